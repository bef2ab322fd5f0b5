//! One test per rule of PROTOCOL.md sections 4 and 8, driven through `testing::Harness`.

mod common;

use common::*;
use ddpush_proto::testing::Harness;
use ddpush_proto::{
    Change, CloseReason, Config, DeviceMsg, DownMsg, Event, InvalidPacket, Kind, Limited, Limits,
    Port, PushMsg, PushReject, ReplyPolicy, Time, Transport,
};

fn acked(h: &mut Harness) -> Vec<(Kind, bool)> {
    h.take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Acked { kind, cleared, .. } => Some((kind, cleared)),
            _ => None,
        })
        .collect()
}

fn invalid_count(h: &Harness, t: Transport, e: InvalidPacket) -> u64 {
    h.node.stats().invalid.get((t, e))
}

// ------------------------------------------------------------------------------------------
// Message types (4.2)
// ------------------------------------------------------------------------------------------

#[test]
fn notify_pushes_merge_and_one_ack_clears() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    assert_eq!(h.push(u, PushMsg::Notify).byte(), 0);
    h.advance(secs(1));
    assert_eq!(h.push(u, PushMsg::Notify).byte(), 0);
    assert_eq!(h.take_changes().len(), 2, "both pushes are journaled");
    h.advance(secs(5));
    h.heartbeat(dev, 3, u);
    assert_eq!(
        h.take_udp(dev),
        vec![down(3, DownMsg::Notify)],
        "merged: sent once"
    );
    h.advance(secs(1));
    h.ack(dev, 3, u, DeviceMsg::AckNotify);
    assert_eq!(acked(&mut h), vec![(Kind::Notify, true)]);
    assert_eq!(
        h.take_changes(),
        vec![Change::Cleared {
            uuid: u,
            kind: Kind::Notify,
            bits: 0
        }]
    );
    assert!(!h.node.record(&u).unwrap().notify);
    h.advance(secs(50));
    h.heartbeat(dev, 3, u);
    assert!(h.take_transmits().is_empty());
}

#[test]
fn bits_accumulate_and_an_ack_clears_exactly_its_bits() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    for b in [1, 4, 0x100] {
        h.push(u, PushMsg::Bits(b));
    }
    assert_eq!(h.node.record(&u).unwrap().bits, 0x105);
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down(1, DownMsg::Bits(0x105))]);
    h.advance(secs(1));
    h.take_changes();
    h.ack(dev, 1, u, DeviceMsg::AckBits(0x101));
    assert_eq!(h.node.record(&u).unwrap().bits, 4);
    assert_eq!(
        h.take_changes(),
        vec![Change::Cleared {
            uuid: u,
            kind: Kind::Bits,
            bits: 0x101
        }]
    );
    // Bits not pending clear nothing and journal nothing.
    h.ack(dev, 1, u, DeviceMsg::AckBits(0x8));
    assert_eq!(h.node.record(&u).unwrap().bits, 4);
    assert!(h.take_changes().is_empty());
    // A push of 0 changes no state (like upstream, the pending mask still goes out at once).
    h.push(u, PushMsg::Bits(0));
    assert_eq!(h.node.record(&u).unwrap().bits, 4);
    assert_eq!(h.take_udp(dev), vec![down(0, DownMsg::Bits(4))]);
    // A later push ORs on top; the whole mask goes out at once to the online client.
    h.push(u, PushMsg::Bits(2));
    assert_eq!(h.take_udp(dev), vec![down(0, DownMsg::Bits(6))]);
    h.take_changes();
    h.ack(dev, 1, u, DeviceMsg::AckBits(u64::MAX));
    assert_eq!(h.node.record(&u).unwrap().bits, 0);
    assert_eq!(
        h.take_changes(),
        vec![Change::Cleared {
            uuid: u,
            kind: Kind::Bits,
            bits: 6
        }]
    );
}

#[test]
fn payload_last_push_wins() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    for p in [&b"a"[..], b"bb", b"ccc"] {
        h.push(u, payload(p));
        h.advance(secs(1));
    }
    assert_eq!(
        h.node.record(&u).unwrap().payload.as_deref(),
        Some(&b"ccc"[..])
    );
    h.heartbeat(dev, 2, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(2, b"ccc")]);
    h.advance(secs(1));
    h.ack(dev, 2, u, DeviceMsg::AckPayload);
    assert_eq!(h.node.record(&u).unwrap().payload, None);
    assert_eq!(h.node.stats().pending.total(), 0);
}

// ------------------------------------------------------------------------------------------
// Pushes (4.3)
// ------------------------------------------------------------------------------------------

#[test]
fn immediate_push_only_when_online() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.advance(secs(10));
    h.push(u, PushMsg::Notify);
    assert_eq!(h.take_udp(dev), vec![down(0, DownMsg::Notify)]);
    assert!(h.events.contains(&Event::PushAccepted {
        uuid: u,
        kind: Kind::Notify,
        sent: 1
    }));
    h.ack(dev, 1, u, DeviceMsg::AckNotify);
    // 61 s after the last sign of life the client is offline: the push waits.
    h.advance(secs(61));
    assert!(!h.node.is_online(&u));
    h.push(u, payload(b"later"));
    assert!(h.take_transmits().is_empty());
    assert!(h.events.contains(&Event::PushAccepted {
        uuid: u,
        kind: Kind::Payload,
        sent: 0
    }));
    // A push does not refresh liveness.
    assert!(!h.node.is_online(&u));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"later")]);
}

#[test]
fn immediate_push_also_on_an_attached_tcp_connection() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    let conn = h.tcp_open(Port::Device, addr(1, 4001)).unwrap();
    h.tcp_data(conn, &raw_up(1, 1, 0, u, &[]));
    assert!(h.take_transmits().is_empty());
    h.push(u, payload(b"hi"));
    assert_eq!(h.take_udp(dev), vec![down_payload(0, b"hi")]);
    assert_eq!(h.take_tcp(conn), down_payload(0, b"hi"));
    // The UDP address is kept across a TCP heartbeat; after close only UDP remains.
    h.tcp_close(conn);
    h.push(u, PushMsg::Notify);
    assert_eq!(h.take_udp(dev), vec![down(0, DownMsg::Notify)]);
    assert!(h.take_transmits().is_empty());
}

#[test]
fn push_to_unknown_uuid_creates_the_record() {
    let u = uuid(7);
    let mut h = default_harness();
    assert_eq!(h.push(u, PushMsg::Bits(9)).byte(), 0);
    assert_eq!(h.node.len(), 1);
    assert_eq!(
        h.take_changes(),
        vec![Change::Pushed {
            uuid: u,
            at: Time::from_secs(1000),
            msg: PushMsg::Bits(9)
        }]
    );
    assert_eq!(h.node.stats().pending.get(Kind::Bits), 1);
    assert_eq!(h.node.stats().pending.total(), 1);
}

// ------------------------------------------------------------------------------------------
// Heartbeats (4.4, 4.5)
// ------------------------------------------------------------------------------------------

#[test]
fn heartbeat_resends_in_fixed_order_with_its_app_id_until_acked() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    // Pushed in the "wrong" order on purpose.
    h.push(u, payload(b"p"));
    h.push(u, PushMsg::Bits(3));
    h.push(u, PushMsg::Notify);
    let want = vec![
        down(0x42, DownMsg::Notify),
        down(0x42, DownMsg::Bits(3)),
        down_payload(0x42, b"p"),
    ];
    for _ in 0..3 {
        h.heartbeat(dev, 0x42, u);
        assert_eq!(h.take_udp(dev), want, "every heartbeat re-sends everything");
        h.advance(secs(50));
    }
    assert_eq!(h.node.stats().resends, 9);
}

fn policy(p: ReplyPolicy) -> Harness {
    harness(Config {
        reply_policy: p,
        ..Config::default()
    })
}

#[test]
fn reply_policy_never() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = policy(ReplyPolicy::Never);
    h.heartbeat(dev, 1, u);
    h.heartbeat(addr(1, 4001), 1, u);
    assert!(h.take_transmits().is_empty());
    assert_eq!(h.node.stats().heartbeat_replies, 0);
}

#[test]
fn reply_policy_always() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = policy(ReplyPolicy::Always);
    for _ in 0..3 {
        h.heartbeat(dev, 9, u);
        assert_eq!(h.take_udp(dev), vec![down(9, DownMsg::HeartbeatReply)]);
        h.advance(secs(50));
    }
    // No reply when something pending is sent instead.
    h.push(u, PushMsg::Notify);
    h.take_transmits();
    h.heartbeat(dev, 9, u);
    assert_eq!(h.take_udp(dev), vec![down(9, DownMsg::Notify)]);
}

#[test]
fn reply_policy_sa_changed() {
    let (u, a, b) = (uuid(1), addr(1, 4000), addr(1, 4001));
    let mut h = policy(ReplyPolicy::SaChanged);
    h.heartbeat(a, 1, u);
    assert_eq!(
        h.take_udp(a),
        vec![down(1, DownMsg::HeartbeatReply)],
        "first heartbeat after creation counts as changed"
    );
    h.advance(secs(50));
    h.heartbeat(a, 1, u);
    assert!(h.take_transmits().is_empty(), "same address");
    h.advance(secs(50));
    h.heartbeat(b, 1, u);
    assert_eq!(h.take_udp(b), vec![down(1, DownMsg::HeartbeatReply)]);
    h.advance(secs(50));
    h.heartbeat(b, 1, u);
    assert!(h.take_transmits().is_empty());

    // After a restart (snapshot restored into a new node) the same address counts as changed.
    let snap: Vec<_> = h.node.records().collect();
    assert_eq!(snap[0].addr, Some(b));
    let now = h.now();
    let mut rec = ddpush_proto::Recovery::new(h.node.config().clone(), now).unwrap();
    for r in snap {
        rec.record(r);
    }
    let mut h2 = Harness::with_node(rec.finish(), now);
    h2.advance(secs(50));
    h2.heartbeat(b, 1, u);
    assert_eq!(h2.take_udp(b), vec![down(1, DownMsg::HeartbeatReply)]);
    h2.advance(secs(50));
    h2.heartbeat(b, 1, u);
    assert!(h2.take_transmits().is_empty());
}

#[test]
fn no_heartbeat_reply_over_tcp() {
    let u = uuid(1);
    for p in [ReplyPolicy::Always, ReplyPolicy::SaChanged] {
        let mut h = policy(p);
        let conn = h.tcp_open(Port::Device, addr(1, 4000)).unwrap();
        h.tcp_data(conn, &raw_up(1, 1, 0, u, &[]));
        assert!(h.take_transmits().is_empty(), "{p:?}");
        assert_eq!(h.node.stats().heartbeats, 1);
        assert!(h.node.is_online(&u));
    }
}

// ------------------------------------------------------------------------------------------
// Online window (4.6)
// ------------------------------------------------------------------------------------------

fn offline_at(h: &mut Harness, u: ddpush_proto::Uuid) -> Option<Time> {
    // The harness drains after each timeout; find when the Offline event appeared.
    for _ in 0..200 {
        h.advance(millis(500));
        if h.take_events().contains(&Event::Offline { uuid: u }) {
            return Some(h.now());
        }
    }
    None
}

#[test]
fn offline_event_at_window_plus_grace() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    assert!(h.take_events().contains(&Event::Online { uuid: u }));
    assert_eq!(h.node.stats().online, 1);
    // Online through second 1060, offline at 1061.
    h.advance_to(Time::from_millis(1_060_999));
    assert!(h.node.is_online(&u));
    assert!(h.take_events().is_empty());
    assert_eq!(h.node.poll_timeout(), Some(Time::from_secs(1061)));
    h.push(u, PushMsg::Notify);
    assert_eq!(h.take_udp(dev).len(), 1, "still online: sent at once");
    h.take_events();
    h.advance_to(Time::from_secs(1061));
    assert_eq!(h.take_events(), vec![Event::Offline { uuid: u }]);
    assert!(!h.node.is_online(&u));
    assert_eq!(h.node.stats().online, 0);
    h.push(u, PushMsg::Bits(1));
    assert!(h.take_transmits().is_empty());
}

#[test]
fn online_window_is_configurable() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = harness(Config {
        heartbeat_interval: secs(20),
        online_grace: secs(5),
        ..Config::default()
    });
    h.heartbeat(dev, 1, u);
    h.take_events();
    assert_eq!(offline_at(&mut h, u), Some(Time::from_secs(1026)));
}

#[test]
fn heartbeats_within_the_window_keep_the_client_online() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    for _ in 0..5 {
        h.heartbeat(dev, 1, u);
        h.advance(secs(50));
    }
    assert!(!h.take_events().contains(&Event::Offline { uuid: u }));
    assert!(h.node.is_online(&u));
    // Last heartbeat at 1200: offline at 1261.
    assert_eq!(offline_at(&mut h, u), Some(Time::from_secs(1261)));
}

#[test]
fn an_ack_refreshes_liveness() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, PushMsg::Notify);
    h.heartbeat(dev, 1, u);
    h.advance(secs(40));
    h.ack(dev, 1, u, DeviceMsg::AckNotify);
    h.take_events();
    // Without the ack the client would go offline at 1061; the ack at 1040 moves it to 1101.
    assert_eq!(offline_at(&mut h, u), Some(Time::from_secs(1101)));
}

// ------------------------------------------------------------------------------------------
// Creation, capacity, expiry
// ------------------------------------------------------------------------------------------

#[test]
fn create_on_heartbeat_off() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = harness(Config {
        create_on_heartbeat: false,
        reply_policy: ReplyPolicy::Always,
        ..Config::default()
    });
    h.heartbeat(dev, 1, u);
    assert!(h.take_transmits().is_empty());
    assert_eq!(h.node.len(), 0);
    assert_eq!(h.node.stats().unknown_heartbeats, 1);
    assert!(h.take_changes().is_empty());
    // Acks from unknown uuids are ignored too.
    h.ack(dev, 1, u, DeviceMsg::AckNotify);
    assert_eq!(h.node.stats().acks_unknown, 1);
    assert_eq!(h.node.len(), 0);
    // A push still creates the record; then heartbeats work.
    h.push(u, PushMsg::Notify);
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down(1, DownMsg::Notify)]);
}

#[test]
fn max_clients_rejects_new_uuids() {
    let mut h = harness(Config {
        max_clients: 2,
        ..Config::default()
    });
    h.push(uuid(1), PushMsg::Notify);
    h.heartbeat(addr(2, 1), 1, uuid(2));
    assert_eq!(h.node.len(), 2);
    h.take_events();
    // A push for a third uuid gets 0x01 over TCP; known uuids are still accepted.
    let conn = h.tcp_open(Port::Push, addr(9, 1)).unwrap();
    let mut reqs = push_bytes(uuid(3), PushMsg::Notify);
    reqs.extend(push_bytes(uuid(1), PushMsg::Bits(1)));
    h.tcp_data(conn, &reqs);
    assert_eq!(h.take_tcp(conn), vec![0x01, 0x00]);
    // A heartbeat from an unknown uuid is dropped and counted.
    h.heartbeat(addr(4, 1), 1, uuid(4));
    assert!(h.take_transmits().is_empty());
    assert_eq!(h.node.len(), 2);
    assert_eq!(h.node.stats().unknown_heartbeats, 1);
    assert_eq!(h.node.stats().capacity_refused, 2);
    assert_eq!(
        h.node.stats().pushes_rejected.get(PushReject::Capacity),
        1,
        "capacity"
    );
    let ev = h.take_events();
    assert_eq!(
        ev.iter().filter(|e| **e == Event::CapacityReached).count(),
        1,
        "logged once"
    );
    assert!(h.node.record(&uuid(3)).is_none());
}

#[test]
fn idle_records_expire_and_pending_ones_wait_for_pending_ttl() {
    let mut h = harness(Config {
        idle_expiry: secs(100),
        pending_ttl: secs(1000),
        ..Config::default()
    });
    let (idle, pending) = (uuid(1), uuid(2));
    h.heartbeat(addr(1, 1), 1, idle);
    h.push(pending, payload(b"x"));
    h.take_changes();
    h.advance(secs(99));
    assert_eq!(h.node.len(), 2);
    h.advance(secs(2));
    assert!(
        h.node.record(&idle).is_none(),
        "idle 100 s with nothing pending"
    );
    assert!(
        h.node.record(&pending).is_some(),
        "pending items survive idle expiry"
    );
    assert_eq!(h.take_changes(), vec![Change::Removed { uuid: idle }]);
    assert!(h.take_events().contains(&Event::Expired { uuid: idle }));
    h.advance_to(Time::from_secs(1999));
    assert!(h.node.record(&pending).is_some());
    h.advance_to(Time::from_secs(2001));
    assert!(h.node.record(&pending).is_none(), "pending_ttl passed");
    assert_eq!(h.take_changes(), vec![Change::Removed { uuid: pending }]);
    assert_eq!(h.node.stats().expired, 2);
    assert_eq!(h.node.stats().clients, 0);
    assert_eq!(h.node.stats().pending.total(), 0);
}

#[test]
fn heartbeats_keep_records_from_expiring() {
    let mut h = harness(Config {
        idle_expiry: secs(100),
        pending_ttl: secs(100),
        ..Config::default()
    });
    for _ in 0..10 {
        h.heartbeat(addr(1, 1), 1, uuid(1));
        h.advance(secs(50));
    }
    assert_eq!(h.node.len(), 1);
    assert_eq!(h.node.stats().expired, 0);
}

// ------------------------------------------------------------------------------------------
// TCP (4.7, 8.3)
// ------------------------------------------------------------------------------------------

#[test]
fn tcp_validates_like_udp() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = harness(Config {
        reply_policy: ReplyPolicy::Always,
        ..Config::default()
    });
    h.push(u, payload(b"keep"));
    h.push(u, PushMsg::Notify);
    h.take_changes();
    let conn = h.tcp_open(Port::Device, dev).unwrap();
    let bad = [
        // Version 2 is the signed extension (PROTOCOL.md 9): its own test is below.
        (raw_up(3, 1, 0x00, u, &[]), InvalidPacket::Version),
        (raw_up(1, 1, 0x00, u, &[0]), InvalidPacket::Length),
        (raw_up(1, 1, 0x20, u, &[0; 5]), InvalidPacket::Length),
        (raw_up(0, 1, 0x10, u, &[]), InvalidPacket::Version),
        (raw_up(1, 1, 0xFF, u, &[]), InvalidPacket::Command),
    ];
    for (frame, why) in &bad {
        let before = invalid_count(&h, Transport::Tcp, *why);
        h.tcp_data(conn, frame);
        assert_eq!(
            invalid_count(&h, Transport::Tcp, *why),
            before + 1,
            "{why:?}"
        );
        assert!(h.take_tcp(conn).is_empty(), "{why:?}: not answered");
        assert!(
            h.take_closes().is_empty(),
            "{why:?}: delimitable, connection stays"
        );
    }
    assert!(h.take_changes().is_empty(), "nothing cleared");
    let r = h.node.record(&u).unwrap();
    assert!(r.notify);
    assert_eq!(r.payload.as_deref(), Some(&b"keep"[..]));
    assert_eq!(h.node.stats().heartbeats, 0);
    assert!(!h.node.is_online(&u));
    // The same on UDP.
    for (frame, why) in &bad {
        let before = invalid_count(&h, Transport::Udp, *why);
        h.udp(dev, frame);
        assert_eq!(invalid_count(&h, Transport::Udp, *why), before + 1);
    }
    assert!(h.take_transmits().is_empty());
    // A version-2 frame is a signed packet: delimited with its 25-byte trailer, and for a
    // uuid without a key dropped as such (counted by the signed path), nothing else.
    let mut signed = raw_up(2, 1, 0x10, u, &[]);
    signed.extend_from_slice(&[0; 25]);
    h.tcp_data(conn, &signed);
    assert!(h.take_tcp(conn).is_empty() && h.take_closes().is_empty());
    assert_eq!(
        h.node
            .stats()
            .signed_dropped
            .get(ddpush_proto::signed::SignedDrop::UnknownKey),
        1
    );
    // A valid heartbeat on the same connection still works.
    h.tcp_data(conn, &raw_up(1, 1, 0, u, &[]));
    assert_eq!(
        h.take_tcp(conn),
        [down(1, DownMsg::Notify), down_payload(1, b"keep")].concat()
    );
}

#[test]
fn device_frame_over_8_bytes_closes_the_connection() {
    let u = uuid(1);
    let mut h = default_harness();
    let conn = h.tcp_open(Port::Device, addr(1, 1)).unwrap();
    assert_eq!(h.node.stats().conns.get(Port::Device), 1);
    assert_eq!(h.node.stats().conns.get(Port::Push), 0);
    // The header alone is enough: N = 9 cannot be a device packet.
    h.tcp_data(conn, &raw_up_len(1, 1, 0x20, u, 9, &[]));
    assert_eq!(h.take_closes(), vec![conn]);
    assert!(h.take_events().contains(&Event::Closed {
        conn,
        reason: CloseReason::Framing
    }));
    assert_eq!(h.node.stats().conns.total(), 0);
    assert_eq!(h.node.stats().conns_framing, 1);
    // Data after the close is ignored.
    h.tcp_data(conn, &raw_up(1, 1, 0, u, &[]));
    assert_eq!(h.node.len(), 0);
}

#[test]
fn coalesced_acks_all_take_effect() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, PushMsg::Notify);
    h.push(u, PushMsg::Bits(5));
    h.push(u, payload(b"hello"));
    let conn = h.tcp_open(Port::Device, dev).unwrap();
    h.tcp_data(conn, &raw_up(1, 1, 0, u, &[]));
    assert_eq!(h.take_tcp(conn).len(), 5 + 13 + 10);
    h.advance(millis(200));
    h.take_changes();
    let three = [
        raw_up(1, 1, 0x10, u, &[]),
        raw_up(1, 1, 0x11, u, &5u64.to_be_bytes()),
        raw_up(1, 1, 0x20, u, &[]),
    ]
    .concat();
    h.tcp_data(conn, &three);
    assert_eq!(
        acked(&mut h),
        vec![
            (Kind::Notify, true),
            (Kind::Bits, true),
            (Kind::Payload, true)
        ]
    );
    assert_eq!(h.take_changes().len(), 3);
    assert_eq!(h.node.pending()[0].bits, 0);
    assert_eq!(h.node.stats().pending.total(), 0);
    h.advance(secs(50));
    h.tcp_data(conn, &raw_up(1, 1, 0, u, &[]));
    assert!(h.take_tcp(conn).is_empty());
}

#[test]
fn frames_split_byte_by_byte() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, PushMsg::Bits(0xF0));
    let conn = h.tcp_open(Port::Device, dev).unwrap();
    let stream = [
        raw_up(1, 4, 0, u, &[]),
        raw_up(1, 4, 0x11, u, &0x30u64.to_be_bytes()),
        raw_up(1, 4, 0, u, &[]),
    ]
    .concat();
    let mut got = Vec::new();
    for (i, b) in stream.iter().enumerate() {
        h.tcp_data(conn, std::slice::from_ref(b));
        let out = h.take_tcp(conn);
        if !out.is_empty() {
            got.push((i, out));
        }
    }
    // Answers appear exactly when the last byte of each heartbeat arrives.
    assert_eq!(
        got,
        vec![
            (20, down(4, DownMsg::Bits(0xF0))),
            (20 + 29 + 21, down(4, DownMsg::Bits(0xC0))),
        ]
    );
    // Push streams too.
    let pc = h.tcp_open(Port::Push, addr(9, 1)).unwrap();
    let reqs = [
        push_bytes(u, payload(b"abc")),
        push_bytes(u, PushMsg::Notify),
    ]
    .concat();
    let mut replies = Vec::new();
    for b in &reqs {
        h.tcp_data(pc, std::slice::from_ref(b));
        replies.extend(h.take_tcp(pc));
    }
    assert_eq!(replies, vec![0, 0]);
    let r = h.node.record(&u).unwrap();
    assert!(r.notify);
    assert_eq!(r.payload.as_deref(), Some(&b"abc"[..]));
}

#[test]
fn idle_tcp_connections_close_on_time() {
    let mut h = default_harness();
    let t0 = h.now();
    let dev = h.tcp_open(Port::Device, addr(1, 1)).unwrap();
    let push = h.tcp_open(Port::Push, addr(9, 1)).unwrap();
    h.advance(secs(200));
    // Activity on the device stream moves its deadline to 200 + 300.
    h.tcp_data(dev, &raw_up(1, 1, 0, uuid(1), &[]));
    h.advance_to(t0 + secs(499) + millis(999));
    assert!(h.take_closes().is_empty());
    h.advance_to(t0 + secs(500));
    assert_eq!(h.take_closes(), vec![dev]);
    h.advance_to(t0 + secs(599) + millis(999));
    assert!(h.take_closes().is_empty());
    h.advance_to(t0 + secs(600));
    assert_eq!(h.take_closes(), vec![push]);
    let idle: Vec<_> = h
        .take_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Closed {
                    reason: CloseReason::Idle,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(idle.len(), 2);
    assert_eq!(h.node.stats().conns_idle, 2);
    assert_eq!(h.node.stats().conns.total(), 0);
    // A closed connection detaches: pushes go only to UDP now (none known), nothing sent.
    h.push(uuid(1), PushMsg::Notify);
    assert!(h.take_transmits().is_empty());
}

#[test]
fn device_tcp_idle_default_is_300s_without_any_data() {
    let mut h = default_harness();
    let t0 = h.now();
    let c = h.tcp_open(Port::Device, addr(1, 1)).unwrap();
    h.advance_to(t0 + secs(299));
    assert!(h.take_closes().is_empty());
    h.advance_to(t0 + secs(300));
    assert_eq!(h.take_closes(), vec![c]);
}

#[test]
fn tcp_connection_limits() {
    let mut h = harness(Config {
        limits: Limits {
            conns_per_ip: 2,
            max_conns: 3,
            ..Limits::default()
        },
        ..Config::default()
    });
    let a = h.tcp_open(Port::Device, addr(1, 1)).unwrap();
    h.tcp_open(Port::Device, addr(1, 2)).unwrap();
    assert_eq!(h.tcp_open(Port::Device, addr(1, 3)), None, "per IP");
    h.tcp_open(Port::Push, addr(1, 4)).unwrap();
    assert_eq!(h.tcp_open(Port::Push, addr(2, 1)), None, "in all");
    assert_eq!(h.node.stats().conns_refused, 2);
    h.tcp_close(a);
    assert!(h.tcp_open(Port::Device, addr(1, 5)).is_some());
}

// ------------------------------------------------------------------------------------------
// No lost newer message (8.2)
// ------------------------------------------------------------------------------------------

#[test]
fn ack_of_an_older_payload_does_not_clear_a_newer_one() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.push(u, payload(b"v1"));
    assert_eq!(h.take_udp(dev), vec![down_payload(0, b"v1")]);
    // v2 is pushed 1 s later; its immediate datagram is lost on the way.
    h.advance(secs(1));
    h.push(u, payload(b"v2"));
    assert_eq!(h.take_udp(dev), vec![down_payload(0, b"v2")]);
    // The device's ack of v1 arrives now: it must not clear v2.
    h.advance(millis(300));
    h.take_changes();
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h), vec![(Kind::Payload, false)]);
    assert!(h.take_changes().is_empty());
    assert_eq!(
        h.node.record(&u).unwrap().payload.as_deref(),
        Some(&b"v2"[..])
    );
    // The next heartbeat re-sends v2, and the ack of that send clears it.
    h.advance(secs(49));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"v2")]);
    h.advance(millis(300));
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h), vec![(Kind::Payload, true)]);
    assert_eq!(h.node.record(&u).unwrap().payload, None);
    h.advance(secs(50));
    h.heartbeat(dev, 1, u);
    assert!(h.take_transmits().is_empty());
}

#[test]
fn ack_of_an_older_notify_does_not_clear_a_newer_one() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, PushMsg::Notify);
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down(1, DownMsg::Notify)]);
    h.advance(secs(2));
    h.push(u, PushMsg::Notify); // its immediate send is lost
    h.take_transmits();
    h.advance(secs(1));
    h.ack(dev, 1, u, DeviceMsg::AckNotify); // the ack of the first send
    assert!(h.node.record(&u).unwrap().notify);
    h.advance(secs(47));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down(1, DownMsg::Notify)]);
    h.advance(secs(1));
    h.ack(dev, 1, u, DeviceMsg::AckNotify);
    assert!(!h.node.record(&u).unwrap().notify);
}

/// Upstream's sequence (issue 12, case 1): "three" goes unacked, "four" is pushed (sent at
/// once), re-sent by the next heartbeat, acked once: the next heartbeat gets nothing. Steps are
/// 150 ms apart, the shortest the rule must handle.
#[test]
fn one_ack_of_a_resend_clears_like_upstream() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, payload(b"three"));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"three")]);
    h.advance(millis(150));
    h.push(u, payload(b"four"));
    assert_eq!(h.take_udp(dev), vec![down_payload(0, b"four")]);
    h.advance(millis(150));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"four")]);
    h.advance(millis(150));
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h), vec![(Kind::Payload, true)]);
    h.advance(millis(150));
    h.heartbeat(dev, 1, u);
    assert!(h.take_transmits().is_empty(), "four was acked");
}

/// Issue 12, case 1b: an item sent on three heartbeats and acked once, then a new push, a
/// heartbeat re-send and one ack: nothing more is sent. The same for 0x10.
#[test]
fn one_ack_after_several_resends_then_a_new_push_clears_like_upstream() {
    for notify in [false, true] {
        let (u, dev) = (uuid(1), addr(1, 4000));
        let mut h = default_harness();
        let (first, second, ack) = if notify {
            (PushMsg::Notify, PushMsg::Notify, DeviceMsg::AckNotify)
        } else {
            (payload(b"one"), payload(b"two"), DeviceMsg::AckPayload)
        };
        h.push(u, first);
        for _ in 0..3 {
            h.heartbeat(dev, 1, u);
            assert_eq!(h.take_udp(dev).len(), 1);
            h.advance(millis(150));
        }
        h.ack(dev, 1, u, ack);
        assert_eq!(acked(&mut h).last().map(|a| a.1), Some(true));
        h.advance(millis(150));
        h.push(u, second);
        assert_eq!(h.take_udp(dev).len(), 1, "sent at once");
        h.advance(millis(150));
        h.heartbeat(dev, 1, u);
        assert_eq!(h.take_udp(dev).len(), 1, "re-sent");
        h.advance(millis(150));
        h.ack(dev, 1, u, ack);
        assert_eq!(acked(&mut h).last().map(|a| a.1), Some(true), "{notify}");
        h.advance(millis(150));
        h.heartbeat(dev, 1, u);
        assert!(h.take_transmits().is_empty(), "notify={notify}: acked");
    }
}

/// Issue 12, case 2: an SDK that acks everything sees no duplicate: an immediate push acked
/// at once is not re-sent.
#[test]
fn an_acked_immediate_push_is_not_resent() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    for (i, p) in [&b"hello"[..], b"again", b"third"].iter().enumerate() {
        h.advance(millis(500));
        h.push(u, payload(p));
        assert_eq!(h.take_udp(dev), vec![down_payload(0, p)]);
        h.advance(millis(20));
        h.ack(dev, 1, u, DeviceMsg::AckPayload);
        assert_eq!(acked(&mut h), vec![(Kind::Payload, true)], "push {i}");
        h.advance(secs(2));
        h.heartbeat(dev, 1, u);
        assert!(h.take_transmits().is_empty(), "push {i} re-sent");
    }
}

/// Issue 12, case 2: the app is killed (the server still counts it online), "one" and "two"
/// go to the dead socket; the app starts again on a new socket, its first heartbeat gets
/// "two", the SDK acks it, and that is the last it sees of it.
#[test]
fn a_new_socket_settles_sends_to_the_old_one() {
    let (u, old, new) = (uuid(1), addr(1, 4000), addr(1, 4001));
    let mut h = default_harness();
    h.heartbeat(old, 1, u);
    h.advance(secs(5));
    h.push(u, payload(b"one"));
    h.push(u, payload(b"two"));
    assert_eq!(h.take_udp(old).len(), 2, "both sent to the dead socket");
    // Within the in-flight window even: the new address alone settles the old sends.
    h.advance(millis(50));
    h.heartbeat(new, 1, u);
    assert_eq!(h.take_udp(new), vec![down_payload(1, b"two")]);
    h.ack(new, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h), vec![(Kind::Payload, true)]);
    h.advance(secs(2));
    h.heartbeat(new, 1, u);
    assert!(h.take_transmits().is_empty());
    // A late ack from the old socket can clear nothing any more.
    h.push(u, payload(b"three"));
    assert_eq!(h.take_udp(new), vec![down_payload(0, b"three")]);
    h.ack(old, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h), vec![(Kind::Payload, false)]);
}

/// Issue 12, case 2: right after a restart, the first heartbeat's answer is trusted: its ack
/// clears, and an immediate push acked at once is not re-sent either.
#[test]
fn acks_are_trusted_right_after_a_restart() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.push(u, payload(b"before"));
    h.take_transmits(); // sent, and the server crashes before the ack arrives
    let snap: Vec<_> = h.node.records().collect();
    let mut node = ddpush_proto::Node::new(h.node.config().clone()).unwrap();
    for r in snap {
        node.restore(h.now() + millis(1_500), r);
    }
    let mut h2 = Harness::with_node(node, h.now() + millis(1_500));
    h2.heartbeat(dev, 1, u);
    assert_eq!(h2.take_udp(dev), vec![down_payload(1, b"before")]);
    h2.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h2), vec![(Kind::Payload, true)]);
    h2.advance(millis(100));
    h2.push(u, PushMsg::Notify);
    assert_eq!(h2.take_udp(dev), vec![down(0, DownMsg::Notify)]);
    h2.ack(dev, 1, u, DeviceMsg::AckNotify);
    assert_eq!(acked(&mut h2), vec![(Kind::Notify, true)]);
    h2.advance(secs(2));
    h2.heartbeat(dev, 1, u);
    assert!(
        h2.take_transmits().is_empty(),
        "no duplicate after a restart"
    );
}

/// Issue 12, case 3 over TCP: the ack of "A" arrives after "B" was pushed (B's immediate send
/// went out on the stream but the device has not read it): B stays; the re-send's ack clears.
#[test]
fn ack_of_an_older_send_over_tcp_does_not_clear_a_newer_one() {
    for notify in [false, true] {
        let u = uuid(1);
        let mut h = default_harness();
        let c = h.tcp_open(Port::Device, addr(1, 4000)).unwrap();
        let hb = raw_up(1, 1, 0x00, u, &[]);
        let (msg_a, msg_b, cmd) = if notify {
            (PushMsg::Notify, PushMsg::Notify, 0x10)
        } else {
            (payload(b"A"), payload(b"B"), 0x20)
        };
        h.push(u, msg_a);
        h.tcp_data(c, &hb);
        assert!(!h.take_tcp(c).is_empty(), "A sent");
        h.advance(millis(150));
        h.push(u, msg_b);
        assert!(!h.take_tcp(c).is_empty(), "B sent at once");
        h.advance(millis(20));
        h.tcp_data(c, &raw_up(1, 1, cmd, u, &[])); // the ack of A
        let r = h.node.record(&u).unwrap();
        assert!(r.notify || r.payload.is_some(), "notify={notify}: B lost");
        h.advance(secs(50));
        h.tcp_data(c, &hb);
        assert!(!h.take_tcp(c).is_empty(), "B re-sent");
        h.tcp_data(c, &raw_up(1, 1, cmd, u, &[]));
        // The device also acks B's immediate copy, which it reads now: nothing left to clear.
        h.tcp_data(c, &raw_up(1, 1, cmd, u, &[]));
        let r = h.node.record(&u).unwrap();
        assert!(!r.notify && r.payload.is_none(), "notify={notify}: B acked");
        h.advance(secs(50));
        h.tcp_data(c, &hb);
        assert!(h.take_tcp(c).is_empty());
    }
}

/// A heartbeat may cross a send on the network; the ack of a send younger than the in-flight
/// window that arrives after the heartbeat is still attributed to that send.
#[test]
fn a_send_that_crossed_the_heartbeat_keeps_its_ack() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.advance(secs(10));
    h.push(u, payload(b"A")); // sent at once
    h.take_transmits();
    h.advance(millis(30));
    h.push(u, payload(b"B")); // sent at once; lost
    h.take_transmits();
    h.advance(millis(40));
    h.heartbeat(dev, 1, u); // sent by the device before A reached it
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"B")]);
    h.advance(millis(40));
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // the ack of A
    assert_eq!(acked(&mut h), vec![(Kind::Payload, false)]);
    let r = h.node.record(&u).unwrap();
    assert_eq!(r.payload.as_deref(), Some(&b"B"[..]), "A's ack cleared B");
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // the ack of the heartbeat's B
    assert_eq!(acked(&mut h), vec![(Kind::Payload, true)]);
    h.advance(secs(50));
    h.heartbeat(dev, 1, u);
    assert!(h.take_transmits().is_empty());
}

/// Two payloads pushed in one turn to an online client and both acked: no duplicate. (The
/// network may swap them on the way; the device then shows the older one last, as with
/// upstream: the acks cannot tell in which order they arrived.)
#[test]
fn two_payloads_in_flight_together_are_acked_once_each() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.push(u, payload(b"m1"));
    h.push(u, payload(b"m2"));
    assert_eq!(
        h.take_udp(dev),
        vec![down_payload(0, b"m1"), down_payload(0, b"m2")]
    );
    h.advance(millis(40));
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert_eq!(
        acked(&mut h),
        vec![(Kind::Payload, false), (Kind::Payload, true)]
    );
    h.advance(secs(50));
    h.heartbeat(dev, 1, u);
    assert!(h.take_transmits().is_empty());
}

/// Lossy seed 3660 of the simulator: m761 sent on a heartbeat, m469 pushed 200 ms later (its
/// immediate send lost), the ack of m761 duplicated by the network, both copies arriving
/// together. m469 must still reach the device; the ack of its re-send clears it.
#[test]
fn a_duplicated_ack_of_an_older_payload_never_clears_a_newer_one() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, payload(b"m761"));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"m761")]);
    h.advance(millis(200));
    h.push(u, payload(b"m469"));
    assert_eq!(
        h.take_udp(dev),
        vec![down_payload(0, b"m469")],
        "sent; lost"
    );
    h.advance(millis(100));
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // the network's copy
    assert_eq!(
        acked(&mut h),
        vec![(Kind::Payload, false), (Kind::Payload, false)]
    );
    h.advance(secs(50));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"m469")]);
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert_eq!(acked(&mut h), vec![(Kind::Payload, true)]);
    assert_eq!(h.node.stats().acks_crossed, 1);
}

/// Fuzz finding 11 (docs/FUZZING.md) through the node: "one" and "two" pushed 100 ms apart to an
/// online device, the ack of "one" and a network copy of it arrive, "three" is pushed (its send
/// lost), then "two"'s own ack arrives. The copy looked like "two"'s ack; "two"'s real ack must
/// not be taken for "three".
#[test]
fn a_stray_ack_taken_for_one_push_does_not_clear_the_next() {
    let (u, dev) = (uuid(7), addr(1, 5000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.take_transmits();
    h.push(u, payload(b"one"));
    h.advance(millis(100));
    h.push(u, payload(b"two"));
    h.advance(millis(10));
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // the ack of "one"
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // the network's copy of it
    h.advance(millis(10));
    h.push(u, payload(b"three"));
    h.take_transmits(); // its send is lost
    h.advance(millis(10));
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // "two"'s own ack
    assert_eq!(
        h.node.record(&u).unwrap().payload.as_deref(),
        Some(&b"three"[..]),
        "three was cleared unseen"
    );
    h.advance(secs(50));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"three")]);
    h.ack(dev, 1, u, DeviceMsg::AckPayload);
    assert!(h.node.record(&u).unwrap().payload.is_none());
}

/// The same crossing, but the heartbeat comes more than the window after A: A is settled (its
/// ack would have come before the heartbeat), so the one ack that comes clears B.
#[test]
fn a_send_older_than_the_window_is_settled_by_the_heartbeat() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.advance(secs(10));
    h.push(u, payload(b"A")); // sent at once; lost
    h.take_transmits();
    h.advance(millis(300));
    h.push(u, payload(b"B")); // sent at once; lost
    h.take_transmits();
    h.advance(millis(40));
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down_payload(1, b"B")]);
    h.ack(dev, 1, u, DeviceMsg::AckPayload); // the ack of the heartbeat's B
    assert_eq!(acked(&mut h), vec![(Kind::Payload, true)]);
    h.advance(secs(50));
    h.heartbeat(dev, 1, u);
    assert!(h.take_transmits().is_empty());
}

/// Acks are taken only from the path the sends went to: another address cannot clear.
#[test]
fn an_ack_from_another_address_clears_nothing() {
    let (u, dev, other) = (uuid(1), addr(1, 4000), addr(2, 4000));
    let mut h = default_harness();
    h.heartbeat(dev, 1, u);
    h.push(u, PushMsg::Notify);
    assert_eq!(h.take_udp(dev).len(), 1);
    h.ack(other, 1, u, DeviceMsg::AckNotify);
    assert_eq!(acked(&mut h), vec![(Kind::Notify, false)]);
    h.ack(dev, 1, u, DeviceMsg::AckNotify);
    assert_eq!(acked(&mut h), vec![(Kind::Notify, true)]);
}

// ------------------------------------------------------------------------------------------
// Abuse limits (8.4)
// ------------------------------------------------------------------------------------------

#[test]
fn spoofed_heartbeat_flood_is_bounded_by_amplification() {
    let mut h = default_harness();
    let big = vec![b'z'; 500];
    for i in 0..1000 {
        h.push(uuid(i), payload(&big));
    }
    let victim = addr(66, 80);
    let lim = Limits::default();
    let mut received = 0u64;
    let mut sent = 0u64;
    // 10 rounds of heartbeats for all 1000 uuids, one round per second of fake time.
    for _ in 0..10 {
        for i in 0..1000 {
            let hb = raw_up(1, 1, 0, uuid(i), &[]);
            received += hb.len() as u64;
            h.udp(victim, &hb);
        }
        sent += h
            .take_udp(victim)
            .iter()
            .map(|d| d.len() as u64)
            .sum::<u64>();
        h.advance(secs(1));
    }
    assert!(h.take_transmits().is_empty());
    // Initial burst plus one burst regained per 10 s period.
    let bound = u64::from(lim.amp_factor) * received + 2 * u64::from(lim.amp_burst);
    assert!(sent <= bound, "sent {sent} > bound {bound}");
    // And the bound is tight enough to matter: without it this flood sends 5 MB.
    assert!(sent > 0);
    assert!(sent < 10_000 * 505 / 5, "sent {sent}");
    assert!(
        h.node.stats().limited.get(Limited::Amplification) > 0,
        "amplification limit counted"
    );
    assert!(h.take_events().contains(&Event::Limited {
        limit: ddpush_proto::Limited::Amplification
    }));
}

#[test]
fn default_limits_leave_normal_devices_alone() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    let p = vec![b'q'; 500];
    h.push(u, payload(&p));
    h.push(u, PushMsg::Bits(1));
    h.push(u, PushMsg::Notify);
    let answer = [
        down(1, DownMsg::Notify),
        down(1, DownMsg::Bits(1)),
        down_payload(1, &p),
    ];
    // A burst of 10 heartbeats at one instant: every one answered in full.
    for _ in 0..10 {
        h.heartbeat(dev, 1, u);
        assert_eq!(h.take_udp(dev), answer.to_vec());
    }
    h.advance(secs(5));
    // Then 3 per second for 10 s.
    for _ in 0..10 {
        for _ in 0..3 {
            h.heartbeat(dev, 1, u);
            assert_eq!(h.take_udp(dev), answer.to_vec());
            h.advance(millis(333));
        }
        h.advance(millis(1));
    }
    assert_eq!(h.node.stats().limited.total(), 0);
}

#[test]
fn per_uuid_answer_rate_limits_a_hot_uuid() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, PushMsg::Notify);
    let mut answered = 0;
    for _ in 0..100 {
        h.heartbeat(dev, 1, u);
        answered += h.take_udp(dev).len();
    }
    assert_eq!(answered, Limits::default().uuid_burst as usize);
    assert_eq!(
        h.node.stats().limited.get(Limited::UuidRate),
        100 - answered as u64
    );
}

// ------------------------------------------------------------------------------------------
// Persistence: snapshot + change stream
// ------------------------------------------------------------------------------------------

/// A record created after the last snapshot is rebuilt from the journal alone; an ack of a
/// send made before the restart must not clear the newer push that followed it.
#[test]
fn acks_in_flight_across_a_restart_do_not_clear_replayed_records() {
    let (u, dev) = (uuid(1), addr(1, 4000));
    let mut h = default_harness();
    h.push(u, PushMsg::Notify);
    h.heartbeat(dev, 1, u);
    assert_eq!(h.take_udp(dev), vec![down(1, DownMsg::Notify)]);
    h.push(u, PushMsg::Notify); // immediate send lost; then the server crashes
    let journal = h.take_changes();
    assert_eq!(
        journal.len(),
        2,
        "two pushes; heartbeats of known records are not journaled"
    );
    let mut node = ddpush_proto::Node::new(h.node.config().clone()).unwrap();
    for c in &journal {
        node.apply(c);
    }
    assert_eq!(node.pending(), h.node.pending());
    let mut h2 = Harness::with_node(node, h.now());
    h2.advance(secs(1));
    h2.ack(dev, 1, u, DeviceMsg::AckNotify); // the ack of the pre-crash send
    assert!(
        h2.node.record(&u).unwrap().notify,
        "not cleared by an old ack"
    );
    h2.advance(secs(50));
    h2.heartbeat(dev, 1, u);
    assert_eq!(h2.take_udp(dev), vec![down(1, DownMsg::Notify)]);
    h2.ack(dev, 1, u, DeviceMsg::AckNotify);
    assert!(!h2.node.record(&u).unwrap().notify);
}

/// Fuzz finding 13: a device heartbeats on two open TCP connections in turn. The ack of a send
/// made on the first before it was replaced arrives on it after it was attached again (the
/// device got that send late); it must not be taken for the newer 0x10 sent on it since.
#[test]
fn a_connection_attached_again_answers_its_old_sends_first() {
    let u = uuid(13);
    let mut h = default_harness();
    let a = h.tcp_open(Port::Device, addr(1, 4001)).unwrap();
    let b = h.tcp_open(Port::Device, addr(1, 4002)).unwrap();
    h.tcp_data(a, &raw_up(1, 1, 0, u, &[]));
    h.push(u, PushMsg::Notify); // version 1, sent on a
    assert_eq!(h.take_tcp(a), down(0, DownMsg::Notify));
    h.tcp_data(b, &raw_up(1, 1, 0, u, &[])); // b replaces a: version 1 again, on b
    assert_eq!(h.take_tcp(b), down(1, DownMsg::Notify));
    h.push(u, PushMsg::Notify); // version 2, sent on b
    assert_eq!(h.take_tcp(b), down(0, DownMsg::Notify));
    h.tcp_data(a, &raw_up(1, 1, 0, u, &[])); // a again: version 2, on a
    assert_eq!(h.take_tcp(a), down(1, DownMsg::Notify));
    h.tcp_data(a, &raw_up(1, 1, 0x10, u, &[])); // the ack of version 1's send on a
    assert!(
        h.node.record(&u).is_some_and(|r| r.notify),
        "the ack of the send before the replacement cleared version 2"
    );
    h.tcp_data(a, &raw_up(1, 1, 0x10, u, &[])); // the ack of version 2's send on a
    assert!(h.node.record(&u).is_some_and(|r| !r.notify));
}
