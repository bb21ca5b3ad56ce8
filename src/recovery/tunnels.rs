//! `recover --stop-all` stops frpc too: the explicit teardown that ends the tunnels (an agent
//! restart never does; frpc outlives it on purpose).

use std::time::Duration;

use super::plan::{Action, Row, Subject};
use crate::config::Config;
use crate::pidfd::PidFd;
use crate::tunnel::process::{self, STOP_GRACE};

/// The frpc this agent started (pidfile and command line agree), if it runs.
pub fn running(cfg: &Config) -> Option<u32> {
    process::find_running(&cfg.frpc_binary, &cfg.frpc_config, &cfg.run_dir)
}

/// Its row in `recover`'s table.
pub fn row(pid: u32) -> Row {
    Row {
        subject: Subject::Process,
        name: format!("frpc pid {pid}"),
        action: Action::Stopped,
        why: "the tunnels stop with the instances; the agent starts frpc again".to_owned(),
        failed: None,
    }
}

/// SIGTERM to frpc's process group, SIGKILL after the grace; its row marked on failure.
pub async fn stop(cfg: &Config, pid: u32, rows: &mut [Row]) {
    if let Err(error) = terminate(cfg, pid, STOP_GRACE).await {
        tracing::error!(pid, %error, "cannot stop frpc");
        let name = format!("frpc pid {pid}");
        if let Some(row) = rows.iter_mut().find(|r| r.name == name) {
            row.failed = Some(error);
        }
    } else {
        tracing::info!(pid, "frpc stopped");
    }
}

async fn terminate(cfg: &Config, pid: u32, grace: Duration) -> Result<(), String> {
    let exit = match PidFd::open(pid) {
        Ok(exit) => exit,
        Err(_) if running(cfg) != Some(pid) => return Ok(()), // gone meanwhile
        Err(e) => return Err(format!("cannot watch frpc pid {pid}: {e}")),
    };
    // Looked up before the instances were stopped (minutes, maybe): once pinned, the pid must
    // still be our frpc, or it exited meanwhile and the pid may be another process's.
    if running(cfg) != Some(pid) {
        return Ok(());
    }
    process::signal_group(pid, libc::SIGTERM);
    if tokio::time::timeout(grace, exit.exited()).await.is_ok() {
        return Ok(());
    }
    process::signal_group(pid, libc::SIGKILL);
    tokio::time::timeout(grace, exit.exited())
        .await
        .map_err(|_| format!("frpc pid {pid} is still there {grace:?} after SIGKILL"))
}
