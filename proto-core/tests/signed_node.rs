//! The node's rules for signed-only uuids (docs/PROTOCOL.md section 9), through the harness.

mod common;

use common::*;
use ddpush_proto::signed::{DeviceKey, KeyError, KeyUpdate, SealedDown, SignedDrop, Unsigned};
use ddpush_proto::testing::{signed_packet, Harness};
use ddpush_proto::{Change, Config, DeviceMsg, DownMsg, Node, Payload, Port, PushMsg, Time, Uuid};

const ALICE: &str = "alice";

fn alice() -> Uuid {
    Uuid::from_user(ALICE)
}

fn key(b: u8) -> DeviceKey {
    DeviceKey::new([b; 32])
}

/// A signed device: its key, and a nonce counter.
struct Signed {
    uuid: Uuid,
    key_id: u8,
    key: DeviceKey,
    nonce: u32,
}

impl Signed {
    fn new(uuid: Uuid, key_id: u8, key: DeviceKey) -> Self {
        Signed {
            uuid,
            key_id,
            key,
            nonce: 0,
        }
    }

    fn packet(&mut self, now: Time, msg: DeviceMsg) -> Vec<u8> {
        self.nonce += 1;
        signed_packet(
            self.uuid,
            msg,
            &self.key,
            self.key_id,
            now.secs32(),
            self.nonce,
        )
    }

    fn open(&self, b: &[u8]) -> DownMsg {
        let k = self.key.clone();
        let id = self.key_id;
        SealedDown::open(b, |i| (i == id).then(|| k.clone()))
            .unwrap_or_else(|e| panic!("{} does not open: {e}", hex::encode(b)))
            .packet
            .msg
    }
}

fn keyed_harness() -> (Harness, Signed) {
    let mut h = default_harness();
    let now = h.now();
    assert_eq!(
        h.node.set_key(now, alice(), 1, key(7), secs(3600)),
        Ok(KeyUpdate::Provisioned)
    );
    h.drain();
    assert!(matches!(h.take_changes()[..], [Change::Keyed { uuid, .. }] if uuid == alice()));
    (h, Signed::new(alice(), 1, key(7)))
}

fn push_all(h: &mut Harness, uuid: Uuid) {
    for m in [PushMsg::Notify, PushMsg::Bits(5), payload(b"secret")] {
        assert_eq!(h.push(uuid, m).byte(), 0x00);
    }
}

#[test]
fn the_attack_fails_for_a_signed_only_uuid() {
    let (mut h, mut dev) = keyed_harness();
    let device_addr = addr(1, 40_000);
    let attacker = addr(66, 6666);
    // The device heartbeats: its address is recorded.
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(device_addr, &hb);
    assert!(h.node.is_online(&alice()));
    assert_eq!(h.node.record(&alice()).unwrap().addr, Some(device_addr));
    h.advance(secs(1));
    push_all(&mut h, alice());
    let sent: Vec<DownMsg> = h
        .take_udp(device_addr)
        .iter()
        .map(|b| dev.open(b))
        .collect();
    assert_eq!(sent.len(), 3, "immediate pushes go to the device, sealed");
    h.take_transmits();

    // The attacker knows the name: a v1 heartbeat with MD5("alice").
    h.advance(secs(1));
    let before = h.node.record(&alice()).unwrap();
    h.heartbeat(attacker, 1, alice());
    assert_eq!(
        h.take_udp(attacker),
        vec![down(1, DownMsg::Notify)],
        "a bare 0x10 at most, never the mask or payload"
    );
    assert!(h.take_transmits().is_empty());
    let after = h.node.record(&alice()).unwrap();
    assert_eq!(after, before, "records nothing: no time, no address");
    // Replaying the device's captured heartbeat from the attacker's address changes nothing.
    h.udp(attacker, &hb);
    assert!(h.take_transmits().is_empty(), "dropped, never answered");
    assert_eq!(h.node.record(&alice()).unwrap(), before);
    assert_eq!(h.node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
    assert_eq!(h.node.stats().unsigned_refused.get(Unsigned::Heartbeat), 1);
    // The next push still goes to the device only.
    h.push(alice(), payload(b"second"));
    assert!(h.take_udp(attacker).is_empty());
    assert_eq!(h.take_udp(device_addr).len(), 1);
}

#[test]
fn the_attack_still_works_for_a_v1_uuid_as_upstream() {
    let mut h = default_harness();
    let bob = Uuid::from_user("bob");
    let device_addr = addr(1, 40_000);
    let attacker = addr(66, 6666);
    h.heartbeat(device_addr, 1, bob);
    h.advance(secs(1));
    h.heartbeat(attacker, 1, bob);
    assert_eq!(h.node.record(&bob).unwrap().addr, Some(attacker));
    h.push(bob, payload(b"secret"));
    assert_eq!(h.take_udp(attacker), vec![down_payload(0, b"secret")]);
}

#[test]
fn signed_heartbeat_answers_are_sealed_and_acks_must_be_signed() {
    let (mut h, mut dev) = keyed_harness();
    let a = addr(1, 40_000);
    push_all(&mut h, alice());
    h.take_transmits();
    h.take_changes();
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(a, &hb);
    let got: Vec<DownMsg> = h.take_udp(a).iter().map(|b| dev.open(b)).collect();
    assert_eq!(
        got,
        vec![
            DownMsg::Notify,
            DownMsg::Bits(5),
            DownMsg::Payload(ddpush_proto::Content::from_static(b"secret"))
        ]
    );
    // Unsigned acks change nothing.
    h.advance(millis(200));
    for m in [
        DeviceMsg::AckNotify,
        DeviceMsg::AckBits(5),
        DeviceMsg::AckPayload,
    ] {
        h.ack(a, 1, alice(), m);
    }
    assert!(h.take_changes().is_empty());
    assert_eq!(h.node.stats().unsigned_refused.get(Unsigned::Ack), 3);
    let p = h.node.pending();
    assert!(p[0].notify && p[0].bits == 5 && p[0].payload.is_some());
    // Signed acks clear.
    for m in [
        DeviceMsg::AckNotify,
        DeviceMsg::AckBits(5),
        DeviceMsg::AckPayload,
    ] {
        let b = dev.packet(h.now(), m);
        h.udp(a, &b);
    }
    assert_eq!(h.take_changes().len(), 3);
    let p = h.node.pending();
    assert!(!p[0].notify && p[0].bits == 0 && p[0].payload.is_none());
    assert_eq!(h.node.stats().signed_accepted, 4);
}

#[test]
fn the_server_answers_the_golden_heartbeat_byte_for_byte() {
    // docs/PROTOCOL.md 9.6: ts 0x6955b900, key 00..1f id 1, server nonces from 0x100.
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/signed-vectors.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let ts = v["ts"].as_u64().unwrap();
    let mut h = Harness::new(Config {
        hash_seed: 0x100,
        ..Config::default()
    })
    .unwrap();
    h.advance_to(Time::from_secs(ts));
    let uuid = golden_uuid();
    let k = DeviceKey::from_hex(v["key"].as_str().unwrap()).unwrap();
    let now = h.now();
    h.node.set_key(now, uuid, 1, k, secs(0)).unwrap();
    for m in [PushMsg::Notify, PushMsg::Bits(5), payload(b"hello")] {
        h.push(uuid, m);
    }
    let a = addr(1, 40_000);
    h.udp(a, &unhex(v["device_to_server"][0]["hex"].as_str().unwrap()));
    let want: Vec<Vec<u8>> = (0..3)
        .map(|i| unhex(v["server_to_device"][i]["hex"].as_str().unwrap()))
        .collect();
    assert_eq!(h.take_udp(a), want);
}

#[test]
fn every_bad_signed_packet_is_dropped_counted_and_changes_nothing() {
    let (mut h, mut dev) = keyed_harness();
    let a = addr(1, 40_000);
    push_all(&mut h, alice());
    h.take_transmits();
    h.take_changes();
    let now = h.now();
    let good = dev.packet(now, DeviceMsg::Heartbeat);
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut wrong_key = Signed::new(alice(), 1, key(8));
    let mut unknown_id = Signed::new(alice(), 9, key(7));
    let late = dev.packet(now + secs(61), DeviceMsg::Heartbeat);
    let early = dev.packet(
        Time::from_secs(now.as_millis() / 1000 - 61),
        DeviceMsg::Heartbeat,
    );
    let cases = [
        (flipped, SignedDrop::Tag),
        (wrong_key.packet(now, DeviceMsg::Heartbeat), SignedDrop::Tag),
        (
            unknown_id.packet(now, DeviceMsg::Heartbeat),
            SignedDrop::UnknownKey,
        ),
        (good[..good.len() - 1].to_vec(), SignedDrop::Length),
        (late, SignedDrop::Expired),
        (early, SignedDrop::Expired),
    ];
    let before = h.node.record(&alice()).unwrap();
    for (b, reason) in &cases {
        h.udp(a, b);
        assert!(h.take_transmits().is_empty(), "{reason:?}: never answered");
        assert_eq!(h.node.record(&alice()).unwrap(), before, "{reason:?}");
        assert!(h.take_changes().is_empty());
    }
    let st = h.node.stats();
    assert_eq!(st.signed_dropped.get(SignedDrop::Tag), 2);
    assert_eq!(st.signed_dropped.get(SignedDrop::UnknownKey), 1);
    assert_eq!(st.signed_dropped.get(SignedDrop::Length), 1);
    assert_eq!(st.signed_dropped.get(SignedDrop::Expired), 2);
    assert_eq!(st.signed_accepted, 0);
    // The good one still works once, then is a replay.
    h.udp(a, &good);
    assert_eq!(h.take_udp(a).len(), 3);
    h.udp(a, &good);
    assert!(h.take_transmits().is_empty());
    assert_eq!(h.node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
}

#[test]
fn signed_packets_work_over_tcp_in_any_split() {
    let (mut h, mut dev) = keyed_harness();
    push_all(&mut h, alice());
    h.take_transmits();
    let conn = h.tcp_open(Port::Device, addr(1, 40_001)).unwrap();
    // A v1 heartbeat on the same connection does not attach it.
    h.tcp_data(conn, &raw_up(1, 1, 0, alice(), &[]));
    assert_eq!(h.take_tcp(conn), down(1, DownMsg::Notify));
    let mut stream = dev.packet(h.now(), DeviceMsg::Heartbeat);
    stream.extend(dev.packet(h.now(), DeviceMsg::AckNotify));
    for b in &stream {
        h.tcp_data(conn, std::slice::from_ref(b));
    }
    let bytes = h.take_tcp(conn);
    let mut dec = ddpush_proto::DownStreamDecoder::new();
    dec.extend(&bytes);
    let mut got = Vec::new();
    while let Some(p) = dec.next_raw() {
        got.push(dev.open(&p));
    }
    assert_eq!(got.len(), 3);
    assert!(h.take_closes().is_empty());
    assert!(
        !h.node.pending()[0].notify,
        "the signed ack on TCP cleared 0x10"
    );
    // Now attached: an immediate push goes down the connection, sealed.
    h.push(alice(), PushMsg::Notify);
    let b = h.take_tcp(conn);
    assert_eq!(dev.open(&b), DownMsg::Notify);
}

#[test]
fn rotation_keeps_the_old_key_for_its_grace_then_only_the_new_one() {
    let (mut h, mut old) = keyed_harness();
    let a = addr(1, 40_000);
    let now = h.now();
    assert_eq!(
        h.node.set_key(now, alice(), 1, key(9), secs(10)),
        Err(KeyError::IdInUse(1))
    );
    assert_eq!(
        h.node.set_key(now, alice(), 2, key(9), secs(10)),
        Ok(KeyUpdate::Rotated)
    );
    h.drain();
    assert!(matches!(h.take_changes()[..], [Change::Keyed { .. }]));
    h.push(alice(), PushMsg::Notify);
    let hb = old.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(a, &hb);
    assert_eq!(
        old.open(&h.take_udp(a)[0]),
        DownMsg::Notify,
        "answered under the old key"
    );
    h.advance(secs(11));
    let hb = old.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(a, &hb);
    assert!(h.take_transmits().is_empty());
    assert_eq!(h.node.stats().signed_dropped.get(SignedDrop::UnknownKey), 1);
    let mut new = Signed::new(alice(), 2, key(9));
    let hb = new.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(a, &hb);
    assert_eq!(new.open(&h.take_udp(a)[0]), DownMsg::Notify);
}

#[test]
fn removing_the_key_makes_the_uuid_v1_again() {
    let (mut h, _) = keyed_harness();
    let now = h.now();
    assert!(h.node.remove_key(now, &alice()));
    assert!(!h.node.remove_key(now, &alice()));
    h.drain();
    assert_eq!(h.take_changes(), vec![Change::Unkeyed { uuid: alice() }]);
    h.push(alice(), payload(b"x"));
    h.heartbeat(addr(1, 1), 1, alice());
    assert_eq!(h.take_udp(addr(1, 1)), vec![down_payload(1, b"x")]);
    assert_eq!(h.node.stats().keys, 0);
}

#[test]
fn provisioning_forgets_an_address_set_by_v1_heartbeats() {
    let mut h = default_harness();
    let attacker = addr(66, 6666);
    h.heartbeat(attacker, 1, alice());
    let now = h.now();
    h.node.set_key(now, alice(), 1, key(7), secs(0)).unwrap();
    h.drain();
    h.push(alice(), payload(b"secret"));
    assert!(
        h.take_transmits().is_empty(),
        "nothing to the unverified address"
    );
}

#[test]
fn keys_survive_snapshot_and_journal_and_refuse_pre_restart_replays() {
    let (mut h, mut dev) = keyed_harness();
    let a = addr(1, 40_000);
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(a, &hb);
    let journal = h.take_changes();
    let bob = Uuid::from_user("bob");
    let now = h.now();
    h.node.set_key(now, bob, 3, key(3), secs(0)).unwrap();
    h.drain();
    let later = h.take_changes();

    // From the snapshot (alice) and the journal (bob), at a later time.
    let restart = h.now() + secs(1);
    let mut n = Node::new(Config::default()).unwrap();
    for (u, k) in h.node.key_states() {
        if u == alice() {
            n.restore_key(restart, u, k);
        }
    }
    for r in h.node.records() {
        n.restore(restart, r);
    }
    for c in journal.iter().chain(&later) {
        n.apply(c);
    }
    assert_eq!(n.key_states(), h.node.key_states());
    assert_eq!(n.stats().keys, 2);
    let mut h2 = Harness::with_node(n, restart);
    // The captured pre-restart heartbeat is refused; a fresh one is accepted.
    h2.udp(addr(66, 1), &hb);
    assert_eq!(h2.node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
    h2.advance(secs(1));
    let fresh = dev.packet(h2.now(), DeviceMsg::Heartbeat);
    h2.udp(a, &fresh);
    assert_eq!(h2.node.stats().signed_accepted, 1);
    // And v1 heartbeats for bob still record nothing.
    h2.heartbeat(addr(66, 1), 1, bob);
    assert!(h2.node.record(&bob).is_none());
}

#[test]
fn journal_replay_without_a_snapshot_also_refuses_pre_restart_stamps() {
    let mut h = default_harness();
    let now = h.now();
    h.node.set_key(now, alice(), 1, key(7), secs(0)).unwrap();
    h.drain();
    let mut dev = Signed::new(alice(), 1, key(7));
    let changes = h.take_changes();
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    let mut n = Node::new(Config::default()).unwrap();
    for c in &changes {
        n.apply(c);
    }
    let mut h2 = Harness::with_node(n, h.now());
    h2.udp(addr(66, 1), &hb);
    assert_eq!(h2.node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
}

#[test]
fn sealed_transmits_are_what_goes_on_the_wire() {
    let (mut h, mut dev) = keyed_harness();
    let a = addr(1, 40_000);
    h.push(alice(), PushMsg::Notify);
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    h.node.handle_udp(h.now(), a, &hb);
    let t = h.node.poll_transmit().unwrap();
    let Payload::Sealed(s) = &t.payload else {
        panic!("expected a sealed packet, got {t:?}");
    };
    let mut wire = Vec::new();
    t.encode(&mut wire);
    assert_eq!(wire, s.to_vec());
    assert_eq!(t.len(), wire.len());
    assert_eq!(wire.len(), 5 + 25);
}

#[test]
fn a_key_change_whose_write_fails_is_taken_back() {
    use ddpush_proto::{Commit, Driver};
    let mut node = Node::new(Config::default()).unwrap();
    let mut d = Driver::new();
    let t = Time::from_secs(1000);
    node.set_key(t, alice(), 1, key(1), secs(60)).unwrap();
    assert!(matches!(
        d.commit(&mut node, |_| Err::<(), _>("disk full")),
        Commit::Failed { .. }
    ));
    assert!(
        node.key_state(&alice()).is_none(),
        "provisioning taken back"
    );
    assert_eq!(node.stats().keys, 0);
    node.set_key(t, alice(), 1, key(1), secs(60)).unwrap();
    assert!(matches!(
        d.commit(&mut node, |c| {
            assert_eq!(c.len(), 1);
            Ok::<(), ()>(())
        }),
        Commit::Written { .. }
    ));
    // A failed rotation and a failed removal leave key 1 in place.
    node.set_key(t, alice(), 2, key(2), secs(60)).unwrap();
    assert!(node.remove_key(t, &alice()));
    assert!(matches!(
        d.commit(&mut node, |_| Err::<(), _>("disk full")),
        Commit::Failed { .. }
    ));
    let k = node.key_state(&alice()).unwrap();
    assert_eq!((k.id, k.previous.is_none()), (1, true));
    assert_eq!(node.stats().keys, 1);
}

#[test]
fn a_failed_removal_gives_back_the_replay_memory_as_it_was() {
    // Found by fuzz target signed_ops (regressions/signed_ops/replayed-pair-accepted): the
    // taken-back removal reinstated the key with a new replay window, which forgot the pairs
    // accepted before it (before the removal floor of 5588123 it accepted them again; since,
    // it refused the device's next pairs up to the removal second plus its ahead bound).
    use ddpush_proto::{Commit, Driver};
    let mut node = Node::new(Config::default()).unwrap();
    let mut d = Driver::new();
    let t = Time::from_secs(1000);
    let device = addr(10, 4000);
    node.set_key(t, alice(), 1, key(1), secs(60)).unwrap();
    assert!(matches!(
        d.commit(&mut node, |_| Ok::<(), ()>(())),
        Commit::Written { .. }
    ));
    let mut dev = Signed::new(alice(), 1, key(1));
    let first = dev.packet(t, DeviceMsg::Heartbeat);
    node.handle_udp(t, device, &first);
    assert_eq!(node.stats().signed_accepted, 1);
    assert!(!matches!(
        d.commit(&mut node, |_| Ok::<(), ()>(())),
        Commit::Failed { .. }
    ));
    assert!(node.remove_key(t, &alice()));
    assert!(matches!(
        d.commit(&mut node, |_| Err::<(), _>("disk full")),
        Commit::Failed { .. }
    ));
    // The captured packet is still a replay, and the device's next one (same second, next
    // nonce) is still new: the window is the one from before the removal.
    node.handle_udp(t, device, &first);
    assert_eq!(node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
    let next = dev.packet(t, DeviceMsg::Heartbeat);
    node.handle_udp(t, device, &next);
    assert_eq!(node.stats().signed_accepted, 2, "the device's next packet");
    assert_eq!(node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
}

#[test]
fn a_v1_address_in_the_snapshot_is_forgotten_when_the_journal_provisions_the_key() {
    // A v1 heartbeat (anyone's) recorded an address, a snapshot holds it, then the key is
    // provisioned (journal only). Live, provisioning forgot the address; a restart from that
    // snapshot + journal must forget it too, or pushes go, sealed but readable, to whoever sent
    // the v1 heartbeat.
    let mut h = default_harness();
    let attacker = addr(66, 6666);
    h.heartbeat(attacker, 1, alice());
    h.take_transmits();
    h.take_changes();
    let snapshot: Vec<_> = h.node.records().collect();
    let now = h.now();
    h.node.set_key(now, alice(), 1, key(7), secs(0)).unwrap();
    h.drain();
    let journal = h.take_changes();

    let restart = h.now() + secs(1);
    let mut n = Node::new(Config::default()).unwrap();
    for r in snapshot {
        n.restore(restart, r);
    }
    for c in &journal {
        n.apply(c);
    }
    assert_eq!(n.record(&alice()).unwrap().addr, None);
    let mut h2 = Harness::with_node(n, restart);
    h2.push(alice(), payload(b"secret"));
    assert!(
        h2.take_transmits().is_empty(),
        "nothing to the address a v1 heartbeat set before the key"
    );
}

/// A signed device whose clock runs `ahead` of the server's stamps its packets that much later.
fn ahead_packet(dev: &mut Signed, h: &Harness, ahead: std::time::Duration) -> Vec<u8> {
    dev.packet(h.now() + ahead, DeviceMsg::Heartbeat)
}

/// The clock-ahead restart hole (PROTOCOL.md 9.3): a device 20 s ahead stamped its last
/// packets before a crash with times after the restart second. The restarted node must refuse
/// a captured copy (it would move the address to the attacker), yet hear the device again
/// at once.
#[test]
fn a_restart_refuses_what_a_fast_clock_stamped_after_the_restart_second() {
    let (mut h, mut dev) = keyed_harness();
    let snapshot = h.node.key_states();
    let ahead = secs(20);
    let a = addr(1, 40_000);
    let first = ahead_packet(&mut dev, &h, ahead);
    h.udp(a, &first);
    h.advance(secs(5));
    let captured = ahead_packet(&mut dev, &h, ahead);
    h.udp(a, &captured);
    assert_eq!(h.node.stats().signed_accepted, 2);
    let journal = h.take_changes();

    // kill -9 a second later: the snapshot of the keys (as provisioned) and the journal.
    let restart = h.now() + secs(1);
    let mut n = Node::new(Config::default()).unwrap();
    for (u, k) in snapshot {
        n.restore_key(restart, u, k);
    }
    for c in &journal {
        n.apply(c);
    }
    let mut h2 = Harness::with_node(n, restart);
    let attacker = addr(66, 1);
    h2.udp(attacker, &captured);
    assert_eq!(
        h2.node.stats().signed_accepted,
        0,
        "the captured copy was accepted"
    );
    assert_eq!(h2.node.stats().signed_dropped.get(SignedDrop::Replayed), 1);
    assert_ne!(
        h2.node.record(&alice()).and_then(|r| r.addr),
        Some(attacker),
        "the replay moved alice's address"
    );
    // The device's next packets, still 20 s ahead, are heard within a second.
    h2.advance(secs(1));
    let fresh = ahead_packet(&mut dev, &h2, ahead);
    h2.udp(a, &fresh);
    assert_eq!(h2.node.stats().signed_accepted, 1);
    assert_eq!(h2.node.record(&alice()).and_then(|r| r.addr), Some(a));
}

/// The ahead bound is journaled when a device is found further ahead than before, and only
/// then: a device steadily ahead costs one write, not one per heartbeat; a failed write
/// takes the raise back, so the next packet journals it again.
#[test]
fn the_ahead_bound_is_journaled_once_per_raise_and_taken_back_with_a_failed_write() {
    use ddpush_proto::{Commit, Driver};
    let (mut h, mut dev) = keyed_harness();
    let a = addr(1, 40_000);
    h.udp(a, &ahead_packet(&mut dev, &h, secs(0)));
    assert!(
        !h.take_changes()
            .iter()
            .any(|c| matches!(c, Change::Keyed { .. })),
        "a device on time journals no bound"
    );
    h.udp(a, &ahead_packet(&mut dev, &h, secs(12)));
    let keyed: Vec<u32> = h
        .take_changes()
        .iter()
        .filter_map(|c| match c {
            Change::Keyed { keys, .. } => Some(keys.ahead),
            _ => None,
        })
        .collect();
    assert_eq!(keyed, vec![12]);
    for _ in 0..5 {
        h.advance(secs(50));
        h.udp(a, &ahead_packet(&mut dev, &h, secs(12)));
    }
    assert_eq!(
        h.take_changes(),
        vec![],
        "steadily ahead: no further writes"
    );
    assert_eq!(h.node.stats().ahead_raised, 1);

    // Through the driver, with a write that fails.
    let mut node = Node::new(Config::default()).unwrap();
    let mut d = Driver::new();
    let t = Time::from_secs(1_000_000);
    node.set_key(t, alice(), 1, key(7), secs(0)).unwrap();
    assert!(matches!(
        d.commit(&mut node, |_| Ok::<(), ()>(())),
        Commit::Written { .. }
    ));
    let mut dev = Signed::new(alice(), 1, key(7));
    node.handle_udp(t, a, &dev.packet(t + secs(30), DeviceMsg::Heartbeat));
    assert!(matches!(
        d.commit(&mut node, |_| Err::<(), _>("disk full")),
        Commit::Failed { .. }
    ));
    assert_eq!(node.key_state(&alice()).map(|k| k.ahead), Some(0));
    node.handle_udp(t, a, &dev.packet(t + secs(30), DeviceMsg::Heartbeat));
    let mut written = Vec::new();
    assert!(matches!(
        d.commit(&mut node, |c| {
            written = c.to_vec();
            Ok::<(), ()>(())
        }),
        Commit::Written { .. }
    ));
    assert!(written
        .iter()
        .any(|c| matches!(c, Change::Keyed { keys, .. } if keys.ahead == 30)));
    assert_eq!(node.key_state(&alice()).map(|k| k.ahead), Some(30));
}

/// A signed heartbeat finds its record through the keyring's slot hint; a slot freed and
/// reused by another uuid must not be taken for it (the hint is checked against the record's
/// uuid), so the other record keeps its address and its payload goes nowhere else.
#[test]
fn a_stale_slot_hint_never_touches_another_record() {
    let (mut h, mut dev) = keyed_harness();
    let (a, b, c) = (addr(1, 1), addr(2, 2), addr(3, 3));
    // The first heartbeat creates alice's record, the second leaves its slot as the hint.
    for _ in 0..2 {
        let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
        h.udp(a, &hb);
        h.advance(millis(1_100));
    }
    assert_eq!(h.node.record(&alice()).and_then(|r| r.addr), Some(a));
    // Alice's record goes; bob's takes its slot (the registry reuses freed slots).
    let now = h.now();
    assert!(h.node.remove(now, &alice()));
    let bob = Uuid::from_user("bob");
    h.push(bob, payload(b"for bob"));
    h.heartbeat(b, 1, bob);
    assert_eq!(h.take_udp(b), vec![down_payload(1, b"for bob")]);
    h.take_transmits();
    // Alice heartbeats again from a new address: a record of her own, bob's untouched.
    h.advance(millis(1_100));
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(c, &hb);
    assert!(h
        .take_udp(c)
        .iter()
        .all(|x| dev.open(x) == DownMsg::HeartbeatReply));
    assert_eq!(h.node.record(&bob).and_then(|r| r.addr), Some(b));
    assert!(h.node.record(&bob).is_some_and(|r| r.payload.is_some()));
    assert_eq!(h.node.record(&alice()).and_then(|r| r.addr), Some(c));
    // And the hint is right again: her next heartbeat is answered as before.
    h.advance(millis(1_100));
    let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
    h.udp(c, &hb);
    assert_eq!(h.node.record(&alice()).and_then(|r| r.addr), Some(c));
    assert_eq!(h.node.stats().signed_accepted, 4);
}

#[test]
fn a_receive_batch_is_handled_as_its_datagrams_one_by_one() {
    let (mut batched, mut dev) = keyed_harness();
    let (mut plain, _) = keyed_harness();
    let (a, m) = (addr(1, 40_000), addr(2, 40_000));
    let mut mallory = Signed::new(Uuid::from_user("mallory"), 1, key(7));
    let mut v1 = Vec::new();
    ddpush_proto::DevicePacket {
        app_id: 1,
        uuid: alice(),
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut v1);
    push_all(&mut batched, alice());
    push_all(&mut plain, alice());
    for round in 0..3 {
        let now = batched.now();
        let hb = dev.packet(now, DeviceMsg::Heartbeat);
        // Around alice's heartbeat: every prefix of it (short and torn ones), a copy (a
        // replay), a v1 packet naming her, a signed packet of a uuid with no key, garbage that
        // starts like a signed packet, nothing.
        let mut batch: Vec<(std::net::SocketAddr, Vec<u8>)> =
            (0..hb.len()).map(|n| (m, hb[..n].to_vec())).collect();
        batch.push((a, hb.clone()));
        batch.push((m, hb.clone()));
        batch.push((m, v1.clone()));
        batch.push((m, mallory.packet(now, DeviceMsg::Heartbeat)));
        batch.push((m, vec![0x02; 700]));
        batch.push((m, Vec::new()));
        let refs: Vec<(std::net::SocketAddr, &[u8])> =
            batch.iter().map(|(f, d)| (*f, d.as_slice())).collect();
        batched.node.handle_udp_batch(now, &refs);
        for (f, d) in &batch {
            plain.udp(*f, d);
        }
        batched.drain();
        let got = batched.take_udp(a);
        assert_eq!(
            got,
            plain.take_udp(a),
            "round {round}: the same answers, byte for byte"
        );
        let opened: Vec<DownMsg> = got.iter().map(|b| dev.open(b)).collect();
        assert_eq!(
            opened.len(),
            3,
            "every pending item resent, sealed: {opened:?}"
        );
        assert_eq!(batched.take_udp(m), plain.take_udp(m));
        assert_eq!(batched.take_changes(), plain.take_changes());
        batched.advance(millis(300));
        plain.advance(millis(300));
    }
    let (x, y) = (batched.node.stats(), plain.node.stats());
    assert_eq!(x.signed_accepted, 3);
    assert_eq!(x.signed_accepted, y.signed_accepted);
    for e in [
        SignedDrop::Length,
        SignedDrop::UnknownKey,
        SignedDrop::Replayed,
    ] {
        assert!(x.signed_dropped.get(e) > 0, "{e:?} counted");
        assert_eq!(x.signed_dropped.get(e), y.signed_dropped.get(e), "{e:?}");
    }
    assert_eq!(batched.node.pending(), plain.node.pending());
    assert_eq!(batched.node.record(&alice()), plain.node.record(&alice()));
}

#[test]
fn mid_rotation_each_answer_is_sealed_under_the_key_its_packet_used() {
    let (mut h, mut old) = keyed_harness();
    let mut new = Signed::new(alice(), 2, key(9));
    let update = h
        .node
        .set_key(h.now(), alice(), new.key_id, new.key.clone(), secs(60));
    assert_eq!(update, Ok(KeyUpdate::Rotated));
    h.drain();
    let a = addr(1, 40_000);
    h.push(alice(), PushMsg::Notify);
    h.take_transmits();
    for round in 0..4 {
        // The new key, the old one, the new one again, the old one again.
        let (dev, other) = if round % 2 == 0 {
            (&mut new, &old)
        } else {
            (&mut old, &new)
        };
        let hb = dev.packet(h.now(), DeviceMsg::Heartbeat);
        h.udp(a, &hb);
        let got = h.take_udp(a);
        // The notification, and from the second round on the mask pushed after the last.
        assert_eq!(got.len(), 1 + usize::from(round > 0), "round {round}");
        assert_eq!(dev.open(&got[0]), DownMsg::Notify, "round {round}");
        let k = other.key.clone();
        let id = other.key_id;
        for b in &got {
            dev.open(b);
            assert!(
                SealedDown::open(b, |i| (i == id).then(|| k.clone())).is_err(),
                "round {round}: not under the other key"
            );
        }
        // An immediate push afterwards goes under the key the device used last.
        h.advance(millis(1_100));
        assert_eq!(h.push(alice(), PushMsg::Bits(1 << round)).byte(), 0x00);
        let pushed = h.take_udp(a);
        assert_eq!(pushed.len(), 1, "round {round}");
        assert!(matches!(dev.open(&pushed[0]), DownMsg::Bits(_)));
        h.advance(millis(1_100));
    }
}
