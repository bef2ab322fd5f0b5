//! The driver's acceptance rule: a push is accepted only if its turn's write succeeded; a
//! refused push leaves no trace in memory, on the wire or in a later start.

mod common;

use common::*;
use ddpush_proto::testing::Harness;
use ddpush_proto::{
    Change, Commit, Config, Content, DeviceMsg, DownMsg, Driver, Event, Node, Payload, Port,
    PushMsg, PushReply, PushRequest, Recovery, Time,
};
use proptest::prelude::*;

fn replay(cfg: &Config, journal: &[Change], now: Time) -> Node {
    let mut r = Recovery::new(cfg.clone(), now).unwrap();
    for c in journal {
        r.change(c);
    }
    r.finish()
}

fn downs(h: &mut Harness) -> Vec<DownMsg> {
    h.take_transmits()
        .into_iter()
        .filter_map(|t| match t.payload {
            Payload::Down(p) => Some(p.msg),
            Payload::Sealed(s) => Some(s.packet.msg),
            Payload::Reply(_) => None,
        })
        .collect()
}

#[test]
fn a_failed_write_refuses_the_turns_pushes_on_every_front_end() {
    let cfg = unlimited();
    let mut h = harness(cfg.clone());
    let (u, a) = (uuid(1), addr(1, 4000));
    h.heartbeat(a, 1, u);
    h.push(u, PushMsg::Bits(0b01));
    assert_eq!(downs(&mut h), vec![DownMsg::Bits(0b01)]);
    let pusher = h.tcp_open(Port::Push, addr(9, 5000)).unwrap();

    h.fail_writes = true;
    // Admin-style push: the ticket resolves to 0xFF, nothing reaches the device.
    assert_eq!(h.push(u, PushMsg::Bits(0b10)), PushReply::Failed);
    assert_eq!(h.push(u, payload(b"refused")), PushReply::Failed);
    // Port 9999: the reply byte is 0xFF.
    h.tcp_data(pusher, &push_bytes(u, PushMsg::Notify));
    assert_eq!(h.take_tcp(pusher), vec![0xFF]);
    assert_eq!(downs(&mut h), Vec::<DownMsg>::new());
    let r = h.node.record(&u).unwrap();
    assert_eq!((r.bits, r.notify, r.payload), (0b01, false, None));
    // A push that would create a record leaves none behind.
    assert_eq!(h.push(uuid(2), PushMsg::Notify), PushReply::Failed);
    assert!(h.node.record(&uuid(2)).is_none());
    assert_eq!(h.node.stats().pushes_failed, 4);
    assert_eq!(h.node.stats().pushes_accepted, 1);
    assert_eq!(h.node.stats().pending.get(ddpush_proto::Kind::Bits), 1);
    assert_eq!(h.node.stats().pending.total(), 1);
    assert!(h.take_events().contains(&Event::PushFailed {
        uuid: u,
        kind: ddpush_proto::Kind::Notify
    }));
    assert!(!h.driver.storage_ok());

    // Heartbeats still work from memory: the accepted item is re-sent, the refused are not.
    h.advance(secs(1));
    h.heartbeat(a, 1, u);
    assert_eq!(downs(&mut h), vec![DownMsg::Bits(0b01)]);

    // Space is back: the next push is written and accepted, no restart needed.
    h.fail_writes = false;
    h.tcp_data(pusher, &push_bytes(u, PushMsg::Bits(0b100)));
    assert_eq!(h.take_tcp(pusher), vec![0x00]);
    assert!(h.driver.storage_ok());

    // A later start sees exactly what was answered 0x00.
    let back = replay(&cfg, &h.take_changes(), h.now());
    assert_eq!(back.pending(), h.node.pending());
    let r = back.record(&u).unwrap();
    assert_eq!((r.bits, r.notify, r.payload), (0b101, false, None));
    assert!(back.record(&uuid(2)).is_none());
}

#[test]
fn a_refused_payload_brings_back_the_one_it_replaced() {
    let mut h = harness(unlimited());
    let u = uuid(3);
    assert_eq!(h.push(u, payload(b"old")), PushReply::Accepted);
    h.fail_writes = true;
    assert_eq!(h.push(u, payload(b"new")), PushReply::Failed);
    assert_eq!(
        h.node.record(&u).unwrap().payload,
        Some(Content::from_static(b"old"))
    );
    assert_eq!(h.node.stats().pending.get(ddpush_proto::Kind::Payload), 1);
    assert_eq!(h.node.stats().pending.total(), 1);
}

#[test]
fn acks_of_a_failed_turn_stay_in_memory() {
    let mut h = harness(unlimited());
    let (u, a) = (uuid(4), addr(4, 4000));
    h.heartbeat(a, 1, u);
    h.push(u, PushMsg::Bits(0b11));
    h.fail_writes = true;
    h.ack(a, 1, u, DeviceMsg::AckBits(0b01));
    assert_eq!(h.failed_turns, 1);
    assert_eq!(h.node.record(&u).unwrap().bits, 0b10);
}

#[test]
fn the_commit_outcome_marks_episodes_once() {
    let mut node = Node::new(unlimited()).unwrap();
    let mut d = Driver::new();
    let now = Time::from_secs(100);
    let req = |n| PushRequest {
        app_id: 0,
        uuid: uuid(n),
        msg: PushMsg::Notify,
    };
    assert!(matches!(
        d.commit(&mut node, |_| Ok::<(), ()>(())),
        Commit::Nothing
    ));
    let outcomes: Vec<String> = [false, false, true, true]
        .into_iter()
        .enumerate()
        .map(|(i, ok)| {
            let t = d.handle_push(&mut node, now, req(i as u32));
            let c = d.commit(&mut node, |ch| {
                assert_eq!(ch.len(), 1);
                if ok {
                    Ok(())
                } else {
                    Err("disk full")
                }
            });
            let (got, reply) = d.poll_reply().unwrap();
            assert_eq!(got, t);
            format!("{c:?} {reply:?}")
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            "Failed { error: \"disk full\", first: true, refused: 1 } Failed",
            "Failed { error: \"disk full\", first: false, refused: 1 } Failed",
            "Written { recovered: true } Accepted",
            "Written { recovered: false } Accepted",
        ]
    );
    assert_eq!(d.failed_writes(), 2);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "before its turn's changes were committed")]
fn a_transmit_before_the_commit_is_caught() {
    let mut node = Node::new(unlimited()).unwrap();
    let now = Time::from_secs(100);
    let a = addr(5, 4000);
    let mut hb = Vec::new();
    ddpush_proto::DevicePacket {
        app_id: 1,
        uuid: uuid(5),
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut hb);
    node.handle_udp(now, a, &hb);
    let _ = node.poll_transmit();
}

/// A node's turn ended by hand, with the commit's write failing.
fn fail_turn(node: &mut Node, d: &mut Driver) {
    let c = d.commit(node, |_| Err::<(), _>("disk full"));
    assert!(matches!(c, Commit::Failed { .. }), "{c:?}");
}

fn hb_bytes(u: ddpush_proto::Uuid) -> Vec<u8> {
    let mut b = Vec::new();
    ddpush_proto::DevicePacket {
        app_id: 1,
        uuid: u,
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut b);
    b
}

#[test]
fn a_removal_whose_write_failed_comes_back_as_it_was() {
    let cfg = unlimited();
    let mut h = harness(cfg.clone());
    let (u, a) = (uuid(7), addr(7, 4000));
    h.heartbeat(a, 1, u);
    h.push(u, PushMsg::Notify);
    h.push(u, PushMsg::Bits(0b110));
    h.push(u, payload(b"kept"));
    h.take_transmits();
    let before = h.node.record(&u).unwrap();
    let stats = |h: &Harness| {
        let s = h.node.stats();
        (s.clients, s.online, s.pending.total())
    };
    let counts = stats(&h);
    assert_eq!(counts, (1, 1, 3));

    h.fail_writes = true;
    assert!(
        !h.remove(u),
        "a removal whose write failed was reported done"
    );
    let back = h.node.record(&u).expect("the record is back");
    assert_eq!(format!("{back:?}"), format!("{before:?}"));
    assert!(h.node.is_online(&u));
    assert_eq!(stats(&h), counts);
    // Still served from memory: the next heartbeat re-sends all three items.
    h.advance(secs(1));
    h.heartbeat(a, 1, u);
    let mut got = downs(&mut h);
    got.sort_by_key(|m| format!("{m:?}"));
    assert_eq!(got.len(), 3, "{got:?}");
    // Nothing of the removal reached the journal: a restart has the record too.
    let replayed = replay(&cfg, &h.take_changes(), h.now());
    assert_eq!(replayed.pending(), h.node.pending());

    // Space is back: the removal is written, and a restart agrees.
    h.fail_writes = false;
    assert!(h.remove(u));
    assert!(h.node.record(&u).is_none());
    assert_eq!(stats(&h), (0, 0, 0));
    let changes = h.take_changes();
    assert!(changes.contains(&Change::Removed { uuid: u }));
    let mut all = Vec::new();
    all.extend(changes);
    let replayed = replay(&cfg, &all, h.now());
    assert!(replayed.record(&u).is_none());
}

#[test]
fn a_failed_turn_takes_back_a_removal_and_the_pushes_around_it_in_order() {
    let now = Time::from_secs(1_000);
    let mut node = Node::new(unlimited()).unwrap();
    let mut d = Driver::new();
    let (u, a) = (uuid(8), addr(8, 4000));
    node.handle_udp(now, a, &hb_bytes(u));
    d.handle_push(
        &mut node,
        now,
        PushRequest {
            app_id: 1,
            uuid: u,
            msg: PushMsg::Bits(1),
        },
    );
    let _ = d.commit(&mut node, |_| Ok::<(), ()>(()));
    while node.poll_transmit().is_some() {}
    let before = format!("{:?}", node.record(&u).unwrap());

    // A push, the removal, then a push that creates the record again: all in one turn.
    d.handle_push(
        &mut node,
        now,
        PushRequest {
            app_id: 1,
            uuid: u,
            msg: PushMsg::Bits(2),
        },
    );
    assert!(node.remove(now, &u));
    d.handle_push(
        &mut node,
        now,
        PushRequest {
            app_id: 1,
            uuid: u,
            msg: payload(b"new"),
        },
    );
    assert!(node.record(&u).unwrap().payload.is_some());
    fail_turn(&mut node, &mut d);
    assert_eq!(format!("{:?}", node.record(&u).unwrap()), before);
    assert_eq!(node.stats().clients, 1);
    assert_eq!(node.stats().online, 1);
    assert_eq!(node.stats().pending.total(), 1);
    assert_eq!(node.stats().pushes_failed, 2);
    while node.poll_transmit().is_some() {}

    // The removal, then a heartbeat that creates the record again in the same turn: the
    // removed record's items come back into it.
    let later = now + secs(2);
    assert!(node.remove(later, &u));
    node.handle_udp(later, a, &hb_bytes(u));
    fail_turn(&mut node, &mut d);
    let r = node.record(&u).unwrap();
    assert_eq!(r.bits, 1);
    assert_eq!(r.last_heartbeat, Some(later));
    assert_eq!(node.stats().clients, 1);
    assert_eq!(node.stats().online, 1);
    assert_eq!(node.stats().pending.total(), 1);
}

#[test]
fn a_removal_taken_back_keeps_its_tcp_connection() {
    let mut h = harness(unlimited());
    let u = uuid(9);
    let c = h.tcp_open(Port::Device, addr(9, 4000)).unwrap();
    h.tcp_data(c, &hb_bytes(u));
    h.take_tcp(c);
    h.fail_writes = true;
    assert!(!h.remove(u));
    h.fail_writes = false;
    // A push goes out on the connection at once, as before the failed removal.
    assert_eq!(h.push(u, PushMsg::Notify), PushReply::Accepted);
    assert_eq!(h.take_tcp(c), down(0, DownMsg::Notify));
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Op {
    /// Push the next unique bit (and, if `payload`, a unique payload) to device `dev`.
    Push {
        dev: u8,
        payload: bool,
    },
    Heartbeat {
        dev: u8,
    },
    /// Ack every bit of the mask the device last received.
    Ack {
        dev: u8,
    },
    Step,
    /// Toggle whether writes fail.
    Disk,
    /// The operator removes the device's record.
    Remove {
        dev: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, any::<bool>()).prop_map(|(dev, payload)| Op::Push { dev, payload }),
        2 => (0u8..3).prop_map(|dev| Op::Heartbeat { dev }),
        2 => (0u8..3).prop_map(|dev| Op::Ack { dev }),
        1 => Just(Op::Step),
        2 => Just(Op::Disk),
        1 => (0u8..3).prop_map(|dev| Op::Remove { dev }),
    ]
}

proptest! {
    /// With writes failing at random turns: the live mask is exactly the accepted bits not
    /// acked (and not removed by a removal that was written; one whose write failed removes
    /// nothing); a restart from the written journal holds every one of them (acks that were
    /// not written may come back, nothing else); no refused bit or payload is ever pending,
    /// live or after the restart, and none reaches a device.
    #[test]
    fn refused_pushes_leave_no_trace(ops in proptest::collection::vec(op(), 1..60)) {
        let cfg = unlimited();
        let mut h = harness(cfg.clone());
        let dev = |d: u8| (uuid(100 + u32::from(d)), addr(100 + u16::from(d), 4000));
        let mut next_bit = 0u32;
        let mut accepted = [0u64; 3];
        let mut refused = [0u64; 3];
        let mut acked = [0u64; 3];
        let mut ok_payloads: Vec<Content> = Vec::new();
        let mut bad_payloads: Vec<Content> = Vec::new();
        let mut received = [0u64; 3];
        for op in &ops {
            match *op {
                Op::Push { dev: d, payload: p } => {
                    let (u, _) = dev(d);
                    let bit = 1u64 << (next_bit % 64);
                    next_bit += 1;
                    if next_bit > 64 { continue; }
                    let ok = h.push(u, PushMsg::Bits(bit)) == PushReply::Accepted;
                    prop_assert_eq!(ok, !h.fail_writes);
                    if ok { accepted[d as usize] |= bit } else { refused[d as usize] |= bit }
                    if p {
                        let body = Content::new(format!("p{next_bit}")).unwrap();
                        let ok = h.push(u, PushMsg::Payload(body.clone())) == PushReply::Accepted;
                        if ok { ok_payloads.push(body) } else { bad_payloads.push(body) }
                    }
                }
                Op::Heartbeat { dev: d } => {
                    let (u, a) = dev(d);
                    h.heartbeat(a, 1, u);
                }
                Op::Ack { dev: d } => {
                    let (u, a) = dev(d);
                    let m = received[d as usize];
                    if m != 0 {
                        h.ack(a, 1, u, DeviceMsg::AckBits(m));
                        acked[d as usize] |= m;
                    }
                }
                Op::Step => h.advance(secs(20)),
                Op::Disk => h.fail_writes = !h.fail_writes,
                Op::Remove { dev: d } => {
                    let (u, _) = dev(d);
                    let existed = h.node.record(&u).is_some();
                    let removed = h.remove(u);
                    prop_assert_eq!(removed, existed && !h.fail_writes);
                    prop_assert_eq!(h.node.record(&u).is_some(), existed && !removed);
                    if removed {
                        // Gone with everything pending: what was accepted before is no
                        // longer owed, live or after a restart.
                        accepted[d as usize] = 0;
                        acked[d as usize] = 0;
                    }
                }
            }
            for t in h.take_transmits() {
                if let Payload::Down(p) = &t.payload {
                    let d = (0..3u8).find(|&d| t.dest == ddpush_proto::Dest::Udp(dev(d).1));
                    match (&p.msg, d) {
                        (DownMsg::Bits(m), Some(d)) => {
                            prop_assert_eq!(m & refused[d as usize], 0, "a refused bit was sent");
                            received[d as usize] = *m;
                        }
                        (DownMsg::Payload(b), _) => {
                            prop_assert!(!bad_payloads.contains(b), "a refused payload was sent");
                        }
                        _ => {}
                    }
                }
            }
        }
        let back = replay(&cfg, &h.changes, h.now());
        for d in 0..3u8 {
            let (u, _) = dev(d);
            let i = d as usize;
            let live = h.node.record(&u);
            let restarted = back.record(&u);
            let live_bits = live.as_ref().map_or(0, |r| r.bits);
            let back_bits = restarted.as_ref().map_or(0, |r| r.bits);
            prop_assert_eq!(live_bits, accepted[i] & !acked[i]);
            prop_assert_eq!(back_bits & live_bits, live_bits, "restart lost an accepted bit");
            prop_assert_eq!(back_bits & !accepted[i], 0, "restart has a bit never accepted");
            for r in [live, restarted].into_iter().flatten() {
                if let Some(p) = r.payload {
                    prop_assert!(ok_payloads.contains(&p), "pending payload was refused");
                }
            }
        }
    }
}

#[test]
fn a_turn_without_changes_commits_nothing_and_keeps_health() {
    let mut node = Node::new(unlimited()).unwrap();
    let mut d = Driver::new();
    let _ = d.write_failed();
    let c = d.commit(&mut node, |_| -> Result<(), ()> {
        panic!("nothing to write")
    });
    assert!(matches!(c, Commit::Nothing));
    assert!(!d.storage_ok());
}
