//! TCP connections (device port and push port): one accept task per listener, and per
//! connection a read task that forwards bytes to the loop and a write task fed by a channel.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use async_io::{Async, Timer};
use ddpush_proto::{ConnId, Port};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::{Executor, Msg};
use crate::metrics::Metrics;
use crate::settings::ServerConfig;

/// Chunks queued for one connection before it counts as stalled and is closed.
pub(super) const WRITE_QUEUE: usize = 256;
/// Bytes read from a TCP connection at a time.
const READ_BUF: usize = 4096;

/// The loop's handle on one open connection.
pub(super) struct ConnHandle {
    pub(super) tx: Sender<Vec<u8>>,
    pub(super) stream: Arc<Async<TcpStream>>,
}

pub(super) async fn accept_loop(
    ex: Executor,
    l: Async<TcpListener>,
    port: Port,
    tx: Sender<Msg>,
    next_id: Arc<AtomicU64>,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
) {
    loop {
        let (stream, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        if port == Port::Push
            && !cfg.push_allow.is_empty()
            && !cfg.push_allow.iter().any(|c| c.contains(peer.ip()))
        {
            metrics.push_denied.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "push connection from outside --push-allow closed");
            continue;
        }
        let _ = stream.get_ref().set_nodelay(true);
        let stream = Arc::new(stream);
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        if tx
            .send(Msg::Open {
                conn,
                port,
                peer,
                stream: stream.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        ex.spawn(read_loop(conn, stream, tx.clone())).detach();
    }
}

async fn read_loop(conn: ConnId, stream: Arc<Async<TcpStream>>, tx: Sender<Msg>) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match (&*stream).read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let bytes = buf[..n].to_vec();
                if tx.send(Msg::Data { conn, bytes }).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Msg::Closed { conn }).await;
}

pub(super) async fn write_loop(stream: Arc<Async<TcpStream>>, rx: Receiver<Vec<u8>>) {
    while let Ok(b) = rx.recv().await {
        if (&*stream).write_all(&b).await.is_err() {
            break;
        }
    }
    // The loop dropped the sender (close after flush) or the peer is gone.
    let _ = stream.get_ref().shutdown(Shutdown::Both);
}
