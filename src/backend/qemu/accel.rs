//! KVM or TCG: one decision per boot of the host, shared by `run` and `doctor`, revised when a
//! VM shows that KVM cannot run it.
//!
//! The decision boots the [`probe`] guest (what VMs boot, cut down to a point it can observe)
//! under KVM; the answer is cached per boot in the run dir (keyed by the kernel's boot id and
//! the probe's inputs), so `doctor` reads what `run` decided. A VM that later hits a KVM
//! failure anyway marks KVM unusable in the same cache ([`Accelerator::kvm_failed`]).

pub mod probe;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use probe::{ProbeOutcome, run_probe};

use crate::backend::qemu::disk::Ovmf;
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

/// The accelerator and why, in words for the log and `doctor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub accel: Accel,
    pub reason: String,
}

/// Choosing the accelerator failed.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `kvm` was forced but the probe guest does not run under KVM.
    #[error(
        "QUDATA_QEMU_ACCEL=kvm but the probe guest does not run under KVM ({detail}); fix KVM \
         on this host or set QUDATA_QEMU_ACCEL=auto or tcg"
    )]
    KvmUnavailable { detail: String },
    /// QEMU could not be started at all.
    #[error(
        "cannot run {binary} for the accelerator probe: {source}; install qemu-system-x86 or \
         set QUDATA_QEMU_BINARY"
    )]
    Spawn { binary: PathBuf, source: std::io::Error },
    /// The probe's files could not be written.
    #[error("cannot write the accelerator probe's file {path}: {source}; check the run dir")]
    Write { path: PathBuf, source: std::io::Error },
}

/// How long a probe may take. Where KVM works QEMU exits as soon as OVMF has run the probe
/// (well under a second); a KVM failure is seen in QEMU's output at once.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);

const CACHE_FILE: &str = "accel-probe.json";

/// Bumped whenever the probe changes, so an answer of an older probe is not trusted.
const PROBE_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    inputs: String,
    kvm: ProbeOutcome,
}

/// What the probe's answer depends on besides the host: a different QEMU or firmware may
/// behave differently under the same KVM.
fn probe_inputs(qemu: &Path, ovmf: &Ovmf) -> String {
    format!("v{PROBE_VERSION} qemu={} ovmf={}", qemu.display(), ovmf.code.display())
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned())
}

fn read_cache(run_dir: &Path, inputs: &str) -> Option<ProbeOutcome> {
    let bytes = std::fs::read(run_dir.join(CACHE_FILE)).ok()?;
    let cached: Cached = serde_json::from_slice(&bytes).ok()?;
    (Some(&cached.boot_id) == boot_id().as_ref() && cached.inputs == inputs).then_some(cached.kvm)
}

fn write_cache(run_dir: &Path, inputs: &str, kvm: &ProbeOutcome) {
    let Some(boot_id) = boot_id() else { return };
    let record = Cached { boot_id, inputs: inputs.to_owned(), kvm: kvm.clone() };
    let bytes = serde_json::to_vec(&record).unwrap_or_default();
    let written = fsutil::ensure_private_dir(run_dir)
        .and_then(|()| fsutil::write_atomic(&run_dir.join(CACHE_FILE), &bytes));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot cache the accelerator decision");
    }
}

/// Records `answer` as this boot's probe answer for `qemu` and `ovmf`, as a probe would (an
/// operator, or a test, forcing a decision until the next reboot).
pub fn cache_answer(run_dir: &Path, qemu: &Path, ovmf: &Ovmf, answer: &ProbeOutcome) {
    write_cache(run_dir, &probe_inputs(qemu, ovmf), answer);
}

/// Whether KVM runs the probe guest on this host, probed at most once per boot.
pub async fn kvm_probe(
    qemu: &Path,
    ovmf: &Ovmf,
    run_dir: &Path,
) -> Result<ProbeOutcome, AccelError> {
    let inputs = probe_inputs(qemu, ovmf);
    if let Some(cached) = read_cache(run_dir, &inputs) {
        return Ok(cached);
    }
    fsutil::ensure_private_dir(run_dir).map_err(|e| AccelError::Write {
        path: run_dir.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let outcome =
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            ProbeOutcome::Fails { detail: format!("cannot open /dev/kvm: {e}") }
        } else {
            run_probe(qemu, ovmf, Accel::Kvm, run_dir, PROBE_DEADLINE).await?
        };
    write_cache(run_dir, &inputs, &outcome);
    Ok(outcome)
}

/// The accelerator for `choice`: `tcg` as asked; `kvm` only when the probe guest runs under
/// it; `auto` KVM where it runs, else TCG (VMs many times slower, no GPU passthrough).
pub async fn decide(
    choice: AccelChoice,
    qemu: &Path,
    ovmf: &Ovmf,
    run_dir: &Path,
) -> Result<Decision, AccelError> {
    if choice == AccelChoice::Tcg {
        return Ok(Decision { accel: Accel::Tcg, reason: "QUDATA_QEMU_ACCEL=tcg".into() });
    }
    match kvm_probe(qemu, ovmf, run_dir).await? {
        ProbeOutcome::Works => Ok(Decision {
            accel: Accel::Kvm,
            reason: "the probe guest (q35, OVMF, an EFI application using SSE and x87) ran \
                     under KVM"
                .into(),
        }),
        ProbeOutcome::Fails { detail } if choice == AccelChoice::Kvm => {
            Err(AccelError::KvmUnavailable { detail })
        }
        ProbeOutcome::Fails { detail } => Ok(Decision {
            accel: Accel::Tcg,
            reason: format!("KVM cannot run guests on this host: {detail}"),
        }),
    }
}

/// The accelerator of the running agent: the start-up [`Decision`], switched to TCG for the
/// rest of the host's boot when a VM shows that KVM cannot run guests after all.
#[derive(Debug)]
pub struct Accelerator {
    choice: AccelChoice,
    run_dir: PathBuf,
    inputs: String,
    current: Mutex<Decision>,
}

impl Accelerator {
    pub fn new(
        choice: AccelChoice,
        decision: Decision,
        qemu: &Path,
        ovmf: &Ovmf,
        run_dir: &Path,
    ) -> Accelerator {
        Accelerator {
            choice,
            run_dir: run_dir.to_owned(),
            inputs: probe_inputs(qemu, ovmf),
            current: Mutex::new(decision),
        }
    }

    /// Always `accel`, never revised (for a backend that only cleans up).
    pub fn fixed(accel: Accel) -> Accelerator {
        Accelerator {
            choice: AccelChoice::Tcg,
            run_dir: PathBuf::new(),
            inputs: String::new(),
            current: Mutex::new(Decision { accel, reason: "fixed".into() }),
        }
    }

    pub fn decision(&self) -> Decision {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn current(&self) -> Accel {
        self.decision().accel
    }

    /// A VM with GPUs needs KVM (TCG cannot really pass a device through), so where `auto`
    /// found KVM unusable such a VM is refused, never moved to TCG silently. `Err` says why.
    /// `QUDATA_QEMU_ACCEL=tcg` is the operator's explicit word (tests of the bind paths).
    pub fn allows_gpus(&self) -> Result<(), String> {
        match self.decision() {
            Decision { accel: Accel::Kvm, .. } => Ok(()),
            _ if self.choice == AccelChoice::Tcg => Ok(()),
            Decision { reason, .. } => Err(format!(
                "a VM with GPUs needs KVM, and VMs on this host run under TCG ({reason}); fix \
                 KVM (see `qudata-agent doctor`), then reboot the host"
            )),
        }
    }

    /// A VM under KVM failed because of KVM (`detail`: QEMU's words). With `auto` KVM is
    /// marked unusable for this boot of the host (cached, so `doctor` and a restarted agent
    /// agree) and every later VM runs under TCG: returns `true`, the caller may retry the VM
    /// under TCG. With `kvm` nothing changes and it returns `false`.
    pub fn kvm_failed(&self, detail: &str) -> bool {
        if self.choice != AccelChoice::Auto {
            return false;
        }
        let switched = {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let was_kvm = current.accel == Accel::Kvm;
            if was_kvm {
                *current = Decision {
                    accel: Accel::Tcg,
                    reason: format!("KVM failed while a VM booted: {detail}"),
                };
            }
            was_kvm
        };
        // Logged and cached once, outside the lock (the cache write fsyncs).
        if switched {
            tracing::error!(
                %detail,
                "KVM FAILED WHILE A VM BOOTED: KVM IS MARKED UNUSABLE UNTIL THE HOST REBOOTS; \
                 VMs now run under TCG software emulation (many times slower, no GPU \
                 passthrough). Fix KVM on this host (nested virtualisation?), then reboot"
            );
            let outcome = ProbeOutcome::Fails {
                detail: format!("a VM failed under KVM after the probe passed: {detail}"),
            };
            write_cache(&self.run_dir, &self.inputs, &outcome);
        }
        true
    }
}

/// The KVM failure QEMU's own output (stderr, `qemu.log`) names, in one phrase, or `None`.
pub fn kvm_failure(qemu_output: &str) -> Option<String> {
    for line in qemu_output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("KVM internal error. Suberror:") {
            // Linux's KVM_INTERNAL_ERROR_* codes.
            let what = match rest.trim() {
                "1" => "emulation failure".to_owned(),
                "2" => "simultaneous exceptions".to_owned(),
                "3" => "event delivery failure".to_owned(),
                "4" => "unexpected exit reason".to_owned(),
                other => format!("suberror {other}"),
            };
            return Some(format!("KVM internal error ({what})"));
        }
        let lower = line.to_ascii_lowercase();
        let names_kvm = ["failed to initialize kvm", "could not access kvm", "kvm run failed"]
            .iter()
            .any(|p| lower.contains(p));
        if names_kvm {
            let words = line.strip_prefix("qemu-system-x86_64: ").unwrap_or(line);
            return Some(words.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_failures_are_named_in_qemus_words() {
        let internal = "KVM internal error. Suberror: 1\nextra data[0]: 0x1\nemulation failure\n";
        assert_eq!(
            kvm_failure(internal).as_deref(),
            Some("KVM internal error (emulation failure)")
        );
        assert_eq!(
            kvm_failure("KVM internal error. Suberror: 9\n").as_deref(),
            Some("KVM internal error (suberror 9)")
        );
        let open = "qemu-system-x86_64: failed to initialize kvm: No such file or directory\n";
        assert_eq!(
            kvm_failure(open).as_deref(),
            Some("failed to initialize kvm: No such file or directory")
        );
        assert_eq!(kvm_failure("qemu-system-x86_64: terminating on signal 15\n"), None);
        assert_eq!(kvm_failure(""), None);
    }

    fn ovmf() -> Ovmf {
        Ovmf { code: "/fw/CODE.fd".into(), vars_template: "/fw/VARS.fd".into() }
    }

    #[tokio::test]
    async fn tcg_is_decided_without_a_probe() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("no-such-qemu");
        let d = decide(AccelChoice::Tcg, &qemu, &ovmf(), dir.path()).await.unwrap();
        assert_eq!(d, Decision { accel: Accel::Tcg, reason: "QUDATA_QEMU_ACCEL=tcg".into() });
    }

    /// The cached answer is the decision, as long as the boot and the probe's inputs match.
    #[tokio::test]
    async fn a_cached_answer_decides_and_other_inputs_probe_again() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("no-such-qemu");
        let fails = ProbeOutcome::Fails { detail: "KVM internal error (emulation failure)".into() };
        write_cache(dir.path(), &probe_inputs(&qemu, &ovmf()), &fails);
        let d = decide(AccelChoice::Auto, &qemu, &ovmf(), dir.path()).await.unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert_eq!(
            d.reason,
            "KVM cannot run guests on this host: KVM internal error (emulation failure)"
        );
        let forced = decide(AccelChoice::Kvm, &qemu, &ovmf(), dir.path()).await.unwrap_err();
        assert!(
            forced.to_string().contains("(KVM internal error (emulation failure))"),
            "{forced}"
        );
        write_cache(dir.path(), &probe_inputs(&qemu, &ovmf()), &ProbeOutcome::Works);
        let d = decide(AccelChoice::Auto, &qemu, &ovmf(), dir.path()).await.unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        // Another firmware is probed again (here: QEMU cannot even start).
        let other = Ovmf { code: "/fw/OTHER.fd".into(), vars_template: "/fw/VARS.fd".into() };
        if std::path::Path::new("/dev/kvm").exists() {
            assert!(decide(AccelChoice::Auto, &qemu, &other, dir.path()).await.is_err());
        }
    }

    #[test]
    fn a_kvm_failure_switches_auto_to_tcg_for_good_and_never_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = Path::new("qemu-system-x86_64");
        let kvm = || Decision { accel: Accel::Kvm, reason: "probe ran".into() };
        let auto = Accelerator::new(AccelChoice::Auto, kvm(), qemu, &ovmf(), dir.path());
        assert!(auto.kvm_failed("KVM internal error (emulation failure)"));
        assert_eq!(auto.current(), Accel::Tcg);
        assert_eq!(
            auto.decision().reason,
            "KVM failed while a VM booted: KVM internal error (emulation failure)"
        );
        let cached = read_cache(dir.path(), &probe_inputs(qemu, &ovmf())).unwrap();
        assert!(matches!(cached, ProbeOutcome::Fails { .. }), "{cached:?}");
        let refused = auto.allows_gpus().unwrap_err();
        assert!(refused.starts_with("a VM with GPUs needs KVM, and VMs on this host run under TCG (KVM failed while a VM booted"), "{refused}");
        let forced = Accelerator::new(AccelChoice::Kvm, kvm(), qemu, &ovmf(), dir.path());
        assert_eq!(forced.allows_gpus(), Ok(()));
        assert_eq!(Accelerator::fixed(Accel::Tcg).allows_gpus(), Ok(()), "tcg, as asked");
        assert!(!forced.kvm_failed("KVM internal error (emulation failure)"));
        assert_eq!(forced.current(), Accel::Kvm);
    }
}
