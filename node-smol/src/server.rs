//! The event loop: one task owns the [`Node`] and the [`Store`]; socket tasks only move bytes.
//!
//! Each turn: wake on the UDP socket, a message from a connection task, a timer or a signal;
//! drain the UDP socket until it would block and the message queue; then journal the turn's
//! changes (fsync under `--fsync always`) *before* sending its transmits, so a `0x00` reply
//! always follows the write that makes its push survive a crash.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_channel::{Receiver, Sender, TrySendError};
use async_io::{Async, Timer};
use ddpush_proto::{
    upstream, Change, ConnId, Dest, Event, Node, Payload, Port, PushReply, Time, Transmit,
};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt, StreamExt};
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminRequest};
use crate::metrics::Metrics;
use crate::persist::{self, Fsync, PersistError, Store};
use crate::settings::{AdminListen, ServerConfig};

/// Datagrams read per turn before other work gets a chance.
const UDP_BATCH: usize = 4096;
/// Messages from connection tasks handled per turn.
const MSG_BATCH: usize = 4096;
/// Chunks queued for one connection before it counts as stalled and is closed.
const WRITE_QUEUE: usize = 256;
/// How long the loop keeps polling after a turn with connection traffic before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// Bytes read from a TCP connection at a time.
const READ_BUF: usize = 4096;

/// Datagrams per `recvmmsg`/`sendmmsg` call. Batching only pays when datagrams queue up
/// (under load); an idle server sees batches of one and costs the same as `recv_from`.
const MMSG: usize = 64;
/// Receive buffer per datagram: larger than any valid device packet, so an oversized one is
/// still seen whole enough to be refused for what it is.
const MMSG_BUF: usize = 2048;

/// Batched UDP I/O on the device socket (Linux `recvmmsg`/`sendmmsg`).
struct UdpBatch {
    rx: Vec<[u8; MMSG_BUF]>,
    rx_addr: Vec<libc::sockaddr_storage>,
    /// Encoded datagrams of this turn, back to back, and (address, end offset) of each.
    tx: Vec<u8>,
    tx_dest: Vec<(socket2::SockAddr, usize)>,
}

impl UdpBatch {
    fn new() -> Self {
        UdpBatch {
            rx: vec![[0u8; MMSG_BUF]; MMSG],
            // SAFETY: all-zero is a valid (empty) sockaddr_storage.
            rx_addr: vec![unsafe { std::mem::zeroed() }; MMSG],
            tx: Vec::with_capacity(MMSG * 32),
            tx_dest: Vec::with_capacity(MMSG),
        }
    }

    /// Reads up to [`MMSG`] datagrams; calls `f` with each. Returns how many, or the error.
    fn recv(
        &mut self,
        fd: std::os::fd::RawFd,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr arrays are valid; each header points at one iovec over
        // our own buffer and at our own address slot, all alive across the call.
        let mut iov: [libc::iovec; MMSG] = unsafe { std::mem::zeroed() };
        let mut hdr: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
        for i in 0..MMSG {
            iov[i].iov_base = self.rx[i].as_mut_ptr().cast();
            iov[i].iov_len = MMSG_BUF;
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
            hdr[i].msg_hdr.msg_name = (&mut self.rx_addr[i] as *mut libc::sockaddr_storage).cast();
            hdr[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
        }
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdr.as_mut_ptr(),
                MMSG as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdr.iter().enumerate().take(n) {
            let len = (h.msg_len as usize).min(MMSG_BUF);
            // SAFETY: the kernel filled `rx_addr[i]` and wrote its length into msg_namelen.
            let addr = unsafe { socket2::SockAddr::new(self.rx_addr[i], h.msg_hdr.msg_namelen) };
            if let Some(a) = addr.as_socket() {
                f(a, &self.rx[i][..len]);
            }
        }
        Ok(n)
    }

    /// Sends the queued datagrams; returns how many the kernel refused.
    fn flush(&mut self, fd: std::os::fd::RawFd) -> u64 {
        let mut failed = 0u64;
        let mut first = 0;
        while first < self.tx_dest.len() {
            let n = (self.tx_dest.len() - first).min(MMSG);
            // SAFETY: as in `recv`; every pointer targets `self.tx` or `self.tx_dest`, which
            // are not touched until the call returns.
            let mut iov: [libc::iovec; MMSG] = unsafe { std::mem::zeroed() };
            let mut hdr: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
            for k in 0..n {
                let i = first + k;
                let start = if i == 0 { 0 } else { self.tx_dest[i - 1].1 };
                let (addr, end) = &self.tx_dest[i];
                iov[k].iov_base = self.tx[start..].as_ptr() as *mut libc::c_void;
                iov[k].iov_len = end - start;
                hdr[k].msg_hdr.msg_iov = &mut iov[k];
                hdr[k].msg_hdr.msg_iovlen = 1;
                hdr[k].msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                hdr[k].msg_hdr.msg_namelen = addr.len();
            }
            let r = unsafe {
                libc::sendmmsg(fd, hdr.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if r <= 0 {
                // The datagram at the head failed (full buffer, unreachable): skip it. UDP
                // is lossy by contract: the item stays pending and goes out again on the
                // next heartbeat.
                failed += 1;
                first += 1;
            } else {
                first += r as usize;
            }
        }
        self.tx.clear();
        self.tx_dest.clear();
        failed
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be bound.
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// State could not be loaded or saved.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// Other I/O.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Bad upstream file.
    #[error("{file}: {source}")]
    Import {
        /// The file.
        file: String,
        /// The error.
        source: upstream::UpstreamError,
    },
}

/// Messages from socket tasks to the loop.
pub(crate) enum Msg {
    Open {
        conn: ConnId,
        port: Port,
        peer: SocketAddr,
        stream: Arc<Async<TcpStream>>,
    },
    Data {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Closed {
        conn: ConnId,
    },
    SnapshotDone {
        gen: u64,
        result: Result<(Duration, usize), PersistError>,
    },
    Admin(AdminRequest),
}

struct ConnHandle {
    tx: Sender<Vec<u8>>,
    stream: Arc<Async<TcpStream>>,
}

/// Wall clock for persisted times, monotonic within a run.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            start: Instant::now(),
            epoch_ms,
        }
    }

    pub(crate) fn now(&self) -> Time {
        Time(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }

    fn instant(&self, t: Time) -> Instant {
        self.start + Duration::from_millis(t.0.saturating_sub(self.epoch_ms))
    }
}

/// Loads the data directory into a fresh node.
pub(crate) fn load(cfg: &ServerConfig, clock: &Clock) -> Result<(Node, Store), ServerError> {
    let mut node = Node::new(cfg.core.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let now = clock.now();
    let t0 = Instant::now();
    let mut changes: Vec<Change> = Vec::new();
    let (store, report) =
        Store::open(&cfg.data_dir, |r| node.restore(now, r), |c| changes.push(c))?;
    for c in &changes {
        node.apply(c);
    }
    for (file, off) in &report.torn {
        warn!(
            file,
            offset = off,
            "dropped a torn last record left by a crash"
        );
    }
    info!(
        snapshot_records = report.snapshot_records,
        replayed = report.replayed,
        clients = node.len(),
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "state loaded"
    );
    Ok((node, store))
}

/// `ddpushd import-ddpush FILE`: merges an upstream `nodeStatus.dat` into the data directory.
pub fn import(cfg: &ServerConfig, file: &std::path::Path) -> Result<usize, ServerError> {
    let clock = Clock::new();
    let bytes = std::fs::read(file)?;
    let records = upstream::read_node_status(&bytes).map_err(|source| ServerError::Import {
        file: file.display().to_string(),
        source,
    })?;
    let (mut node, mut store) = load(cfg, &clock)?;
    let n = records.len();
    let now = clock.now();
    for r in records {
        node.restore(now, r);
    }
    snapshot_now(&node, &mut store, &clock)?;
    Ok(n)
}

fn snapshot_now(node: &Node, store: &mut Store, clock: &Clock) -> Result<usize, PersistError> {
    let gen = store.rotate()?;
    let bytes = persist::encode_snapshot(gen, clock.now().0, node.records());
    persist::write_snapshot_file(store.dir(), &bytes)?;
    store.snapshot_done(gen);
    Ok(bytes.len())
}

fn bind_udp(addr: SocketAddr, buf: usize) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind {
        what: "UDP",
        addr,
        source,
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err)?;
    // Large buffers absorb bursts; the kernel caps them at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.bind(&addr.into()).map_err(err)?;
    Ok(s.into())
}

fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { what, addr, source };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(1024).map_err(err)?;
    Ok(s.into())
}

/// Addresses actually bound (port 0 resolved), printed at start for tests and operators.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Device UDP.
    pub udp: SocketAddr,
    /// Device TCP, if enabled.
    pub tcp: Option<SocketAddr>,
    /// Push TCP.
    pub push: SocketAddr,
    /// Admin HTTP, if enabled.
    pub admin: Option<SocketAddr>,
}

/// Runs the server until SIGTERM or SIGINT, then writes a snapshot and returns.
pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    let clock = Clock::new();
    let udp = bind_udp(cfg.listen, cfg.udp_buffer)?;
    let udp_addr = udp.local_addr()?;
    // With port 0 the TCP device port follows the UDP one, as both share 9966 in production.
    let tcp_addr = SocketAddr::new(cfg.listen.ip(), udp_addr.port());
    let tcp = if cfg.device_tcp {
        Some(bind_tcp("device TCP", tcp_addr)?)
    } else {
        None
    };
    let push = bind_tcp("push TCP", cfg.push_listen)?;
    let admin_l = match cfg.admin_listen {
        AdminListen::Addr(a) => Some(bind_tcp("admin HTTP", a)?),
        AdminListen::None => None,
    };
    // Signals are registered before loading so a SIGTERM during a long load is not lost.
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let (node, store) = load(&cfg, &clock)?;
    let bound = Bound {
        udp: udp_addr,
        tcp: tcp.as_ref().map(|l| l.local_addr()).transpose()?,
        push: push.local_addr()?,
        admin: admin_l.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    info!(
        udp = %bound.udp,
        tcp = %bound.tcp.map_or("off".to_string(), |a| a.to_string()),
        push = %bound.push,
        admin = %bound.admin.map_or("off".to_string(), |a| a.to_string()),
        data_dir = %cfg.data_dir.display(),
        fsync = ?cfg.fsync,
        clients = node.len(),
        "ddpushd listening"
    );
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = async_channel::bounded::<Msg>(8192);
    let next_id = Arc::new(AtomicU64::new(1));
    let udp = Async::new(udp)?;
    // Everything runs on this one thread: the loop, the accept, read and write tasks. Handing a
    // request from a reader to the loop to a writer is then a local wake-up, not a cross-thread
    // one, which is what a one-request-at-a-time pusher waits for; the other core is left to
    // the kernel's network stack.
    let ex: Executor = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    if let Some(l) = tcp {
        tasks.push(ex.spawn(accept_loop(
            ex.clone(),
            Async::new(l)?,
            Port::Device,
            tx.clone(),
            next_id.clone(),
            cfg.clone(),
            metrics.clone(),
        )));
    }
    tasks.push(ex.spawn(accept_loop(
        ex.clone(),
        Async::new(push)?,
        Port::Push,
        tx.clone(),
        next_id.clone(),
        cfg.clone(),
        metrics.clone(),
    )));
    if let Some(l) = admin_l {
        tasks.push(ex.spawn(admin::serve(
            ex.clone(),
            Async::new(l)?,
            tx.clone(),
            cfg.admin_token.clone(),
        )));
    }
    let mut lp = Loop {
        node,
        store,
        clock,
        cfg,
        udp,
        conns: HashMap::new(),
        tx,
        metrics,
        changes: Vec::new(),
        tcp_out: HashMap::new(),
        udp_batch: UdpBatch::new(),
        next_snapshot: Instant::now(),
        next_sync: Instant::now() + Duration::from_secs(1),
        snapshot_in_flight: false,
        journal_failed: false,
        admin_out: Vec::new(),
        ex: None,
    };
    lp.next_snapshot = Instant::now() + lp.cfg.snapshot_interval;
    lp.ex = Some(ex.clone());
    smol::block_on(ex.run(lp.run(rx, signals)));
    drop(tasks);
    lp.shutdown()
}

/// The single-threaded executor every task of the server runs on.
pub(crate) type Executor = Rc<smol::LocalExecutor<'static>>;

async fn accept_loop(
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

async fn write_loop(stream: Arc<Async<TcpStream>>, rx: Receiver<Vec<u8>>) {
    while let Ok(b) = rx.recv().await {
        if (&*stream).write_all(&b).await.is_err() {
            break;
        }
    }
    // The loop dropped the sender (close after flush) or the peer is gone.
    let _ = stream.get_ref().shutdown(Shutdown::Both);
}

enum Wake {
    Udp,
    Msg(Msg),
    Timer,
    Signal,
}

struct Loop {
    /// Set before the loop runs; `None` only while it is being built.
    ex: Option<Executor>,
    node: Node,
    store: Store,
    clock: Clock,
    cfg: ServerConfig,
    udp: Async<UdpSocket>,
    conns: HashMap<ConnId, ConnHandle>,
    tx: Sender<Msg>,
    metrics: Arc<Metrics>,
    changes: Vec<Change>,
    tcp_out: HashMap<ConnId, Vec<u8>>,
    udp_batch: UdpBatch,
    next_snapshot: Instant,
    next_sync: Instant,
    snapshot_in_flight: bool,
    journal_failed: bool,
    /// Admin answers held until the turn's journal write, like push replies.
    admin_out: Vec<(Sender<admin::Response>, admin::Response)>,
}

impl Loop {
    async fn run(&mut self, rx: Receiver<Msg>, mut signals: async_signal::Signals) {
        let mut buf = vec![0u8; 2048];
        let mut spin_until = Instant::now();
        loop {
            let deadline = self.deadline();
            let race = future::or(
                future::or(
                    async {
                        let _ = self.udp.readable().await;
                        Wake::Udp
                    },
                    async {
                        match rx.recv().await {
                            Ok(m) => Wake::Msg(m),
                            Err(_) => Wake::Signal,
                        }
                    },
                ),
                future::or(
                    async {
                        Timer::at(deadline).await;
                        Wake::Timer
                    },
                    async {
                        signals.next().await;
                        Wake::Signal
                    },
                ),
            );
            // For a moment after a busy turn, poll every source without sleeping and yield to
            // the connection tasks in between: the next request of a one-at-a-time pusher
            // usually arrives within microseconds, and waking an idle core costs more than the
            // spin. Every source stays in the race, so nothing is starved while spinning.
            let wake = if Instant::now() < spin_until {
                match future::poll_once(race).await {
                    Some(w) => w,
                    None => {
                        future::yield_now().await;
                        continue;
                    }
                }
            } else {
                race.await
            };
            let mut tcp_turn = matches!(wake, Wake::Msg(_));
            match wake {
                Wake::Signal => return,
                // A message wake skips the UDP drain: the race above polls the socket first on
                // every turn, so pending datagrams win the next one, and a push round trip
                // saves a syscall that would only say "would block".
                Wake::Msg(m) => self.on_msg(m),
                Wake::Udp | Wake::Timer => self.drain_udp(&mut buf),
            }
            for _ in 0..MSG_BATCH {
                match rx.try_recv() {
                    Ok(m) => {
                        self.on_msg(m);
                        tcp_turn = true;
                    }
                    Err(_) => break,
                }
            }
            let now = self.clock.now();
            self.node.handle_timeout(now);
            self.maintenance();
            self.flush();
            // Only connection traffic (pushers waiting for their reply byte) earns the spin;
            // heartbeats are fire-and-forget, so a UDP-only load sleeps between turns as before.
            if tcp_turn {
                spin_until = Instant::now() + SPIN;
            }
        }
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + 'static) {
        if let Some(ex) = &self.ex {
            ex.spawn(f).detach();
        }
    }

    fn deadline(&self) -> Instant {
        let mut d = self.next_snapshot.min(self.next_sync);
        if let Some(t) = self.node.poll_timeout() {
            d = d.min(self.clock.instant(t));
        }
        d
    }

    fn drain_udp(&mut self, _buf: &mut [u8]) {
        use std::os::fd::AsRawFd;
        let fd = self.udp.get_ref().as_raw_fd();
        let mut read = 0;
        while read < UDP_BATCH {
            let now = self.clock.now();
            let node = &mut self.node;
            match self
                .udp_batch
                .recv(fd, |from, data| node.handle_udp(now, from, data))
            {
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

    fn on_msg(&mut self, m: Msg) {
        let now = self.clock.now();
        match m {
            Msg::Open {
                conn,
                port,
                peer,
                stream,
            } => {
                if self.node.handle_tcp_open(now, conn, port, peer) {
                    let (tx, rx) = async_channel::bounded(WRITE_QUEUE);
                    self.spawn(write_loop(stream.clone(), rx));
                    self.conns.insert(conn, ConnHandle { tx, stream });
                } else {
                    let _ = stream.get_ref().shutdown(Shutdown::Both);
                }
            }
            Msg::Data { conn, bytes } => self.node.handle_tcp_data(now, conn, &bytes),
            Msg::Closed { conn } => {
                self.node.handle_tcp_close(now, conn);
                self.conns.remove(&conn);
            }
            Msg::SnapshotDone { gen, result } => {
                self.snapshot_in_flight = false;
                match result {
                    Ok((took, size)) => {
                        self.store.snapshot_done(gen);
                        self.metrics.snapshot_done(took, size);
                        debug!(
                            gen,
                            size,
                            took_ms = took.as_millis() as u64,
                            "snapshot written"
                        );
                    }
                    Err(e) => error!(error = %e, "snapshot failed; journals are kept"),
                }
            }
            Msg::Admin(req) => {
                let resp = admin::handle(&req, &mut self.node, now, &self.metrics);
                self.admin_out.push((req.reply, resp));
            }
        }
    }

    fn maintenance(&mut self) {
        let now = Instant::now();
        if now >= self.next_sync {
            self.next_sync = now + Duration::from_secs(1);
            if self.cfg.fsync == Fsync::Interval {
                let t = Instant::now();
                if let Err(e) = self.store.sync() {
                    error!(error = %e, "journal fsync failed");
                }
                self.metrics.fsync_done(t.elapsed());
            }
        }
        if now >= self.next_snapshot && !self.snapshot_in_flight {
            self.next_snapshot = now + self.cfg.snapshot_interval;
            self.flush();
            match self.store.rotate() {
                Ok(gen) => {
                    let t = Instant::now();
                    let bytes =
                        persist::encode_snapshot(gen, self.clock.now().0, self.node.records());
                    let dir = self.store.dir().to_path_buf();
                    let tx = self.tx.clone();
                    self.snapshot_in_flight = true;
                    self.spawn(async move {
                        let size = bytes.len();
                        let result =
                            smol::unblock(move || persist::write_snapshot_file(&dir, &bytes))
                                .await
                                .map(|()| (t.elapsed(), size));
                        let _ = tx.send(Msg::SnapshotDone { gen, result }).await;
                    });
                }
                Err(e) => error!(error = %e, "journal rotation failed"),
            }
        }
    }

    /// Journals the turn's changes, then sends its transmits, closes and events.
    fn flush(&mut self) {
        while let Some(c) = self.node.poll_change() {
            self.changes.push(c);
        }
        if !self.changes.is_empty() {
            let t = Instant::now();
            let mut ok = self.store.append(&self.changes).is_ok();
            if ok && self.cfg.fsync == Fsync::Always {
                ok = self.store.sync().is_ok();
                self.metrics.fsync_done(t.elapsed());
            }
            self.metrics.journal_writes.fetch_add(1, Ordering::Relaxed);
            if !ok && !self.journal_failed {
                error!("journal write failed: accepted pushes are answered 0xFF until it recovers");
            }
            self.journal_failed = !ok;
            let now = self.clock.now();
            for c in &self.changes {
                if let Change::Cleared { uuid, .. } = c {
                    if let Some(t) = self.node.record(uuid).and_then(|r| r.last_push) {
                        self.metrics.push_acked(now.since(t));
                    }
                }
            }
            self.changes.clear();
        }
        for (tx, resp) in self.admin_out.drain(..) {
            let _ = tx.try_send(resp);
        }
        while let Some(t) = self.node.poll_transmit() {
            self.send(t);
        }
        self.send_udp();
        for (conn, bytes) in self.tcp_out.drain() {
            if let Some(h) = self.conns.get(&conn) {
                match h.tx.try_send(bytes) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        // A peer that does not read its replies: drop it rather than buffer
                        // without bound or stall anyone else.
                        self.metrics.stalled_closed.fetch_add(1, Ordering::Relaxed);
                        let _ = h.stream.get_ref().shutdown(Shutdown::Both);
                    }
                    Err(TrySendError::Closed(_)) => {}
                }
            }
        }
        while let Some(conn) = self.node.poll_close() {
            // Dropping the sender lets the writer flush what is queued, then shut down.
            self.conns.remove(&conn);
        }
        while let Some(e) = self.node.poll_event() {
            log_event(&e);
        }
    }

    fn send(&mut self, t: Transmit) {
        match t.dest {
            Dest::Udp(a) => {
                // Queued for one `sendmmsg` at the end of the turn's transmits.
                let b = &mut self.udp_batch;
                t.encode(&mut b.tx);
                b.tx_dest.push((socket2::SockAddr::from(a), b.tx.len()));
                if b.tx_dest.len() >= MMSG {
                    self.send_udp();
                }
            }
            Dest::Tcp(c) => {
                let out = self.tcp_out.entry(c).or_default();
                match t.payload {
                    Payload::Reply(PushReply::Accepted) if self.journal_failed => {
                        out.push(PushReply::Failed.byte())
                    }
                    _ => t.encode(out),
                }
            }
        }
    }

    /// Sends the queued datagrams. UDP is lossy by contract: one the kernel refuses stays
    /// pending and goes out again on the next heartbeat.
    fn send_udp(&mut self) {
        use std::os::fd::AsRawFd;
        let failed = self.udp_batch.flush(self.udp.get_ref().as_raw_fd());
        if failed > 0 {
            self.metrics
                .udp_send_errors
                .fetch_add(failed, Ordering::Relaxed);
        }
    }

    fn shutdown(mut self) -> Result<(), ServerError> {
        self.flush();
        let t = Instant::now();
        let size = snapshot_now(&self.node, &mut self.store, &self.clock)?;
        let s = self.node.stats();
        info!(
            clients = s.clients,
            online = s.online,
            pushes_accepted = s.pushes_accepted,
            heartbeats = s.heartbeats,
            resends = s.resends,
            acks = s.acks,
            snapshot_bytes = size,
            snapshot_ms = t.elapsed().as_millis() as u64,
            "ddpushd stopped"
        );
        Ok(())
    }
}

fn log_event(e: &Event) {
    match e {
        Event::Limited { limit } => warn!(limit = limit.label(), "abuse limit hit (first time)"),
        Event::CapacityReached => warn!("max-clients reached: new uuids are refused"),
        Event::Closed { conn, reason } => debug!(conn, ?reason, "connection closed"),
        other => tracing::trace!(?other),
    }
}
