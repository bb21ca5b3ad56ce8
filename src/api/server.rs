//! The API's HTTP/1.1 server, bounded against local processes that hold connections open
//! (a slowloris on 127.0.0.1 must not starve the control plane's `DELETE` at lease end):
//!
//! - a request head must arrive within [`HEADER_READ`]. hyper starts that timer whenever it
//!   waits for a head, on a fresh connection and between keep-alive requests, so it is also
//!   the idle timeout;
//! - heads are read into a small buffer ([`MAX_BUF`]): a longer head is refused;
//! - at most [`MAX_CONNECTIONS`] connections at once. At the cap, a new connection evicts the
//!   oldest one that has not sent a complete request head yet (a connection that has is
//!   being served, and a whole request, body included, is bounded by the router's deadline),
//!   so a flood of half-open connections cannot keep a real request out;
//! - on shutdown, connections finish the request in progress, then close.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

/// Time for a request head to arrive (and the longest a keep-alive connection stays idle).
pub const HEADER_READ: Duration = Duration::from_secs(10);
/// hyper's read buffer: the largest request head accepted (hyper's minimum is 8 KiB).
pub const MAX_BUF: usize = 16 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long an accepted connection waits for the one it evicted to let go of its slot.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// How long connections get to finish their request at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// One connection as the accept loop sees it.
struct Connection {
    /// Set once a complete request head arrived (the connection is being served).
    served: AtomicBool,
    /// Told to close: it is the oldest half-open one at the cap.
    evict: Notify,
}

/// The connections that have not sent a complete request head yet, oldest first.
#[derive(Default)]
struct HalfOpen(Mutex<VecDeque<Arc<Connection>>>);

impl HalfOpen {
    fn push(&self, connection: Arc<Connection>) {
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        queue.retain(|c| !c.served.load(Ordering::Relaxed) && Arc::strong_count(c) > 1);
        queue.push_back(connection);
    }

    /// Tells the oldest connection that is still half-open to close; `false` when none is.
    fn evict_oldest(&self) -> bool {
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(oldest) = queue.pop_front() {
            if !oldest.served.load(Ordering::Relaxed) && Arc::strong_count(&oldest) > 1 {
                oldest.evict.notify_one();
                return true;
            }
        }
        false
    }
}

/// Serves `app` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let half_open = Arc::new(HalfOpen::default());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: go on.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopping(&mut shutdown) => break,
        };
        while connections.try_join_next().is_some() {}
        let Some(slot) = take_slot(&slots, &half_open).await else {
            continue; // every slot is serving a request: the new connection is closed
        };
        let connection =
            Arc::new(Connection { served: AtomicBool::new(false), evict: Notify::new() });
        half_open.push(Arc::clone(&connection));
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(serve_connection(stream, app, connection, slot, shutdown));
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        connections.abort_all();
    }
    Ok(())
}

/// A free slot, or one freed by evicting the oldest half-open connection.
async fn take_slot(slots: &Arc<Semaphore>, half_open: &HalfOpen) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = Arc::clone(slots).try_acquire_owned() {
        return Some(slot);
    }
    if !half_open.evict_oldest() {
        return None;
    }
    tokio::time::timeout(EVICTION_WAIT, Arc::clone(slots).acquire_owned()).await.ok()?.ok()
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    connection: Arc<Connection>,
    _slot: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let seen = Arc::clone(&connection);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        seen.served.store(true, Ordering::Relaxed);
        let app = app.clone();
        app.oneshot(request.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ).max_buf_size(MAX_BUF);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let mut closing = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result
                    && !e.is_timeout()
                    && !e.is_incomplete_message()
                {
                    tracing::debug!(error = %e, "API connection ended with an error");
                }
                return;
            }
            () = connection.evict.notified(), if !closing => {
                // Evicted before it sent a complete head: nothing is lost.
                if !connection.served.load(Ordering::Relaxed) {
                    return;
                }
            }
            () = stopping(&mut shutdown), if !closing => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
