//! Where a VM's vCPUs and memory live on the host: a pure plan from host facts ([`HostFacts`],
//! read from sysfs by `host`) and the VM's shape.
//!
//! A VM with GPUs runs on its GPUs' NUMA nodes: one guest node per host node, its memory bound
//! there (`host-nodes=…,policy=bind`), its vCPU threads pinned to that node's CPUs less those
//! reserved for the host, and QEMU's other threads (main loop, I/O thread) on the reserved
//! ones, so a GPU's DMA and the guest's memory never cross the host's interconnect and the
//! disk's work never takes a vCPU's time. A VM without GPUs is one guest node that the
//! host's scheduler places: nothing ties it to a node, and pinning many small VMs by hand
//! only does the scheduler's job worse.
//!
//! Memory comes from huge pages when the host has a pool (1 GiB pages first, then 2 MiB), and a
//! VM the pool cannot hold is refused: the operator reserved that memory for VMs, so normal
//! memory is what the host kept for itself.

pub mod cpulist;
pub mod host;

use std::path::PathBuf;

/// One NUMA node of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNode {
    pub id: u32,
    pub cpus: Vec<u32>,
    /// Its first CPU and that CPU's hyper-threads: what the host keeps by default.
    pub first_core: Vec<u32>,
    /// The node's own huge page pools, smallest page first.
    pub hugepages: Vec<HugePool>,
}

/// A pool of huge pages of one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePool {
    pub page_kib: u64,
    pub total: u64,
    pub free: u64,
}

/// What the host has, as sysfs says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub nodes: Vec<HostNode>,
    /// The host-wide pools (`kernel/mm/hugepages`), smallest page first.
    pub hugepages: Vec<HugePool>,
}

/// The CPUs QEMU's threads other than vCPUs (and the host itself) keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// The first core of each node (CPU and hyper-threads): one core per node holds the
    /// host's interrupts and housekeeping, the agent, and QEMU's main loops and I/O threads
    /// near the node's devices, at the cost of one core in every node's count.
    FirstCoreOfEachNode,
    /// These CPUs (`QUDATA_HOST_RESERVED_CPUS`; empty: none).
    Cpus(Vec<u32>),
}

/// The VM being placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The NUMA node of each of its GPUs (`None`: the firmware does not say); empty: no GPU.
    pub gpu_nodes: Vec<Option<u32>>,
}

/// How the guest's memory is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Normal memory (`memory-backend-memfd`).
    Normal,
    /// Huge pages of `page_kib` (`memory-backend-memfd,hugetlb=on`).
    HugePages { page_kib: u64 },
}

/// One NUMA node of the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNode {
    /// Guest CPU indices, contiguous.
    pub vcpus: Vec<u32>,
    pub memory_mib: u64,
    /// The host node its memory is bound to; `None`: wherever the kernel puts it.
    pub host_node: Option<u32>,
    /// Host CPUs its vCPU threads are pinned to; empty: not pinned.
    pub pin: Vec<u32>,
    /// Threads that fault its memory in before the guest runs; `None`: no preallocation.
    pub prealloc_threads: Option<u32>,
}

/// Where a VM lives on the host, and what the guest sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    pub nodes: Vec<GuestNode>,
    pub backing: Backing,
    /// Host CPUs of QEMU's other threads (main loop, I/O thread, workers); empty: anywhere.
    pub io_cpus: Vec<u32>,
}

impl Topology {
    /// One guest node of normal memory, nothing pinned: a VM the host's scheduler places.
    pub fn unplaced(vcpus: u32, memory_mib: u64) -> Topology {
        Topology {
            sockets: 1,
            cores: vcpus,
            threads: 1,
            nodes: vec![GuestNode {
                vcpus: (0..vcpus).collect(),
                memory_mib,
                host_node: None,
                pin: Vec::new(),
                prealloc_threads: None,
            }],
            backing: Backing::Normal,
            io_cpus: Vec::new(),
        }
    }

    pub fn vcpus(&self) -> u32 {
        self.nodes.iter().map(|n| n.vcpus.len() as u32).sum()
    }

    /// Host CPUs the vCPU `index`'s thread is pinned to; empty: not pinned.
    pub fn pin_of(&self, index: u32) -> &[u32] {
        let node = self.nodes.iter().find(|n| n.vcpus.contains(&index));
        node.map_or(&[], |n| &n.pin)
    }
}

/// Why a VM cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The pool is too small: the one sentence a refused create carries.
    #[error(
        "the {memory_mib} MiB of this VM do not fit in the free huge pages {place} \
         ({free}): ask for at most {fits_mib} MiB, or reserve more huge pages for VMs \
         (install.sh --hugepages-gib)"
    )]
    HugePagesShort { memory_mib: u64, place: String, free: String, fits_mib: u64 },
    #[error("{path} says {text:?}, which is not what the kernel writes there")]
    Malformed { path: PathBuf, text: String },
    #[error("a GPU is on NUMA node {node}, which the host's sysfs does not list")]
    NoSuchNode { node: u32 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Plans `vm` on the host of `facts`.
pub fn plan(
    facts: &HostFacts,
    reserved: &Reserved,
    vm: &VmShape,
) -> Result<Topology, TopologyError> {
    let placed = host_nodes(facts, vm)?;
    let mut topology = Topology::unplaced(vm.vcpus, vm.memory_mib);
    if !placed.is_empty() {
        let reserved = reserved_cpus(facts, reserved);
        topology = spread(vm, &placed, &reserved);
        topology.io_cpus = io_cpus(facts, &placed, &reserved, &topology);
    }
    place_memory(facts, vm, &mut topology)?;
    Ok(topology)
}

/// The host nodes of the VM's GPUs, in order; empty without GPUs. A GPU whose node the
/// firmware does not give is on the only node of a one-node host, and anywhere otherwise.
fn host_nodes<'a>(facts: &'a HostFacts, vm: &VmShape) -> Result<Vec<&'a HostNode>, TopologyError> {
    let only = (facts.nodes.len() == 1).then(|| facts.nodes[0].id);
    let mut ids: Vec<u32> = vm.gpu_nodes.iter().filter_map(|n| n.or(only)).collect();
    ids.sort_unstable();
    ids.dedup();
    // Every guest node needs a vCPU: a 1-vCPU VM on GPUs of two nodes lives on the first.
    ids.truncate(vm.vcpus.max(1) as usize);
    ids.iter()
        .map(|&id| {
            facts.nodes.iter().find(|n| n.id == id).ok_or(TopologyError::NoSuchNode { node: id })
        })
        .collect()
}

fn reserved_cpus(facts: &HostFacts, reserved: &Reserved) -> Vec<u32> {
    match reserved {
        Reserved::FirstCoreOfEachNode => {
            let mut cpus: Vec<u32> =
                facts.nodes.iter().flat_map(|n| n.first_core.iter().copied()).collect();
            cpus.sort_unstable();
            cpus
        }
        Reserved::Cpus(cpus) => cpus.clone(),
    }
}

/// vCPUs and memory shared out evenly over `placed` (the first nodes take a remainder of
/// vCPUs), each node's vCPUs pinned to its CPUs less the reserved ones (all of them where
/// that leaves none). The guest sees a socket per node when the vCPUs divide evenly, one
/// socket otherwise (QEMU wants equal sockets); never hyper-threads, since a vCPU may run
/// on any CPU of its set, not on a fixed sibling.
fn spread(vm: &VmShape, placed: &[&HostNode], reserved: &[u32]) -> Topology {
    let n = placed.len() as u32;
    let even = vm.vcpus.is_multiple_of(n);
    let (sockets, cores) = if even { (n, vm.vcpus / n) } else { (1, vm.vcpus) };
    let mut first_vcpu = 0;
    let mut nodes = Vec::new();
    for (i, host) in placed.iter().enumerate() {
        let i = i as u32;
        let count = vm.vcpus / n + u32::from(i < vm.vcpus % n);
        let free: Vec<u32> = host.cpus.iter().copied().filter(|c| !reserved.contains(c)).collect();
        nodes.push(GuestNode {
            vcpus: (first_vcpu..first_vcpu + count).collect(),
            memory_mib: 0,
            host_node: Some(host.id),
            pin: if free.is_empty() { host.cpus.clone() } else { free },
            prealloc_threads: None,
        });
        first_vcpu += count;
    }
    Topology { sockets, cores, threads: 1, nodes, backing: Backing::Normal, io_cpus: Vec::new() }
}

/// The reserved CPUs of the VM's nodes; else every reserved CPU; else any CPU no vCPU of this
/// VM is pinned to; else anywhere.
fn io_cpus(facts: &HostFacts, placed: &[&HostNode], reserved: &[u32], t: &Topology) -> Vec<u32> {
    let local: Vec<u32> =
        reserved.iter().copied().filter(|c| placed.iter().any(|n| n.cpus.contains(c))).collect();
    if !local.is_empty() {
        return local;
    }
    if !reserved.is_empty() {
        return reserved.to_vec();
    }
    let mut rest: Vec<u32> = facts
        .nodes
        .iter()
        .flat_map(|n| n.cpus.iter().copied())
        .filter(|c| !t.nodes.iter().any(|g| g.pin.contains(c)))
        .collect();
    rest.sort_unstable();
    rest
}

const PREFERRED_PAGES_KIB: [u64; 2] = [1 << 20, 2 << 10];

/// Shares the memory out over the guest's nodes and picks its backing: the largest huge page
/// (1 GiB, then 2 MiB) whose pools hold every node's share, normal memory where the host has
/// no huge pages at all, or a refusal.
fn place_memory(facts: &HostFacts, vm: &VmShape, t: &mut Topology) -> Result<(), TopologyError> {
    let pools_of = |node: Option<u32>| -> &[HugePool] {
        match node.and_then(|id| facts.nodes.iter().find(|n| n.id == id)) {
            Some(n) => &n.hugepages,
            None => &facts.hugepages,
        }
    };
    let reserved_any = t.nodes.iter().any(|g| pools_of(g.host_node).iter().any(|p| p.total > 0));
    if !reserved_any {
        share(t, vm.memory_mib, 1);
        return Ok(());
    }
    for page_kib in PREFERRED_PAGES_KIB {
        let page_mib = page_kib >> 10;
        if !vm.memory_mib.is_multiple_of(page_mib) {
            continue;
        }
        share(t, vm.memory_mib, page_mib);
        let fits = t.nodes.iter().all(|g| {
            let free = free_pages(pools_of(g.host_node), page_kib);
            g.memory_mib / page_mib <= free
        });
        if fits {
            t.backing = Backing::HugePages { page_kib };
            for g in &mut t.nodes {
                // Faulted in before the guest runs, by as many threads as the node's vCPUs
                // may use: the guest then never waits on the kernel zeroing a page.
                let cpus = if g.pin.is_empty() { vm.vcpus } else { g.pin.len() as u32 };
                g.prealloc_threads = Some(cpus.max(1));
            }
            return Ok(());
        }
    }
    Err(short(vm, t, pools_of))
}

/// `memory_mib` shared out in multiples of `unit_mib`, the last node taking the rest.
fn share(t: &mut Topology, memory_mib: u64, unit_mib: u64) {
    let n = t.nodes.len() as u64;
    let each = memory_mib / n / unit_mib * unit_mib;
    let last = t.nodes.len() - 1;
    for (i, g) in t.nodes.iter_mut().enumerate() {
        g.memory_mib = if i == last { memory_mib - each * (n - 1) } else { each };
    }
}

fn free_pages(pools: &[HugePool], page_kib: u64) -> u64 {
    pools.iter().find(|p| p.page_kib == page_kib).map_or(0, |p| p.free)
}

/// The refusal: where the pool is short, what is free there, and the most that would fit.
fn short<'a>(
    vm: &VmShape,
    t: &Topology,
    pools_of: impl Fn(Option<u32>) -> &'a [HugePool],
) -> TopologyError {
    let nodes: Vec<Option<u32>> = t.nodes.iter().map(|g| g.host_node).collect();
    let place = match nodes.as_slice() {
        [None] => "of the host".to_owned(),
        [Some(one)] => format!("of host node {one}"),
        many => {
            let ids: Vec<String> = many.iter().flatten().map(u32::to_string).collect();
            format!("of host nodes {}", ids.join(" and "))
        }
    };
    let mut free = Vec::new();
    let mut fits_mib = 0;
    for page_kib in PREFERRED_PAGES_KIB {
        let per_node: Vec<u64> = nodes.iter().map(|&n| free_pages(pools_of(n), page_kib)).collect();
        let counts: Vec<String> = per_node.iter().map(u64::to_string).collect();
        free.push(format!("{} × {} free", counts.join(" + "), page_name(page_kib)));
        // The guest's memory is shared out evenly, so the smallest node bounds it.
        let least = per_node.iter().copied().min().unwrap_or(0);
        fits_mib = fits_mib.max(least * (page_kib >> 10) * nodes.len() as u64);
    }
    TopologyError::HugePagesShort {
        memory_mib: vm.memory_mib,
        place,
        free: free.join(", "),
        fits_mib,
    }
}

fn page_name(page_kib: u64) -> String {
    if page_kib >= 1 << 20 {
        format!("{} GiB", page_kib >> 20)
    } else {
        format!("{} MiB", page_kib >> 10)
    }
}

#[cfg(test)]
mod tests;
