use std::path::Path;

use super::*;
use crate::vfio::{PciAddress, SysfsRoot};

const GIB: u64 = 1 << 10;
const ONE_G: u64 = 1 << 20;
const TWO_M: u64 = 2 << 10;

fn write(root: &Path, relative: &str, text: &str) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("{text}\n")).unwrap();
}

/// Node `id`'s CPUs, its first CPU's hyper-thread sibling list and its pools
/// (`(page kib, total, free)`).
fn node(root: &Path, id: u32, cpus: &str, siblings: &str, pools: &[(u64, u64, u64)]) {
    let dir = format!("devices/system/node/node{id}");
    write(root, &format!("{dir}/cpulist"), cpus);
    let first = cpulist::parse(cpus).unwrap()[0];
    write(root, &format!("devices/system/cpu/cpu{first}/topology/thread_siblings_list"), siblings);
    for &(kib, total, free) in pools {
        write(root, &format!("{dir}/hugepages/hugepages-{kib}kB/nr_hugepages"), &total.to_string());
        write(
            root,
            &format!("{dir}/hugepages/hugepages-{kib}kB/free_hugepages"),
            &free.to_string(),
        );
    }
}

fn host_pools(root: &Path, pools: &[(u64, u64, u64)]) {
    for &(kib, total, free) in pools {
        write(
            root,
            &format!("kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"),
            &total.to_string(),
        );
        write(
            root,
            &format!("kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"),
            &free.to_string(),
        );
    }
}

fn gpu(root: &Path, addr: &str, numa_node: i32) {
    write(root, &format!("bus/pci/devices/{addr}/numa_node"), &numa_node.to_string());
}

/// A one-socket host: CPUs 0-7 (0 and 4 are one core), no huge pages, a GPU whose firmware
/// gives no node (`-1`, as on most one-socket boards).
fn one_node_host() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path(), 0, "0-7", "0,4", &[(TWO_M, 0, 0), (ONE_G, 0, 0)]);
    host_pools(dir.path(), &[(TWO_M, 0, 0), (ONE_G, 0, 0)]);
    gpu(dir.path(), "0000:65:00.0", -1);
    dir
}

const EIGHT_GPUS: [(&str, i32); 8] = [
    ("0000:18:00.0", 0),
    ("0000:2a:00.0", 0),
    ("0000:3a:00.0", 0),
    ("0000:5d:00.0", 0),
    ("0000:9a:00.0", 1),
    ("0000:ab:00.0", 1),
    ("0000:ba:00.0", 1),
    ("0000:db:00.0", 1),
];

/// A two-socket 8-GPU host: node 0 has CPUs 0-7 and their hyper-threads 16-23, node 1 8-15 and
/// 24-31; 64 × 1 GiB pages reserved per node (node 1 with `node1_free` left), four GPUs on
/// each node.
fn two_node_host(node1_free: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path(), 0, "0-7,16-23", "0,16", &[(TWO_M, 0, 0), (ONE_G, 64, 64)]);
    node(dir.path(), 1, "8-15,24-31", "8,24", &[(TWO_M, 0, 0), (ONE_G, 64, node1_free)]);
    host_pools(dir.path(), &[(TWO_M, 0, 0), (ONE_G, 128, 64 + node1_free)]);
    for (addr, n) in EIGHT_GPUS {
        gpu(dir.path(), addr, n);
    }
    dir
}

fn facts(root: &Path) -> HostFacts {
    HostFacts::read(&SysfsRoot::new(root)).unwrap()
}

fn gpu_nodes(root: &Path, addrs: &[&str]) -> Vec<Option<u32>> {
    let sysfs = SysfsRoot::new(root);
    addrs
        .iter()
        .map(|a| host::device_node(&sysfs, &a.parse::<PciAddress>().unwrap()).unwrap())
        .collect()
}

fn shape(vcpus: u32, memory_mib: u64, gpu_nodes: Vec<Option<u32>>) -> VmShape {
    VmShape { vcpus, memory_mib, gpu_nodes }
}

fn range(a: u32, b: u32) -> Vec<u32> {
    (a..=b).collect()
}

#[test]
fn the_facts_are_read_from_sysfs() {
    let host = two_node_host(60);
    let f = facts(host.path());
    let pools = |free| {
        vec![
            HugePool { page_kib: TWO_M, total: 0, free: 0 },
            HugePool { page_kib: ONE_G, total: 64, free },
        ]
    };
    assert_eq!(
        f.nodes,
        vec![
            HostNode {
                id: 0,
                cpus: [range(0, 7), range(16, 23)].concat(),
                first_core: vec![0, 16],
                hugepages: pools(64)
            },
            HostNode {
                id: 1,
                cpus: [range(8, 15), range(24, 31)].concat(),
                first_core: vec![8, 24],
                hugepages: pools(60)
            },
        ]
    );
    assert_eq!(f.hugepages[1], HugePool { page_kib: ONE_G, total: 128, free: 124 });
    let addrs: Vec<&str> = EIGHT_GPUS.iter().map(|g| g.0).collect();
    let nodes = gpu_nodes(host.path(), &addrs);
    assert_eq!(nodes, [0, 0, 0, 0, 1, 1, 1, 1].map(Some).to_vec());
    assert_eq!(gpu_nodes(one_node_host().path(), &["0000:65:00.0"]), vec![None]);
}

#[test]
fn a_host_without_numa_is_one_node_of_its_online_cpus() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "devices/system/cpu/online", "0-3");
    let f = facts(dir.path());
    assert_eq!(
        f.nodes,
        vec![HostNode { id: 0, cpus: range(0, 3), first_core: vec![0], hugepages: vec![] }]
    );
    assert!(f.hugepages.is_empty());
}

#[test]
fn one_node_host_gpu_vm_runs_off_the_hosts_core() {
    let host = one_node_host();
    let vm = shape(4, 8 * GIB, gpu_nodes(host.path(), &["0000:65:00.0"]));
    let t = plan(&facts(host.path()), &Reserved::FirstCoreOfEachNode, &vm).unwrap();
    assert_eq!(
        t,
        Topology {
            sockets: 1,
            cores: 4,
            threads: 1,
            nodes: vec![GuestNode {
                vcpus: vec![0, 1, 2, 3],
                memory_mib: 8 * GIB,
                host_node: Some(0),
                pin: vec![1, 2, 3, 5, 6, 7],
                // No huge pages: normal memory, which VFIO pins (faults in) at start anyway.
                prealloc_threads: None,
            }],
            backing: Backing::Normal,
            io_cpus: vec![0, 4],
        }
    );
}

#[test]
fn eight_gpus_on_two_nodes_make_two_guest_nodes_on_1_gib_pages() {
    let host = two_node_host(64);
    let addrs: Vec<&str> = EIGHT_GPUS.iter().map(|g| g.0).collect();
    let vm = shape(16, 128 * GIB, gpu_nodes(host.path(), &addrs));
    let t = plan(&facts(host.path()), &Reserved::FirstCoreOfEachNode, &vm).unwrap();
    let node0_free = [range(1, 7), range(17, 23)].concat();
    let node1_free = [range(9, 15), range(25, 31)].concat();
    assert_eq!(
        t,
        Topology {
            sockets: 2,
            cores: 8,
            threads: 1,
            nodes: vec![
                GuestNode {
                    vcpus: range(0, 7),
                    memory_mib: 64 * GIB,
                    host_node: Some(0),
                    pin: node0_free,
                    prealloc_threads: Some(14),
                },
                GuestNode {
                    vcpus: range(8, 15),
                    memory_mib: 64 * GIB,
                    host_node: Some(1),
                    pin: node1_free,
                    prealloc_threads: Some(14),
                },
            ],
            backing: Backing::HugePages { page_kib: ONE_G },
            io_cpus: vec![0, 8, 16, 24],
        }
    );
    assert_eq!(t.pin_of(9), t.nodes[1].pin.as_slice());
    assert_eq!(t.vcpus(), 16);
}

#[test]
fn gpus_of_one_node_keep_the_vm_on_that_node() {
    let host = two_node_host(64);
    let vm = shape(6, 32 * GIB, gpu_nodes(host.path(), &["0000:ab:00.0", "0000:db:00.0"]));
    let t = plan(&facts(host.path()), &Reserved::FirstCoreOfEachNode, &vm).unwrap();
    assert_eq!(t.nodes.len(), 1);
    assert_eq!(t.nodes[0].host_node, Some(1));
    assert_eq!((t.sockets, t.cores), (1, 6));
    // Node 1's own reserved core, not node 0's.
    assert_eq!(t.io_cpus, vec![8, 24]);
}

#[test]
fn a_pool_too_small_on_one_node_is_one_sentence_saying_what_to_do() {
    let host = two_node_host(16);
    let addrs: Vec<&str> = EIGHT_GPUS.iter().map(|g| g.0).collect();
    let vm = shape(16, 128 * GIB, gpu_nodes(host.path(), &addrs));
    let err = plan(&facts(host.path()), &Reserved::FirstCoreOfEachNode, &vm).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the 131072 MiB of this VM do not fit in the free huge pages of host nodes 0 and 1 \
         (64 + 16 × 1 GiB free, 0 + 0 × 2 MiB free): ask for at most 32768 MiB, or reserve \
         more huge pages for VMs (install.sh --hugepages-gib)"
    );
    // What the sentence offers fits.
    let smaller = shape(16, 32 * GIB, vm.gpu_nodes.clone());
    plan(&facts(host.path()), &Reserved::FirstCoreOfEachNode, &smaller).unwrap();
}

#[test]
fn two_mib_pages_when_gigabyte_ones_cannot_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path(), 0, "0-3", "0", &[(TWO_M, 2048, 2048), (ONE_G, 2, 2)]);
    host_pools(dir.path(), &[(TWO_M, 2048, 2048), (ONE_G, 2, 2)]);
    gpu(dir.path(), "0000:65:00.0", 0);
    let f = facts(dir.path());
    let gpus = gpu_nodes(dir.path(), &["0000:65:00.0"]);
    let reserved = Reserved::FirstCoreOfEachNode;
    // 2 GiB: 1 GiB pages. 3 GiB: two are all there is, so 2 MiB ones. 1.5 GiB: not whole GiB.
    let backing = |mib| plan(&f, &reserved, &shape(2, mib, gpus.clone())).unwrap().backing;
    assert_eq!(backing(2 * GIB), Backing::HugePages { page_kib: ONE_G });
    assert_eq!(backing(3 * GIB), Backing::HugePages { page_kib: TWO_M });
    assert_eq!(backing(1536), Backing::HugePages { page_kib: TWO_M });
    assert!(plan(&f, &reserved, &shape(2, 5 * GIB, gpus)).is_err());
}

#[test]
fn a_vm_without_gpus_is_placed_by_the_scheduler_on_the_hosts_pages() {
    let host = two_node_host(64);
    let f = facts(host.path());
    let t = plan(&f, &Reserved::FirstCoreOfEachNode, &shape(3, 4 * GIB, vec![])).unwrap();
    let mut expected = Topology::unplaced(3, 4 * GIB);
    expected.backing = Backing::HugePages { page_kib: ONE_G };
    expected.nodes[0].prealloc_threads = Some(3);
    assert_eq!(t, expected);
    let normal =
        plan(&facts(one_node_host().path()), &Reserved::Cpus(vec![]), &shape(3, 512, vec![]));
    assert_eq!(normal.unwrap(), Topology::unplaced(3, 512));
}

#[test]
fn uneven_vcpus_make_one_socket_and_no_reserve_pins_whole_nodes() {
    let host = two_node_host(64);
    let addrs = ["0000:18:00.0", "0000:db:00.0"];
    let vm = shape(5, 4 * GIB, gpu_nodes(host.path(), &addrs));
    let t = plan(&facts(host.path()), &Reserved::Cpus(vec![]), &vm).unwrap();
    assert_eq!((t.sockets, t.cores, t.threads), (1, 5, 1));
    assert_eq!(t.nodes[0].vcpus, vec![0, 1, 2]);
    assert_eq!(t.nodes[1].vcpus, vec![3, 4]);
    assert_eq!(t.nodes[0].pin, [range(0, 7), range(16, 23)].concat());
    // Every CPU of the host holds a vCPU: the other threads run anywhere.
    assert_eq!(t.io_cpus, Vec::<u32>::new());
    // A one-vCPU VM on both nodes' GPUs lives on the first.
    let one = plan(&facts(host.path()), &Reserved::Cpus(vec![]), &shape(1, 2 * GIB, vm.gpu_nodes));
    assert_eq!(one.unwrap().nodes.len(), 1);
}

#[test]
fn a_gpu_on_a_node_sysfs_does_not_list_is_an_error() {
    let host = one_node_host();
    let err =
        plan(&facts(host.path()), &Reserved::FirstCoreOfEachNode, &shape(2, 1024, vec![Some(3)]));
    assert!(matches!(err, Err(TopologyError::NoSuchNode { node: 3 })), "{err:?}");
}
