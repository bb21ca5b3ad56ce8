//! The guest SSH client against a real OpenSSH server standing in for the guest, with the real
//! OpenSSH client as a second opinion on keys (DESIGN.md "Guest configuration").

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qudata_agent::guest::{
    GuestClient, GuestCommand, GuestError, GuestPath, GuestPaths, GuestTarget, ManagementKey, setup,
};
use tokio::time::Instant;

use crate::support::sshd::{Sshd, keygen, openssh_login};
use crate::support::wait::wait_until_blocking;

mod session;

struct Guest {
    sshd: Sshd,
    key: ManagementKey,
    state: tempfile::TempDir,
    target: GuestTarget,
    paths: GuestPaths,
}

fn guest() -> Guest {
    let state = tempfile::tempdir().unwrap();
    let key = ManagementKey::load_or_create(&state.path().join("keys")).unwrap();
    let sshd = Sshd::start(&[&key.public_line()]);
    let target = GuestTarget::new("vm-test-1", sshd.port, state.path().join("known_host"));
    let paths = GuestPaths {
        authorized_keys: gpath(&sshd.authorized_keys()),
        run_dir: gpath(&sshd.run_dir()),
        homes: gpath(&state.path().join("home")),
        state_dir: gpath(&state.path().join("guest-state")),
    };
    Guest { sshd, key, state, target, paths }
}

fn gpath(p: &Path) -> GuestPath {
    GuestPath::new(p.to_str().unwrap()).unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

impl Guest {
    async fn connect(&self) -> GuestClient {
        match GuestClient::connect(&self.target, &self.key, soon()).await {
            Ok(c) => c,
            Err(e) => panic!("{e}\nsshd log:\n{}", self.sshd.log()),
        }
    }
}

#[tokio::test]
async fn exec_reports_status_and_streams_and_stdin_round_trips() {
    let g = guest();
    let client = g.connect().await;
    assert_eq!(mode(&g.target.host_keys.file), 0o600, "host key pinned privately");

    let out =
        client.exec(&GuestCommand::fixed("echo out; echo err >&2; exit 3"), b"").await.unwrap();
    assert_eq!(
        (out.status, out.stdout.as_slice(), out.stderr.as_slice()),
        (Some(3), &b"out\n"[..], &b"err\n"[..])
    );
    let failed =
        client.run("fail on purpose", &GuestCommand::fixed("echo why >&2; exit 4"), b"").await;
    match failed {
        Err(GuestError::CommandFailed { instance, status, stderr, .. }) => {
            assert_eq!(
                (instance.as_str(), status.as_str(), stderr.as_str()),
                ("vm-test-1", "exit status 4", "why")
            );
        }
        other => panic!("{other:?}"),
    }

    // Every byte value, bigger than one SSH window packet.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let echoed = client.exec(&GuestCommand::fixed("cat"), &data).await.unwrap();
    assert!(echoed.success() && echoed.stdout == data);

    let file = g.sshd.run_dir().join("uploaded.bin");
    client.upload(&gpath(&file), &data, 0o640).await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), data);
    assert_eq!(mode(&file), 0o640);
    client.upload(&gpath(&file), b"smaller", 0o600).await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"smaller");
    assert_eq!(mode(&file), 0o600);
    client.close().await;
}

#[tokio::test]
async fn a_changed_host_key_is_refused_at_once_and_names_the_instance() {
    let mut g = guest();
    g.connect().await.close().await;
    let pinned = std::fs::read_to_string(&g.target.host_keys.file).unwrap();

    g.sshd.restart(false);
    g.connect().await.close().await; // same key: still accepted

    g.sshd.restart(true);
    let err = GuestClient::connect(&g.target, &g.key, soon()).await.err().expect("refused");
    assert!(
        matches!(err, GuestError::HostKeyChanged { ref instance, .. } if instance == "vm-test-1"),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("vm-test-1") && text.contains("neither the known one"), "{text}");
    // The retry loop stops on it instead of retrying until its deadline.
    let far = Instant::now() + Duration::from_secs(600);
    let err = GuestClient::wait_reachable(&g.target, &g.key, far).await.err().expect("refused");
    assert!(matches!(err, GuestError::HostKeyChanged { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&g.target.host_keys.file).unwrap(), pinned, "pin kept");
}

#[tokio::test]
async fn authorized_keys_are_set_replaced_and_removed() {
    let g = guest();
    let client = g.connect().await;
    let known = g.state.path().join("openssh_known_hosts");
    let (id1, id2) = (g.state.path().join("renter1"), g.state.path().join("renter2"));
    let (k1, k2) = (keygen(&id1), keygen(&id2));
    let mgmt = g.key.public_line();

    setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), std::slice::from_ref(&k1))
        .await
        .unwrap();
    assert_eq!(mode(&g.sshd.authorized_keys()), 0o600);
    openssh_login(g.sshd.port, &id1, &known).unwrap();
    assert!(openssh_login(g.sshd.port, &id2, &known).is_err(), "key 2 not yet added");

    setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), std::slice::from_ref(&k2))
        .await
        .unwrap();
    assert!(openssh_login(g.sshd.port, &id1, &known).is_err(), "key 1 replaced");
    openssh_login(g.sshd.port, &id2, &known).unwrap();

    setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), &[]).await.unwrap();
    assert!(openssh_login(g.sshd.port, &id2, &known).is_err(), "key 2 removed");
    assert_eq!(std::fs::read_to_string(g.sshd.authorized_keys()).unwrap(), format!("{mgmt}\n"));
    g.connect().await.close().await; // the agent kept its own access

    let hostile = format!("command=\"touch /tmp/x\" {k1}");
    let err =
        setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), &[hostile]).await.unwrap_err();
    assert!(matches!(err, GuestError::BadValue { .. }), "{err}");
}

/// The image's default user (cloud-init gave it the management key at first boot, as stock
/// images do) gets exactly the renter's keys, also after the management key has left its file;
/// a home without the management key is not touched.
#[tokio::test]
async fn the_default_user_gets_the_renters_keys_and_not_the_agents() {
    let g = guest();
    let client = g.connect().await;
    let mgmt = g.key.public_line();
    let homes = g.state.path().join("home");
    let renter_home = homes.join("renter");
    let other_home = homes.join("other");
    for (home, line) in
        [(&renter_home, format!("{mgmt}\n")), (&other_home, "ssh-ed25519 X o\n".into())]
    {
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        std::fs::write(home.join(".ssh/authorized_keys"), line).unwrap();
    }
    let (id1, id2) = (g.state.path().join("id1"), g.state.path().join("id2"));
    let (k1, k2) = (keygen(&id1), keygen(&id2));
    let file = renter_home.join(".ssh/authorized_keys");

    setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), std::slice::from_ref(&k1))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{k1}\n"));
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&renter_home.join(".ssh")), 0o700);
    assert_eq!(
        std::fs::read_to_string(other_home.join(".ssh/authorized_keys")).unwrap(),
        "ssh-ed25519 X o\n",
        "a home cloud-init did not give the management key is not the default user's"
    );

    // The management key is gone from that file now; the home is remembered.
    setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), std::slice::from_ref(&k2))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{k2}\n"));
    setup::set_authorized_keys(&client, &g.paths, Some(&mgmt), &[]).await.unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
}

fn wait_for_file(path: &Path) -> Vec<u8> {
    let what = format!("{} to be written", path.display());
    wait_until_blocking(what, Duration::from_secs(20), Duration::from_millis(50), || {
        std::fs::read(path).ok().filter(|bytes| !bytes.is_empty())
    })
}

#[tokio::test]
async fn hostile_values_reach_the_service_as_data() {
    let g = guest();
    let client = g.connect().await;
    let markers = tempfile::tempdir().unwrap();
    let m = markers.path().display();
    let value = format!(
        "$(touch {m}/a) `touch {m}/b` '; touch {m}/c; ' \"; touch {m}/d; \" \\ $HOME ; x'\"'\"'y"
    );
    let out = g.state.path().join("value.out");
    let env =
        BTreeMap::from([("HOSTILE".to_string(), value.clone()), ("PLAIN".into(), "p".into())]);
    let command = format!(
        "printf '%s' \"$HOSTILE\" > {}; exec sleep 30 # it's \"quoted\"; touch {m}/e",
        out.display()
    );
    let pid = setup::start_service(&client, &g.paths, &command, &env).await.unwrap();
    assert_eq!(wait_for_file(&out), value.as_bytes(), "value read back byte-exact in the service");
    let created: Vec<_> = std::fs::read_dir(markers.path()).unwrap().collect();
    assert!(created.is_empty(), "a hostile value ran as code: {created:?}");
    assert_eq!(mode(&g.sshd.run_dir().join("renter.env")), 0o600);
    assert_eq!(setup::service_pid(&client, &g.paths).await.unwrap(), Some(pid));
    setup::stop_service(&client, &g.paths).await.unwrap();
}

fn alive(pid: u32) -> bool {
    // A zombie (nobody reaps orphans in some containers) is not alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").unwrap().1.starts_with('Z'),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_service_writes_its_pidfile_is_kept_when_unchanged_and_replaced_when_changed() {
    let g = guest();
    let client = g.connect().await;
    let pidfile = g.sshd.run_dir().join("renter.pid");
    assert_eq!(setup::service_pid(&client, &g.paths).await.unwrap(), None);
    setup::stop_service(&client, &g.paths).await.unwrap(); // nothing to stop: fine

    let env = BTreeMap::new();
    let first = setup::start_service(&client, &g.paths, "exec sleep 60", &env).await.unwrap();
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap().trim(), first.to_string());
    assert!(alive(first));

    // An agent that restarted asks again with the same command and environment: the
    // renter's process (their Jupyter and its kernels) is left alone.
    let again = setup::start_service(&client, &g.paths, "exec sleep 60", &env).await.unwrap();
    assert_eq!(again, first);
    assert!(alive(first));

    let env = BTreeMap::from([("CHANGED".to_string(), "1".to_string())]);
    let second = setup::start_service(&client, &g.paths, "exec sleep 60", &env).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap().trim(), second.to_string());
    assert!(!alive(first), "the old service was stopped first");
    assert!(alive(second));
    assert_eq!(setup::service_pid(&client, &g.paths).await.unwrap(), Some(second));

    setup::stop_service(&client, &g.paths).await.unwrap();
    assert!(!alive(second));
    assert!(!pidfile.exists());
    assert_eq!(setup::service_pid(&client, &g.paths).await.unwrap(), None);
}

#[tokio::test]
async fn a_server_that_never_speaks_hits_the_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket); // accepted, never answered
        }
    });
    let state = tempfile::tempdir().unwrap();
    let key = ManagementKey::generate();
    let target = GuestTarget::new("vm-silent", port, state.path().join("known_host"));

    let deadline = Instant::now() + Duration::from_secs(2);
    let err = GuestClient::connect(&target, &key, deadline).await.err().expect("times out");
    assert!(
        matches!(err, GuestError::Timeout { ref instance, .. } if instance == "vm-silent"),
        "{err}"
    );
    assert!(err.to_string().contains("vm-silent"), "{err}");
    assert!(Instant::now() >= deadline, "gave up only at the deadline");

    let err = GuestClient::wait_reachable(&target, &key, Instant::now() + Duration::from_secs(2))
        .await
        .err()
        .expect("unreachable");
    match err {
        GuestError::Unreachable { instance, last, .. } => {
            assert_eq!(instance, "vm-silent");
            assert!(matches!(*last, GuestError::Timeout { .. }), "{last}");
        }
        other => panic!("{other}"),
    }
    assert!(!state.path().join("known_host").exists(), "nothing pinned without a key");
    hold.abort();
}

#[tokio::test]
async fn waiting_retries_a_guest_that_is_not_listening_yet() {
    let mut g = guest();
    g.sshd.stop();
    let err =
        GuestClient::wait_reachable(&g.target, &g.key, Instant::now() + Duration::from_secs(1))
            .await
            .err()
            .expect("nothing listens");
    match err {
        GuestError::Unreachable { last, .. } => {
            assert!(matches!(*last, GuestError::NotListening { .. }), "{last}")
        }
        other => panic!("{other}"),
    }
    // sshd comes up while the agent is already waiting.
    let mut sshd = g.sshd;
    let boot = tokio::task::spawn_blocking(move || {
        // Deliberately late: the client must already be waiting when sshd comes up.
        std::thread::sleep(Duration::from_secs(1));
        sshd.restart(false);
        sshd
    });
    let client = GuestClient::wait_reachable(&g.target, &g.key, soon()).await.unwrap();
    assert!(client.exec(&GuestCommand::fixed("true"), b"").await.unwrap().success());
    drop(boot.await.unwrap());
}

#[tokio::test]
async fn a_command_that_runs_too_long_is_cut_off() {
    let mut g = guest();
    g.target.exec_timeout = Duration::from_secs(3);
    let client = g.connect().await;
    let err = client.exec(&GuestCommand::fixed("sleep 60"), b"").await.unwrap_err();
    assert!(matches!(err, GuestError::Timeout { action: "a guest command", .. }), "{err}");
    // The connection still serves the next command.
    assert!(client.exec(&GuestCommand::fixed("true"), b"").await.unwrap().success());
}

#[test]
fn the_management_key_is_private_and_openssh_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = ManagementKey::load_or_create(dir.path()).unwrap();
    let file = dir.path().join(qudata_agent::guest::keys::MANAGEMENT_KEY_FILE);
    assert_eq!(mode(&file), 0o600);
    let again = ManagementKey::load_or_create(dir.path()).unwrap();
    assert_eq!(again.public_line(), key.public_line());
    // ssh-keygen derives the same public key from the stored private key.
    let out = Command::new("ssh-keygen").arg("-y").arg("-f").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let derived = String::from_utf8(out.stdout).unwrap();
    let body = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(body(&derived), body(&key.public_line()));
}

/// The CI guest has no bash and no systemd: the uploaded scripts must work with busybox
/// applets only (run here directly, the way the guest's dropbear would run them).
#[test]
fn the_service_scripts_work_under_busybox_alone() {
    use qudata_agent::guest::script;
    let busybox = ["/usr/bin/busybox", "/bin/busybox"].into_iter().find(|p| Path::new(p).exists());
    let busybox = busybox.expect("busybox is installed (tests/packages.txt)");
    let dir = tempfile::tempdir().unwrap();
    let (bin, run) = (dir.path().join("bin"), dir.path().join("run"));
    std::fs::create_dir(&bin).unwrap();
    std::fs::create_dir(&run).unwrap();
    for applet in ["sh", "cat", "dirname", "setsid", "sleep", "mv", "rm", "printf", "kill", "cmp"] {
        std::os::unix::fs::symlink(busybox, bin.join(applet)).unwrap();
    }
    let value = "it's $(id) `id` \"q\" ; \\";
    let out = dir.path().join("out");
    let env = BTreeMap::from([("V".to_string(), value.to_string())]);
    std::fs::write(run.join(script::RUN_SCRIPT), script::RUN_SCRIPT_TEXT).unwrap();
    std::fs::write(run.join(script::SERVICE_SCRIPT), script::SERVICE_SCRIPT_TEXT).unwrap();
    let put_service = |env: &BTreeMap<String, String>| {
        std::fs::write(run.join(script::NEW_ENV_FILE), script::env_file(env).unwrap()).unwrap();
        let command = format!("printf '%s' \"$V\" > {}; exec sleep 30", out.display());
        std::fs::write(run.join(script::NEW_COMMAND_FILE), command).unwrap();
    };
    put_service(&env);
    let service = |verb: &str| {
        let out = Command::new(bin.join("sh"))
            .arg(run.join(script::SERVICE_SCRIPT))
            .arg(verb)
            .env_clear()
            .env("PATH", &bin)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.code(), text, String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (code, first, err) = service("ensure");
    assert_eq!(code, Some(0), "{err}");
    let first: u32 = first.parse().unwrap();
    assert_eq!(wait_for_file(&out), value.as_bytes());
    assert_eq!(service("status").1, first.to_string());
    put_service(&env);
    assert_eq!(service("ensure").1, first.to_string(), "unchanged: kept");
    put_service(&BTreeMap::from([("V".to_string(), "other".to_string())]));
    let (_, second, err) = service("ensure");
    let second: u32 = second.parse().unwrap_or_else(|_| panic!("{err}"));
    assert_ne!(first, second);
    assert!(!alive(first) && alive(second));
    assert_eq!(service("stop").0, Some(0));
    assert!(!alive(second));
    assert_eq!(service("status").0, Some(3));
}
