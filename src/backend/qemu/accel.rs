//! KVM or TCG, decided by what really runs.
//!
//! Opening `/dev/kvm` proves nothing: on some hosts it opens, yet `-cpu host` aborts on an MSR
//! KVM refuses, or a guest under KVM hangs in firmware. So the probe boots a few bytes of firmware that write to QEMU's `isa-debug-exit`
//! port: where KVM works QEMU exits with the expected code within milliseconds of starting;
//! where it does not, QEMU fails or hangs and is killed at a deadline. The answer is cached
//! per boot in the run dir (keyed by the kernel's boot id).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::config::AccelChoice;
use crate::fsutil;

/// The accelerator a VM runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Choosing the accelerator failed.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `kvm` was forced but the probe guest does not run under KVM.
    #[error(
        "QUDATA_QEMU_ACCEL=kvm but a probe guest does not run under KVM ({detail}); fix KVM on \
         this host or set QUDATA_QEMU_ACCEL=auto or tcg"
    )]
    KvmUnavailable { detail: String },
    /// QEMU could not be started at all.
    #[error(
        "cannot run {binary} for the accelerator probe: {source}; install qemu-system-x86 or \
         set QUDATA_QEMU_BINARY"
    )]
    Spawn { binary: PathBuf, source: std::io::Error },
    /// The probe firmware could not be written.
    #[error("cannot write the probe firmware to {path}: {source}; check the run dir")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The value the probe writes to the debug-exit port.
pub const PROBE_VALUE: u8 = 0x2a;

/// QEMU's exit status after the probe's write: `isa-debug-exit` exits with `(value << 1) | 1`.
pub const PROBE_EXIT_CODE: i32 = ((PROBE_VALUE as i32) << 1) | 1;

/// Real-mode code at the reset vector: `mov al, PROBE_VALUE; out 0xf4, al; hlt; jmp $-1`.
pub const PROBE_CODE: [u8; 7] = [0xb0, PROBE_VALUE, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];

/// How long a probe may take. Where KVM works QEMU answers as soon as it has started.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

const CACHE_FILE: &str = "accel-probe.json";

/// The probe's firmware image: 64 KiB (QEMU wants a multiple of 64 KiB), `hlt` everywhere,
/// [`PROBE_CODE`] at the reset vector (offset 0xfff0, the last 16 bytes below 4 GiB).
pub fn probe_firmware() -> Vec<u8> {
    let mut image = vec![0xf4; 0x10000];
    image[0xfff0..0xfff0 + PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    image
}

/// The probe's command line (after the program name). Machine and CPU model are the ones VMs
/// get (see `argv`): a plain KVM guest can run where `-cpu host` aborts on an MSR it cannot set.
pub fn probe_argv(accel: Accel, bios: &Path) -> Vec<String> {
    let cpu = if accel == Accel::Kvm { "host" } else { "max" };
    let machine = format!("q35,accel={}", accel.as_str());
    let args = ["-machine", &machine, "-cpu", cpu];
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    argv.extend(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"].map(String::from));
    argv.extend(["-bios".into(), bios.display().to_string()]);
    argv.extend(["-display", "none", "-nodefaults", "-no-user-config"].map(String::from));
    argv
}

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeOutcome {
    /// The guest ran and wrote the expected value.
    Works,
    /// It did not; `detail` says how.
    Fails { detail: String },
}

/// Boots the probe firmware under `accel` (firmware written into `dir`) and reports whether it
/// ran. QEMU is killed and reaped when it has not answered by `deadline`.
pub async fn run_probe(
    qemu: &Path,
    accel: Accel,
    dir: &Path,
    deadline: Duration,
) -> Result<ProbeOutcome, AccelError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let bios = dir.join(format!("probe-bios-{}-{n}.bin", std::process::id()));
    std::fs::write(&bios, probe_firmware())
        .map_err(|source| AccelError::Write { path: bios.clone(), source })?;
    let outcome = probe_with(qemu, &probe_argv(accel, &bios), deadline).await;
    let _ = std::fs::remove_file(&bios);
    outcome
}

async fn probe_with(
    qemu: &Path,
    argv: &[String],
    deadline: Duration,
) -> Result<ProbeOutcome, AccelError> {
    let mut child = Command::new(qemu)
        .args(argv)
        .env_clear()
        .envs(crate::child_env::for_child())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AccelError::Spawn { binary: qemu.to_owned(), source })?;
    let mut stderr = child.stderr.take();
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        if let Some(stderr) = stderr.as_mut() {
            let _ = stderr.take(4096).read_to_string(&mut text).await;
        }
        text
    });
    let waited = tokio::time::timeout(deadline, child.wait()).await;
    let outcome = match waited {
        Ok(Ok(status)) if status.code() == Some(PROBE_EXIT_CODE) => ProbeOutcome::Works,
        Ok(Ok(status)) => {
            let stderr = reader.await.unwrap_or_default();
            let detail = format!("QEMU exited with {status}: {}", stderr.trim());
            return Ok(ProbeOutcome::Fails { detail });
        }
        Ok(Err(e)) => ProbeOutcome::Fails { detail: format!("waiting for QEMU failed: {e}") },
        Err(_) => {
            // SIGKILL and reap.
            let _ = child.kill().await;
            let detail = format!("no answer within {} ms", deadline.as_millis());
            ProbeOutcome::Fails { detail }
        }
    };
    reader.abort();
    Ok(outcome)
}

#[derive(Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    kvm: ProbeOutcome,
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned())
}

/// Whether KVM runs a guest on this host, probed at most once per boot (cached in `run_dir`).
pub async fn kvm_probe(qemu: &Path, run_dir: &Path) -> Result<ProbeOutcome, AccelError> {
    fsutil::ensure_private_dir(run_dir).map_err(|e| AccelError::Write {
        path: run_dir.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let cache = run_dir.join(CACHE_FILE);
    let boot = boot_id();
    if let (Some(boot), Ok(bytes)) = (&boot, std::fs::read(&cache))
        && let Ok(cached) = serde_json::from_slice::<Cached>(&bytes)
        && &cached.boot_id == boot
    {
        return Ok(cached.kvm);
    }
    let outcome =
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            ProbeOutcome::Fails { detail: format!("cannot open /dev/kvm: {e}") }
        } else {
            run_probe(qemu, Accel::Kvm, run_dir, PROBE_DEADLINE).await?
        };
    if let Some(boot_id) = boot {
        let record = Cached { boot_id, kvm: outcome.clone() };
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        if let Err(e) = fsutil::write_atomic(&cache, &bytes) {
            tracing::warn!(error = %e, "cannot cache the KVM probe result");
        }
    }
    Ok(outcome)
}

/// The accelerator for `choice`: `tcg` as asked; `kvm` only when the probe passes; `auto`
/// falls back to TCG with a loud warning (VMs are many times slower under TCG).
pub async fn choose(choice: AccelChoice, qemu: &Path, run_dir: &Path) -> Result<Accel, AccelError> {
    if choice == AccelChoice::Tcg {
        tracing::info!("accelerator: TCG (QUDATA_QEMU_ACCEL=tcg)");
        return Ok(Accel::Tcg);
    }
    match kvm_probe(qemu, run_dir).await? {
        ProbeOutcome::Works => {
            tracing::info!("accelerator: KVM (probe guest ran)");
            Ok(Accel::Kvm)
        }
        ProbeOutcome::Fails { detail } if choice == AccelChoice::Kvm => {
            Err(AccelError::KvmUnavailable { detail })
        }
        ProbeOutcome::Fails { detail } => {
            tracing::warn!(
                %detail,
                "KVM DOES NOT RUN GUESTS ON THIS HOST: VMs use TCG software emulation and will \
                 be very slow; GPU passthrough needs KVM"
            );
            Ok(Accel::Tcg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_puts_the_probe_at_the_reset_vector() {
        let image = probe_firmware();
        assert_eq!(image.len(), 65536);
        assert_eq!(&image[0xfff0..0xfff7], &[0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]);
        assert_eq!(PROBE_EXIT_CODE, 85);
    }

    #[test]
    fn probe_argv_is_exact() {
        let argv = probe_argv(Accel::Kvm, Path::new("/run/q/probe.bin"));
        let expected = [
            "-machine",
            "q35,accel=kvm",
            "-cpu",
            "host",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-bios",
            "/run/q/probe.bin",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
        ];
        assert_eq!(argv, expected);
    }

    /// The deadline path, with the real QEMU: firmware that only halts never answers.
    #[tokio::test]
    async fn a_silent_guest_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let bios = dir.path().join("halt.bin");
        std::fs::write(&bios, vec![0xf4; 0x10000]).unwrap();
        let argv = probe_argv(Accel::Tcg, &bios);
        let qemu = Path::new("qemu-system-x86_64");
        let outcome = probe_with(qemu, &argv, Duration::from_millis(1500)).await.unwrap();
        assert_eq!(outcome, ProbeOutcome::Fails { detail: "no answer within 1500 ms".into() });
    }

    #[tokio::test]
    async fn a_missing_qemu_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("no-such-qemu");
        let err = run_probe(&qemu, Accel::Tcg, dir.path(), PROBE_DEADLINE).await.unwrap_err();
        assert!(err.to_string().contains("set QUDATA_QEMU_BINARY"), "{err}");
    }
}
