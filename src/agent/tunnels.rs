//! The agent's side of FRP (PROTOCOL.md §3): which credentials are in force, starting frpc (or
//! adopting the one an earlier agent left running), applying new credentials, and handing the
//! instance manager its publisher. Production mode only: `run --local` never starts frpc.

use std::sync::Arc;

use crate::config::{Config, FrpOverrides};
use crate::control_plane::identity::FrpCredentials as Stored;
use crate::instance::Manager;
use crate::tunnel::{
    FrpCredentials, TunnelError, TunnelPublisher, TunnelSettings, Tunnels, credentials_from_parts,
};

pub(super) struct TunnelLink {
    settings: TunnelSettings,
    env: FrpOverrides,
    manager: Manager,
    active: Option<(Arc<Tunnels>, FrpCredentials)>,
    /// Credentials frpc could not be started with (not tried again with the same ones).
    failed: Option<FrpCredentials>,
}

impl TunnelLink {
    pub(super) fn new(cfg: &Config, agent_id: &str, agent_port: u16, manager: Manager) -> Self {
        let settings = TunnelSettings::new(cfg, agent_id, agent_port);
        TunnelLink { settings, env: cfg.frp.clone(), manager, active: None, failed: None }
    }

    /// Brings frpc in line with `stored` (the persisted `/init` values) under the environment's
    /// overrides: started or adopted the first time, restarted only when the main file changes.
    /// `registered`: `/init` has answered, so missing credentials are final and worth a line.
    pub(super) async fn apply(&mut self, stored: &Stored, registered: bool) {
        let merged = stored.with_overrides(&self.env);
        let creds = match credentials_from_parts(
            merged.server_addr,
            merged.server_port,
            merged.token,
            merged.subdomain,
        ) {
            Ok(creds) => creds,
            Err(missing) => {
                if registered && self.active.is_none() {
                    tracing::warn!("{missing}");
                }
                return;
            }
        };
        match &mut self.active {
            Some((_, current)) if *current == creds => {}
            Some((tunnels, current)) => {
                let tunnels = tunnels.clone();
                let result = tunnels.set_credentials(creds.clone()).await;
                *current = creds.clone();
                match result {
                    Ok(()) => tracing::info!("new FRP credentials applied"),
                    Err(e @ (TunnelError::NotReady { .. } | TunnelError::Admin(_))) => {
                        tracing::warn!(error = %e, "frpc has the new FRP credentials but is not ready yet");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot apply the new FRP credentials; frpc keeps the previous ones");
                        return;
                    }
                }
                self.publish_with(tunnels, &creds);
            }
            None if self.failed.as_ref() == Some(&creds) => {}
            None => match Tunnels::start(self.settings.clone(), Ok(creds.clone())).await {
                Ok(tunnels) => {
                    let tunnels = Arc::new(tunnels);
                    self.active = Some((tunnels.clone(), creds.clone()));
                    self.publish_with(tunnels, &creds);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start frpc: nothing is published");
                    self.failed = Some(creds);
                }
            },
        }
    }

    /// A new publisher (the subdomain may have changed): the manager publishes every instance
    /// again and withdraws what has no record.
    fn publish_with(&self, tunnels: Arc<Tunnels>, creds: &FrpCredentials) {
        self.manager.set_publisher(Arc::new(TunnelPublisher::new(tunnels, creds)));
    }
}
