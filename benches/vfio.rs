//! VFIO figures: a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench vfio` measures:
//! - the scan of `/proc/*/fd` for holders of `/dev/nvidia*` on this machine's real `/proc`
//!   (it runs on every create with GPUs, on the NVIDIA driver's GPUs);
//! - `Vfio::plan` (every refusal check, reading only) for 8 GPUs on a simulated sysfs;
//! - bind + release of 8 GPUs against the simulated kernel (its 2 ms polling dominates: this is
//!   the agent's own overhead plus the simulator's reaction time, not a kernel's); a release
//!   now resets each GPU on vfio-pci first;
//! - reset + check of one GPU on vfio-pci (the `reset` write and the config-space read; a real
//!   FLR adds the device's own time, about 100 ms by the PCIe spec's wait after it).
//!
//! `QUDATA_BENCH_ROUNDS` sets the rounds (default 20).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use qudata_agent::vfio::{PciAddress, Timeouts, Vfio, host};
use support::kernel::SimKernel;
use support::sysfs::{CLASS_3D, FakeSysfs};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(rounds: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("vfio benchmark: skipped (run it with `cargo bench --bench vfio`)");
        return;
    }
    let rounds: usize =
        std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);

    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();
    let scan = time(rounds, || {
        let found = host::holders(Path::new("/proc"), |n| host::is_gpu_node(n, None));
        assert!(found.is_empty(), "this machine has no GPU: {found:?}");
    });
    println!("holder scan of /proc: {scan:?} median for {processes} processes");

    let mut fake = FakeSysfs::new().driver_available("vfio-pci");
    let mut gpus: Vec<PciAddress> = Vec::new();
    for i in 0..8u32 {
        let address = format!("0000:{:02x}:00.0", 0x18 + i * 0x10);
        fake = fake
            .device(&address, 0x10de, 0x2330, CLASS_3D)
            .driver("nvidia")
            .group(100 + i)
            .bars(&[(0, 16 << 20, false), (1, 128 << 30, true), (3, 32 << 20, true)])
            .resettable("flr bus");
        gpus.push(address.parse().unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("proc")).unwrap();
    let vfio = Vfio {
        sysfs: fake.root(),
        proc_root: dir.path().join("proc"),
        record_dir: dir.path().join("vfio"),
        quarantine: qudata_agent::vfio::Quarantine::new(&dir.path().join("data")),
        timeouts: Timeouts { write: Duration::from_secs(5), settle: Duration::from_secs(5) },
    };
    let plan = time(rounds, || {
        vfio.plan(None, &gpus).unwrap();
    });
    println!("plan (every check) for 8 GPUs: {plan:?} median");

    let _kernel = SimKernel::start(&fake, &[]);
    let (mut binds, mut releases) = (Vec::new(), Vec::new());
    for _ in 0..rounds.min(10) {
        let start = Instant::now();
        vfio.bind("bench", &gpus).unwrap();
        binds.push(start.elapsed());
        let start = Instant::now();
        assert!(vfio.release("bench").unwrap().iter().all(|o| o.is_ok()));
        releases.push(start.elapsed());
    }
    println!(
        "8 GPUs against the simulated kernel: bind {:?}, release with resets {:?} (medians)",
        median(binds),
        median(releases)
    );

    vfio.bind("bench", &gpus).unwrap();
    let mut next = 0;
    let reset = time(rounds, || {
        let gpu = &gpus[next % gpus.len()];
        next += 1;
        let done = vfio.reset_slot(std::slice::from_ref(gpu)).unwrap();
        assert_eq!(done.len(), 1);
    });
    println!("reset + check of one GPU on vfio-pci: {reset:?} median");
    assert!(vfio.release("bench").unwrap().iter().all(|o| o.is_ok() && !o.quarantined));
    assert!(vfio.quarantine.load().unwrap().gpus.is_empty());
}
