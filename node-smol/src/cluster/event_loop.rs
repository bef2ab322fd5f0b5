//! The cluster node's event loop: one task owns the [`ClusterNode`]; store operations and
//! peer links only move values. The device and push sockets are the single node's socket
//! layer ([`Sockets`]: batched UDP, readiness-driven TCP connections, the stall rule), fed to
//! the core through [`SocketCore`].
//!
//! Each turn: wake on the UDP socket, a ready connection, an accepted connection or admin
//! request, a store result, a peer event, a timer or a signal; feed everything that is ready
//! to the core; then drain its outputs: store operations go to Redis (at most the in-flight
//! bound at once, the rest queued in order), peer messages to their links, transmits to the
//! sockets. While that many operations are outstanding (issued and not yet answered by
//! Redis, including those the core already timed out) the loop stops reading connections
//! (the bound is checked before every read of at most 4 KiB), so a pusher beyond the bound
//! waits in TCP flow control; nothing is dropped. The bound adapts to the store's latency
//! ([`InflightLimit`]) so that operations do not queue past their time-out; an operation
//! still queued when its time-out passed is not sent at all (the core has answered it).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_io::{Async, Timer};
use ddpush_proto::cluster::{ClusterConfig, ClusterEvent, ClusterNode, OpId, StoreError, StoreOp};
use ddpush_proto::driver::StoreConfirmed;
use ddpush_proto::{ConnId, Driver, Port, Time, Transmit, Uuid};
use futures_lite::{future, StreamExt};
use tracing::{debug, info, warn};

use super::admin::{self as cluster_admin, HeldPushes, Route};
use super::limit::InflightLimit;
use super::peer::{self, Directory, PeerConfig, PeerEvent, Peers};
use super::status::AdapterStats;
use super::store::{Executed, RedisStore, StoreConfig};
use super::ClusterOptions;
use crate::admin;
use crate::server::sockets::{Listeners, ReadSize, SocketCore, Sockets};
use crate::server::{bind_tcp, Clock, Executor, Msg, ServerError};
use crate::settings::ServerConfig;

/// Accepted connections and admin requests queued before their tasks wait for the loop.
const MSG_QUEUE: usize = 8192;
/// Inputs of one kind handled per turn before the others get a chance.
const BATCH: usize = 4096;
/// After SIGTERM, how long store operations in flight may take to finish.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a node that started degraded tries the store again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

enum Wake {
    Udp,
    Conns,
    Msg(Msg),
    Ctl(Ctl),
    Peer(PeerEvent),
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
    let clock = Clock::new();
    let mut listeners = Listeners::bind(&cfg)?;
    let peer_l = bind_tcp("peer TCP", opts.peer_listen, None)?;
    let admin_l = listeners.admin.take();
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let peer_addr = peer_l.local_addr()?;
    let advertise = opts.peer_advertise.unwrap_or(peer_addr);
    let store_cfg = StoreConfig {
        pending_ttl: cfg.core.pending_ttl,
        wait_replicas: opts.wait_replicas,
        wait_timeout: opts.wait_timeout,
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
    let tcp_addr = |l: &Option<std::net::TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or("off".into(), |a| a.to_string())
    };
    info!(
        udp = %listeners.udp.local_addr()?,
        tcp = %tcp_addr(&listeners.tcp),
        push = %listeners.push.local_addr()?,
        admin = %tcp_addr(&admin_l),
        peer = %peer_addr,
        advertise = %advertise,
        node_id = %opts.node,
        store = if store.is_some() { "connected" } else { "degraded" },
        "ddpushd listening (cluster mode)"
    );
    let dir: Directory = Arc::new(Mutex::new(store.clone()));
    let (msg_tx, msg_rx) = async_channel::bounded::<Msg>(MSG_QUEUE);
    let (peer_tx, peer_rx) = async_channel::bounded::<PeerEvent>(MSG_QUEUE);
    let pcfg = Arc::new(PeerConfig {
        me: opts.node.clone(),
        secret: opts.secret.clone().map(String::into_bytes),
    });
    let stats = AdapterStats::default();
    let (sockets, mut tasks) = Sockets::start(
        &ex,
        listeners,
        &cfg,
        ReadSize::Small,
        msg_tx.clone(),
        stats.sockets.clone(),
    )?;
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
            msg_tx,
            cfg.admin_token.clone(),
        )));
    }
    let mut lp = Loop {
        peers: Peers::new(ex.clone(), pcfg, dir.clone(), peer_tx),
        ex: ex.clone(),
        node,
        clock,
        driver: Driver::new(),
        accept: StoreConfirmed {
            wait: opts.wait_fail.policy(),
        },
        held: HeldPushes::default(),
        limit: InflightLimit::new(
            opts.max_inflight,
            InflightLimit::target_for(opts.store_timeout, opts.wait_timeout),
        ),
        store_timeout: opts.store_timeout,
        sockets,
        store,
        dir,
        ctl_tx,
        queue: VecDeque::new(),
        dispatched: 0,
        stats,
        next_second: Instant::now(),
        started: Instant::now(),
    };
    lp.stats.store_connected = lp.store.is_some();
    lp.stats.inflight_limit = lp.limit.get();
    smol::block_on(ex.run(lp.run(msg_rx, ctl_rx, peer_rx, signals)));
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
    clock: Clock,
    /// The core's turn (shared with the single node): its acceptance step decides every push.
    driver: Driver,
    /// The cluster's acceptance step: `0x00` only once the store confirmed (`--cluster-wait-fail`).
    accept: StoreConfirmed,
    /// `POST /push` answers waiting for the store's confirmations of their items.
    held: HeldPushes,
    limit: InflightLimit,
    store_timeout: Duration,
    /// The device and push sockets (the single node's socket layer).
    sockets: Sockets,
    store: Option<RedisStore>,
    dir: Directory,
    ctl_tx: Sender<Ctl>,
    /// Operations the core issued that wait for a free in-flight slot, in order, with when.
    queue: VecDeque<(OpId, StoreOp, Instant)>,
    dispatched: usize,
    peers: Peers,
    stats: AdapterStats,
    /// When the once-a-second socket upkeep (lingering closes, the console's history) is
    /// next due.
    next_second: Instant,
    /// When the loop started (the console's uptime).
    started: Instant,
}

/// The inputs the socket layer needs from a node; the cluster core applies the single node's
/// connection bounds in `handle_tcp_open` (the shared `limits::Guard`).
impl SocketCore for ClusterNode {
    fn handle_udp(&mut self, now: Time, from: SocketAddr, data: &[u8]) {
        ClusterNode::handle_udp(self, now, from, data);
    }

    fn handle_tcp_open(&mut self, now: Time, conn: ConnId, port: Port, peer: SocketAddr) -> bool {
        ClusterNode::handle_tcp_open(self, now, conn, port, peer)
    }

    fn handle_tcp_data(&mut self, now: Time, conn: ConnId, data: &[u8]) {
        ClusterNode::handle_tcp_data(self, now, conn, data);
    }

    fn handle_tcp_close(&mut self, now: Time, conn: ConnId) {
        ClusterNode::handle_tcp_close(self, now, conn);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        ClusterNode::poll_transmit(self)
    }

    fn poll_close(&mut self) -> Option<ConnId> {
        ClusterNode::poll_close(self)
    }
}

/// Operations the core issued that wait for a free in-flight slot, with when they were
/// issued, and the bound; what decides whether the loop may read more input.
struct Backlog<'a> {
    queue: &'a mut VecDeque<(OpId, StoreOp, Instant)>,
    dispatched: usize,
    limit: usize,
}

impl<'a> Backlog<'a> {
    fn of(
        queue: &'a mut VecDeque<(OpId, StoreOp, Instant)>,
        dispatched: usize,
        limit: &InflightLimit,
    ) -> Self {
        Backlog {
            queue,
            dispatched,
            limit: limit.get(),
        }
    }

    /// Moves the core's new store operations to the queue (stamped now).
    fn take(&mut self, node: &mut ClusterNode) {
        let issued = Instant::now();
        while let Some((id, op)) = node.poll_store() {
            self.queue.push_back((id, op, issued));
        }
    }

    /// Connection input is read only below the in-flight bound. Outstanding counts what the
    /// core waits for and what Redis still works on (operations the core timed out included:
    /// they still load the store).
    fn below_bound(&self, node: &ClusterNode) -> bool {
        node.inflight().max(self.dispatched + self.queue.len()) < self.limit
    }

    /// Device datagrams are read while less than a bound's worth of store operations waits
    /// for a slot: beyond, the binds and acks they would issue could only wait for their
    /// time-out in our queue, so the datagrams wait in the socket buffer instead (where the
    /// core's clock does not run for them; a full buffer drops, as UDP may). Heartbeats of
    /// devices with a copy cost no store operation but wait with the rest.
    fn udp_open(&self) -> bool {
        self.queue.len() < self.limit
    }
}

impl Loop {
    async fn run(
        &mut self,
        msg_rx: Receiver<Msg>,
        ctl_rx: Receiver<Ctl>,
        peer_rx: Receiver<PeerEvent>,
        mut signals: async_signal::Signals,
    ) {
        let mut stopping: Option<Instant> = None;
        loop {
            let deadline = self
                .node
                .poll_timeout()
                .map(|t| self.clock.instant(t))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
                .min(self.next_second);
            // A stop lets the operations in flight finish (their replies go out), then ends.
            if let Some(t) = stopping {
                if self.node.inflight() == 0 || t.elapsed() > STOP_GRACE {
                    return;
                }
            }
            // Back-pressure: with the core's in-flight bound reached, connection input waits.
            let backlog = Backlog::of(&mut self.queue, self.dispatched, &self.limit);
            let open = backlog.below_bound(&self.node) && stopping.is_none();
            let udp_open = backlog.udp_open();
            if !open {
                self.stats.backpressure += 1;
            }
            let wake = future::or(
                future::or(
                    async {
                        if !udp_open {
                            return future::pending().await;
                        }
                        self.sockets.udp_readable().await;
                        Wake::Udp
                    },
                    async {
                        if !open {
                            return future::pending().await;
                        }
                        future::poll_fn(|cx| self.sockets.poll_conns(cx)).await;
                        Wake::Conns
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
                            match msg_rx.recv().await {
                                Ok(m) => Wake::Msg(m),
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
                Wake::Udp | Wake::Timer | Wake::Conns => {}
                Wake::Msg(m) => self.on_msg(m),
                Wake::Ctl(c) => self.on_ctl(c),
                Wake::Peer(p) => self.on_peer(p),
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
                match msg_rx.try_recv() {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                }
            }
            if stopping.is_none() {
                let now = self.clock.now();
                let mut backlog = Backlog::of(&mut self.queue, self.dispatched, &self.limit);
                self.sockets.service(&mut self.node, now, |node| {
                    backlog.take(node);
                    backlog.below_bound(node)
                });
            }
            let now = self.clock.now();
            self.node.handle_timeout(now);
            if Instant::now() >= self.next_second {
                self.next_second = Instant::now() + Duration::from_secs(1);
                self.sockets.expire_lingering();
                let counters = crate::console::history::cluster_counters(self.node.stats());
                self.stats
                    .history
                    .offer(now, self.started.elapsed(), counters);
            }
            self.flush();
        }
    }

    fn drain_udp(&mut self) {
        let mut backlog = Backlog::of(&mut self.queue, self.dispatched, &self.limit);
        self.sockets.drain_udp(&mut self.node, &self.clock, |node| {
            backlog.take(node);
            backlog.udp_open()
        });
    }

    /// An accepted connection (through the core, which may refuse it) or an admin request.
    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Open {
                conn,
                port,
                peer,
                stream,
            } => {
                let now = self.clock.now();
                self.sockets
                    .open(&mut self.node, now, conn, port, peer, stream);
            }
            Msg::Admin(req) => self.on_admin(req),
            // Snapshots are single-node state; no cluster task sends this.
            Msg::SnapshotDone { .. } => {}
        }
    }

    /// An admin request: answered now, or, for `POST /push`, once the store decided every
    /// item (the driver's acceptance step, as on port 9999), or, for `GET /clients/{uuid}`,
    /// once the store answered a read.
    fn on_admin(&mut self, req: admin::AdminRequest) {
        self.stats.drain_records_read = self
            .store
            .as_ref()
            .map_or(0, RedisStore::drain_records_read);
        let view = cluster_admin::View {
            now: self.clock.now(),
            uptime: self.started.elapsed(),
        };
        match cluster_admin::route(&req, &self.node, &self.stats, view) {
            Route::Now(resp) => {
                let _ = req.reply.try_send(resp);
            }
            Route::Push => {
                let now = self.clock.now();
                match admin::push(
                    req.body(),
                    &mut self.node,
                    &mut self.driver,
                    now,
                    cluster_admin::NOT_CONFIRMED,
                ) {
                    Ok(held) => self.held.hold(req.reply, held),
                    Err(resp) => {
                        let _ = req.reply.try_send(resp);
                    }
                }
            }
            Route::Record(uuid) => self.read_record(req, uuid, None),
            Route::Lookup(uuid, user) => self.read_record(req, uuid, Some(user)),
        }
    }

    /// `GET /clients/{uuid}` (`lookup` None) or the console's lookup (the user name it was
    /// given, if any): one read of the store, answered when it returns.
    fn read_record(
        &mut self,
        req: admin::AdminRequest,
        uuid: Uuid,
        lookup: Option<Option<String>>,
    ) {
        let now = self.clock.now();
        let owned = self.node.copy(&uuid).is_some();
        let online = self.node.is_online(&uuid);
        let Some(store) = self.store.clone() else {
            let _ = req.reply.try_send(admin::Response::error(
                503,
                "the store is not connected (degraded start): the record cannot be read",
            ));
            return;
        };
        self.ex
            .spawn(async move {
                let resp = match (store.read_record(&uuid).await, lookup) {
                    (Ok(r), Some(user)) => {
                        cluster_admin::lookup_json(&uuid, user, r.as_ref(), owned, online, now)
                    }
                    (Ok(Some(r)), None) => admin::Response::json(
                        200,
                        cluster_admin::record_json(&uuid, &r, owned, online),
                    ),
                    (Ok(None), None) => admin::Response::error(404, "unknown uuid"),
                    (Err(e), _) => admin::Response::error(
                        503,
                        &format!("the store did not answer the read: {e}"),
                    ),
                };
                let _ = req.reply.send(resp).await;
            })
            .detach();
    }

    fn on_ctl(&mut self, c: Ctl) {
        let now = self.clock.now();
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
        let now = self.clock.now();
        match p {
            PeerEvent::Msg(m) => self.node.handle_peer(now, m),
            PeerEvent::Up(n) => self.stats.peer_link(n, true, Instant::now()),
            PeerEvent::Lost(n) => {
                self.stats.peer_link(n, false, Instant::now());
                self.node.handle_peer_lost(now);
            }
            PeerEvent::Refused => self.stats.peer_refused += 1,
        }
    }

    /// Ends the turn through the core's driver (the acceptance step decides the pushes whose
    /// store results came in), then drains the core's outputs.
    fn flush(&mut self) {
        let settled = self.driver.end_turn(&mut self.node, self.accept);
        if settled.first {
            warn!("the store did not confirm a push; answering 0xFF until it does again");
        }
        if settled.recovered {
            info!("the store confirms pushes again");
        }
        self.held.settle(&mut self.driver);
        Backlog::of(&mut self.queue, self.dispatched, &self.limit).take(&mut self.node);
        self.dispatch();
        while let Some((to, msg)) = self.node.poll_peer() {
            if !self.peers.send(to, msg) {
                self.stats.pokes_dropped += 1;
            }
        }
        self.sockets.output(&mut self.node);
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
}

fn log_event(e: &ClusterEvent) {
    match e {
        ClusterEvent::StoreFailed { id, error } => debug!(id, %error, "store operation failed"),
        ClusterEvent::Dropped { uuid } => debug!(%uuid, "copy dropped (another owner or epoch)"),
        // The single node's log lines for its limits, which are these.
        ClusterEvent::Limited { limit } => {
            warn!(limit = limit.label(), "abuse limit hit (first time)")
        }
        ClusterEvent::CapacityReached => warn!("max-clients reached: new uuids are refused"),
        other => tracing::trace!(?other),
    }
}
