//! The cluster scenarios at CI size, with fixed seeds (docs/CLUSTER.md). A failure prints the
//! seed and the command that replays it.

use ddpush_sim::cluster::{run, Kind, Params, Report};

fn check(kind: Kind, seed: u64) -> Report {
    let p = Params::new(kind, seed, 1);
    let t = std::time::Instant::now();
    match run(&p) {
        Ok(r) => {
            println!("{r} [{:.1}s wall]", t.elapsed().as_secs_f64());
            r
        }
        Err(e) => panic!(
            "scenario {} failed with seed {seed}:\n{e}\nreplay: {}",
            kind.name(),
            p.replay(1)
        ),
    }
}

/// What every scenario must show: no store op per steady heartbeat, every accepted push
/// delivered.
fn common(r: &Report) {
    assert!(r.steady_heartbeats > 40, "steady window too short: {r}");
    assert_eq!(r.ops_per_heartbeat_steady, 0.0);
    assert_eq!(r.delivered, r.accepted);
    assert!(r.accepted > 200, "too few pushes accepted: {r}");
    assert!(
        r.tcp_devices > r.devices / 5 && r.tcp_devices < r.devices / 2,
        "about a third of the devices on TCP: {r}"
    );
}

/// A lost node's TCP devices re-home too, and well before their next heartbeat: their
/// connection ends with the node (EOF on a kill, a load-balancer reset on a freeze), and the
/// SDK reconnects after its 1 s retry delay to a node the load balancer still sends to.
fn tcp_rehomed(r: &Report) {
    assert!(
        r.rehomed_tcp > 3,
        "too few TCP devices on the lost node: {r}"
    );
    let t = r.rehome_tcp_ms.expect("TCP devices re-homed");
    assert!(t < 15_000, "TCP devices took {t} ms to re-home: {r}");
}

#[test]
fn push_at_any_node() {
    let r = check(Kind::AnyNode, 1);
    common(&r);
    assert!(r.pokes > 100, "most pushes land at a non-owner and poke it");
    assert_eq!(r.dups_per_1000, 0.0);
    // The cut node-to-node link: both ends saw it break (handle_peer_lost), and the pushes
    // made meanwhile at one end for the other's devices reached them through its drain.
    assert!(r.peer_lost >= 2, "both ends of the cut link report it: {r}");
    assert!(r.drained_while_down >= 10, "{r}");
}

#[test]
fn kill_one_node_mid_burst() {
    let r = check(Kind::Kill, 2);
    common(&r);
    tcp_rehomed(&r);
    assert!(
        r.peer_lost > 0,
        "the survivors' links to the killed node broke: {r}"
    );
    assert!(r.rehomed > 10 && r.rehome_ms.is_some(), "{r}");
}

#[test]
fn freeze_one_node_past_the_online_window() {
    let r = check(Kind::Freeze, 3);
    common(&r);
    tcp_rehomed(&r);
    assert!(r.rehomed > 10, "{r}");
}

#[test]
fn cut_one_node_from_the_store() {
    let r = check(Kind::StoreCut, 4);
    common(&r);
    assert!(r.failed > 0, "pushes at the cut node must get 0xFF: {r}");
}

#[test]
fn old_acks_crossing_newer_pushes() {
    let r = check(Kind::Crossing, 5);
    common(&r);
    assert!(r.acks_not_cleared > 10, "too few crossings happened: {r}");
}

/// The ack races of issue 12 across nodes: runs of 0x10/0x20 pushes at random nodes 100-300 ms
/// apart while the network loses immediate sends and acks and moves devices to new sockets.
#[test]
fn ack_races_across_nodes() {
    let r = check(Kind::Acks, 9);
    common(&r);
    assert!(
        r.lost_down > 5 && r.lost_acks > 5 && r.rebinds > 10,
        "too few faults happened: {r}"
    );
    assert!(
        r.acks_older > 20,
        "too few acks attributed to an older send: {r}"
    );
    assert!(
        r.acks_not_cleared > 20,
        "too few acks refused by the store's generation compare: {r}"
    );
}

#[test]
fn rolling_restart() {
    let r = check(Kind::Rolling, 6);
    common(&r);
    assert!(r.rehomed > 5, "{r}");
}

#[test]
fn mass_rehome() {
    let r = check(Kind::Rehome, 7);
    common(&r);
    tcp_rehomed(&r);
    assert!(r.rehomed > 80 && r.binds_per_s > 1.0, "{r}");
}

#[test]
fn store_fail_over_with_replica_wait() {
    let r = check(Kind::Failover, 8);
    common(&r);
    assert_eq!(r.lost_by_failover, 0);
    assert!(r.writes_dropped > 0, "the fail-over dropped nothing: {r}");
}

#[test]
fn same_seed_same_trace() {
    let mut p = Params::new(Kind::Kill, 11, 1);
    p.devices = 30;
    let a = run(&p).expect("first run");
    let b = run(&p).expect("second run");
    assert_eq!(a.trace, b.trace, "same seed gave different traces");
    p.seed = 12;
    let c = run(&p).expect("other seed");
    assert_ne!(a.trace, c.trace, "different seeds gave the same trace");
}
