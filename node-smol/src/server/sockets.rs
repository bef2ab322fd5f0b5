//! The device and push sockets of a node of either kind, single ([`Node`]) or cluster
//! ([`ClusterNode`]): one socket layer, so both modes behave the same on the wire.
//!
//! What it holds: the device UDP socket with its batched I/O (`udp`), the TCP connections of
//! both ports (`conn`: readiness-driven reads into one buffer, bounded write queues, the stall
//! rule, lingering closes), the accept tasks (`--push-allow` applied there), and the
//! transmits of a turn on their way out. What it does not hold: any protocol rule. Framing
//! (v1 and signed v2 device frames, push requests), connection limits and idle timeouts are
//! the core's, reached through [`SocketCore`]; each event loop only decides *when* the layer
//! may read (a cluster node holds input back while its store is behind).
//!
//! [`ClusterNode`]: ddpush_proto::cluster::ClusterNode

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_channel::Sender;
use async_io::Async;
use ddpush_proto::{ConnId, Dest, Node, Port, Time, Transmit};

use super::bind::{bind_device, bind_tcp, PUSH_BUFFERS};
use super::clock::Clock;
use super::conn::{accept_loop, Conns};
use super::udp::{UdpBatch, MMSG};
use super::{Executor, Msg, ServerError};
use crate::metrics::SocketStats;
use crate::settings::{AdminListen, ServerConfig};

/// Datagrams read per drain before other work gets a chance.
const UDP_BATCH: usize = 4096;

/// What the socket layer needs from a node: the inputs of its device and push sockets, and
/// the outputs that go back to them. Implemented by the single node's [`Node`] and by the
/// cluster node; both decode, limit and time out connections in the core.
pub(crate) trait SocketCore {
    /// A datagram on the device UDP port.
    fn handle_udp(&mut self, now: Time, from: SocketAddr, data: &[u8]);
    /// Datagrams read together, in order ([`Node::handle_udp_batch`]).
    fn handle_udp_batch(&mut self, now: Time, batch: &[(SocketAddr, &[u8])]) {
        for &(from, data) in batch {
            self.handle_udp(now, from, data);
        }
    }
    /// A TCP connection was accepted; false refuses it (the layer closes it without telling
    /// the core again).
    fn handle_tcp_open(&mut self, now: Time, conn: ConnId, port: Port, peer: SocketAddr) -> bool;
    /// Bytes arrived on a TCP connection, in any split.
    fn handle_tcp_data(&mut self, now: Time, conn: ConnId, data: &[u8]);
    /// The peer closed the connection, or it broke.
    fn handle_tcp_close(&mut self, now: Time, conn: ConnId);
    /// The next packet or reply to send.
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// A connection the core closed (shut down once what is queued for it is written).
    fn poll_close(&mut self) -> Option<ConnId>;
}

impl SocketCore for Node {
    fn handle_udp(&mut self, now: Time, from: SocketAddr, data: &[u8]) {
        Node::handle_udp(self, now, from, data);
    }

    fn handle_udp_batch(&mut self, now: Time, batch: &[(SocketAddr, &[u8])]) {
        Node::handle_udp_batch(self, now, batch);
    }

    fn handle_tcp_open(&mut self, now: Time, conn: ConnId, port: Port, peer: SocketAddr) -> bool {
        Node::handle_tcp_open(self, now, conn, port, peer)
    }

    fn handle_tcp_data(&mut self, now: Time, conn: ConnId, data: &[u8]) {
        Node::handle_tcp_data(self, now, conn, data);
    }

    fn handle_tcp_close(&mut self, now: Time, conn: ConnId) {
        Node::handle_tcp_close(self, now, conn);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        Node::poll_transmit(self)
    }

    fn poll_close(&mut self) -> Option<ConnId> {
        Node::poll_close(self)
    }
}

/// The listening sockets every node has, bound before anything is loaded so that a port in
/// use fails the start at once.
pub(crate) struct Listeners {
    pub(crate) udp: UdpSocket,
    pub(crate) tcp: Option<TcpListener>,
    pub(crate) push: TcpListener,
    pub(crate) admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the device UDP socket, device TCP (if enabled) on the same port, push TCP and,
    /// if enabled, admin HTTP.
    pub(crate) fn bind(cfg: &ServerConfig) -> Result<Self, ServerError> {
        let (udp, tcp) = bind_device(cfg.listen, cfg.udp_buffer, cfg.device_tcp)?;
        let push = bind_tcp("push TCP", cfg.push_listen, Some(PUSH_BUFFERS))?;
        let admin = match cfg.admin_listen {
            AdminListen::Addr(a) => Some(bind_tcp("admin HTTP", a, None)?),
            AdminListen::None => None,
        };
        Ok(Listeners {
            udp,
            tcp,
            push,
            admin,
        })
    }
}

/// Read sizes: how many bytes one read of a connection hands to the core at most.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReadSize {
    /// The single node answers every request within the turn: large reads.
    Large,
    /// The cluster node issues a store operation per push and checks its in-flight bound
    /// between reads: a read must not carry much more than the bound's slack (4 KiB is at
    /// most 195 push requests).
    Small,
}

impl ReadSize {
    fn bytes(self) -> usize {
        match self {
            ReadSize::Large => 64 * 1024,
            ReadSize::Small => 4 * 1024,
        }
    }
}

/// The loop-side halves of a node's device and push sockets.
pub(crate) struct Sockets {
    udp: Async<UdpSocket>,
    udp_batch: UdpBatch,
    conns: Conns,
    /// This turn's TCP transmits, gathered per connection (one write each).
    tcp_out: HashMap<ConnId, Vec<u8>>,
    stats: Arc<SocketStats>,
}

/// The accept tasks of the device TCP and push listeners; dropping them stops accepting.
pub(crate) type AcceptTasks = Vec<smol::Task<()>>;

impl Sockets {
    /// Takes the device UDP socket and starts the accept tasks of the device TCP (if any)
    /// and push listeners (the admin listener, if still in `l`, is dropped: take it first);
    /// they hand new connections to `tx` as [`Msg::Open`], which the loop
    /// passes to [`Sockets::open`].
    pub(crate) fn start(
        ex: &Executor,
        l: Listeners,
        cfg: &ServerConfig,
        read: ReadSize,
        tx: Sender<Msg>,
        stats: Arc<SocketStats>,
    ) -> io::Result<(Self, AcceptTasks)> {
        let next_id = Arc::new(AtomicU64::new(1));
        let mut tasks = Vec::new();
        let listeners = l
            .tcp
            .map(|t| (t, Port::Device))
            .into_iter()
            .chain([(l.push, Port::Push)]);
        for (listener, port) in listeners {
            tasks.push(ex.spawn(accept_loop(
                Async::new(listener)?,
                port,
                tx.clone(),
                next_id.clone(),
                cfg.push_allow.clone(),
                stats.clone(),
            )));
        }
        let s = Sockets {
            udp: Async::new(l.udp)?,
            udp_batch: UdpBatch::new(),
            conns: Conns::new(read.bytes()),
            tcp_out: HashMap::new(),
            stats,
        };
        Ok((s, tasks))
    }

    /// Resolves when the UDP socket may have datagrams (for the loop's race).
    pub(crate) async fn udp_readable(&self) {
        let _ = self.udp.readable().await;
    }

    /// Ready when a connection needs service (for the loop's race).
    pub(crate) fn poll_conns(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.conns.poll_ready(cx)
    }

    /// Reads datagrams into the core until the socket would block, [`UDP_BATCH`] were read,
    /// or `more` (asked before each batch of up to [`MMSG`]) says stop.
    pub(crate) fn drain_udp<C: SocketCore>(
        &mut self,
        core: &mut C,
        clock: &Clock,
        mut more: impl FnMut(&mut C) -> bool,
    ) {
        let mut read = 0;
        while read < UDP_BATCH && more(core) {
            let now = clock.now();
            match self.udp_batch.recv(self.udp.get_ref(), |batch| {
                core.handle_udp_batch(now, batch)
            }) {
                Ok(0) => break,
                Ok(n) => {
                    read += n;
                    if n < MMSG {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from earlier sends surface here on some systems: not ours to fix.
                Err(_) => read += 1,
            }
        }
    }

    /// An accepted connection ([`Msg::Open`]): the core accepts it (its first read happens
    /// in the next service) or refuses it (it is closed at once).
    pub(crate) fn open<C: SocketCore>(
        &mut self,
        core: &mut C,
        now: Time,
        conn: ConnId,
        port: Port,
        peer: SocketAddr,
        stream: Async<TcpStream>,
    ) {
        if core.handle_tcp_open(now, conn, port, peer) {
            self.conns.insert(conn, stream);
        } else {
            let _ = stream.get_ref().shutdown(std::net::Shutdown::Both);
        }
    }

    /// Services the connections the reactor reported ready: pending writes, then reads into
    /// the core while `more` (asked before each read) allows; connections left unread stay
    /// ready for the next service. Returns how many connections were serviced.
    pub(crate) fn service<C: SocketCore>(
        &mut self,
        core: &mut C,
        now: Time,
        more: impl FnMut(&mut C) -> bool,
    ) -> usize {
        self.conns.service(core, now, more)
    }

    /// Sends the core's transmits and carries out its closes: datagrams in `sendmmsg`
    /// batches, each connection's bytes in one write (a peer that stops reading is closed
    /// by the stall rule), then the closes, after the writes they follow.
    pub(crate) fn output<C: SocketCore>(&mut self, core: &mut C) {
        while let Some(t) = core.poll_transmit() {
            match t.dest {
                Dest::Udp(a) => {
                    if self.udp_batch.push(a, |buf| t.encode(buf)) {
                        self.send_udp();
                    }
                }
                Dest::Tcp(c) => t.encode(self.tcp_out.entry(c).or_default()),
            }
        }
        self.send_udp();
        for (conn, bytes) in self.tcp_out.drain() {
            if !self.conns.send(conn, &bytes) {
                // A peer that does not read what it is sent: closed rather than buffered
                // without bound.
                SocketStats::bump(&self.stats.stalled_closed);
            }
        }
        while let Some(conn) = core.poll_close() {
            self.conns.close(conn);
        }
        self.conns.finish_closed();
    }

    /// Sends the queued datagrams. UDP is lossy by contract: one the kernel refuses stays
    /// pending in the core and goes out again on the next heartbeat.
    fn send_udp(&mut self) {
        let failed = self.udp_batch.flush(self.udp.get_ref());
        if failed > 0 {
            self.stats
                .udp_send_errors
                .fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Drops connections that lingered too long with bytes unsent (call about once a second).
    pub(crate) fn expire_lingering(&mut self) {
        self.conns.expire_lingering();
    }
}
