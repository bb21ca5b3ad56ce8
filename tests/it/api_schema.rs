//! The agent API against its own OpenAPI document (`openapi.json`), fuzzed by schemathesis
//! (from PyPI, in a venv of its own under target/) against a running local-mode agent on the
//! QEMU backend: every answer must be JSON, match the document (status, content type, body),
//! and no request a client can make may get a 5xx. Bounded in examples per operation.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::agent::{Api, local_secret};
use crate::support::vm::{fresh_agent, wait_gone};

/// Pinned: its command line and checks are what this test speaks.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Examples per operation (`QUDATA_SCHEMA_EXAMPLES` raises it).
const EXAMPLES: &str = "25";

/// schemathesis's `st`, installed on first use into target/tmp/schemathesis.
fn st() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/schemathesis");
    let st = venv.join("bin/st");
    let stamp = venv.join(SCHEMATHESIS);
    if st.exists() && stamp.exists() {
        return st;
    }
    let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
    assert!(made.is_ok_and(|s| s.success()), "python3 -m venv (apt-get install python3-venv)");
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", SCHEMATHESIS])
        .status();
    assert!(pip.is_ok_and(|s| s.success()), "pip install {SCHEMATHESIS}");
    std::fs::write(stamp, b"").unwrap();
    st
}

#[tokio::test]
async fn every_answer_matches_the_document_and_no_request_gets_a_server_error() {
    let st = st();
    let dirs = crate::support::agent::Dirs::new();
    let mut agent = fresh_agent(&dirs);
    agent.wait_ready().await;
    let secret = local_secret(&dirs);
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let examples = std::env::var("QUDATA_SCHEMA_EXAMPLES").unwrap_or_else(|_| EXAMPLES.into());
    let report = dirs.root.path().join("schemathesis.xml");
    let run = tokio::task::spawn_blocking({
        let url = format!("http://127.0.0.1:{}", agent.port);
        let report = report.clone();
        let scratch = dirs.root.path().to_owned();
        move || {
            Command::new(&st)
                // Its cache (`.schemathesis/`) goes to the test's own directory.
                .current_dir(&scratch)
                .arg("run")
                .arg(&document)
                .args(["--url", &url])
                .args(["--header", &format!("X-Agent-Secret: {secret}")])
                .args([
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,\
                     response_schema_conformance,response_headers_conformance,ignored_auth",
                ])
                .args(["--max-examples", &examples])
                .args(["--request-timeout", "70"])
                .args(["--generation-deterministic", "--no-color"])
                .args(["--report", "junit", "--report-junit-path"])
                .arg(&report)
                .env("SCHEMATHESIS_HOOKS", "")
                .output()
                .expect("run schemathesis")
        }
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    println!("{out}");
    assert!(
        run.status.success(),
        "schemathesis found failures:\n{out}\n{err}\nagent:\n{}",
        agent.output()
    );
    // What it created is deleted, and nothing is left behind.
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let _ = api.call("DELETE", "/instances", None).await;
    for id in dirs.records().iter().filter_map(|r| r.strip_suffix(".json")) {
        wait_gone(&dirs, id, std::time::Duration::from_secs(120)).await;
    }
}
