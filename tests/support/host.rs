//! A fake host for `doctor` checks: `/proc`, `/dev`, `/lib/modules`, OVMF, a `PATH` dir,
//! a Docker socket path and a data dir under one temporary directory, plus a [`FakeSysfs`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use qudata_agent::config::BackendChoice;
use qudata_agent::doctor::HostView;

use super::sysfs::FakeSysfs;

pub struct FakeHost {
    dir: tempfile::TempDir,
    pub sysfs: FakeSysfs,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHost {
    /// An Intel CPU with VT-x, booted with `intel_iommu=on`, and nothing else.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("qudata-host-").tempdir().expect("tempdir");
        for sub in ["proc/sys/kernel", "dev", "lib/modules", "ovmf", "bin"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let host = FakeHost { dir, sysfs: FakeSysfs::new() };
        host.write("proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n");
        host.write(
            "proc/cmdline",
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt\n",
        );
        host.write("proc/sys/kernel/osrelease", "6.1.0-test-amd64\n");
        host
    }

    pub fn with_sysfs(mut self, sysfs: FakeSysfs) -> Self {
        self.sysfs = sysfs;
        self
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let path = self.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    /// An executable shell script `bin/<name>` (on the view's `PATH`).
    pub fn program(&self, name: &str, body: &str) -> PathBuf {
        let path = self.join("bin").join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// The view the checks read: every root in this tree, backend `auto`.
    pub fn view(&self) -> HostView {
        HostView {
            proc_root: self.join("proc"),
            sysfs: self.sysfs.root(),
            dev_root: self.join("dev"),
            lib_modules: self.join("lib/modules"),
            ovmf_dir: self.join("ovmf"),
            docker_socket: self.join("docker.sock"),
            search_path: self.join("bin").into_os_string(),
            data_dir: self.join("data"),
            host_ports: qudata_agent::ports::HOST_PORTS,
            frpc_binary: "frpc".into(),
            frp_overrides: Default::default(),
            gpu_pci_addrs: None,
            nvml_library: self.join("lib/libnvidia-ml.so.1"),
            backend: BackendChoice::Auto,
            command_timeout: Duration::from_secs(10),
            accel: qudata_agent::doctor::AccelView::Undecided("not probed".into()),
        }
    }
}
