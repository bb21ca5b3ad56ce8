//! The fake `libnvidia-ml.so.1` (tests/support/fake_nvml/fake_nvml.c), built with gcc once per
//! test process, and the file that sets its values.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Path of the built library.
pub fn fake_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let source =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_nvml/fake_nvml.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-nvml");
        std::fs::create_dir_all(&dir).unwrap();
        // Built under a private name, then renamed: test processes (a bench, a second run) may
        // build it at the same time.
        let tmp = dir.join(format!("build-{}.so", std::process::id()));
        let out = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&tmp)
            .arg(&source)
            .output()
            .expect("run gcc");
        assert!(out.status.success(), "gcc failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let lib = dir.join("libnvidia-ml.so.1");
        std::fs::rename(&tmp, &lib).unwrap();
        lib
    })
    .clone()
}

/// One fake GPU.
#[derive(Clone, Debug)]
pub struct FakeGpu {
    pub name: &'static str,
    pub total_mib: u64,
    pub used_mib: u64,
    pub util: u32,
    pub temp: u32,
    /// `None`: the GPU does not report power (NVML_ERROR_NOT_SUPPORTED).
    pub power_mw: Option<u32>,
}

/// The fake driver's state, written to a file the library reads.
#[derive(Clone, Debug, Default)]
pub struct FakeDriver {
    pub fail_init: bool,
    /// NVML's encoding: 12040 is CUDA 12.4.
    pub cuda: i32,
    pub gpus: Vec<FakeGpu>,
    /// Per GPU index: PCI bus (decimal), retired pages pending, row remap pending, row remap
    /// failure. GPUs not listed: bus 16 + index, all clear.
    pub health: Vec<(usize, u32, bool, bool, bool)>,
    /// Per GPU index: PCIe link, ECC mode and power limit. GPUs not listed support none.
    pub links: Vec<(usize, FakeLink)>,
}

/// What `nvmlDeviceGetCurrPcieLinkGeneration` and friends answer; `None`: not supported.
#[derive(Clone, Copy, Debug, Default)]
pub struct FakeLink {
    pub gen_current: Option<u32>,
    pub gen_max: Option<u32>,
    pub width_current: Option<u32>,
    pub width_max: Option<u32>,
    pub ecc: Option<bool>,
    pub power_limit_mw: Option<u32>,
}

impl FakeLink {
    /// An H100 SXM as it usually reports: gen 5 x16, ECC on, 700 W.
    pub fn h100() -> FakeLink {
        FakeLink {
            gen_current: Some(5),
            gen_max: Some(5),
            width_current: Some(16),
            width_max: Some(16),
            ecc: Some(true),
            power_limit_mw: Some(700_000),
        }
    }
}

impl FakeDriver {
    /// Writes the state to `path` (atomically: the agent may be reading it).
    pub fn write(&self, path: &Path) {
        let mut text = String::new();
        if self.fail_init {
            text.push_str("fail_init\n");
        }
        text.push_str(&format!("cuda {}\ndriver 550.54.15\n", self.cuda));
        for g in &self.gpus {
            let power = g.power_mw.map_or(-1, i64::from);
            text.push_str(&format!(
                "gpu {} {} {} {} {} {}\n",
                g.total_mib, g.used_mib, g.util, g.temp, power, g.name
            ));
        }
        for &(index, bus, retire, pending, failure) in &self.health {
            let flag = |b: bool| u8::from(b);
            text.push_str(&format!(
                "health {index} {bus} {} {} {}\n",
                flag(retire),
                flag(pending),
                flag(failure)
            ));
        }
        for (index, l) in &self.links {
            let v = |x: Option<u32>| x.map_or(-1, i64::from);
            let ecc = l.ecc.map_or(-1, i64::from);
            text.push_str(&format!(
                "link {index} {} {} {} {} {ecc} {}\n",
                v(l.gen_current),
                v(l.gen_max),
                v(l.width_current),
                v(l.width_max),
                v(l.power_limit_mw)
            ));
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }
}

/// An H100 as NVML describes it.
pub fn h100(util: u32, temp: u32, used_mib: u64, power_mw: Option<u32>) -> FakeGpu {
    FakeGpu { name: "NVIDIA H100 80GB HBM3", total_mib: 81559, used_mib, util, temp, power_mw }
}
