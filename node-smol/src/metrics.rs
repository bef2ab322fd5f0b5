//! Adapter-side metrics and the Prometheus rendering of everything, core counters included.
//!
//! The core counts protocol facts in [`Stats`]; the adapter adds what only it sees (fsync
//! latency, snapshot size, refused push connections). `/metrics` renders both through
//! prometheus-client so the exposition format is not hand-written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ddpush_proto::{Stats, Time};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::console::history::{History, Latency, Rates};

/// Counters of the socket layer, the same in single-node and cluster mode.
#[derive(Debug, Default)]
pub struct SocketStats {
    /// Push connections closed for coming from outside `--push-allow`.
    pub push_denied: AtomicU64,
    /// Connections closed because they stopped reading their replies.
    pub stalled_closed: AtomicU64,
    /// UDP sends that failed.
    pub udp_send_errors: AtomicU64,
}

impl SocketStats {
    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (push_denied, stalled_closed, udp_send_errors) now.
    pub fn get(&self) -> [u64; 3] {
        [
            &self.push_denied,
            &self.stalled_closed,
            &self.udp_send_errors,
        ]
        .map(|a| a.load(Ordering::Relaxed))
    }
}

/// Counters kept by the adapter.
#[derive(Debug)]
pub struct Metrics {
    /// Journal frames written (one per turn with changes).
    pub journal_writes: AtomicU64,
    /// The socket layer's counters.
    pub sockets: Arc<SocketStats>,
    /// Last snapshot duration in ms and size in bytes.
    pub snapshot_ms: AtomicU64,
    /// Last snapshot size.
    pub snapshot_bytes: AtomicU64,
    /// Snapshots written.
    pub snapshots: AtomicU64,
    /// Writes to the data directory that failed (journal, fsync, rotation, snapshot).
    pub storage_failed_writes: AtomicU64,
    fsync_seconds: Histogram,
    push_to_ack_seconds: Histogram,
    /// The last journal write failed (pushes are answered 0xFF until one succeeds).
    journal_failing: AtomicBool,
    started: Instant,
    last_snapshot: Mutex<Option<Instant>>,
    /// Rates and latencies for the web console's charts (bounded; see its module).
    history: Mutex<History>,
}

/// The storage facts the console shows.
pub(crate) struct StorageView {
    pub journal_failing: bool,
    pub journal_writes: u64,
    pub snapshots: u64,
    pub snapshot_bytes: u64,
    pub snapshot_ms: u64,
    pub snapshot_age: Option<Duration>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            journal_writes: AtomicU64::new(0),
            sockets: Arc::default(),
            snapshot_ms: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            storage_failed_writes: AtomicU64::new(0),
            fsync_seconds: Histogram::new([
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            push_to_ack_seconds: Histogram::new([
                0.01, 0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
            ]),
            journal_failing: AtomicBool::new(false),
            started: Instant::now(),
            last_snapshot: Mutex::new(None),
            history: Mutex::new(History::default()),
        }
    }
}

impl Metrics {
    /// Records an fsync's latency.
    pub fn fsync_done(&self, d: Duration) {
        self.fsync_seconds.observe(d.as_secs_f64());
    }

    /// Records a finished snapshot.
    pub fn snapshot_done(&self, d: Duration, size: usize) {
        self.snapshot_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
        self.snapshot_bytes.store(size as u64, Ordering::Relaxed);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_snapshot) = Some(Instant::now());
    }

    /// Whether writes to the data directory currently succeed (not degraded).
    pub fn storage_ok(&self) -> bool {
        !self.journal_failing.load(Ordering::Relaxed)
    }

    /// Records the time from a push to the ack that cleared it.
    pub fn push_acked(&self, d: Duration) {
        self.push_to_ack_seconds.observe(d.as_secs_f64());
        lock(&self.history).acked(Instant::now(), d);
    }

    /// Records whether the last journal write failed.
    pub fn journal_state(&self, failing: bool) {
        self.journal_failing.store(failing, Ordering::Relaxed);
    }

    /// Offers the core's counters to the console's history; the loop calls this about once a
    /// second and the history keeps a sample every two.
    pub fn sample_history(&self, now: Time, s: &Stats) {
        let uptime = self.uptime();
        lock(&self.history).offer(now, uptime, crate::console::history::counters(s));
    }

    /// Time since the server started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The console's chart points after `since`, and the latency percentiles at `now`.
    pub(crate) fn console_history(&self, since: u64, now: Instant) -> (Rates, Latency) {
        let mut h = lock(&self.history);
        (h.rates(since), h.latency(now))
    }

    /// The storage facts the console shows.
    pub(crate) fn storage(&self) -> StorageView {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StorageView {
            journal_failing: self.journal_failing.load(Ordering::Relaxed),
            journal_writes: ld(&self.journal_writes),
            snapshots: ld(&self.snapshots),
            snapshot_bytes: ld(&self.snapshot_bytes),
            snapshot_ms: ld(&self.snapshot_ms),
            snapshot_age: lock(&self.last_snapshot).map(|t| t.elapsed()),
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self, s: &Stats) -> String {
        let mut r = Registry::with_prefix("ddpush");
        let c = |v: u64| ConstCounter::new(v);
        let g = |v: u64| ConstGauge::new(v as i64);
        r.register("clients", "Client records held", g(s.clients));
        r.register(
            "clients_online",
            "Clients within the online window",
            g(s.online),
        );
        let pending = Family::<Vec<(String, String)>, Gauge>::default();
        for (kind, v) in s.pending.iter() {
            pending
                .get_or_create(&vec![("type".into(), format!("0x{:02x}", kind.cmd()))])
                .set(v as i64);
        }
        r.register(
            "pending_items",
            "Undelivered items by message type",
            pending,
        );
        r.register("heartbeats", "Heartbeats processed", c(s.heartbeats));
        r.register(
            "pushes_accepted",
            "Pushes answered 0x00",
            c(s.pushes_accepted),
        );
        let rejected = Family::<Vec<(String, String)>, Counter>::default();
        for (reason, v) in s.pushes_rejected.iter() {
            rejected
                .get_or_create(&vec![("reason".into(), reason.label().into())])
                .inc_by(v);
        }
        r.register("pushes_rejected", "Pushes answered 0x01", rejected);
        r.register(
            "deliveries",
            "Packets sent at once on a push",
            c(s.deliveries),
        );
        r.register(
            "resends",
            "Pending items sent in answer to heartbeats",
            c(s.resends),
        );
        r.register(
            "heartbeat_replies",
            "Heartbeat replies sent",
            c(s.heartbeat_replies),
        );
        r.register("acks", "Acks from known clients", c(s.acks));
        r.register(
            "acks_cleared",
            "Acks that cleared an item",
            c(s.acks_cleared),
        );
        r.register(
            "acks_crossed",
            "UDP acks that could be a duplicate of an older send's (they clear nothing)",
            c(s.acks_crossed),
        );
        r.register("acks_unknown", "Acks from unknown uuids", c(s.acks_unknown));
        let invalid = Family::<Vec<(String, String)>, Counter>::default();
        for ((t, k), v) in s.invalid.iter() {
            invalid
                .get_or_create(&vec![
                    ("transport".into(), t.label().into()),
                    ("kind".into(), k.label().into()),
                ])
                .inc_by(v);
        }
        r.register("invalid_packets", "Dropped malformed packets", invalid);
        let limited = Family::<Vec<(String, String)>, Counter>::default();
        for (l, v) in s.limited.iter() {
            limited
                .get_or_create(&vec![("limit".into(), l.label().into())])
                .inc_by(v);
        }
        r.register(
            "limited",
            "Inputs or answers held back by abuse limits",
            limited,
        );
        // Signed devices (PROTOCOL.md 9).
        r.register(
            "signed_clients",
            "Signed-only uuids (with a key)",
            g(s.keys),
        );
        r.register(
            "signed_accepted",
            "Signed packets that passed every check",
            c(s.signed_accepted),
        );
        r.register(
            "signed_ahead_raised",
            "Raises of a signed uuid's ahead bound (its clock found further ahead), each journaled",
            c(s.ahead_raised),
        );
        let signed = Family::<Vec<(String, String)>, Counter>::default();
        for (reason, v) in s.signed_dropped.iter() {
            signed
                .get_or_create(&vec![("reason".into(), reason.label().into())])
                .inc_by(v);
        }
        r.register(
            "signed_dropped",
            "Signed packets dropped, by reason",
            signed,
        );
        let unsigned = Family::<Vec<(String, String)>, Counter>::default();
        for (kind, v) in s.unsigned_refused.iter() {
            unsigned
                .get_or_create(&vec![("kind".into(), kind.label().into())])
                .inc_by(v);
        }
        r.register(
            "unsigned_refused",
            "v1 packets naming a signed-only uuid (they change nothing)",
            unsigned,
        );
        r.register("expired", "Records removed by expiry", c(s.expired));
        r.register("created", "Records created", c(s.created));
        r.register(
            "capacity_refused",
            "New uuids refused at max-clients",
            c(s.capacity_refused),
        );
        r.register(
            "unknown_heartbeats",
            "Heartbeats from unknown uuids dropped",
            c(s.unknown_heartbeats),
        );
        let conns = Family::<Vec<(String, String)>, Gauge>::default();
        for (port, v) in s.conns.iter() {
            conns
                .get_or_create(&vec![("port".into(), port.label().into())])
                .set(v as i64);
        }
        r.register("tcp_connections", "Open TCP connections", conns);
        r.register(
            "tcp_refused",
            "TCP connections refused at the limits",
            c(s.conns_refused),
        );
        r.register(
            "tcp_closed_framing",
            "TCP connections closed for framing errors",
            c(s.conns_framing),
        );
        r.register(
            "tcp_closed_idle",
            "TCP connections closed for idleness",
            c(s.conns_idle),
        );
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let [denied, stalled, udp_errors] = self.sockets.get();
        r.register(
            "push_denied",
            "Push connections outside --push-allow",
            c(denied),
        );
        r.register(
            "tcp_closed_stalled",
            "Connections closed for not reading",
            c(stalled),
        );
        r.register("udp_send_errors", "UDP sends that failed", c(udp_errors));
        r.register(
            "journal_writes",
            "Journal frames written",
            c(ld(&self.journal_writes)),
        );
        r.register("snapshots", "Snapshots written", c(ld(&self.snapshots)));
        r.register(
            "storage_ok",
            "1 while writes to the data directory succeed, 0 while degraded (pushes refused)",
            g(u64::from(self.storage_ok())),
        );
        r.register(
            "storage_failed_writes",
            "Writes to the data directory that failed (journal, fsync, rotation, snapshot)",
            c(ld(&self.storage_failed_writes)),
        );
        r.register(
            "pushes_failed",
            "Pushes answered 0xFF or HTTP 503 because their write failed",
            c(s.pushes_failed),
        );
        r.register(
            "snapshot_duration_ms",
            "Last snapshot duration",
            g(ld(&self.snapshot_ms)),
        );
        r.register(
            "snapshot_bytes",
            "Last snapshot size",
            g(ld(&self.snapshot_bytes)),
        );
        r.register(
            "journal_fsync_seconds",
            "Journal fsync latency",
            self.fsync_seconds.clone(),
        );
        r.register(
            "push_to_ack_seconds",
            "Time from a push to the ack that cleared it (1 s resolution)",
            self.push_to_ack_seconds.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }
}

/// Locks a mutex that only plain data sits behind: a panic elsewhere cannot leave it
/// half-updated in a way that matters, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
