//! Port publishing through a scripted `Publisher` that writes into the backend's call log, so
//! the order of backend and tunnel steps is visible in one list.

use super::*;
use crate::instance::manager::Publisher;
use crate::instance::spec::SpecError;

struct ScriptedPublisher {
    log: Arc<Scripted>,
    refuse: StdMutex<Option<SpecError>>,
    /// What `publish` and `errors` report (guest port → error).
    errors: StdMutex<BTreeMap<u16, String>>,
    published: StdMutex<Vec<String>>,
}

impl ScriptedPublisher {
    fn new(log: &Arc<Scripted>) -> Arc<ScriptedPublisher> {
        Arc::new(ScriptedPublisher {
            log: log.clone(),
            refuse: StdMutex::default(),
            errors: StdMutex::default(),
            published: StdMutex::default(),
        })
    }

    fn note(&self, call: String) {
        self.log.calls.lock().unwrap().push(call);
    }
}

#[async_trait]
impl Publisher for ScriptedPublisher {
    fn validate(&self, _: &Instance) -> Result<(), SpecError> {
        self.refuse.lock().unwrap().clone().map_or(Ok(()), Err)
    }
    async fn publish(&self, i: &Instance) -> Result<BTreeMap<u16, String>, PublishError> {
        self.note("publish".into());
        self.published.lock().unwrap().push(i.id.clone());
        Ok(self.errors.lock().unwrap().clone())
    }
    async fn unpublish(&self, id: &str) -> Result<(), PublishError> {
        self.note(format!("unpublish {id}"));
        self.published.lock().unwrap().retain(|p| p != id);
        Ok(())
    }
    async fn errors(&self, _: &str) -> BTreeMap<u16, String> {
        self.errors.lock().unwrap().clone()
    }
    fn published_ids(&self) -> Vec<String> {
        self.published.lock().unwrap().clone()
    }
}

fn with_publisher(h: &Harness) -> Arc<ScriptedPublisher> {
    let p = ScriptedPublisher::new(&h.backend);
    h.manager.set_publisher(p.clone());
    p
}

async fn until_calls(h: &Harness, what: &str, check: impl Fn(&[String]) -> bool) {
    for _ in 0..500 {
        if check(&h.backend.calls()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}: {:?}", h.backend.calls());
}

const HTTP_8888: &str =
    r#"{"ssh_enabled":true,"ports":[{"container_port":8888,"remote_port":20000,"proto":"http"}]}"#;

fn body() -> serde_json::Value {
    serde_json::from_str(HTTP_8888).unwrap()
}

#[tokio::test]
async fn a_tunnel_refusal_is_a_400_and_creates_nothing() {
    let h = harness(&[]);
    let p = with_publisher(&h);
    let refusal = SpecError { field: "tunnel_token".into(), reason: "not a DNS label".into() };
    *p.refuse.lock().unwrap() = Some(refusal.clone());
    let err = h.manager.create_json(&body()).await.unwrap_err();
    assert!(matches!(err, ManagerError::Invalid(ref e) if *e == refusal), "{err}");
    assert!(record_files(&h).is_empty());
    assert!(h.manager.instances().is_empty());
    assert!(h.backend.calls().is_empty(), "nothing launched or published");
}

#[tokio::test]
async fn ports_are_published_once_after_launch_without_waiting_for_the_guest() {
    let h = harness(&[]);
    let p = with_publisher(&h);
    let id = h.manager.create_json(&body()).await.unwrap().id;
    // Published while the guest still boots (no ready permit yet).
    until_calls(&h, "publish", |c| c.contains(&"publish".to_owned())).await;
    assert_eq!(h.manager.current_status(), Status::Pending);
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    assert_eq!(h.backend.calls(), ["launch", "publish", "wait_ready", "configure"]);
    assert_eq!(p.published_ids(), [id]);
    assert_eq!(h.manager.status().port_errors, None);
}

#[tokio::test]
async fn delete_withdraws_the_ports_before_teardown() {
    let h = harness(&[]);
    let p = with_publisher(&h);
    let id = h.manager.create_json(&body()).await.unwrap().id;
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    h.manager.delete().await.unwrap();
    until_calls(&h, "destroy", |c| c.contains(&"destroy".to_owned())).await;
    let calls = h.backend.calls();
    assert_eq!(calls[calls.len() - 2..], [format!("unpublish {id}"), "destroy".to_owned()]);
    assert!(p.published_ids().is_empty());
}

#[tokio::test]
async fn a_refused_port_shows_in_the_status_and_the_instance_stays_usable() {
    let h = harness(&[]);
    let p = with_publisher(&h);
    p.errors.lock().unwrap().insert(8888, "port already used".into());
    h.manager.create_json(&body()).await.unwrap();
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    let want = BTreeMap::from([("8888".to_owned(), "port already used".to_owned())]);
    assert_eq!(h.manager.status().port_errors, Some(want.clone()));
    let live = h.manager.status_live().await;
    let json = serde_json::to_value(&live).unwrap();
    assert_eq!(json["port_errors"], json!({"8888": "port already used"}));
    assert_eq!(json["status"], "running");

    // The server takes the port later: the live view clears the error.
    p.errors.lock().unwrap().clear();
    let json = serde_json::to_value(h.manager.status_live().await).unwrap();
    assert!(json.get("port_errors").is_none(), "{json}");
}

#[tokio::test]
async fn a_late_publisher_publishes_live_instances_and_withdraws_orphans() {
    let h = harness(&[]);
    let id = h.manager.create_json(&body()).await.unwrap().id;
    h.backend.ready.add_permits(1);
    wait_for(&h.manager, Status::Running).await;
    let p = ScriptedPublisher::new(&h.backend);
    *p.published.lock().unwrap() = vec!["gone-1".into(), id.clone()];
    h.manager.set_publisher(p.clone());
    until_calls(&h, "publish and orphan withdrawal", |c| {
        c.contains(&"publish".to_owned()) && c.contains(&"unpublish gone-1".to_owned())
    })
    .await;
    let calls = h.backend.calls();
    assert!(!calls.contains(&format!("unpublish {id}")), "{calls:?}");
    assert_eq!(calls.iter().filter(|c| *c == "publish").count(), 1, "{calls:?}");
}
