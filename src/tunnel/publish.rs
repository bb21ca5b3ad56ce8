//! `Tunnels`: the one object the agent holds. Writes frpc's files, keeps frpc supervised,
//! and publishes instance ports by include file + admin reload (never a restart).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::admin::AdminClient;
use super::config::{self, FrpCredentials, InstanceTunnels};
use super::credentials::MissingCredentials;
use super::mainfile;
use super::supervisor::{Backoff, Started, Supervisor, SupervisorOptions};
use super::{TunnelError, validate};
use crate::fsutil;

/// Where frpc and its files live, and who this agent is.
#[derive(Clone, Debug)]
pub struct TunnelSettings {
    pub frpc_binary: PathBuf,
    /// The main file; includes go in `frpc.d/` beside it.
    pub config_path: PathBuf,
    pub run_dir: PathBuf,
    pub agent_id: String,
    pub agent_port: u16,
    pub backoff: Backoff,
    /// How long a publish waits for its proxies to be `running`.
    pub ready_timeout: Duration,
}

impl TunnelSettings {
    /// Production settings from the agent's configuration.
    pub fn new(cfg: &crate::config::Config, agent_id: &str, agent_port: u16) -> TunnelSettings {
        TunnelSettings {
            frpc_binary: cfg.frpc_binary.clone(),
            config_path: cfg.frpc_config.clone(),
            run_dir: cfg.run_dir.clone(),
            agent_id: agent_id.to_owned(),
            agent_port,
            backoff: Backoff::PRODUCTION,
            ready_timeout: Duration::from_secs(15),
        }
    }
}

/// The result of publishing one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortOutcome {
    pub container_port: u16,
    pub remote_port: u16,
    pub proxy: String,
    /// None: `running` on the FRP server. Some: why not (e.g. the server refused the port).
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub ports: Vec<PortOutcome>,
}

impl PublishReport {
    /// Guest port → error, for the ports that are not published.
    pub fn errors(&self) -> BTreeMap<u16, String> {
        let failed = self.ports.iter().filter_map(|p| Some((p.container_port, p.error.clone()?)));
        failed.collect()
    }
}

struct Active {
    supervisor: Supervisor,
    admin: AdminClient,
}

#[derive(Default)]
struct Inner {
    active: Option<Active>,
    instances: BTreeMap<String, InstanceTunnels>,
}

/// The agent's tunnels. Methods serialise on one lock: each config change is write + reload.
pub struct Tunnels {
    settings: TunnelSettings,
    inner: tokio::sync::Mutex<Inner>,
}

const OFF: &str = "tunnels are off on this host (no FRP credentials)";

impl Tunnels {
    /// Writes the main file, then adopts the frpc an earlier agent left running or starts one.
    /// Without credentials nothing is started and the log says why, in one line. Err: bad
    /// values, files that cannot be written, or no frpc binary. An frpc that is slow to answer
    /// is only logged: it stays supervised and each `publish` waits for it again.
    pub async fn start(
        settings: TunnelSettings,
        creds: Result<FrpCredentials, MissingCredentials>,
    ) -> Result<Tunnels, TunnelError> {
        let tunnels = Tunnels { settings, inner: Default::default() };
        match creds {
            Ok(creds) => match tunnels.set_credentials(creds).await {
                Err(e @ (TunnelError::NotReady { .. } | TunnelError::Admin(_))) => {
                    tracing::warn!(error = %e, "frpc is supervised but not ready yet");
                }
                other => other?,
            },
            Err(why) => tracing::warn!("{why}"),
        }
        Ok(tunnels)
    }

    /// Applies (new) credentials: rewrites the main file and restarts frpc only if it changed.
    pub async fn set_credentials(&self, creds: FrpCredentials) -> Result<(), TunnelError> {
        let s = &self.settings;
        if !validate::is_subdomain(&creds.subdomain) {
            let value = creds.subdomain.clone();
            let hint = "use a DNS label: letters, digits, '-'";
            return Err(TunnelError::Invalid { what: "subdomain".into(), value, hint });
        }
        let mut inner = self.inner.lock().await;
        let (main, changed) = mainfile::write(&self.settings, &creds, None)?;
        let client = AdminClient::new(&main.web_server);
        match inner.active.as_mut() {
            Some(active) => {
                if changed {
                    tracing::info!("frpc main config changed; restarting frpc");
                    active.supervisor.restart().await;
                }
                active.admin = client;
            }
            None => {
                let opts = SupervisorOptions {
                    binary: s.frpc_binary.clone(),
                    config: s.config_path.clone(),
                    run_dir: s.run_dir.clone(),
                    backoff: s.backoff,
                };
                let (supervisor, started) = Supervisor::start(opts).await?;
                if matches!(started, Started::Adopted(_)) && changed {
                    tracing::info!("frpc config changed while the agent was down; restarting frpc");
                    supervisor.restart().await;
                }
                inner.active = Some(Active { supervisor, admin: client });
            }
        }
        let active = inner.active.as_mut().expect("set above");
        if let Err(e) = super::wait::admin_up(&active.admin, s.ready_timeout).await {
            // Its admin port may have been taken by another program, or an adopted frpc may be
            // wedged: a fresh port and password and one restart settle both.
            tracing::warn!(error = %e, "frpc's admin API does not answer; restarting frpc on a new admin port");
            let (main, _) =
                mainfile::write(&self.settings, &creds, Some(mainfile::random_admin()))?;
            active.admin = AdminClient::new(&main.web_server);
            active.supervisor.restart().await;
            super::wait::admin_up(&active.admin, s.ready_timeout).await?;
        }
        // An adopted frpc may hold includes of another moment: make it read the disk now.
        active.admin.reload().await?;
        let agent = config::agent_proxy_name(&s.agent_id);
        let states =
            super::wait::running(&active.admin, std::slice::from_ref(&agent), s.ready_timeout)
                .await;
        if let Some(Err(why)) = states.get(&agent) {
            tracing::warn!(proxy = %agent, "the agent's own tunnel is not up: {why}");
        }
        Ok(())
    }
}

impl Tunnels {
    /// Publishes (or re-publishes) every port of an instance: writes its include file, reloads
    /// frpc, and waits for each proxy. A port the server refuses is reported in the answer, the
    /// others stay published. Err: invalid values, a file that cannot be written, or frpc's
    /// admin API refusing the reload.
    pub async fn publish(&self, tunnels: &InstanceTunnels) -> Result<PublishReport, TunnelError> {
        let s = &self.settings;
        validate::validate_instance(&s.agent_id, tunnels)?;
        if let Some(p) = tunnels.ports.iter().find(|p| p.local.port() == 0) {
            let value = format!("0 (guest port {})", p.container_port);
            let hint = "allocate a host port before publishing";
            return Err(TunnelError::Invalid { what: "host port".into(), value, hint });
        }
        let mut inner = self.inner.lock().await;
        let include = config::include_config(&s.agent_id, tunnels);
        let path = config::include_path(&s.config_path, &tunnels.instance_id);
        fsutil::ensure_private_dir(&config::include_dir(&s.config_path))?;
        fsutil::write_atomic(&path, config::render(&include)?.as_bytes())?;
        inner.instances.insert(tunnels.instance_id.clone(), tunnels.clone());
        let names: Vec<String> = include.proxies.iter().map(|p| p.name.clone()).collect();
        let states = match inner.active.as_ref() {
            None => names.iter().map(|n| (n.clone(), Err(OFF.to_owned()))).collect(),
            Some(active) => {
                // frpc may be between a crash and its restart: give it the same deadline.
                super::wait::admin_up(&active.admin, s.ready_timeout).await?;
                active.admin.reload().await?;
                super::wait::running(&active.admin, &names, s.ready_timeout).await
            }
        };
        let ports = tunnels
            .ports
            .iter()
            .zip(names)
            .map(|(p, proxy)| {
                let error = states.get(&proxy).and_then(|r| r.clone().err());
                PortOutcome {
                    container_port: p.container_port,
                    remote_port: p.remote_port,
                    proxy,
                    error,
                }
            })
            .collect();
        Ok(PublishReport { ports })
    }

    /// Withdraws every port of an instance (include file removed, then reload). Idempotent.
    pub async fn unpublish(&self, instance_id: &str) -> Result<(), TunnelError> {
        let s = &self.settings;
        let mut inner = self.inner.lock().await;
        inner.instances.remove(instance_id);
        let path = config::include_path(&s.config_path, instance_id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(fsutil::FsError::Write { path, source }.into()),
        }
        if let Some(active) = inner.active.as_ref() {
            super::wait::admin_up(&active.admin, s.ready_timeout).await?;
            active.admin.reload().await?;
        }
        Ok(())
    }

    /// Guest port → why it is not published, as frpc reports it now (the last publish's view
    /// when frpc cannot be asked). Empty when every port is `running`.
    pub async fn proxy_errors(&self, instance_id: &str) -> BTreeMap<u16, String> {
        let s = &self.settings;
        let inner = self.inner.lock().await;
        let Some(tunnels) = inner.instances.get(instance_id) else { return BTreeMap::new() };
        let status = match inner.active.as_ref() {
            Some(active) => active.admin.status().await.map_err(|e| e.to_string()),
            None => Err(OFF.to_owned()),
        };
        let mut out = BTreeMap::new();
        for p in &tunnels.ports {
            let name = config::proxy_name(&s.agent_id, instance_id, p.container_port);
            let error = match &status {
                Err(e) => Some(e.clone()),
                Ok(all) => super::wait::proxy_error(all.get(&name)),
            };
            if let Some(e) = error {
                out.insert(p.container_port, e);
            }
        }
        out
    }

    /// Instance ids that have an include file on disk (for recovery: an id with no record is
    /// an orphan to `unpublish`).
    pub fn published_ids(&self) -> Vec<String> {
        let dir = config::include_dir(&self.settings.config_path);
        let mut ids: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".toml").map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }

    /// The agent id its proxy names start with.
    pub fn agent_id(&self) -> &str {
        &self.settings.agent_id
    }

    /// The frpc pid now, if one runs.
    pub async fn frpc_pid(&self) -> Option<u32> {
        self.inner.lock().await.active.as_ref().and_then(|a| a.supervisor.pid())
    }

    /// Unexpected frpc exits restarted so far.
    pub async fn frpc_restarts(&self) -> u64 {
        self.inner.lock().await.active.as_ref().map_or(0, |a| a.supervisor.restarts())
    }

    /// The admin API client (tests and diagnostics).
    pub async fn admin(&self) -> Option<AdminClient> {
        self.inner.lock().await.active.as_ref().map(|a| a.admin.clone())
    }

    /// Stops frpc for good (host teardown / uninstall). Dropping `Tunnels` instead leaves frpc
    /// running for the next agent to adopt.
    pub async fn teardown(self) {
        if let Some(active) = self.inner.into_inner().active {
            active.supervisor.shutdown().await;
        }
    }
}
