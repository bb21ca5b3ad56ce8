//! `HostNetwork`: the one owner of the host side of guests' networks. It knows which guests
//! are on the bridge (from their records at start-up, then from each plug and unplug) and
//! makes the kernel match: the bridge and dnsmasq while a VM needs them, the nftables tables
//! replaced whole on every change, taps on the bridge with their limits. With no guest left,
//! nothing of it stays on the host.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::rules::{self, BridgeRules};
use super::subnet::{guest_mac, tap_name};
use super::{GuestNet, NetSettings, NetworkError, dnsmasq, link};

/// A VM's NIC, opened for its QEMU (which gets the descriptors, not the right to make taps).
pub struct TapQueues {
    pub taps: Vec<OwnedFd>,
    /// `/dev/vhost-net`, one per queue; empty where the host has none or it is not wanted.
    pub vhost: Vec<OwnedFd>,
}

/// What is on the agent's bridges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Instance id → its VM's place on the bridge.
    pub vms: BTreeMap<String, GuestNet>,
    /// Ids of the containers on the agent's Docker network.
    pub containers: BTreeSet<String>,
}

impl Members {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.containers.is_empty()
    }
}

/// What `HostNetwork::inspect` finds on the host (for `recover`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub bridge: bool,
    /// The agent's `inet` table.
    pub table: bool,
    pub taps: Vec<String>,
    pub dnsmasq: Option<u32>,
}

/// How often the bridge's dnsmasq is looked at while VMs are on the bridge.
const DNSMASQ_CHECK: Duration = Duration::from_secs(10);

pub struct HostNetwork {
    settings: NetSettings,
    members: Mutex<Members>,
}

impl std::fmt::Debug for HostNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostNetwork").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl HostNetwork {
    pub fn new(settings: NetSettings) -> HostNetwork {
        HostNetwork { settings, members: Mutex::new(Members::default()) }
    }

    pub fn settings(&self) -> &NetSettings {
        &self.settings
    }

    /// A place on the bridge for a new VM: the first address none of `taken` holds.
    pub fn allocate(
        &self,
        taken: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<GuestNet, NetworkError> {
        let s = &self.settings;
        let taken: HashSet<Ipv4Addr> = taken.into_iter().collect();
        let address =
            s.subnet.allocate(&taken).ok_or(NetworkError::Exhausted { subnet: s.subnet })?;
        let tap = tap_name(&s.bridge, &s.subnet, address).expect("an address of the subnet");
        Ok(GuestNet { address, mac: guest_mac(address), tap })
    }

    /// Whether a recorded place is one this host's settings can give (a record from before a
    /// change of subnet or bridge is not).
    pub fn fits(&self, guest: &GuestNet) -> bool {
        let s = &self.settings;
        s.subnet.is_guest(guest.address)
            && tap_name(&s.bridge, &s.subnet, guest.address).as_deref() == Some(guest.tap.as_str())
    }

    /// Start-up and `recover`: exactly `members` are on the bridges. Their rules and DHCP
    /// entries come first, whatever else fails; their taps are left as they are (a running VM
    /// keeps its network) and wired again; every other tap of the bridge goes.
    pub async fn restore(&self, members: Members) -> Result<(), NetworkError> {
        let mut held = self.members.lock().await;
        *held = members;
        self.apply(&held).await?;
        let wanted: HashSet<&str> = held.vms.values().map(|g| g.tap.as_str()).collect();
        for tap in link::taps_of(&self.settings.bridge) {
            if !wanted.contains(tap.as_str()) {
                tracing::info!(%tap, "removing a tap no VM owns");
                link::delete(&tap).await?;
            }
        }
        for guest in held.vms.values().filter(|g| link::exists(&g.tap)) {
            self.wire(&guest.tap).await?;
        }
        Ok(())
    }

    /// A tap on the bridge, isolated and up, with its limits.
    async fn wire(&self, tap: &str) -> Result<(), NetworkError> {
        link::attach(tap, &self.settings.bridge).await?;
        link::limit(tap, self.settings.bandwidth_mbit).await
    }

    /// Puts a new VM on the bridge: its rules and DHCP entry first, then its tap, opened with
    /// `queues` queues for QEMU. The tap goes when QEMU (or, on failure, this) closes it.
    pub async fn plug_vm(
        &self,
        id: &str,
        guest: &GuestNet,
        queues: usize,
        vhost: bool,
    ) -> Result<TapQueues, NetworkError> {
        let mut held = self.members.lock().await;
        held.vms.insert(id.to_owned(), guest.clone());
        self.apply(&held).await?;
        // A tap left by a QEMU that has not finished exiting would be joined, not made.
        if link::exists(&guest.tap) {
            link::delete(&guest.tap).await?;
        }
        let taps = link::open_tap(&guest.tap, queues)?;
        self.wire(&guest.tap).await?;
        let vhost = if vhost { link::open_vhost(queues).unwrap_or_default() } else { Vec::new() };
        Ok(TapQueues { taps, vhost })
    }

    /// A running VM found after an agent restart: its rules and DHCP entry, and its tap back
    /// on the bridge with its limits if something took it off.
    pub async fn adopt_vm(&self, id: &str, guest: &GuestNet) -> Result<(), NetworkError> {
        let mut held = self.members.lock().await;
        let changed = held.vms.insert(id.to_owned(), guest.clone()).as_ref() != Some(guest);
        if changed {
            self.apply(&held).await?;
        }
        if link::exists(&guest.tap) {
            self.wire(&guest.tap).await?;
        }
        Ok(())
    }

    /// Takes a VM off the bridge once its QEMU is gone: its tap (if still there), its DHCP
    /// entry and its rules; with the last guest, the bridge, dnsmasq and the tables.
    pub async fn unplug_vm(&self, id: &str) -> Result<(), NetworkError> {
        let mut held = self.members.lock().await;
        let Some(guest) = held.vms.get(id).cloned() else { return Ok(()) };
        link::delete(&guest.tap).await?;
        let mut left = held.clone();
        left.vms.remove(id);
        self.apply(&left).await?;
        link::forget_connections(guest.address).await?;
        // Only now: a failure above is retried by the next teardown.
        *held = left;
        Ok(())
    }

    /// Puts a container on the agent's Docker network under the rules (before it starts).
    pub async fn plug_container(&self, id: &str) -> Result<(), NetworkError> {
        let mut held = self.members.lock().await;
        if held.containers.insert(id.to_owned()) {
            self.apply(&held).await?;
        }
        Ok(())
    }

    /// A container is gone; with the last guest the tables go.
    pub async fn unplug_container(&self, id: &str) -> Result<(), NetworkError> {
        let mut held = self.members.lock().await;
        if held.containers.remove(id) {
            self.apply(&held).await?;
        }
        Ok(())
    }

    /// Keeps the bridge's dnsmasq running while VMs are on it: one that died (killed, out of
    /// memory) is started again, so guests keep their resolver. Runs for the agent's life.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(DNSMASQ_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held = self.members.lock().await;
            let files = dnsmasq::DnsmasqFiles::new(&self.settings.run_dir);
            if held.vms.is_empty() || dnsmasq::find(&files).is_some() {
                continue;
            }
            tracing::warn!(bridge = %self.settings.bridge, "the guests' dnsmasq is gone: starting it again");
            let guests: Vec<GuestNet> = held.vms.values().cloned().collect();
            if let Err(e) = dnsmasq::ensure(&self.settings, &guests).await {
                tracing::error!(error = %e, "cannot start the guests' dnsmasq");
            }
        }
    }

    /// What of the agent's network is on the host now.
    pub async fn inspect(&self) -> Found {
        let files = dnsmasq::DnsmasqFiles::new(&self.settings.run_dir);
        Found {
            bridge: link::exists(&self.settings.bridge),
            table: link::table_exists(&self.settings.table()).await,
            taps: link::taps_of(&self.settings.bridge),
            dnsmasq: dnsmasq::find(&files),
        }
    }

    /// The tables' rules for `members`.
    pub fn rules(&self, members: &Members) -> Vec<BridgeRules> {
        let s = &self.settings;
        let mut bridges = Vec::new();
        if !members.vms.is_empty() {
            bridges.push(BridgeRules {
                bridge: s.bridge.clone(),
                subnet: s.subnet,
                host_services: true,
                guests: members.vms.values().cloned().collect(),
                conntrack_limit: s.conntrack_limit,
                bandwidth_mbit: s.bandwidth_mbit,
            });
        }
        if !members.containers.is_empty() {
            bridges.push(BridgeRules {
                bridge: s.container_bridge.clone(),
                subnet: s.container_subnet,
                host_services: false,
                guests: Vec::new(),
                conntrack_limit: s.conntrack_limit,
                bandwidth_mbit: None,
            });
        }
        bridges
    }

    /// Makes the host match `members`. The rules come first when guests arrive (no guest
    /// packet before its rules) and last when they go.
    async fn apply(&self, members: &Members) -> Result<(), NetworkError> {
        let s = &self.settings;
        let script = rules::ruleset(&s.table(), &self.rules(members), &s.blocked);
        link::nft(&script).await?;
        if !members.is_empty() {
            link::enable_forwarding()?;
        }
        let files = dnsmasq::DnsmasqFiles::new(&s.run_dir);
        if members.vms.is_empty() {
            dnsmasq::stop(&files).await;
            link::delete(&s.bridge).await?;
            return Ok(());
        }
        link::ensure_bridge(&s.bridge, &s.subnet).await?;
        let guests: Vec<GuestNet> = members.vms.values().cloned().collect();
        dnsmasq::ensure(s, &guests).await
    }
}
