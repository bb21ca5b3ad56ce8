//! One SSH connection per guest (DESIGN.md "Guest configuration"), shared by everything the
//! agent does there: readiness, configuration, key changes and the GPU metrics channel each
//! open channels on it (russh multiplexes them), and one policy makes it again when it breaks.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::client::{GuestClient, GuestTarget};
use super::error::GuestError;
use super::keys::ManagementKey;
use crate::control_plane::backoff::Backoff;

/// Between reconnects of a connection that broke; back to the start once one is made.
pub const RECONNECT: Backoff =
    Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(30) };
/// One reconnect attempt (TCP, handshake, login).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(20);
/// Failed reconnects between two warnings (the others are logged at debug level).
const WARN_EVERY: u32 = 20;

/// The guest's connection, made on first use and again after it broke, until closed.
pub struct GuestSession {
    target: GuestTarget,
    key: ManagementKey,
    state: Mutex<State>,
    /// Held while connecting, so that callers who find the connection down make one
    /// handshake between them, not one each.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    client: Option<Arc<GuestClient>>,
    /// Failed reconnects since the last connection: the back-off step.
    failures: u32,
    /// No reconnect before this.
    next_try: Option<Instant>,
    closed: bool,
}

impl GuestSession {
    pub fn new(target: GuestTarget, key: ManagementKey) -> GuestSession {
        GuestSession {
            target,
            key,
            state: Mutex::default(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub fn target(&self) -> &GuestTarget {
        &self.target
    }

    /// Readiness of a booting guest: the live connection, or a new one tried every half
    /// second until `deadline` ([`GuestClient::wait_reachable`]).
    pub async fn connect_until(&self, deadline: Instant) -> Result<Arc<GuestClient>, GuestError> {
        if let Some(client) = self.live()? {
            return Ok(client);
        }
        let _turn = self.connecting.lock().await;
        if let Some(client) = self.live()? {
            return Ok(client);
        }
        let client = GuestClient::wait_reachable(&self.target, &self.key, deadline).await?;
        self.keep(client).await
    }

    /// The live connection, or a new one made on the [`RECONNECT`] back-off, which all
    /// callers share. Ends only with a connection, an error retrying cannot fix, or
    /// `SessionClosed`; callers with a deadline put a timeout around it.
    pub async fn get(&self) -> Result<Arc<GuestClient>, GuestError> {
        loop {
            if let Some(client) = self.live()? {
                return Ok(client);
            }
            let turn = self.connecting.lock().await;
            if let Some(client) = self.live()? {
                return Ok(client);
            }
            let next_try = self.state().next_try;
            if let Some(at) = next_try.filter(|at| *at > Instant::now()) {
                drop(turn);
                tokio::time::sleep_until(at).await;
                continue;
            }
            let deadline = Instant::now() + ATTEMPT_LIMIT;
            match GuestClient::connect(&self.target, &self.key, deadline).await {
                Ok(client) => return self.keep(client).await,
                Err(e) => {
                    let permanent = e.is_permanent();
                    self.failed(&e);
                    if permanent {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Ends the connection and every channel on it; later calls answer `SessionClosed`.
    pub async fn close(&self) {
        let client = {
            let mut state = self.state();
            state.closed = true;
            state.client.take()
        };
        if let Some(client) = client {
            client.close().await;
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> Result<Option<Arc<GuestClient>>, GuestError> {
        let state = self.state();
        if state.closed {
            return Err(GuestError::SessionClosed { instance: self.target.instance.clone() });
        }
        Ok(state.client.clone().filter(|c| !c.is_closed()))
    }

    /// Stores a new connection, unless the session was closed while it was made.
    async fn keep(&self, client: GuestClient) -> Result<Arc<GuestClient>, GuestError> {
        let client = Arc::new(client);
        let closed = {
            let mut state = self.state();
            if !state.closed {
                *state = State { client: Some(client.clone()), ..State::default() };
            }
            state.closed
        };
        if closed {
            client.close().await;
            return Err(GuestError::SessionClosed { instance: self.target.instance.clone() });
        }
        Ok(client)
    }

    fn failed(&self, error: &GuestError) {
        let mut state = self.state();
        let pause = RECONNECT.delay(state.failures);
        state.next_try = Some(Instant::now() + pause);
        let failures = state.failures;
        state.failures = failures.saturating_add(1);
        let id = &self.target.instance;
        if failures.is_multiple_of(WARN_EVERY) {
            tracing::warn!(%id, %error, retry_in_ms = pause.as_millis() as u64, failures, "cannot reach the guest over SSH; retrying");
        } else {
            tracing::debug!(%id, %error, retry_in_ms = pause.as_millis() as u64, failures, "guest SSH reconnect failed");
        }
    }
}
