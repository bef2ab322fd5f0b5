//! The event loop: one task owns the [`Node`] and the [`Store`]; socket tasks only move bytes.
//!
//! Each turn: wake on the UDP socket, a message from a connection task, a timer or a signal;
//! drain the UDP socket until it would block and the message queue; then journal the turn's
//! changes (fsync under `--fsync always`) *before* sending its transmits, so a `0x00` reply
//! always follows the write that makes its push survive a crash.
//!
//! The loop shares its thread with the admin connection tasks, the accept tasks and the
//! snapshot's completion; they run only while the loop waits. A loop that has not waited for
//! [`FAIR_SLICE`] yields once after its turn, so they are served between turns however busy
//! or slow the turns are.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_io::Timer;
use ddpush_proto::{Driver, Node, Uuid};
use futures_lite::{future, StreamExt};
use tracing::{debug, error, info};

use super::clock::Clock;
use super::sockets::{AcceptTasks, Listeners, ReadSize, Sockets};
use super::{Executor, Msg};
use crate::admin;
use crate::metrics::Metrics;
use crate::persist::{self, Fsync, Store};
use crate::settings::ServerConfig;

mod turn;

/// Messages queued from socket tasks before they wait for the loop.
const MSG_QUEUE: usize = 8192;
/// Messages from connection tasks handled per turn.
const MSG_BATCH: usize = 4096;
/// How soon a failed snapshot is tried again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(5);
/// How long the loop keeps polling after a turn with connection traffic before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// The longest the loop runs turns without letting the executor's other tasks run (admin
/// connections, accepts, the snapshot's completion). They run only while the loop waits, and
/// under load it may never wait: see `Loop::run`.
const FAIR_SLICE: Duration = Duration::from_millis(5);

enum Wake {
    Udp,
    Conns,
    Msg(Msg),
    Timer,
    Signal,
    Stop(super::Stop),
}

/// The event loop's state: the node, its store, the sockets' loop-side halves.
pub(super) struct Loop {
    ex: Executor,
    node: Node,
    store: Store,
    clock: Clock,
    cfg: ServerConfig,
    /// The device and push sockets (shared with cluster mode).
    sockets: Sockets,
    tx: Sender<Msg>,
    metrics: Arc<Metrics>,
    /// The core's turn: commit, then outputs; it decides every acceptance.
    driver: Driver,
    /// Records whose item an ack cleared this turn (for the push-to-ack histogram).
    acked: Vec<Uuid>,
    next_snapshot: Instant,
    next_sync: Instant,
    snapshot_in_flight: bool,
    /// A snapshot failed and has not succeeded since (its failure was logged).
    snapshot_failing: bool,
    /// Admin answers held until the turn's commit, like push replies.
    admin_out: Vec<(Sender<admin::Response>, admin::Answer)>,
}

impl Loop {
    /// A loop over a loaded node on `listeners` (their admin listener taken out), the
    /// receiving half of its message channel (for `run`), and the accept tasks.
    pub(super) fn new(
        ex: Executor,
        node: Node,
        store: Store,
        clock: Clock,
        cfg: ServerConfig,
        listeners: Listeners,
    ) -> io::Result<(Self, Receiver<Msg>, AcceptTasks)> {
        let (tx, rx) = async_channel::bounded::<Msg>(MSG_QUEUE);
        let metrics = Arc::new(Metrics::default());
        let (sockets, tasks) = Sockets::start(
            &ex,
            listeners,
            &cfg,
            ReadSize::Large,
            tx.clone(),
            metrics.sockets.clone(),
        )?;
        let now = Instant::now();
        let mut lp = Loop {
            ex,
            node,
            store,
            clock,
            next_snapshot: now + cfg.snapshot_interval,
            next_sync: now + Duration::from_secs(1),
            cfg,
            sockets,
            tx,
            metrics,
            driver: Driver::new(),
            acked: Vec::new(),
            snapshot_in_flight: false,
            snapshot_failing: false,
            admin_out: Vec::new(),
        };
        if !lp.store.journal_open() {
            // Started on a full disk (logged by the load): degraded from the first turn, so
            // `/status`, the gauge and the first refused push agree; the first append that
            // finds space ends it.
            lp.driver.write_failed();
            lp.metrics.journal_state(true);
        }
        Ok((lp, rx, tasks))
    }

    /// A sender for the tasks that feed the loop.
    pub(super) fn sender(&self) -> Sender<Msg> {
        self.tx.clone()
    }

    /// Runs turns until SIGTERM or SIGINT, or until `stop` says so. Returns how it stopped.
    pub(super) async fn run(
        &mut self,
        rx: Receiver<Msg>,
        mut signals: async_signal::Signals,
        stop: Option<Receiver<super::Stop>>,
    ) -> super::Stop {
        let mut spin_until = Instant::now();
        // When the other tasks of the executor last had their chance to run (or, after a
        // wait, the end of the turn it woke for: the next slice starts there).
        let mut others_ran = Instant::now();
        loop {
            // Whether this turn's race had to wait (the executor ran its other tasks then).
            let mut waited = false;
            let deadline = self.deadline();
            let race = future::or(
                future::or(
                    async {
                        self.sockets.udp_readable().await;
                        Wake::Udp
                    },
                    async {
                        future::poll_fn(|cx| self.sockets.poll_conns(cx)).await;
                        Wake::Conns
                    },
                ),
                future::or(
                    future::or(
                        async {
                            match rx.recv().await {
                                Ok(m) => Wake::Msg(m),
                                // Cannot happen while `self.tx` is alive; never a reason to stop.
                                Err(_) => future::pending().await,
                            }
                        },
                        async {
                            Timer::at(deadline).await;
                            Wake::Timer
                        },
                    ),
                    future::or(
                        async {
                            signals.next().await;
                            Wake::Signal
                        },
                        async {
                            match &stop {
                                Some(s) => match s.recv().await {
                                    Ok(how) => Wake::Stop(how),
                                    Err(_) => future::pending().await,
                                },
                                None => future::pending().await,
                            }
                        },
                    ),
                ),
            );
            // For a moment after a busy turn, poll every source without sleeping and yield to
            // the reactor and the other tasks in between: the next request of a one-at-a-time pusher
            // usually arrives within microseconds, and waking an idle core costs more than the
            // spin. Every source stays in the race, so nothing is starved while spinning.
            let wake = if Instant::now() < spin_until {
                match future::poll_once(race).await {
                    Some(w) => w,
                    None => {
                        future::yield_now().await;
                        others_ran = Instant::now();
                        continue;
                    }
                }
            } else {
                let mut race = std::pin::pin!(race);
                future::poll_fn(|cx| {
                    let p = std::future::Future::poll(race.as_mut(), cx);
                    waited |= p.is_pending();
                    p
                })
                .await
            };
            let mut tcp_turn = matches!(wake, Wake::Msg(_) | Wake::Conns);
            match wake {
                Wake::Signal => return super::Stop::Graceful,
                Wake::Stop(how) => return how,
                // A connection or message wake skips the UDP drain: the race above polls the
                // socket first on every turn, so pending datagrams win the next one, and a push
                // round trip saves a syscall that would only say "would block".
                Wake::Msg(m) => self.on_msg(m),
                Wake::Conns => {}
                Wake::Udp | Wake::Timer => self.drain_udp(),
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
            if self.sockets.service(&mut self.node, now, |_| true) > 0 {
                tcp_turn = true;
            }
            self.node.handle_timeout(now);
            self.maintenance();
            self.flush();
            let end = Instant::now();
            // Only connection traffic (pushers waiting for their reply byte) earns the spin;
            // heartbeats are fire-and-forget, so a UDP-only load sleeps between turns as before.
            if tcp_turn {
                spin_until = end + SPIN;
            }
            // The executor runs its other tasks only while this future is pending. Under load
            // it may not be: while a turn runs, async-io's helper thread polls the sockets,
            // so the next turn finds a connection ready at once, and slow turns (an fsync per
            // turn on a struggling disk) follow each other without a wait. Admin requests,
            // accepts and the snapshot's completion would starve, so after FAIR_SLICE without
            // a wait the loop yields once. A loop that waits between turns (the usual case,
            // heartbeats included) never yields here and pays one clock read per turn; a busy
            // one yields once per slice, and slow turns in a row once after each.
            if waited {
                others_ran = end;
            } else if end.duration_since(others_ran) >= FAIR_SLICE {
                future::yield_now().await;
                others_ran = Instant::now();
            }
        }
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + 'static) {
        self.ex.spawn(f).detach();
    }

    fn deadline(&self) -> Instant {
        let mut d = self.next_snapshot.min(self.next_sync);
        if let Some(t) = self.node.poll_timeout() {
            d = d.min(self.clock.instant(t));
        }
        d
    }

    fn drain_udp(&mut self) {
        self.sockets
            .drain_udp(&mut self.node, &self.clock, |_| true);
    }

    fn on_msg(&mut self, m: Msg) {
        let now = self.clock.now();
        match m {
            Msg::Open {
                conn,
                port,
                peer,
                stream,
            } => self
                .sockets
                .open(&mut self.node, now, conn, port, peer, stream),
            Msg::SnapshotDone { gen, size, result } => {
                self.snapshot_in_flight = false;
                match result {
                    Ok(took) => {
                        self.store.snapshot_done(gen);
                        self.metrics.snapshot_done(took, size);
                        if std::mem::take(&mut self.snapshot_failing) {
                            info!(gen, size, "snapshot written again after failures");
                        }
                        debug!(
                            gen,
                            size,
                            took_ms = took.as_millis() as u64,
                            "snapshot written"
                        );
                    }
                    Err(e) => self.snapshot_failed(&e, Some(size)),
                }
            }
            Msg::Admin(req) => {
                let ans = admin::handle(&req, &mut self.node, &mut self.driver, now, &self.metrics);
                self.admin_out.push((req.reply, ans));
            }
        }
    }

    /// A failed snapshot leaves the previous one and every journal since in place; it is
    /// retried soon (not only at the next interval), and logged once until one succeeds.
    /// `size` is the snapshot's (a new one needs that much free beside the old one and its
    /// journals, which are deleted only once it is written).
    fn snapshot_failed(&mut self, e: &crate::persist::PersistError, size: Option<usize>) {
        self.metrics
            .storage_failed_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !std::mem::replace(&mut self.snapshot_failing, true) {
            error!(error = %e, snapshot_bytes = size, "snapshot failed; the previous snapshot and its journals are kept, retrying every {}s (a snapshot needs snapshot_bytes free beside them)", SNAPSHOT_RETRY.as_secs());
        }
        self.next_snapshot = self.next_snapshot.min(Instant::now() + SNAPSHOT_RETRY);
    }

    fn maintenance(&mut self) {
        let now = Instant::now();
        if now >= self.next_sync {
            self.next_sync = now + Duration::from_secs(1);
            self.sockets.expire_lingering();
            self.metrics
                .sample_history(self.clock.now(), self.node.stats());
            if self.cfg.fsync == Fsync::Interval {
                let t = Instant::now();
                if let Err(e) = self.store.sync() {
                    self.metrics
                        .storage_failed_writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if self.driver.write_failed() {
                        error!(error = %e, "storage degraded: journal fsync failed; pushes are refused (0xFF / HTTP 503) until a write succeeds");
                    }
                    self.metrics.journal_state(true);
                    // What the failed write-back held may be gone from the disk's view even
                    // though it was answered: a snapshot of memory, retried until the storage
                    // works again, writes all of it again.
                    self.next_snapshot = self.next_snapshot.min(now + SNAPSHOT_RETRY);
                }
                self.metrics.fsync_done(t.elapsed());
            }
            // Degraded and maybe idle (an unready node gets no pushes from a balancer): try
            // the journal, so readiness comes back when space does.
            if !self.driver.storage_ok() && self.store.probe_write().is_ok() {
                if self.driver.write_succeeded() {
                    info!("storage recovered: a probe write to the journal succeeds; pushes are accepted");
                }
                self.metrics.journal_state(false);
            }
        }
        if now >= self.next_snapshot && !self.snapshot_in_flight {
            self.next_snapshot = now + self.cfg.snapshot_interval;
            self.flush();
            match self.store.rotate() {
                Ok(gen) => {
                    let t = Instant::now();
                    let bytes = persist::encode_snapshot_signed(
                        gen,
                        self.clock.now().0,
                        &self.node.key_states(),
                        &self.node.removal_floors(),
                        self.node.records(),
                    );
                    let dir = self.store.dir().to_path_buf();
                    let disk = self.store.disk();
                    let tx = self.tx.clone();
                    self.snapshot_in_flight = true;
                    self.spawn(async move {
                        let size = bytes.len();
                        let result = smol::unblock(move || {
                            persist::write_snapshot_on(disk.as_ref(), &dir, &bytes)
                        })
                        .await
                        .map(|()| t.elapsed());
                        let _ = tx.send(Msg::SnapshotDone { gen, size, result }).await;
                    });
                }
                Err(e) => self.snapshot_failed(&e, None),
            }
        }
    }
}
