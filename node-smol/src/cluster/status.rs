//! What a cluster node shows: `/status` (JSON) and `/metrics` (Prometheus text), the node's
//! view (peers up, store latency histogram, store errors, binds, pokes, dirty drains, owned
//! clients). The admin routes are in [`super::admin`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddpush_proto::cluster::{ClusterNode, NodeId};
use ddpush_proto::Limited;
use serde_json::json;

use crate::metrics::SocketStats;

/// Upper bounds (ms) of the store latency histogram's buckets.
const BOUNDS_MS: [f64; 12] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
];

/// What the adapter counts beside the core's [`ddpush_proto::cluster::ClusterStats`].
#[derive(Default)]
pub struct AdapterStats {
    /// Store operations completed, by latency bucket (last: above every bound).
    pub latency: [u64; BOUNDS_MS.len() + 1],
    /// Sum of their latencies, seconds.
    pub latency_sum: f64,
    /// Pushes whose WAIT was not satisfied in time (answered per `--cluster-wait-fail`).
    pub wait_short: u64,
    /// Pokes dropped because the link's queue was full.
    pub pokes_dropped: u64,
    /// Connections on the peer port refused (garbage, wrong secret, other version).
    pub peer_refused: u64,
    /// Peers with a link up (either direction).
    pub peers_up: BTreeSet<NodeId>,
    /// The store answered the last connection attempt.
    pub store_connected: bool,
    /// Times the loop held push input back because the in-flight bound was reached.
    pub backpressure: u64,
    /// The in-flight bound now (it follows the store's latency, up to
    /// `--cluster-max-inflight`).
    pub inflight_limit: usize,
    /// Operations still queued when their time-out passed, so never sent.
    pub expired_unsent: u64,
    /// Records drains read from Redis (at most their limit each: all of them reach the
    /// core, so this follows `dirty_drained`).
    pub drain_records_read: u64,
    /// The socket layer's counters (the same as a single node's).
    pub sockets: Arc<SocketStats>,
    /// Every peer a link (either direction) came up or went down with since start: the web
    /// console's cluster view.
    pub peers: BTreeMap<NodeId, PeerLink>,
    /// The web console's chart history (the single node's rings, fed the cluster counters).
    pub(crate) history: crate::console::history::History,
}

/// What this node saw of its links with one peer.
#[derive(Clone, Copy, Debug)]
pub struct PeerLink {
    /// A link is up now.
    pub up: bool,
    /// When it last changed between up and down.
    pub since: Instant,
    /// Times a link came up.
    pub ups: u64,
    /// Times a link went down (or could not be dialed).
    pub losses: u64,
}

impl AdapterStats {
    /// A link with `peer` came up (`up`) or went down; `peers_up` follows, as before.
    pub fn peer_link(&mut self, peer: NodeId, up: bool, now: Instant) {
        if up {
            self.peers_up.insert(peer.clone());
        } else {
            self.peers_up.remove(&peer);
        }
        let l = self.peers.entry(peer).or_insert(PeerLink {
            up: !up,
            since: now,
            ups: 0,
            losses: 0,
        });
        if l.up != up {
            l.since = now;
        }
        l.up = up;
        if up {
            l.ups += 1;
        } else {
            l.losses += 1;
        }
    }
}

impl AdapterStats {
    /// Records one store operation's latency.
    pub fn observe(&mut self, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let i = BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BOUNDS_MS.len());
        self.latency[i] += 1;
        self.latency_sum += took.as_secs_f64();
    }

    /// The latency below which fraction `q` of operations completed (bucket upper bound, ms).
    pub(super) fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

/// `GET /status`.
pub(super) fn status(node: &ClusterNode, a: &AdapterStats) -> serde_json::Value {
    let s = node.stats();
    let [denied, stalled, udp_errors] = a.sockets.get();
    json!({
        "mode": "cluster",
        "node_id": node.id().0,
        "peers_up": a.peers_up.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
        "owned": s.owned,
        "online": s.online,
        "heartbeats": s.heartbeats,
        "binds": s.binds,
        "pokes": { "sent": s.pokes[0], "received": s.pokes[1], "dropped": a.pokes_dropped },
        "dirty_drained": s.drained,
        "copies_dropped": s.dropped,
        "pushes": {
            "accepted": s.pushes[0],
            "rejected": s.pushes[1],
            "failed": s.pushes[2],
            "failed_wait": s.unreplicated_refused,
            "failed_store": s.pushes[2].saturating_sub(s.unreplicated_refused),
        },
        "acks": { "received": s.acks[0], "cleared": s.acks[1] },
        "store": {
            "connected": a.store_connected,
            "ops": { "push": s.store_ops[0], "ack": s.store_ops[1], "bind": s.store_ops[2], "drain": s.store_ops[3] },
            "errors": s.store_errors,
            "timeouts": s.store_timeouts,
            "late": s.store_late,
            "inflight": node.inflight(),
            "inflight_limit": a.inflight_limit,
            "expired_unsent": a.expired_unsent,
            "drain_records_read": a.drain_records_read,
            "wait_short": a.wait_short,
            "latency_ms": { "p50": a.quantile_ms(0.5), "p99": a.quantile_ms(0.99) },
        },
        "peer_refused": a.peer_refused,
        "backpressure": a.backpressure,
        "limited": {
            "source_rate": s.limited.get(Limited::SourceRate),
            "uuid_rate": s.limited.get(Limited::UuidRate),
            "amplification": s.limited.get(Limited::Amplification),
            "capacity_refused": s.capacity_refused,
            "tcp_refused": s.conns_refused,
        },
        "sockets": {
            "push_denied": denied,
            "tcp_closed_stalled": stalled,
            "udp_send_errors": udp_errors,
        },
    })
}

/// `GET /metrics`.
pub(super) fn metrics(node: &ClusterNode, a: &AdapterStats) -> String {
    let s = node.stats();
    let mut o = String::new();
    let mut one = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP ddpush_cluster_{name} {help}");
        let _ = writeln!(o, "# TYPE ddpush_cluster_{name} {kind}");
        let suffix = if kind == "counter" { "_total" } else { "" };
        let _ = writeln!(o, "ddpush_cluster_{name}{suffix} {v}");
    };
    one(
        "peers_up",
        "gauge",
        "Peers with a link up.",
        a.peers_up.len() as u64,
    );
    one(
        "owned_clients",
        "gauge",
        "Clients this node serves from its copy.",
        s.owned,
    );
    one(
        "online_clients",
        "gauge",
        "Clients online at this node.",
        s.online,
    );
    one("binds", "counter", "Binds completed.", s.binds);
    one("pokes_sent", "counter", "Pokes sent to owners.", s.pokes[0]);
    one("pokes_received", "counter", "Pokes received.", s.pokes[1]);
    one(
        "pokes_dropped",
        "counter",
        "Pokes dropped on a full link queue.",
        a.pokes_dropped,
    );
    one(
        "dirty_drained",
        "counter",
        "Dirty marks drained.",
        s.drained,
    );
    one(
        "store_errors",
        "counter",
        "Store operations that failed.",
        s.store_errors,
    );
    one(
        "store_timeouts",
        "counter",
        "Store operations that timed out.",
        s.store_timeouts,
    );
    one(
        "drain_records_read",
        "counter",
        "Records read from Redis by drains.",
        a.drain_records_read,
    );
    one(
        "wait_short",
        "counter",
        "Pushes whose WAIT was not satisfied.",
        a.wait_short,
    );
    one(
        "peer_refused",
        "counter",
        "Peer connections refused.",
        a.peer_refused,
    );
    one(
        "pushes_accepted",
        "counter",
        "Pushes answered 0x00.",
        s.pushes[0],
    );
    one(
        "pushes_failed",
        "counter",
        "Pushes answered 0xFF.",
        s.pushes[2],
    );
    let [denied, stalled, udp_errors] = a.sockets.get();
    one(
        "push_denied",
        "counter",
        "Push connections outside --push-allow.",
        denied,
    );
    one(
        "tcp_closed_stalled",
        "counter",
        "Connections closed for not reading.",
        stalled,
    );
    one(
        "udp_send_errors",
        "counter",
        "UDP sends that failed.",
        udp_errors,
    );
    one(
        "store_inflight",
        "gauge",
        "Store operations in flight.",
        node.inflight() as u64,
    );
    one(
        "store_inflight_limit",
        "gauge",
        "The in-flight bound now (follows the store latency).",
        a.inflight_limit as u64,
    );
    one(
        "store_expired_unsent",
        "counter",
        "Store operations whose time-out passed before they were sent.",
        a.expired_unsent,
    );
    let _ = writeln!(
        o,
        "# HELP ddpush_cluster_pushes_failed_by Pushes answered 0xFF, by why: the WAIT missed its replicas, or the store timed out or failed."
    );
    let _ = writeln!(o, "# TYPE ddpush_cluster_pushes_failed_by counter");
    for (reason, n) in [
        ("wait_replicas", s.unreplicated_refused),
        ("store", s.pushes[2].saturating_sub(s.unreplicated_refused)),
    ] {
        let _ = writeln!(
            o,
            "ddpush_cluster_pushes_failed_by_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(
        o,
        "# HELP ddpush_cluster_store_ops Store operations issued."
    );
    let _ = writeln!(o, "# TYPE ddpush_cluster_store_ops counter");
    for (i, op) in ["push", "ack", "bind", "drain"].iter().enumerate() {
        let _ = writeln!(
            o,
            "ddpush_cluster_store_ops_total{{op=\"{op}\"}} {}",
            s.store_ops[i]
        );
    }
    let _ = writeln!(
        o,
        "# HELP ddpush_cluster_store_latency_seconds Store operation latency (script and WAIT)."
    );
    let _ = writeln!(o, "# TYPE ddpush_cluster_store_latency_seconds histogram");
    let mut cum = 0;
    for (i, b) in BOUNDS_MS.iter().enumerate() {
        cum += a.latency[i];
        let _ = writeln!(
            o,
            "ddpush_cluster_store_latency_seconds_bucket{{le=\"{}\"}} {cum}",
            b / 1000.0
        );
    }
    cum += a.latency[BOUNDS_MS.len()];
    let _ = writeln!(
        o,
        "ddpush_cluster_store_latency_seconds_bucket{{le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        o,
        "ddpush_cluster_store_latency_seconds_sum {}",
        a.latency_sum
    );
    let _ = writeln!(o, "ddpush_cluster_store_latency_seconds_count {cum}");
    // The abuse limits and bounds: the single node's names, since they are its limits.
    let _ = writeln!(
        o,
        "# HELP ddpush_limited Inputs or answers held back by abuse limits"
    );
    let _ = writeln!(o, "# TYPE ddpush_limited counter");
    for (l, v) in s.limited.iter() {
        let _ = writeln!(o, "ddpush_limited_total{{limit=\"{}\"}} {v}", l.label());
    }
    for (name, help, v) in [
        (
            "capacity_refused",
            "New devices refused at max-clients",
            s.capacity_refused,
        ),
        (
            "tcp_refused",
            "TCP connections refused at the limits",
            s.conns_refused,
        ),
    ] {
        let _ = writeln!(o, "# HELP ddpush_{name} {help}");
        let _ = writeln!(o, "# TYPE ddpush_{name} counter");
        let _ = writeln!(o, "ddpush_{name}_total {v}");
    }
    o
}
