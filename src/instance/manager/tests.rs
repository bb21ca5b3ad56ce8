//! The manager driven without HTTP, through a scripted backend (test support only).

use std::sync::{Mutex as StdMutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};

use super::*;
use crate::backend::{Adoption, BackendEvent, EventSink, Machine};
use crate::instance::spec::Spec;

/// Records every call; `wait_ready` waits for a permit of `ready` so tests control boot time.
struct Scripted {
    me: Weak<Scripted>,
    calls: StdMutex<Vec<String>>,
    ready: Semaphore,
    /// While `true`, `configure` waits for a permit of `configured`.
    hold_configure: StdMutex<bool>,
    configured: Semaphore,
    fail: StdMutex<Option<&'static str>>,
    /// `Some(detail)`: adoption finds the instance gone.
    gone: StdMutex<Option<String>>,
    keys_seen: StdMutex<Vec<Vec<String>>>,
    /// Per `destroy` call: whether the instance's task handed over its machine.
    destroyed_held: StdMutex<Vec<bool>>,
    /// How many `destroy` calls fail before one succeeds.
    destroy_failures: StdMutex<u32>,
}

impl Scripted {
    fn new() -> Arc<Scripted> {
        Arc::new_cyclic(|me| Scripted {
            me: me.clone(),
            calls: StdMutex::default(),
            ready: Semaphore::new(0),
            hold_configure: StdMutex::new(false),
            configured: Semaphore::new(0),
            fail: StdMutex::default(),
            gone: StdMutex::default(),
            destroyed_held: StdMutex::default(),
            keys_seen: StdMutex::default(),
            destroy_failures: StdMutex::default(),
        })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn machine(&self) -> Arc<dyn Machine> {
        Arc::new(ScriptedMachine(self.me.upgrade().expect("the backend lives")))
    }

    fn step(&self, name: &'static str) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push(name.to_owned());
        if *self.fail.lock().unwrap() == Some(name) {
            return Err(BackendError::op(name, "scripted failure"));
        }
        Ok(())
    }
}

#[async_trait]
impl backend::Lifecycle for Scripted {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }
    fn guest_network(
        &self,
        held: &[Instance],
    ) -> Result<Option<crate::network::GuestNet>, BackendError> {
        let last = 2 + held.len() as u8;
        let address = std::net::Ipv4Addr::new(10, 213, 0, last);
        let mac = crate::network::subnet::guest_mac(address);
        Ok(Some(crate::network::GuestNet { address, mac, tap: format!("qudata0-{last}") }))
    }
    fn validate(&self, spec: &Spec) -> Result<(), BackendError> {
        match spec.image.as_deref() {
            Some("unknown") => {
                Err(BackendError::Unsupported { field: "image", reason: "is not known".into() })
            }
            _ => Ok(()),
        }
    }
    fn check_gpus(&self, gpus: &[String]) -> Result<(), BackendError> {
        match gpus.iter().find(|g| g.as_str() == "0000:99:00.0") {
            Some(g) => Err(BackendError::Refused { reason: format!("GPU {g} is on nouveau") }),
            None => Ok(()),
        }
    }
    async fn launch(&self, _: &Instance) -> Result<Arc<dyn Machine>, BackendError> {
        self.step("launch")?;
        Ok(self.machine())
    }
    async fn boot(&self, _: &Instance) -> Result<Arc<dyn Machine>, BackendError> {
        self.step("boot")?;
        Ok(self.machine())
    }
    async fn destroy(
        &self,
        _: &Instance,
        held: Option<Arc<dyn Machine>>,
    ) -> Result<(), BackendError> {
        self.destroyed_held.lock().unwrap().push(held.is_some());
        self.step("destroy")?;
        let mut failures = self.destroy_failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err(BackendError::op("destroy", "scripted transient failure"));
        }
        Ok(())
    }
    async fn adopt(&self, _: &Instance) -> Result<Adoption, BackendError> {
        self.step("adopt")?;
        Ok(match self.gone.lock().unwrap().clone() {
            Some(detail) => Adoption::Gone { detail },
            None => Adoption::Adopted(self.machine()),
        })
    }
}

/// The scripted backend's machine: every call recorded by the backend.
struct ScriptedMachine(Arc<Scripted>);

#[async_trait]
impl Machine for ScriptedMachine {
    async fn wait_ready(&self, _: &Instance) -> Result<(), BackendError> {
        self.0.step("wait_ready")?;
        self.0.ready.acquire().await.unwrap().forget();
        Ok(())
    }
    async fn configure(&self, i: &Instance) -> Result<(), BackendError> {
        self.0.keys_seen.lock().unwrap().push(i.ssh_keys.clone());
        self.0.step("configure")?;
        if *self.0.hold_configure.lock().unwrap() {
            self.0.configured.acquire().await.unwrap().forget();
        }
        Ok(())
    }
    async fn apply_ssh_keys(&self, i: &Instance) -> Result<(), BackendError> {
        self.0.keys_seen.lock().unwrap().push(i.ssh_keys.clone());
        self.0.step("apply_ssh_keys")
    }
    async fn pause(&self) -> Result<(), BackendError> {
        self.0.step("pause")
    }
    async fn resume(&self) -> Result<(), BackendError> {
        self.0.step("resume")
    }
    async fn reset(&self) -> Result<(), BackendError> {
        self.0.step("reset")
    }
    async fn stop(&self) -> Result<(), BackendError> {
        self.0.step("stop")
    }
    async fn stop_now(&self) -> Result<(), BackendError> {
        self.0.step("stop_now")
    }
}

struct Harness {
    manager: Manager,
    backend: Arc<Scripted>,
    dir: tempfile::TempDir,
    events: EventSink,
}

/// What the API does with a request body: parse it, then the typed command.
pub(super) trait FromWire {
    async fn create_json(&self, body: &serde_json::Value) -> Result<Created, ManagerError>;
    async fn add_ssh_key(&self, line: &str) -> Result<(), ManagerError>;
    async fn remove_ssh_key(&self, line: &str) -> Result<(), ManagerError>;
}

impl FromWire for Manager {
    async fn create_json(&self, body: &serde_json::Value) -> Result<Created, ManagerError> {
        self.create(spec::parse_create(body, self.limits())?).await
    }

    async fn add_ssh_key(&self, line: &str) -> Result<(), ManagerError> {
        self.change_ssh_key(KeyChange::Add(spec::parse_ssh_pubkey(line)?)).await
    }

    async fn remove_ssh_key(&self, line: &str) -> Result<(), ManagerError> {
        self.change_ssh_key(KeyChange::Remove(spec::parse_ssh_pubkey(line)?)).await
    }
}

fn settings(gpus: &[&str]) -> ManagerSettings {
    ManagerSettings {
        limits: HostLimits {
            cpus: 4,
            memory_mib: 8192,
            storage_gb: 100,
            default_cpus: 1,
            default_memory_mib: 512,
            default_storage_gb: 5,
        },
        gpu_pool: gpus.iter().map(|s| s.to_string()).collect(),
        gpu_health: None,
        host_ports: crate::ports::HOST_PORTS,
        local: false,
    }
}

fn harness_in(dir: tempfile::TempDir, backend: Arc<Scripted>, gpus: &[&str]) -> Harness {
    let store = Store::open(dir.path()).unwrap();
    let manager =
        Manager::new(Ok(backend.clone() as Arc<dyn backend::Lifecycle>), store, settings(gpus));
    let (events, rx) = mpsc::unbounded_channel();
    manager.spawn_event_loop(rx);
    Harness { manager, backend, dir, events }
}

fn harness(gpus: &[&str]) -> Harness {
    harness_in(tempfile::tempdir().unwrap(), Scripted::new(), gpus)
}

async fn wait_for(manager: &Manager, want: Status) {
    for _ in 0..500 {
        if manager.current_status() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("status stayed {} (wanted {want})", manager.current_status());
}

fn record_files(h: &Harness) -> Vec<String> {
    std::fs::read_dir(h.dir.path().join("instances"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdj0ztsvqr9qxDpzEX9DHR4ZrCcGbiYfHqwMuX0MG0W";

#[tokio::test]
async fn create_runs_through_pending_to_running() {
    let h = harness(&["0000:65:00.0"]);
    let created = h.manager.create_json(&json!({"ssh_enabled": true})).await.unwrap();
    assert_eq!(created.status, Status::Pending);
    assert!(created.ports.contains_key("22"));
    assert_eq!(h.manager.status().status, Status::Pending);
    assert_eq!(record_files(&h), [format!("{}.json", created.id)]);
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    assert_eq!(h.backend.calls(), ["launch", "wait_ready", "configure"]);
    let view = h.manager.status();
    assert_eq!(view.gpus, Some(1));
    assert_eq!(view.id.as_deref(), Some(created.id.as_str()));
    // The VM's place on the bridge is recorded; the agent reaches the guest there, with no
    // host port of its own.
    let instance = &h.manager.instances()[0];
    let guest = instance.network.as_ref().expect("a place on the bridge");
    assert_eq!(guest.address, std::net::Ipv4Addr::new(10, 213, 0, 2));
    assert_eq!(instance.management_port, None);
    let ssh = instance.ports.iter().find(|p| p.guest_port == 22).unwrap();
    assert_eq!(view.ports.unwrap()["22"], ssh.remote_port.to_string());
}

#[tokio::test]
async fn without_ssh_published_the_vm_still_gets_its_address_and_nothing_is_published_for_the_agent()
 {
    let h = harness(&[]);
    let body = json!({"ports": [{"container_port": 8888, "remote_port": 20000, "proto": "http"}]});
    let created = h.manager.create_json(&body).await.unwrap();
    let instance = &h.manager.instances()[0];
    assert!(instance.network.is_some());
    assert_eq!(instance.management_port, None);
    assert_eq!(instance.ports.len(), 1);
    assert!(!created.ports.contains_key("22"));
}

#[tokio::test]
async fn admission_refuses_a_second_instance_bad_input_and_missing_gpus() {
    let h = harness(&["0000:65:00.0", "0000:66:00.0"]);
    let err = h.manager.create_json(&json!({"gpus": 3})).await.unwrap_err();
    assert!(matches!(err, ManagerError::Resources(ref m) if m.contains("2 free")), "{err}");
    let err = h.manager.create_json(&json!({"image": "unknown"})).await.unwrap_err();
    assert!(matches!(err, ManagerError::Invalid(ref e) if e.field == "image"), "{err}");
    let err = h.manager.create_json(&json!({"cpus": 99})).await.unwrap_err();
    assert!(matches!(err, ManagerError::Invalid(_)));
    assert!(record_files(&h).is_empty(), "nothing created by a refused request");

    h.manager.create_json(&json!({})).await.unwrap();
    assert_eq!(h.manager.instances()[0].gpus.len(), 2, "default: every free GPU");
    let err = h.manager.create_json(&json!({})).await.unwrap_err();
    assert!(matches!(err, ManagerError::Conflict { .. }), "{err}");
    assert_eq!(record_files(&h).len(), 1);
}

#[tokio::test]
async fn gpus_the_backend_cannot_give_are_refused_before_anything_starts() {
    let h = harness(&["0000:65:00.0", "0000:99:00.0"]);
    let err = h.manager.create_json(&json!({})).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::Resources(ref m) if m == "GPU 0000:99:00.0 is on nouveau"),
        "{err}"
    );
    assert!(record_files(&h).is_empty());
    assert!(h.backend.calls().is_empty());
    // The first free GPU alone is fine.
    h.manager.create_json(&json!({"gpus": 1})).await.unwrap();
    assert_eq!(h.manager.instances()[0].gpus, ["0000:65:00.0"]);
}

#[tokio::test]
async fn no_backend_answers_every_create_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let manager =
        Manager::new(Err(Arc::from(Box::from("no VM backend yet"))), store, settings(&[]));
    let err = manager.create_json(&json!({})).await.unwrap_err();
    assert_eq!(err.to_string(), "no instance can be created: no VM backend yet");
    let err = manager.create_json(&json!({"ports": "x"})).await.unwrap_err();
    assert!(matches!(err, ManagerError::Invalid(_)), "validation comes first");
}

#[tokio::test]
async fn a_failed_launch_rolls_back_and_reports_error() {
    let h = harness(&[]);
    *h.backend.fail.lock().unwrap() = Some("launch");
    h.manager.create_json(&json!({})).await.unwrap();
    wait_for(&h.manager, Status::Error).await;
    assert_eq!(h.backend.calls(), ["launch", "destroy"]);
    assert_eq!(*h.backend.destroyed_held.lock().unwrap(), [false], "no machine was made");
    let view = h.manager.status();
    assert_eq!(view.error.as_deref(), Some("launch failed: scripted failure"));
    h.manager.delete().await.unwrap();
    wait_for(&h.manager, Status::Destroyed).await;
    for _ in 0..100 {
        if record_files(&h).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("record left behind: {:?}", record_files(&h));
}

/// A teardown that fails for a while (an engine call timing out) is retried, not abandoned
/// with the host blocked until the next restart.
#[tokio::test]
async fn a_delete_whose_teardown_fails_twice_is_retried_until_it_succeeds() {
    let h = harness(&[]);
    h.manager.create_json(&json!({})).await.unwrap();
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    *h.backend.destroy_failures.lock().unwrap() = 2;
    h.manager.delete().await.unwrap();
    for _ in 0..1000 {
        // The task leaves the registry first, then removes the record file.
        if h.manager.instances().is_empty() && record_files(&h).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(h.manager.instances().is_empty(), "{:?}", h.backend.calls());
    assert!(record_files(&h).is_empty());
    let destroys = h.backend.calls().iter().filter(|c| *c == "destroy").count();
    assert_eq!(destroys, 3, "{:?}", h.backend.calls());
}

#[tokio::test]
async fn delete_during_boot_stops_waiting_and_cleans_up() {
    let h = harness(&[]);
    h.manager.create_json(&json!({})).await.unwrap();
    while !h.backend.calls().contains(&"wait_ready".to_owned()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A teardown that takes a while (the first try fails; the next comes 2 s later).
    *h.backend.destroy_failures.lock().unwrap() = 1;
    h.manager.delete().await.unwrap();
    assert_eq!(h.manager.current_status(), Status::Destroyed, "deleting reads as destroyed");
    let err = h.manager.create_json(&json!({})).await.unwrap_err();
    assert!(err.to_string().contains("still being deleted"), "{err}");
    for _ in 0..200 {
        // The task leaves the registry first, then removes the record file.
        if h.manager.instances().is_empty() && record_files(&h).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(h.manager.instances().is_empty());
    assert!(record_files(&h).is_empty());
    assert_eq!(h.backend.calls(), ["launch", "wait_ready", "destroy", "destroy"]);
    // The boot that stopped waiting handed its machine to the task, and the task to the
    // teardown: the VM is stopped through its own handle, not searched for.
    assert_eq!(*h.backend.destroyed_held.lock().unwrap(), [true, true]);
}

#[tokio::test]
async fn lifecycle_follows_the_state_machine() {
    let h = harness(&[]);
    h.manager.create_json(&json!({})).await.unwrap();
    let err = h.manager.lifecycle(Lifecycle::Stop).await.unwrap_err();
    assert!(matches!(err, ManagerError::Conflict(ref c) if c.status == Status::Pending), "{err}");
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;

    h.manager.lifecycle(Lifecycle::Stop).await.unwrap();
    assert_eq!(h.manager.current_status(), Status::Paused);
    h.manager.lifecycle(Lifecycle::Stop).await.unwrap(); // already paused: no-op
    h.manager.lifecycle(Lifecycle::Start).await.unwrap();
    assert_eq!(h.manager.current_status(), Status::Running);

    h.manager.lifecycle(Lifecycle::Restart).await.unwrap();
    assert_eq!(h.manager.current_status(), Status::Rebooting);
    let err = h.manager.lifecycle(Lifecycle::Start).await.unwrap_err();
    assert!(err.to_string().contains("rebooting"), "{err}");
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    let calls = h.backend.calls();
    assert_eq!(
        calls[3..],
        ["pause", "resume", "apply_ssh_keys", "reset", "wait_ready", "configure"]
    );
}

#[tokio::test]
async fn an_exit_event_turns_into_error_and_start_boots_again() {
    let h = harness(&[]);
    let id = h.manager.create_json(&json!({})).await.unwrap().id;
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    h.events.send(BackendEvent::Exited { id, reason: "QEMU exited with status 1".into() }).unwrap();
    wait_for(&h.manager, Status::Error).await;
    assert_eq!(h.manager.status().error.as_deref(), Some("QEMU exited with status 1"));
    h.manager.lifecycle(Lifecycle::Start).await.unwrap();
    assert_eq!(h.manager.current_status(), Status::Pending);
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    assert!(h.backend.calls().ends_with(&["boot".into(), "wait_ready".into(), "configure".into()]));
}

#[tokio::test]
async fn a_started_event_configures_the_instance_again() {
    let h = harness(&[]);
    let id = h.manager.create_json(&json!({})).await.unwrap().id;
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    // Running, restarted behind our back (restart policy): configured again, still running.
    h.events.send(BackendEvent::Started { id: id.clone() }).unwrap();
    for _ in 0..500 {
        if h.backend.calls().iter().filter(|c| *c == "configure").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.backend.calls().iter().filter(|c| *c == "configure").count(), 2);
    assert_eq!(h.manager.current_status(), Status::Running);
    // In error (the engine went away), then back: pending until the guest is ready again.
    h.events.send(BackendEvent::Exited { id: id.clone(), reason: "engine gone".into() }).unwrap();
    wait_for(&h.manager, Status::Error).await;
    h.events.send(BackendEvent::Started { id }).unwrap();
    wait_for(&h.manager, Status::Pending).await;
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    assert!(h.backend.calls().ends_with(&["wait_ready".into(), "configure".into()]));
}

/// The instance's task runs one operation at a time: a command that fits waits for the one
/// in progress and is answered after it; a deletion refuses whatever still waits.
#[tokio::test]
async fn a_command_waits_for_the_operation_in_progress_and_a_delete_refuses_what_waits() {
    let h = harness(&[]);
    let id = h.manager.create_json(&json!({})).await.unwrap().id;
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    *h.backend.hold_configure.lock().unwrap() = true;
    // Restarted behind our back: the task configures it again (held in `configure`).
    h.events.send(BackendEvent::Started { id }).unwrap();
    while h.backend.calls().iter().filter(|c| *c == "configure").count() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let manager = h.manager.clone();
    let stop = tokio::spawn(async move { manager.lifecycle(Lifecycle::Stop).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!stop.is_finished(), "the stop waits for the configuration");
    assert_eq!(h.manager.current_status(), Status::Running);
    h.backend.configured.add_permits(1);
    stop.await.unwrap().unwrap();
    assert_eq!(h.manager.current_status(), Status::Paused);
    assert!(h.backend.calls().ends_with(&["configure".into(), "pause".into()]));

    // Running again and being configured (held): a stop fits, and waits…
    h.manager.lifecycle(Lifecycle::Start).await.unwrap();
    let configures = h.backend.calls().iter().filter(|c| *c == "configure").count();
    h.events.send(BackendEvent::Started { id: h.manager.instances()[0].id.clone() }).unwrap();
    while h.backend.calls().iter().filter(|c| *c == "configure").count() == configures {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let manager = h.manager.clone();
    let queued = tokio::spawn(async move { manager.lifecycle(Lifecycle::Stop).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!queued.is_finished());
    // …until the instance is deleted: then it is refused, and the teardown follows.
    h.manager.delete().await.unwrap();
    let err = queued.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("being deleted"), "{err}");
    h.backend.configured.add_permits(1);
    for _ in 0..200 {
        // The task leaves the registry first, then removes the record file.
        if h.manager.instances().is_empty() && record_files(&h).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(h.manager.instances().is_empty());
}

#[tokio::test]
async fn keys_added_while_pending_are_applied_when_ready() {
    let h = harness(&[]);
    let err = h.manager.add_ssh_key(KEY).await.unwrap_err();
    assert!(matches!(err, ManagerError::NotFound));
    h.manager.create_json(&json!({"ssh_enabled": true})).await.unwrap();
    h.manager.add_ssh_key(&format!("{KEY} me@laptop")).await.unwrap();
    h.manager.add_ssh_key(KEY).await.unwrap(); // the same key again: no duplicate
    assert_eq!(h.manager.instances()[0].ssh_keys.len(), 1);
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    assert_eq!(h.backend.keys_seen.lock().unwrap()[0], [format!("{KEY} me@laptop")]);

    h.manager.remove_ssh_key(KEY).await.unwrap();
    assert!(h.manager.instances()[0].ssh_keys.is_empty());
    assert_eq!(h.backend.calls().last().unwrap(), "apply_ssh_keys");

    *h.backend.fail.lock().unwrap() = Some("apply_ssh_keys");
    assert!(h.manager.add_ssh_key(KEY).await.is_err());
    assert!(h.manager.instances()[0].ssh_keys.is_empty(), "a key not applied is not kept");
}

#[tokio::test]
async fn an_instance_holds_at_most_64_renter_keys() {
    let h = harness(&[]);
    h.manager.create_json(&json!({"ssh_enabled": true})).await.unwrap();
    let key = |i: u8| {
        let seed = [i; 32];
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed),
        );
        key.public_key().to_openssh().unwrap()
    };
    for i in 0..64 {
        h.manager.add_ssh_key(&key(i)).await.unwrap();
    }
    let err = h.manager.add_ssh_key(&key(64)).await.unwrap_err();
    assert!(err.to_string().contains("64 SSH keys"), "{err}");
    assert_eq!(h.manager.instances()[0].ssh_keys.len(), 64);
    h.manager.add_ssh_key(&key(3)).await.unwrap(); // one it has: no change, no refusal
    h.manager.remove_ssh_key(&key(0)).await.unwrap();
    h.manager.add_ssh_key(&key(64)).await.unwrap();
}

#[tokio::test]
async fn keys_need_ssh_enabled() {
    let h = harness(&[]);
    h.manager.create_json(&json!({})).await.unwrap();
    let err = h.manager.add_ssh_key(KEY).await.unwrap_err();
    assert!(err.to_string().contains("SSH is not enabled"), "{err}");
    let err = h.manager.add_ssh_key("not a key").await.unwrap_err();
    assert!(matches!(err, ManagerError::Invalid(_)));
}

#[tokio::test]
async fn restore_adopts_running_instances_and_marks_vanished_ones() {
    let h = harness(&[]);
    h.manager.create_json(&json!({})).await.unwrap();
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    let Harness { dir, manager, .. } = h;
    drop(manager);

    let again = harness_in(dir, Scripted::new(), &[]);
    let records = again.manager.stored_records().unwrap();
    again.manager.restore_with(records.into_iter().map(|i| (i, Restore::Adopt)).collect()).await;
    wait_for(&again.manager, Status::Running).await;
    for _ in 0..100 {
        if again.backend.calls().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(again.backend.calls(), ["adopt", "configure"]);

    let gone = Scripted::new();
    *gone.gone.lock().unwrap() = Some("no QEMU process".into());
    let third = harness_in(again.dir, gone, &[]);
    let records = third.manager.stored_records().unwrap();
    third.manager.restore_with(records.into_iter().map(|i| (i, Restore::Adopt)).collect()).await;
    assert_eq!(third.manager.current_status(), Status::Error);
    let error = third.manager.status().error.unwrap();
    assert!(error.contains("exited while the agent was down"), "{error}");
}

/// A sweeper that records what it tears down (for `recover`, which runs no backend).
#[derive(Default)]
struct Sweeps(StdMutex<Vec<String>>);

#[async_trait]
impl backend::HostSweeper for Sweeps {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }
    async fn find_owned(&self) -> Result<Vec<backend::Owned>, BackendError> {
        Ok(Vec::new())
    }
    async fn reap(&self, _: &backend::Owned) -> Result<(), BackendError> {
        Ok(())
    }
    async fn halt(&self, _: &backend::Owned) -> Result<(), BackendError> {
        Ok(())
    }
    async fn tear_down(&self, instance: &Instance) -> Result<(), BackendError> {
        self.0.lock().unwrap().push(instance.id.clone());
        Ok(())
    }
}

/// A record an agent left marked deleting (killed mid-teardown) is torn down and forgotten at
/// the next start-up, and likewise by `recover` with the agent stopped.
#[tokio::test]
async fn an_interrupted_deletion_is_finished_at_start_up_and_by_recover() {
    for offline in [false, true] {
        let h = harness(&[]);
        h.manager.create_json(&json!({})).await.unwrap();
        h.backend.ready.add_permits(1);
        wait_for(&h.manager, Status::Running).await;
        let mut record = h.manager.instances()[0].clone();
        record.deleting = true;
        Store::open(h.dir.path()).unwrap().save(&record).unwrap();
        let Harness { dir, manager, .. } = h;
        drop(manager);

        let records = Store::open(dir.path()).unwrap().load_all().unwrap();
        assert!(records[0].deleting);
        let plan: Vec<_> = records.into_iter().map(|i| (i, Restore::TearDown)).collect();
        if offline {
            let sweeps = Arc::new(Sweeps::default());
            let store = Store::open(dir.path()).unwrap();
            let manager = Manager::offline(store, vec![sweeps.clone()]);
            let outcomes = manager.restore_offline(plan).await;
            assert!(outcomes.iter().all(|(_, r)| r.is_ok()), "{outcomes:?}");
            assert_eq!(*sweeps.0.lock().unwrap(), [record.id.clone()]);
        } else {
            let again = harness_in(dir, Scripted::new(), &[]);
            again.manager.restore_with(plan).await;
            for _ in 0..200 {
                if again.manager.instances().is_empty() && record_files(&again).is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(again.backend.calls(), ["destroy"]);
            assert!(record_files(&again).is_empty());
            continue;
        }
        assert!(Store::open(dir.path()).unwrap().load_all().unwrap().is_empty());
    }
}

#[tokio::test]
async fn local_mode_answers_with_the_host_ports() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let local = ManagerSettings { local: true, ..settings(&[]) };
    let manager = Manager::new(Ok(Scripted::new() as Arc<dyn backend::Lifecycle>), store, local);
    let body = json!({"ports": [{"guest_port": 8080, "remote_port": 20000, "proto": "http"}]});
    let created = manager.create_json(&body).await.unwrap();
    let instance = &manager.instances()[0];
    assert_eq!(instance.ports[0].remote_port, 20000, "the record keeps the remote port");
    let host = instance.ports[0].host_port.to_string();
    assert_eq!(created.ports["8080"], host);
    assert_eq!(manager.status().ports.unwrap()["8080"], host);
}

mod publish;

#[test]
fn jupyter_gets_a_token_of_its_own_only_when_the_agent_starts_it_in_a_vm() {
    let limits = settings(&[]).limits;
    let parse = |body| spec::parse_create(&body, &limits).unwrap();
    let jupyter =
        json!({"ports": [{"container_port": 8888, "remote_port": 20001, "proto": "http"}]});
    let token = |body, kind| jupyter_token(&parse(body), kind).map(|t| t.expose().to_owned());

    let generated = token(jupyter.clone(), BackendKind::Qemu).expect("a token for our Jupyter");
    assert_eq!(generated.len(), 40);
    assert!(generated.chars().all(|c| c.is_ascii_alphanumeric()), "{generated}");
    let again = token(jupyter.clone(), BackendKind::Qemu).unwrap();
    assert_ne!(generated, again, "each instance gets its own");

    let mut renters = jupyter.clone();
    renters["env_variables"] = json!({"JUPYTER_TOKEN": "mine"});
    assert_eq!(token(renters, BackendKind::Qemu).as_deref(), Some("mine"));
    let mut own_command = jupyter.clone();
    own_command["command"] = json!("sleep infinity");
    assert_eq!(token(own_command, BackendKind::Qemu), None, "the renter's command runs");
    assert_eq!(token(json!({"ssh_enabled": true}), BackendKind::Qemu), None, "no port 8888");
    assert_eq!(token(jupyter, BackendKind::Docker), None, "the container runs its own image");
}
