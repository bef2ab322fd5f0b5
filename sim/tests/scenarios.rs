//! The simulation scenarios at CI size, with fixed seeds. A failure prints the seed and the
//! command that replays it.

use ddpush_sim::{run, Kind, Params, Report};

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

#[test]
fn lossy_udp() {
    let r = check(Kind::Lossy, 1);
    assert!(
        r.hb_histogram.len() > 2,
        "loss should cost some deliveries heartbeats"
    );
}

#[test]
fn offline_and_back() {
    let r = check(Kind::Offline, 2);
    assert!(r.offline_checked > 20, "too few offline periods checked");
}

#[test]
fn partitions() {
    let r = check(Kind::Partition, 3);
    assert!(
        r.app_reconnects > 0,
        "the app server never had to reconnect"
    );
}

#[test]
fn server_crash_and_restart() {
    let r = check(Kind::Crash, 4);
    assert!(r.crashes >= 6, "too few crashes: {}", r.crashes);
    assert!(r.crash_points.0 > 0 && r.crash_points.1 > 0);
}

#[test]
fn tcp_reconnect() {
    let r = check(Kind::Tcp, 5);
    assert!(r.episodes_checked > 100, "too few reconnects checked");
}

#[test]
fn disk_full() {
    let r = check(Kind::DiskFull, 7);
    assert!(
        r.refused > 10,
        "too few pushes met the full disk: {}",
        r.refused
    );
    assert!(r.crashes >= 2, "too few crashes: {}", r.crashes);
}

#[test]
fn mixed() {
    check(Kind::Mixed, 6);
}

#[test]
fn same_seed_same_trace() {
    let mut p = Params::new(Kind::Crash, 11, 1);
    p.udp_devices = 60;
    p.tcp_devices = 20;
    p.crashes = 4;
    p.push_phase = 240_000;
    let a = run(&p).expect("first run");
    let b = run(&p).expect("second run");
    assert_eq!(a.trace, b.trace, "same seed gave different traces");
    assert_eq!(a.trace_items, b.trace_items);
    p.seed = 12;
    let c = run(&p).expect("other seed");
    assert_ne!(a.trace, c.trace, "different seeds gave the same trace");
}

#[test]
fn signed_devices_and_a_replaying_attacker() {
    use ddpush_proto::signed::SignedDrop;
    let r = check(Kind::Signed, 8);
    // check() failed the run if the attacker got a mask, a payload, a heartbeat reply or a
    // sealed packet, or moved a signed-only uuid's address, or if a device missed a push.
    let a = r.attack.expect("attacker stats");
    let s = r.signed.clone().expect("signed counters");
    assert!(
        a.replayed > 500 && a.tcp_replayed > 20,
        "too few replays: {a:?}"
    );
    assert!(a.v1_heartbeats > 10_000 && a.got_notify > 100, "{a:?}");
    assert!(s.accepted > 1_000, "{s:?}");
    assert!(s.dropped.get(SignedDrop::Replayed) > 500, "{s:?}");
    assert!(
        s.dropped.get(SignedDrop::Expired) > 10,
        "late replays: {s:?}"
    );
    assert!(s.dropped.get(SignedDrop::Tag) > 10, "forgeries: {s:?}");
    assert!(r.crashes >= 2 && r.accepted > 500, "{r}");
    // Restarted devices got the answers captured before their restart injected and refused
    // every one (check() fails the run if one accepted any; it does with the start floor off).
    assert!(
        r.device_restarts >= 10 && a.restarts_found >= 10,
        "too few restarts: {r}"
    );
    assert!(
        r.restart_replays.0 > 100 && r.restart_replays.1 == 0,
        "injected answers refused/accepted: {:?}",
        r.restart_replays
    );
}

#[test]
fn signed_same_seed_same_trace() {
    let mut p = Params::new(Kind::Signed, 21, 1);
    p.udp_devices = 40;
    p.tcp_devices = 10;
    let a = run(&p).expect("first run");
    let b = run(&p).expect("second run");
    assert_eq!(a.trace, b.trace, "same seed gave different traces");
    assert_eq!(a.attack.map(|x| x.replayed), b.attack.map(|x| x.replayed));
}
