//! The cluster node's event loop: one task owns the [`ClusterNode`]; socket tasks, store
//! operations and peer links only move values.
//!
//! Each turn: wake on the UDP socket, a connection message, a store result, a peer event, an
//! admin request, a timer or a signal; feed everything that is ready to the core; then drain
//! its outputs: store operations go to Redis (at most the in-flight bound at once, the rest
//! queued in order), peer messages to their links, transmits to the sockets. While that many
//! operations are outstanding (issued and not yet answered by Redis, including those the core
//! already timed out) the loop stops taking connection input, so a pusher beyond the bound
//! waits in TCP flow control; nothing is dropped. The bound adapts to the store's latency
//! ([`InflightLimit`]) so that operations do not queue past their time-out; an operation
//! still queued when its time-out passed is not sent at all (the core has answered it).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, UdpSocket};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_channel::{Receiver, Sender, TrySendError};
use async_io::{Async, Timer};
use ddpush_proto::cluster::{ClusterConfig, ClusterEvent, ClusterNode, OpId, StoreError, StoreOp};
use ddpush_proto::{ConnId, Dest, Port, Time, Transmit};
use futures_lite::{future, StreamExt};
use tracing::{debug, info, warn};

use super::io::{accept_loop, bind_device, bind_tcp, write_loop, ConnHandle, ConnMsg, WRITE_QUEUE};
use super::limit::InflightLimit;
use super::peer::{self, Directory, PeerConfig, PeerEvent, Peers};
use super::status::{self, AdapterStats};
use super::store::{Executed, RedisStore, StoreConfig};
use super::ClusterOptions;
use crate::admin;
use crate::server::{Executor, Msg, ServerError};
use crate::settings::{AdminListen, ServerConfig};

/// Messages queued from connection tasks before they wait for the loop.
const MSG_QUEUE: usize = 8192;
/// Inputs of one kind handled per turn before the others get a chance.
const BATCH: usize = 4096;
/// After SIGTERM, how long store operations in flight may take to finish.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a node that started degraded tries the store again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

enum Wake {
    Udp,
    Conn(ConnMsg),
    Ctl(Ctl),
    Peer(PeerEvent),
    Admin(Msg),
    Timer,
    Signal,
}

/// Results and state changes that come back to the loop.
enum Ctl {
    /// An operation's outcome, and when the core issued it.
    Done(OpId, Executed, Instant),
    StoreUp(RedisStore),
}

/// Runs a cluster node until SIGTERM or SIGINT; then stops reading input, lets the store
/// operations in flight finish (their push replies go out) and returns.
pub fn run(cfg: ServerConfig, opts: ClusterOptions) -> Result<(), ServerError> {
    let (udp, tcp) =
        bind_device(cfg.listen, cfg.udp_buffer, cfg.device_tcp).map_err(|e| ServerError::Bind {
            what: "device UDP/TCP",
            addr: cfg.listen,
            source: e,
        })?;
    let bind = |what: &'static str, addr| {
        bind_tcp(addr).map_err(|source| ServerError::Bind { what, addr, source })
    };
    let push = bind("push TCP", cfg.push_listen)?;
    let peer_l = bind("peer TCP", opts.peer_listen)?;
    let admin_l = match cfg.admin_listen {
        AdminListen::Addr(a) => Some(bind("admin HTTP", a)?),
        AdminListen::None => None,
    };
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let peer_addr = peer_l.local_addr()?;
    let advertise = opts.peer_advertise.unwrap_or(peer_addr);
    let store_cfg = StoreConfig {
        pending_ttl: cfg.core.pending_ttl,
        wait_replicas: opts.wait_replicas,
        wait_timeout: opts.wait_timeout,
        wait_fail: opts.wait_fail,
        op_timeout: opts.store_timeout,
    };
    let ex: Executor = std::rc::Rc::new(smol::LocalExecutor::new());
    let (ctl_tx, ctl_rx) = async_channel::unbounded::<Ctl>();
    // The store first: a node that cannot reach it refuses to start unless told otherwise.
    let first = smol::block_on(RedisStore::connect(&opts.redis, store_cfg.clone()));
    let store = match first {
        Ok(s) => {
            smol::block_on(s.register_node(&opts.node, advertise))
                .map_err(|e| io::Error::other(format!("registering the node in Redis: {e}")))?;
            Some(s)
        }
        Err(e) if opts.start_degraded => {
            warn!(error = %e, "Redis Cluster not usable; starting degraded (pushes get 0xFF until it is)");
            let (redis, node, tx, cfg) = (
                opts.redis.clone(),
                opts.node.clone(),
                ctl_tx.clone(),
                store_cfg.clone(),
            );
            ex.spawn(async move {
                loop {
                    Timer::after(RECONNECT_EVERY).await;
                    if let Ok(s) = RedisStore::connect(&redis, cfg.clone()).await {
                        if s.register_node(&node, advertise).await.is_ok() {
                            let _ = tx.send(Ctl::StoreUp(s)).await;
                            return;
                        }
                    }
                }
            })
            .detach();
            None
        }
        Err(e) => {
            return Err(io::Error::other(format!(
                "{e} (ddpushd refuses to start without its store; \
                 --cluster-start-degraded starts anyway)"
            ))
            .into())
        }
    };
    let cc = ClusterConfig {
        store_timeout: opts.store_timeout,
        drain_every: opts.drain_interval,
        ..ClusterConfig::new(opts.node.clone())
    };
    let node = ClusterNode::new(cfg.core.clone(), cc)
        .map_err(|e| io::Error::other(format!("cluster configuration: {e}")))?;
    let udp_addr = udp.local_addr()?;
    info!(
        udp = %udp_addr,
        tcp = %tcp.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".into(), |a| a.to_string()),
        push = %push.local_addr()?,
        admin = %admin_l.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".into(), |a| a.to_string()),
        peer = %peer_addr,
        advertise = %advertise,
        node_id = %opts.node,
        store = if store.is_some() { "connected" } else { "degraded" },
        "ddpushd listening (cluster mode)"
    );
    let dir: Directory = Arc::new(Mutex::new(store.clone()));
    let (conn_tx, conn_rx) = async_channel::bounded::<ConnMsg>(MSG_QUEUE);
    let (peer_tx, peer_rx) = async_channel::bounded::<PeerEvent>(MSG_QUEUE);
    let (admin_tx, admin_rx) = async_channel::bounded::<Msg>(64);
    let pcfg = Arc::new(PeerConfig {
        me: opts.node.clone(),
        secret: opts.secret.clone().map(String::into_bytes),
    });
    let next_id = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    if let Some(l) = tcp {
        tasks.push(ex.spawn(accept_loop(
            ex.clone(),
            Async::new(l)?,
            Port::Device,
            Vec::new(),
            conn_tx.clone(),
            next_id.clone(),
        )));
    }
    tasks.push(ex.spawn(accept_loop(
        ex.clone(),
        Async::new(push)?,
        Port::Push,
        cfg.push_allow.clone(),
        conn_tx.clone(),
        next_id.clone(),
    )));
    tasks.push(ex.spawn(peer::listen(
        ex.clone(),
        Async::new(peer_l)?,
        pcfg.clone(),
        peer_tx.clone(),
    )));
    if let Some(l) = admin_l {
        tasks.push(ex.spawn(admin::serve(
            ex.clone(),
            Async::new(l)?,
            admin_tx,
            cfg.admin_token.clone(),
        )));
    }
    let epoch_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut lp = Loop {
        peers: Peers::new(ex.clone(), pcfg, dir.clone(), peer_tx),
        ex: ex.clone(),
        node,
        start: Instant::now(),
        epoch_ms,
        limit: InflightLimit::new(
            opts.max_inflight,
            InflightLimit::target_for(opts.store_timeout, opts.wait_timeout),
        ),
        store_timeout: opts.store_timeout,
        udp: Async::new(udp)?,
        conns: HashMap::new(),
        tcp_out: HashMap::new(),
        store,
        dir,
        ctl_tx,
        queue: VecDeque::new(),
        dispatched: 0,
        stats: AdapterStats::default(),
        buf: vec![0u8; 2048],
    };
    lp.stats.store_connected = lp.store.is_some();
    lp.stats.inflight_limit = lp.limit.get();
    smol::block_on(ex.run(lp.run(conn_rx, ctl_rx, peer_rx, admin_rx, signals)));
    drop(tasks);
    let s = lp.node.stats();
    info!(
        owned = s.owned,
        pushes_accepted = s.pushes[0],
        binds = s.binds,
        "ddpushd stopped (cluster mode)"
    );
    Ok(())
}

struct Loop {
    ex: Executor,
    node: ClusterNode,
    start: Instant,
    epoch_ms: u64,
    limit: InflightLimit,
    store_timeout: Duration,
    udp: Async<UdpSocket>,
    conns: HashMap<ConnId, ConnHandle>,
    tcp_out: HashMap<ConnId, Vec<u8>>,
    store: Option<RedisStore>,
    dir: Directory,
    ctl_tx: Sender<Ctl>,
    /// Operations the core issued that wait for a free in-flight slot, in order, with when.
    queue: VecDeque<(OpId, StoreOp, Instant)>,
    dispatched: usize,
    peers: Peers,
    stats: AdapterStats,
    buf: Vec<u8>,
}

impl Loop {
    fn now(&self) -> Time {
        Time(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }

    fn instant(&self, t: Time) -> Instant {
        self.start + Duration::from_millis(t.0.saturating_sub(self.epoch_ms))
    }

    /// Connection input is read only below the in-flight bound. Outstanding counts what the
    /// core waits for and what Redis still works on (operations the core timed out included:
    /// they still load the store).
    fn below_bound(&self) -> bool {
        self.node.inflight().max(self.dispatched + self.queue.len()) < self.limit.get()
    }

    async fn run(
        &mut self,
        conn_rx: Receiver<ConnMsg>,
        ctl_rx: Receiver<Ctl>,
        peer_rx: Receiver<PeerEvent>,
        admin_rx: Receiver<Msg>,
        mut signals: async_signal::Signals,
    ) {
        let mut stopping: Option<Instant> = None;
        loop {
            let deadline = self
                .node
                .poll_timeout()
                .map(|t| self.instant(t))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            // A stop lets the operations in flight finish (their replies go out), then ends.
            if let Some(t) = stopping {
                if self.node.inflight() == 0 || t.elapsed() > STOP_GRACE {
                    return;
                }
            }
            // Back-pressure: with the core's in-flight bound reached, connection input waits.
            let open = self.below_bound() && stopping.is_none();
            if !open {
                self.stats.backpressure += 1;
            }
            let udp_open = self.udp_open();
            let wake = future::or(
                future::or(
                    async {
                        if !udp_open {
                            return future::pending().await;
                        }
                        let _ = self.udp.readable().await;
                        Wake::Udp
                    },
                    async {
                        if !open {
                            return future::pending().await;
                        }
                        match conn_rx.recv().await {
                            Ok(m) => Wake::Conn(m),
                            Err(_) => future::pending().await,
                        }
                    },
                ),
                future::or(
                    future::or(
                        async {
                            match ctl_rx.recv().await {
                                Ok(c) => Wake::Ctl(c),
                                Err(_) => future::pending().await,
                            }
                        },
                        async {
                            match peer_rx.recv().await {
                                Ok(p) => Wake::Peer(p),
                                Err(_) => future::pending().await,
                            }
                        },
                    ),
                    future::or(
                        async {
                            match admin_rx.recv().await {
                                Ok(m) => Wake::Admin(m),
                                Err(_) => future::pending().await,
                            }
                        },
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
                    ),
                ),
            )
            .await;
            match wake {
                Wake::Signal => {
                    stopping.get_or_insert_with(Instant::now);
                }
                Wake::Udp | Wake::Timer => {}
                Wake::Conn(m) => self.on_conn(m),
                Wake::Ctl(c) => self.on_ctl(c),
                Wake::Peer(p) => self.on_peer(p),
                Wake::Admin(m) => self.on_admin(m),
            }
            self.drain_udp();
            for _ in 0..BATCH {
                match ctl_rx.try_recv() {
                    Ok(c) => self.on_ctl(c),
                    Err(_) => break,
                }
            }
            for _ in 0..BATCH {
                match peer_rx.try_recv() {
                    Ok(p) => self.on_peer(p),
                    Err(_) => break,
                }
            }
            for _ in 0..BATCH {
                if !self.below_bound() || stopping.is_some() {
                    break;
                }
                match conn_rx.try_recv() {
                    Ok(m) => self.on_conn(m),
                    Err(_) => break,
                }
            }
            let now = self.now();
            self.node.handle_timeout(now);
            self.flush();
        }
    }

    /// Device datagrams are read while less than a bound's worth of store operations waits
    /// for a slot: beyond, the binds and acks they would issue could only wait for their
    /// time-out in our queue, so the datagrams wait in the socket buffer instead (where the
    /// core's clock does not run for them; a full buffer drops, as UDP may). Heartbeats of
    /// devices with a copy cost no store operation but wait with the rest.
    fn udp_open(&self) -> bool {
        self.queue.len() < self.limit.get()
    }

    /// Moves the core's new store operations to the queue (stamped now).
    fn take_ops(&mut self) {
        let issued = Instant::now();
        while let Some((id, op)) = self.node.poll_store() {
            self.queue.push_back((id, op, issued));
        }
    }

    fn drain_udp(&mut self) {
        for _ in 0..BATCH {
            if !self.udp_open() {
                break;
            }
            match self.udp.get_ref().recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    let now = self.now();
                    self.node.handle_udp(now, from, &self.buf[..n]);
                    self.take_ops();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors of earlier sends surface here: not ours to fix.
                Err(_) => continue,
            }
        }
    }

    fn on_conn(&mut self, m: ConnMsg) {
        let now = self.now();
        match m {
            ConnMsg::Open { conn, port, stream } => {
                self.node.handle_tcp_open(now, conn, port);
                let (tx, rx) = async_channel::bounded(WRITE_QUEUE);
                self.ex.spawn(write_loop(stream.clone(), rx)).detach();
                self.conns.insert(conn, ConnHandle { tx, stream });
            }
            ConnMsg::Data { conn, bytes } => self.node.handle_tcp_data(now, conn, &bytes),
            ConnMsg::Closed { conn } => {
                self.node.handle_tcp_close(now, conn);
                self.conns.remove(&conn);
            }
        }
    }

    fn on_ctl(&mut self, c: Ctl) {
        let now = self.now();
        match c {
            Ctl::Done(id, ex, issued) => {
                self.dispatched = self.dispatched.saturating_sub(1);
                self.limit.on_done(Instant::now(), issued.elapsed());
                self.stats.inflight_limit = self.limit.get();
                if ex.wait_short {
                    self.stats.wait_short += 1;
                }
                if ex.result.is_ok() {
                    self.stats.observe(ex.took);
                }
                self.node.handle_store(now, id, ex.result);
            }
            Ctl::StoreUp(s) => {
                info!("Redis Cluster connected; leaving degraded mode");
                if let Ok(mut d) = self.dir.lock() {
                    *d = Some(s.clone());
                }
                self.store = Some(s);
                self.stats.store_connected = true;
                // Marks may have piled up while we could not drain.
                self.node.handle_peer_lost(now);
            }
        }
    }

    fn on_peer(&mut self, p: PeerEvent) {
        let now = self.now();
        match p {
            PeerEvent::Msg(m) => self.node.handle_peer(now, m),
            PeerEvent::Up(n) => {
                self.stats.peers_up.insert(n);
            }
            PeerEvent::Lost(n) => {
                self.stats.peers_up.remove(&n);
                self.node.handle_peer_lost(now);
            }
            PeerEvent::Refused => self.stats.peer_refused += 1,
        }
    }

    fn on_admin(&mut self, m: Msg) {
        if let Msg::Admin(req) = m {
            let resp = status::handle(&req, &self.node, &self.stats);
            let _ = req.reply.try_send(resp);
        }
    }

    /// Drains the core's outputs.
    fn flush(&mut self) {
        self.take_ops();
        self.dispatch();
        while let Some((to, msg)) = self.node.poll_peer() {
            if !self.peers.send(to, msg) {
                self.stats.pokes_dropped += 1;
            }
        }
        while let Some(t) = self.node.poll_transmit() {
            self.send(t);
        }
        for (conn, bytes) in self.tcp_out.drain() {
            if let Some(h) = self.conns.get(&conn) {
                match h.tx.try_send(bytes) {
                    Ok(()) | Err(TrySendError::Closed(_)) => {}
                    Err(TrySendError::Full(_)) => {
                        // A peer that does not read: drop it rather than buffer without bound.
                        let _ = h.stream.get_ref().shutdown(Shutdown::Both);
                    }
                }
            }
        }
        while let Some(conn) = self.node.poll_close() {
            self.conns.remove(&conn);
        }
        while let Some(e) = self.node.poll_event() {
            log_event(&e);
        }
    }

    /// Starts queued operations up to the in-flight bound.
    fn dispatch(&mut self) {
        while self.dispatched < self.limit.get() {
            let Some((id, op, issued)) = self.queue.pop_front() else {
                return;
            };
            if issued.elapsed() >= self.store_timeout {
                // The core already answered it as timed out; running it now would only
                // load a store that is behind.
                self.stats.expired_unsent += 1;
                continue;
            }
            let tx = self.ctl_tx.clone();
            match &self.store {
                None => {
                    let ex = Executed {
                        result: Err(StoreError::Unavailable),
                        took: Duration::ZERO,
                        wait_short: false,
                    };
                    self.dispatched += 1;
                    let _ = tx.try_send(Ctl::Done(id, ex, issued));
                }
                Some(s) => {
                    let s = s.clone();
                    self.dispatched += 1;
                    self.ex
                        .spawn(async move {
                            let r = s.execute(&op).await;
                            let _ = tx.send(Ctl::Done(id, r, issued)).await;
                        })
                        .detach();
                }
            }
        }
    }

    fn send(&mut self, t: Transmit) {
        match t.dest {
            Dest::Udp(a) => {
                let mut b = Vec::with_capacity(512);
                t.encode(&mut b);
                // UDP is lossy by contract: a refused datagram goes out again on the next
                // heartbeat.
                let _ = self.udp.get_ref().send_to(&b, a);
            }
            Dest::Tcp(c) => t.encode(self.tcp_out.entry(c).or_default()),
        }
    }
}

fn log_event(e: &ClusterEvent) {
    match e {
        ClusterEvent::StoreFailed { id, error } => debug!(id, %error, "store operation failed"),
        ClusterEvent::Dropped { uuid } => debug!(%uuid, "copy dropped (another owner or epoch)"),
        other => tracing::trace!(?other),
    }
}
