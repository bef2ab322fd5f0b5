//! Sockets of a cluster node: the device UDP socket, TCP listeners, and per connection a read
//! task feeding the loop and a write task fed by it.
//!
//! Deliberately plain (one `recv_from` per datagram, one task pair per connection): the single
//! node's socket layer is being reworked for scale (batched UDP, readiness-driven TCP), and
//! the cluster loop moves to it once that settles (docs/CLUSTER.md, "Limits").

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use async_io::{Async, Timer};
use ddpush_proto::{ConnId, Port};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::server::Executor;
use crate::settings::Cidr;

/// Chunks queued for one connection before it counts as stalled and is closed.
pub const WRITE_QUEUE: usize = 256;
const READ_BUF: usize = 4096;

/// What connection tasks tell the loop.
pub enum ConnMsg {
    /// A connection was accepted.
    Open {
        /// Its id.
        conn: ConnId,
        /// Which port.
        port: Port,
        /// Its stream, for the write task.
        stream: Arc<Async<TcpStream>>,
    },
    /// Bytes arrived.
    Data {
        /// From.
        conn: ConnId,
        /// What.
        bytes: Vec<u8>,
    },
    /// The peer closed or the read failed.
    Closed {
        /// Which.
        conn: ConnId,
    },
}

/// The loop's handle on one open connection.
pub struct ConnHandle {
    /// Chunks to write.
    pub tx: Sender<Vec<u8>>,
    /// For shutting it down.
    pub stream: Arc<Async<TcpStream>>,
}

/// Binds the device UDP socket and, if enabled, the device TCP listener on the same port.
/// With port 0 the number is picked again until both are free.
pub fn bind_device(
    addr: SocketAddr,
    udp_buffer: usize,
    tcp: bool,
) -> std::io::Result<(UdpSocket, Option<TcpListener>)> {
    let mut last = None;
    for _ in 0..32 {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        let _ = s.set_recv_buffer_size(udp_buffer);
        let _ = s.set_send_buffer_size(udp_buffer);
        s.bind(&addr.into())?;
        let udp: UdpSocket = s.into();
        if !tcp {
            return Ok((udp, None));
        }
        let bound = udp.local_addr()?;
        match bind_tcp(bound) {
            Ok(l) => return Ok((udp, Some(l))),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port pair")))
}

/// A TCP listener with SO_REUSEADDR (restarts do not wait for TIME_WAIT).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Accepts connections on one listener and starts their read tasks.
pub async fn accept_loop(
    ex: Executor,
    l: Async<TcpListener>,
    port: Port,
    allow: Vec<Cidr>,
    tx: Sender<ConnMsg>,
    next_id: Arc<AtomicU64>,
) {
    loop {
        let (stream, peer) = match l.accept().await {
            Ok(x) => x,
            Err(_) => {
                Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        if port == Port::Push && !allow.is_empty() && !allow.iter().any(|c| c.contains(peer.ip())) {
            continue;
        }
        let _ = stream.get_ref().set_nodelay(true);
        let stream = Arc::new(stream);
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        let open = ConnMsg::Open {
            conn,
            port,
            stream: stream.clone(),
        };
        if tx.send(open).await.is_err() {
            return;
        }
        ex.spawn(read_loop(conn, stream, tx.clone())).detach();
    }
}

async fn read_loop(conn: ConnId, stream: Arc<Async<TcpStream>>, tx: Sender<ConnMsg>) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match (&*stream).read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let bytes = buf[..n].to_vec();
                // A full channel (the loop applies back-pressure) stops this read, and TCP
                // flow control stops the pusher.
                if tx.send(ConnMsg::Data { conn, bytes }).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(ConnMsg::Closed { conn }).await;
}

/// Writes what the loop queues; shuts the connection down when the loop drops the sender.
pub async fn write_loop(stream: Arc<Async<TcpStream>>, rx: Receiver<Vec<u8>>) {
    while let Ok(b) = rx.recv().await {
        if (&*stream).write_all(&b).await.is_err() {
            break;
        }
    }
    let _ = stream.get_ref().shutdown(Shutdown::Both);
}
