//! Cluster mode applies the single node's abuse limits and bounds, with the same flags and
//! the same metrics (issue #15): against a real Redis Cluster and a real ddpushd.
//!
//! Needs the cluster of `.ci/redis-cluster.sh` (hence `#[ignore]`; `.ci/run` runs them):
//!
//!     bash .ci/redis-cluster.sh run cargo test -p ddpushd --test cluster_limits -- --ignored

#[path = "server.rs"]
mod server;
#[path = "cluster_util.rs"]
mod util;

use std::io::{Read, Write};
use std::time::Duration;

use util::*;

/// A node with the limits on (the other cluster tests turn them off) and `extra` flags.
fn limited_node(id: &str, extra: &[&str]) -> Node {
    let mut args = base_args(id);
    if let Some(i) = args.iter().position(|a| a == "--limits") {
        args.drain(i..i + 2);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Node::start_args(id, args).unwrap_or_else(|e| panic!("node {id} did not start: {e}"))
}

/// One sample of the node's /metrics.
fn metric(n: &Node, name: &str) -> f64 {
    let (code, body) = http_get(n.admin, "/metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn a_heartbeat_storm_for_one_uuid_gets_the_single_nodes_answer_budget() {
    let n = limited_node(&format!("{}-storm", run_id()), &[]);
    let uuid = random_uuid();
    let mut p = n.pusher();
    assert_eq!(push_one(&mut p, &push_req(&uuid, 0x10, &[])), Some(0x00));
    let dev = device_socket();
    // Bound first: heartbeats that arrive while a bind is in flight share its one answer.
    assert!(!bind_at(&dev, &uuid, n.udp).is_empty(), "bound");
    for _ in 0..500 {
        dev.send_to(&dev_pkt(&uuid, 1, 0x00, &[]), n.udp)
            .expect("hb");
    }
    let mut got = 0;
    while recv_within(&dev, Duration::from_millis(500)).is_some() {
        got += 1;
    }
    // Burst 20 answers per uuid (plus 5/s), as on a single node: far below 500.
    assert!(
        (10..=25).contains(&got),
        "answers to a 500-heartbeat storm: {got}"
    );
    assert!(metric(&n, r#"ddpush_limited_total{limit="uuid_rate"}"#) >= 475.0);
}

#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn max_clients_and_connection_bounds_apply_in_cluster_mode() {
    let n = limited_node(
        &format!("{}-bounds", run_id()),
        &["--max-clients", "1", "--max-connections-per-ip", "2"],
    );
    // The first device is served; the second is refused at --max-clients (no bind, no answer).
    let (a, b) = (random_uuid(), random_uuid());
    let dev = device_socket();
    assert!(
        !bind_at(&dev, &a, n.udp).is_empty(),
        "the first device binds"
    );
    dev.send_to(&dev_pkt(&b, 1, 0x00, &[]), n.udp).expect("hb");
    assert_eq!(recv_within(&dev, Duration::from_millis(500)), None);
    assert!(metric(&n, "ddpush_capacity_refused_total") >= 1.0);
    assert_eq!(n.status()["owned"], 1);
    // Two push connections from loopback work, a third is closed unanswered.
    let mut conns = [n.pusher(), n.pusher()];
    for c in conns.iter_mut() {
        assert_eq!(push_one(c, &push_req(&a, 0x10, &[])), Some(0x00));
    }
    let mut extra = n.pusher();
    extra.write_all(&push_req(&a, 0x10, &[])).ok();
    let mut byte = [0u8; 1];
    assert!(matches!(extra.read(&mut byte), Ok(0) | Err(_)), "refused");
    assert_eq!(metric(&n, "ddpush_tcp_refused_total"), 1.0);
}
