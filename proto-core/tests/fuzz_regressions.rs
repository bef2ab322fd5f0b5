//! Regressions found by the fuzz targets in `fuzz/` (see docs/FUZZING.md).
//!
//! Each test replays, through the public API, the exact inputs of a minimized crash and asserts
//! the correct behaviour. The raw crash files are kept in `fuzz/regressions/<target>/` and are
//! replayed by `fuzz/smoke.sh` as well.

use std::net::SocketAddr;
use std::time::Duration;

use ddpush_proto::{
    Config, Content, DownMsg, Limits, Node, Payload, PushMsg, PushReply, PushRequest, RecordState,
    Time, Transmit, Uuid,
};

fn config() -> Config {
    Config {
        limits: Limits {
            enabled: false,
            ..Limits::default()
        },
        ..Config::default()
    }
}

fn device(app_id: u8, cmd: u8, uuid: &Uuid, content: &[u8]) -> Vec<u8> {
    let mut v = vec![1, app_id, cmd];
    v.extend_from_slice(&uuid.0);
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(content);
    v
}

fn drain(node: &mut Node) -> Vec<Transmit> {
    while node.poll_change().is_some() {}
    while node.poll_event().is_some() {}
    std::iter::from_fn(|| node.poll_transmit()).collect()
}

fn downs(t: &[Transmit]) -> Vec<DownMsg> {
    t.iter()
        .filter_map(|t| match &t.payload {
            Payload::Down(p) => Some(p.msg.clone()),
            Payload::Sealed(s) => Some(s.packet.msg.clone()),
            Payload::Reply(_) => None,
        })
        .collect()
}

/// fuzz/regressions/node_ops/time-past-2106-overflow: a heartbeat once the clock passes
/// u32::MAX seconds (Unix time in Feb 2106) overflowed `now_s + window + 1` and panicked.
/// The node must keep working with a saturated clock.
#[test]
fn heartbeat_after_u32_seconds_does_not_overflow() {
    let mut node = Node::new(config()).unwrap();
    let uuid = Uuid([0xC0; 16]);
    let from: SocketAddr = "[fd00::5]:40005".parse().unwrap();
    // The crash input: start near u32::MAX seconds, jump past it, heartbeat.
    let t = Time::from_millis(4_294_967_068u64 * 1000 / 7) + Duration::from_secs(4_294_963_037);
    assert!(t.as_millis() / 1000 > u64::from(u32::MAX));
    let reply = node.handle_push(
        t,
        PushRequest {
            app_id: 0,
            uuid,
            msg: PushMsg::Payload(Content::from_static(b"hi")),
        },
    );
    assert_eq!(reply, PushReply::Accepted);
    drain(&mut node);
    node.handle_udp(t, from, &device(0, 0x00, &uuid, &[]));
    let out = drain(&mut node);
    assert_eq!(
        downs(&out),
        vec![DownMsg::Payload(Content::from_static(b"hi"))]
    );
    assert!(node.is_online(&uuid));
    // Time keeps moving, timeouts and restores keep working.
    let later = t + Duration::from_secs(3600);
    node.handle_timeout(later);
    let _ = node.poll_timeout();
    let mut restored = Node::new(config()).unwrap();
    for r in node.records().collect::<Vec<RecordState>>() {
        restored.restore(later, r);
    }
    restored.handle_udp(later, from, &device(0, 0x00, &uuid, &[]));
    assert_eq!(restored.pending(), node.pending());
}

/// fuzz/regressions/node_ops/ack-horizon-second-rounding: under the former time-based guard
/// (records kept whole seconds, `ack_horizon` 1 s) a 0x10 sent at x.571 s and a newer 0x10
/// pushed at (x+1).340 s looked "older than the horizon": the ack of the first send, 769 ms
/// after it, cleared the newer message (PROTOCOL.md 8.2: never lose a newer message to the ack
/// of an older send). The ack rule now attributes that ack to the older send, whatever the
/// times.
#[test]
fn ack_of_an_older_send_across_a_second_boundary_keeps_the_newer_push() {
    let mut node = Node::new(config()).unwrap();
    let uuid = Uuid([0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    let from: SocketAddr = "[fd00::5]:40005".parse().unwrap();
    let t0 = Time::from_millis(609_046_813_571);
    let push = |node: &mut Node, t| {
        node.handle_push(
            t,
            PushRequest {
                app_id: 41,
                uuid,
                msg: PushMsg::Notify,
            },
        )
    };
    assert_eq!(push(&mut node, t0), PushReply::Accepted);
    drain(&mut node);
    // The heartbeat sends version 1 of the 0x10.
    node.handle_udp(t0, from, &device(59, 0x00, &uuid, &[]));
    assert_eq!(downs(&drain(&mut node)), vec![DownMsg::Notify]);
    // 769 ms later, in the next second, version 2 is pushed (and sent at once).
    let t1 = Time(t0.0 + 769);
    assert_eq!(push(&mut node, t1), PushReply::Accepted);
    drain(&mut node);
    // The ack of version 1 arrives after version 2 was pushed: it must not clear version 2.
    node.handle_udp(t1, from, &device(1, 0x10, &uuid, &[]));
    drain(&mut node);
    assert!(
        node.record(&uuid).unwrap().notify,
        "ack of an older send cleared a newer push"
    );
    // Version 2 is re-sent on the next heartbeat (a fence) and the ack of that re-send clears
    // it.
    let t2 = t1 + Duration::from_secs(5);
    node.handle_udp(t2, from, &device(59, 0x00, &uuid, &[]));
    assert_eq!(downs(&drain(&mut node)), vec![DownMsg::Notify]);
    node.handle_udp(t2, from, &device(1, 0x10, &uuid, &[]));
    drain(&mut node);
    assert!(!node.record(&uuid).unwrap().notify);
}

/// fuzz/regressions/node_ops/ack-before-remove-clears-recreated (finding 3 in
/// docs/FUZZING.md, open): a 0x10 is sent over TCP, an operator removes the record, a new 0x10
/// push re-creates it, and the device's ack of the first send (well within `ack_horizon`)
/// clears the new message. The re-created record had no send history, so nothing guarded it.
/// Now: acks are taken only from the path the sends went to (this one comes over UDP from an
/// address the re-created record does not have), and a record removed within the ack window
/// of a send leaves its ledgers behind for a re-creation.
#[test]
fn ack_of_a_send_before_removal_keeps_the_push_after_it() {
    let mut node = Node::new(config()).unwrap();
    let uuid = Uuid([0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
    let t = Time::from_millis(262_270_902_714);
    let peer: SocketAddr = "10.0.0.2:40001".parse().unwrap();
    assert!(node.handle_tcp_open(t, 2, ddpush_proto::Port::Device, peer));
    node.handle_tcp_data(t, 2, &device(49, 0x00, &uuid, &[]));
    let notify = PushRequest {
        app_id: 19,
        uuid,
        msg: PushMsg::Notify,
    };
    assert_eq!(node.handle_push(t, notify.clone()), PushReply::Accepted);
    assert_eq!(downs(&drain(&mut node)), vec![DownMsg::Notify]);
    assert!(node.remove(t, &uuid));
    assert_eq!(node.handle_push(t, notify), PushReply::Accepted);
    drain(&mut node);
    // The device acks what it got before the removal.
    node.handle_udp(
        t,
        "[fd00::5]:40005".parse().unwrap(),
        &device(1, 0x10, &uuid, &[]),
    );
    drain(&mut node);
    assert!(
        node.record(&uuid).unwrap().notify,
        "ack of a send made before the removal cleared the push made after it"
    );
}

/// fuzz/regressions/node_ops/ack-of-v1-cleared-v2 (finding 8 in docs/FUZZING.md): a 0x10 is
/// sent twice on a device TCP connection, an operator removes the record, a new 0x10 push
/// re-creates it (inheriting the removed record's ledger, finding 3), and a heartbeat on the
/// *same* connection attaches it and gets the new 0x10. The device's ack of one of the first
/// sends, still in flight, cleared the new message: attaching the re-created record counted as
/// a new connection and forgot the inherited sends, although their acks still come on it.
#[test]
fn ack_on_the_same_connection_after_removal_keeps_the_push_after_it() {
    let mut node = Node::new(config()).unwrap();
    let uuid = Uuid([0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    let t = Time::from_millis(261_245_220_571);
    let peer: SocketAddr = "10.0.0.2:40001".parse().unwrap();
    let notify = PushRequest {
        app_id: 29,
        uuid,
        msg: PushMsg::Notify,
    };
    assert!(node.handle_tcp_open(t, 1, ddpush_proto::Port::Device, peer));
    node.handle_tcp_data(t, 1, &device(109, 0x00, &uuid, &[]));
    assert_eq!(node.handle_push(t, notify.clone()), PushReply::Accepted);
    assert_eq!(downs(&drain(&mut node)), vec![DownMsg::Notify]);
    // A heartbeat that crossed the immediate send: version 1 goes out a second time.
    node.handle_tcp_data(t, 1, &device(81, 0x00, &uuid, &[]));
    assert_eq!(downs(&drain(&mut node)), vec![DownMsg::Notify]);
    assert!(node.remove(t, &uuid));
    assert_eq!(node.handle_push(t, notify), PushReply::Accepted);
    assert!(
        downs(&drain(&mut node)).is_empty(),
        "no path yet: nothing sent"
    );
    // The device heartbeats on the same connection and gets version 2.
    node.handle_tcp_data(t, 1, &device(81, 0x00, &uuid, &[]));
    assert_eq!(downs(&drain(&mut node)), vec![DownMsg::Notify]);
    // The ack of a send of version 1 arrives: it must not clear version 2.
    node.handle_tcp_data(t, 1, &device(1, 0x10, &uuid, &[]));
    drain(&mut node);
    assert!(
        node.record(&uuid).unwrap().notify,
        "ack of a send made before the removal cleared the push made after it"
    );
    // The acks of the other version-1 send and of version 2 follow; the second one clears.
    node.handle_tcp_data(t, 1, &device(1, 0x10, &uuid, &[]));
    drain(&mut node);
    assert!(node.record(&uuid).unwrap().notify);
    node.handle_tcp_data(t, 1, &device(1, 0x10, &uuid, &[]));
    drain(&mut node);
    assert!(
        !node.record(&uuid).unwrap().notify,
        "the ack of version 2 clears it"
    );
}
