//! `127.0.0.1:<host port>` → a guest's port, in the agent: what local mode publishes (the
//! README's `ssh -p <port> root@127.0.0.1`) and what the host's own tools reach a guest by.
//! frpc does not go through it (its `localIP` is the guest's address), so an agent restart
//! cuts only the connections made here.
//!
//! A relay rather than a DNAT rule: DNAT of loopback traffic to another interface needs
//! `route_localnet`, which opens 127.0.0.0/8 to the network on that interface.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::NetworkError;

/// Connections one forward carries at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 256;
/// How long reaching the guest may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// The forwards of one instance; dropping them closes the listeners and their connections.
pub struct Forwards {
    tasks: JoinSet<()>,
}

impl Forwards {
    /// Listens on `127.0.0.1:<host>` for each `(host, guest port)` and relays to the guest.
    pub async fn open(guest: Ipv4Addr, ports: &[(u16, u16)]) -> Result<Forwards, NetworkError> {
        let mut tasks = JoinSet::new();
        for &(host, port) in ports {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, host))
                .await
                .map_err(|e| NetworkError::io(format!("listen on 127.0.0.1:{host}"), e))?;
            let target = SocketAddr::V4(SocketAddrV4::new(guest, port));
            tasks.spawn(serve(listener, target));
        }
        Ok(Forwards { tasks })
    }
}

impl Drop for Forwards {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn serve(listener: TcpListener, target: SocketAddr) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let client = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap finished relays so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((mut client, _)) = client else {
            // Out of descriptors, say: wait instead of spinning on the same error.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        connections.spawn(async move {
            let _permit = permit;
            let connect = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(target));
            let Ok(Ok(mut upstream)) = connect.await else { return };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
