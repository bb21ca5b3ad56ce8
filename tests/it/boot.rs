//! Boot truth (real QEMU under TCG, real OVMF, real guests): the accelerator decision boots
//! what VMs boot and `run` and `doctor` share it; a KVM failure under `auto` boots the VM
//! again under TCG; a boot that cannot succeed is `error` in QEMU's or the console's words.

use std::process::Command;
use std::time::Duration;

use qudata_agent::backend::qemu::accel::{self, Accel, ProbeOutcome};
use serde_json::{Value, json};

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::guests::{host_ovmf, install_test_guest, install_zeros, qemu};
use crate::support::vm::{BOOT, ci_guest_image, qemu_pids, small_vm, wait_gone, wait_status};
use crate::support::wait::wait_until;

/// Local mode with the CI guest as base image and the accelerator left to the agent.
async fn agent_with(dirs: &Dirs, extra: &[(&'static str, String)]) -> (Agent, Api) {
    let mut env = vec![("QUDATA_BASE_IMAGE", ci_guest_image().display().to_string())];
    env.extend(extra.iter().cloned());
    let mut agent = Agent::start(dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(dirs)));
    (agent, api)
}

/// What KVM does with the probe guest on this host, asked directly (not through the agent).
async fn kvm_here() -> ProbeOutcome {
    let opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    if let Err(e) = opens {
        return ProbeOutcome::Fails { detail: format!("cannot open /dev/kvm: {e}") };
    }
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(60);
    accel::run_probe(&qemu(), &host_ovmf(), Accel::Kvm, dir.path(), deadline).await.unwrap()
}

/// `doctor --json`'s accel line for the dirs' run dir.
fn doctor_accel(dirs: &Dirs) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_qudata-agent"))
        .args(["doctor", "--json"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("QUDATA_DATA_DIR", &dirs.data)
        .env("QUDATA_RUN_DIR", &dirs.run)
        .output()
        .unwrap();
    let report: Vec<Value> = serde_json::from_slice(&out.stdout).expect("doctor's JSON");
    report.into_iter().find(|c| c["check"] == "accel").expect("an accel line")
}

fn create_body(image: &str) -> Value {
    let mut body = small_vm();
    body["image"] = json!(image);
    body
}

/// Creates an instance of `image` and waits for its `error`: the reason.
async fn failed_boot(api: &Api, image: &str) -> String {
    let created = api.json("POST", "/instances", &create_body(image)).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let failed = wait_status(api, "error", BOOT).await;
    failed["error"].as_str().unwrap_or_default().to_owned()
}

async fn delete(dirs: &Dirs, api: &Api) {
    let id = api.get("/instances").await.body["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(dirs, &id, Duration::from_secs(60)).await;
    wait_status(api, "destroyed", Duration::from_secs(30)).await;
}

#[tokio::test]
async fn run_and_doctor_share_the_decision_the_probe_guest_makes() {
    let kvm = kvm_here().await;
    let dirs = Dirs::new();
    let (agent, _api) = agent_with(&dirs, &[]).await;
    let log = agent.output();
    let line = doctor_accel(&dirs);
    let detail = line["detail"].as_str().unwrap();
    match kvm {
        ProbeOutcome::Works => {
            assert!(log.contains("accelerator: KVM"), "{log}");
            assert_eq!(line["status"], "ok", "{line}");
            assert!(detail.starts_with("KVM: the probe guest"), "{line}");
        }
        ProbeOutcome::Fails { detail: why } => {
            // This kind of machine: /dev/kvm opens, OVMF dies under KVM at once.
            let reason = format!("KVM cannot run guests on this host: {why}");
            assert!(log.contains("accelerator: TCG"), "{log}");
            assert!(log.contains(&reason), "the run log names the reason {reason:?}: {log}");
            assert_eq!(line["status"], "warn", "{line}");
            assert_eq!(detail, format!("TCG: {reason}"), "{line}");
        }
    }
}

/// A host where the probe passed but a VM then fails under KVM (forced here by recording a
/// passing probe for this boot): under `auto` the create boots again under TCG and runs,
/// and KVM stays marked unusable for `doctor` and later VMs.
#[tokio::test]
async fn a_kvm_failure_while_booting_boots_the_vm_again_under_tcg() {
    let kvm = kvm_here().await;
    let dirs = Dirs::new();
    accel::cache_answer(&dirs.run, &qemu(), &host_ovmf(), &ProbeOutcome::Works);
    let (agent, api) = agent_with(&dirs, &[]).await;
    let created = api.json("POST", "/instances", &small_vm()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    wait_status(&api, "running", BOOT).await;
    let log = agent.output();
    match kvm {
        ProbeOutcome::Fails { .. } => {
            assert!(log.contains("booting the VM again under TCG"), "{log}");
            assert!(log.contains("KVM FAILED WHILE A VM BOOTED"), "{log}");
            let line = doctor_accel(&dirs);
            let detail = line["detail"].as_str().unwrap();
            assert!(
                detail
                    .starts_with("TCG: KVM cannot run guests on this host: a VM failed under KVM"),
                "{line}"
            );
        }
        ProbeOutcome::Works => assert!(log.contains("accel=\"kvm\""), "{log}"),
    }
    delete(&dirs, &api).await;
}

#[tokio::test]
async fn a_forced_kvm_never_falls_back() {
    let ProbeOutcome::Fails { .. } = kvm_here().await else {
        return; // KVM works here: nothing to refuse.
    };
    let dirs = Dirs::new();
    accel::cache_answer(&dirs.run, &qemu(), &host_ovmf(), &ProbeOutcome::Works);
    let (_agent, api) = agent_with(&dirs, &[("QUDATA_QEMU_ACCEL", "kvm".into())]).await;
    let created = api.json("POST", "/instances", &small_vm()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let failed = wait_status(&api, "error", BOOT).await;
    let reason = failed["error"].as_str().unwrap();
    assert!(reason.contains("QEMU stopped the VM: KVM internal error"), "{reason}");
    assert!(reason.ends_with("QUDATA_QEMU_ACCEL=kvm never falls back: fix KVM or set it to auto"));
    delete(&dirs, &api).await;
}

#[tokio::test]
async fn boots_that_cannot_succeed_are_errors_in_the_firmwares_and_kernels_words() {
    let dirs = Dirs::new();
    let zeros = install_zeros(&dirs);
    let no_esp = install_test_guest(&dirs, "no-esp");
    let panics = install_test_guest(&dirs, "panic");
    let (_agent, api) = agent_with(&dirs, &[("QUDATA_QEMU_ACCEL", "tcg".into())]).await;

    for image in [&zeros, &no_esp] {
        let reason = failed_boot(&api, image).await;
        assert!(
            reason.starts_with("the VM did not boot: the VM's firmware found nothing to boot"),
            "{image}: {reason}"
        );
        assert!(reason.contains("BdsDxe: failed to load Boot0001"), "{image}: {reason}");
        delete(&dirs, &api).await;
    }

    let reason = failed_boot(&api, &panics).await;
    assert!(reason.contains("kernel panicked"), "{reason}");
    assert!(reason.contains("Kernel panic - not syncing: Attempted to kill init!"), "{reason}");
    delete(&dirs, &api).await;
}

#[tokio::test]
async fn a_guest_that_never_answers_ssh_fails_at_the_deadline_with_its_console() {
    let dirs = Dirs::new();
    let silent = install_test_guest(&dirs, "silent");
    let settings = [("QUDATA_QEMU_ACCEL", "tcg".into()), ("QUDATA_VM_BOOT_TIMEOUT", "45".into())];
    let (_agent, api) = agent_with(&dirs, &settings).await;
    let reason = failed_boot(&api, &silent).await;
    assert!(
        reason.starts_with("the guest did not become reachable within 45 s: it never answered SSH"),
        "{reason}"
    );
    // What the console showed last is quoted. How far a loaded machine gets in the deadline
    // varies (the guest's own line, the kernel's or the firmware's lines before it), and a
    // failed create's files, its console log with them, are removed: the quote is checked
    // for being there (which lines it holds, by the follower's unit tests).
    let (_, shown) = reason.split_once("its console last showed: ").expect("console quoted");
    let (quoted, _advice) = shown.rsplit_once("; the image must").expect("the advice follows");
    assert!(!quoted.trim().is_empty(), "{reason}");
    delete(&dirs, &api).await;
}

#[tokio::test]
async fn qemu_killed_while_the_guest_boots_is_an_error_naming_the_exit() {
    let dirs = Dirs::new();
    let silent = install_test_guest(&dirs, "silent");
    let (_agent, api) = agent_with(&dirs, &[("QUDATA_QEMU_ACCEL", "tcg".into())]).await;
    let created = api.json("POST", "/instances", &create_body(&silent)).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    let pid = crate::support::vm::wait_for_qemu(&id, Duration::from_secs(60)).await;
    // Booting: the firmware has written to the console.
    let serial = dirs.data.join("vms").join(&id).join("serial.log");
    let what = format!("the guest to print to {}", serial.display());
    wait_until(what, Duration::from_secs(120), Duration::from_millis(100), async || {
        std::fs::metadata(&serial).map_or(0, |m| m.len()) > 0
    })
    .await;
    // SAFETY: kill(2) on the test's own VM process.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let failed = wait_status(&api, "error", Duration::from_secs(60)).await;
    let reason = failed["error"].as_str().unwrap();
    assert!(reason.starts_with("the VM did not boot: QEMU exited unexpectedly"), "{reason}");
    assert!(reason.contains("signal: 9"), "{reason}");
    assert!(qemu_pids(&id).is_empty());
    delete(&dirs, &api).await;
}
