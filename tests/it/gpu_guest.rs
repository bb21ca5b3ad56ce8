//! In-guest GPU metrics end to end: the real agent (production mode against the mock control
//! plane), a real VM under TCG booting the CI guest, whose `nvidia-smi` stand-in prints the
//! real CSV format; the values must reach `/stats` over one long-lived SSH channel, come back
//! after the channel breaks and after the agent is killed and adopts the VM, and stop with the
//! instance.

use std::time::Duration;

use serde_json::Value;

use crate::support::agent::{Agent, Api, Dirs, free_port};
use crate::support::mock_cp::{Behaviour, MockCp, api_key, ok_stats};
use crate::support::vm::{
    create_running, guest_logins, openssh_to, record, small_vm, vm_env, wait_gone, wait_status,
};

const WAIT: Duration = Duration::from_secs(120);

/// `/stats` bodies accepted after the first `skip` requests.
fn stats_after(cp: &MockCp, skip: usize) -> Vec<Value> {
    ok_stats(&cp.requests()[skip..]).into_iter().map(|r| r.body.clone()).collect()
}

fn has_guest_gpus(body: &Value) -> bool {
    body["gpus"].as_array().is_some_and(|g| g.len() == 2)
}

/// Processes whose parent is `pid`, as `name state`.
fn children(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((name, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("?");
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            let name = name.split_once('(').map(|(_, n)| n).unwrap_or_default();
            out.push(format!("{name} {state}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_nvidia_smi_values_reach_stats_and_stop_with_the_instance() {
    let cp =
        MockCp::start(Behaviour { host_exists: true, without_frp: true, ..Default::default() });
    let dirs = Dirs::new();
    let mut env = cp.agent_env(&api_key(), 500);
    env.extend(vm_env());
    // No driver on the host: every GPU value in /stats comes from the guest.
    env.push(("QUDATA_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1".to_owned()));
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    cp.until("a first sample", WAIT, |r| !ok_stats(r).is_empty()).await;
    let api = Api::new(&agent, Some(&cp.only_secret()));

    let id = create_running(&api, &small_vm()).await;

    // The stand-in's values: two H100s, GPU 0 moving every sample, GPU 1 without power draw.
    let before = cp.requests().len();
    cp.until("guest GPU values in /stats", WAIT, |r| {
        ok_stats(&r[before..]).iter().filter(|s| has_guest_gpus(&s.body)).count() >= 10
    })
    .await;
    // Readiness, configuration and the metrics channel: one SSH login (it was three).
    assert_eq!(guest_logins(&dirs, &id), 1, "one SSH session per guest");
    let samples: Vec<Value> = stats_after(&cp, before).into_iter().filter(has_guest_gpus).collect();
    let last = samples.last().unwrap();
    assert_eq!(last["status"], "running");
    let gpus = last["gpus"].as_array().unwrap();
    assert_eq!((gpus[0]["index"].as_u64(), gpus[1]["index"].as_u64()), (Some(0), Some(1)));
    assert!(gpus.iter().all(|g| g["mem_total_mib"] == 81559), "{last}");
    assert_eq!(gpus[1]["power_w"], 0.0, "[N/A] is 0: {last}");
    assert_eq!((gpus[1]["temp"].as_i64(), gpus[1]["util"].as_f64()), (Some(33), Some(0.0)));
    let power = gpus[0]["power_w"].as_f64().unwrap();
    assert!((70.0..100.0).contains(&power) && power.fract() == 0.25, "{last}");
    // The flat compat keys carry GPU 0.
    assert_eq!(last["gpu_util"], gpus[0]["util"]);
    assert_eq!(last["gpu_temp"], gpus[0]["temp"]);
    let utils: std::collections::BTreeSet<u64> =
        samples.iter().map(|s| s["gpu_util"].as_f64().unwrap() as u64).collect();
    assert!(utils.len() >= 3, "values move with the stream: {utils:?}");
    // One long-lived channel, nothing spawned per sample: QEMU is the agent's only child.
    let kids = children(agent.pid());
    assert!(kids.len() == 1 && kids[0].starts_with("qemu-system-x86 "), "{kids:?}");
    assert!(!kids[0].ends_with(" Z"), "{kids:?}");

    // The channel breaks (nvidia-smi killed in the guest): the agent opens a new one.
    let key = dirs.data.join("keys/guest_ed25519");
    // The agent's way in: the guest's own address on the bridge.
    let address = record(&dirs, &id)["network"]["address"].as_str().unwrap().to_owned();
    openssh_to(&key, &address, 22, "killall nvidia-smi").expect("kill the guest's nvidia-smi");
    let broken = cp.requests().len();
    cp.until("a gap and GPU values again", WAIT, |r| {
        let s = ok_stats(&r[broken..]);
        let gap = s.iter().position(|s| !has_guest_gpus(&s.body));
        gap.is_some_and(|at| s[at..].iter().any(|s| has_guest_gpus(&s.body)))
    })
    .await;
    assert!(agent.output().contains("opening it again"), "{}", agent.output());
    assert_eq!(guest_logins(&dirs, &id), 2, "the agent's session and the test's `killall`");

    // The agent is killed and started again: it adopts the VM and opens a new stream.
    agent.kill9();
    let restarted = cp.requests().len();
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    cp.until("guest GPU values from the new agent", WAIT, |r| {
        ok_stats(&r[restarted..]).iter().filter(|s| has_guest_gpus(&s.body)).count() >= 2
    })
    .await;
    let secret = std::fs::read_to_string(dirs.data.join("agent-secret")).unwrap();
    let api = Api::new(&agent, Some(secret.trim()));

    // Deleted: the stream stops with the VM; no GPU values after `destroyed`.
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", WAIT).await;
    let gone = cp.requests().len();
    cp.until("destroyed samples", WAIT, |r| {
        ok_stats(&r[gone..]).iter().filter(|s| s.body["status"] == "destroyed").count() >= 4
    })
    .await;
    let after = stats_after(&cp, gone);
    let destroyed: Vec<&Value> = after.iter().filter(|s| s["status"] == "destroyed").collect();
    assert!(destroyed.iter().all(|s| s.get("gpus").is_none()), "{destroyed:?}");
    // QEMU (adopted, so not the agent's child) and the VM's files are gone.
    wait_gone(&dirs, &id, WAIT).await;
}
