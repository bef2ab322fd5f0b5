//! TCP idle timeouts live in a one-second wheel; they must still fire on the millisecond and
//! follow activity, whatever the phase of the clock, for many connections at once.

mod common;

use common::*;
use ddpush_proto::Port;

#[test]
fn idle_timeouts_fire_on_the_millisecond_off_a_whole_second() {
    let mut h = default_harness();
    h.advance(millis(1_300));
    let t0 = h.now();
    let c = h.tcp_open(Port::Device, addr(1, 1)).unwrap();
    h.advance(secs(120) + millis(450));
    h.tcp_data(c, &raw_up(1, 1, 0, uuid(1), &[]));
    let active = h.now();
    // The deadline is `active + 300 s`, between two whole seconds.
    h.advance_to(active + secs(299) + millis(999));
    assert!(h.take_closes().is_empty());
    h.advance_to(active + secs(300));
    assert_eq!(h.take_closes(), vec![c]);
    assert!(active > t0);
}

#[test]
fn many_connections_each_close_at_their_own_deadline() {
    let mut h = default_harness();
    let mut opened = Vec::new();
    for i in 0..200u16 {
        h.advance(millis(37));
        let c = h.tcp_open(Port::Device, addr(i + 1, 1)).unwrap();
        opened.push((h.now() + secs(300), c));
    }
    // Half of them send a heartbeat 100 s later: their deadline moves.
    h.advance(secs(100));
    let mut want = Vec::new();
    for (k, &(d, c)) in opened.iter().enumerate() {
        if k % 2 == 0 {
            h.tcp_data(c, &raw_up(1, 1, 0, uuid(k as u32), &[]));
            want.push((h.now() + secs(300), c));
        } else {
            want.push((d, c));
        }
    }
    want.sort();
    let mut closed = Vec::new();
    for &(d, c) in &want {
        if closed.contains(&c) {
            continue; // shared its deadline with one before it
        }
        h.advance_to(ddpush_proto::Time(d.0 - 1));
        assert!(h.take_closes().is_empty(), "nothing closes early");
        h.advance_to(d);
        let now_closed = h.take_closes();
        assert!(
            now_closed.contains(&c),
            "connection {c} closes at its deadline"
        );
        for x in &now_closed {
            let due = want.iter().find(|w| w.1 == *x).map(|w| w.0);
            assert_eq!(
                due,
                Some(d),
                "connection {x} closes only at its own deadline"
            );
        }
        closed.extend(now_closed);
    }
    assert_eq!(closed.len(), 200);
    assert_eq!(h.node.stats().conns_idle, 200);
}
