//! The command line: settings errors, help texts, version.

use std::process::Command;

fn agent(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qudata-agent"));
    cmd.args(args)
        .env_clear()
        .env("QUDATA_DATA_DIR", dir.path().join("data"))
        .env("QUDATA_RUN_DIR", dir.path().join("run"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn a_bad_setting_stops_with_one_line_and_status_2() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "QUDATA_API_KEY"),
        (&[("QUDATA_API_KEY", "sk-not-an-api-key")], "QUDATA_API_KEY=<redacted>"),
        (
            &[("QUDATA_API_KEY", "ak-1"), ("QUDATA_STATS_INTERVAL_MS", "fast")],
            "QUDATA_STATS_INTERVAL_MS",
        ),
        (&[("QUDATA_API_KEY", "ak-1"), ("QUDATA_BACKEND", "xen")], "QUDATA_BACKEND"),
        (
            &[("QUDATA_API_KEY", "ak-1"), ("QUDATA_SERVICE_URL", "internal.qudata.ai")],
            "QUDATA_SERVICE_URL",
        ),
        (
            &[("QUDATA_API_KEY", "ak-1"), ("QUDATA_GPU_PCI_ADDRS", "65:00.0")],
            "QUDATA_GPU_PCI_ADDRS",
        ),
        (&[("QUDATA_API_KEY", "ak-1"), ("QUDATA_AGENT_PORT", "99999")], "QUDATA_AGENT_PORT"),
    ];
    for (env, variable) in cases {
        let out = agent(&["run"], env);
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with(&format!("qudata-agent: {variable}")), "{stderr}");
        assert!(stderr.contains("accepted: "), "{stderr}");
        assert!(!stderr.contains("sk-not-an-api-key"), "the key is never echoed");
    }
}

#[test]
fn help_lists_the_variables_each_command_reads() {
    let out = agent(&["run", "--help"], &[]);
    let help = String::from_utf8(out.stdout).unwrap();
    for variable in
        ["QUDATA_API_KEY", "QUDATA_DATA_DIR", "QUDATA_STATS_INTERVAL_MS", "QUDATA_FRP_TOKEN"]
    {
        assert!(help.contains(variable), "{variable} missing from:\n{help}");
    }
}

#[test]
fn version_is_the_crate_version() {
    let out = agent(&["version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("qudata-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_readme_documents_every_setting_and_run_help_lists_them() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let help = String::from_utf8(agent(&["run", "--help"], &[]).stdout).unwrap();
    for setting in qudata_agent::config::SETTINGS {
        let row = format!("| `{}` |", setting.name);
        assert!(readme.contains(&row), "README.md has no row for {}", setting.name);
        assert!(help.contains(setting.name), "`run --help` does not list {}", setting.name);
    }
}

#[test]
fn recover_help_lists_its_flags_and_the_variables_it_reads() {
    let out = agent(&["recover", "--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in
        ["--dry-run", "--json", "--stop-all", "--wait", "QUDATA_DATA_DIR", "QUDATA_RUN_DIR"]
    {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    assert!(!help.contains("QUDATA_API_KEY"), "recover needs no control plane:\n{help}");
}
