//! Target 8: signed devices (PROTOCOL.md section 9) through the node and the driver.
//!
//! Operations, derived by `arbitrary`, on three uuids, four UDP addresses and a few TCP
//! connections: key provisioning, rotation (with a grace period) and removal, each in a turn
//! whose write may fail; pushes (turns that may fail too); v1 heartbeats and acks; signed
//! heartbeats and acks with the right or a wrong key, a known or unknown key id, a timestamp
//! inside, at the edge of or outside the replay window, a fresh or a reused nonce, and tampered
//! bytes (a flipped bit, a cut, extra bytes); verbatim replays of captured packets from any
//! address or connection; raw version-2 bytes; TCP open/close; time steps; snapshots; and
//! restarts from snapshot + journal.
//!
//! The oracle keeps its own model of every uuid's keys (from the key updates and whether their
//! turn was written) and computes, independently of the core (`ddpush_fuzz`'s contract
//! framer, shape rule and HMAC), what each signed packet must come to: dropped for `length`,
//! `command`, `unknown_key`, `tag`, `expired` or `replayed` (a pair it saw accepted since the
//! key was provisioned in this life, or one stamped at or before the restart second), or
//! "fresh" (accepted, or refused as `replayed` by the window's bounded memory). Checked after
//! every operation:
//! 1. the node counts exactly the verdict's reason, and accepts only fresh packets;
//! 2. **an invalid packet changes nothing**: no record, no key, no change journaled, nothing
//!    sent;
//! 3. **a v1 packet naming a signed-only uuid** changes nothing and is answered with at most
//!    one bare v1 `0x10` to its source (a heartbeat, when something is pending), never a mask or
//!    a payload; a v1 ack gets nothing;
//! 4. **a signed-only uuid's address moves only on an accepted signed heartbeat** (to its
//!    source), and provisioning a first key forgets the address a v1 heartbeat set;
//! 5. **everything sent for a signed-only uuid is sealed**, opens under the model's key for its
//!    key id at that time, is stamped with the node's clock, and goes only to an address or
//!    connection from which that uuid sent an accepted signed heartbeat since its key was
//!    provisioned; an answer to a signed heartbeat goes back to its source under its key id;
//! 6. the node's effective keys (which id verifies under which key now) equal the model's, and
//!    restore(snapshot) + replay(journal) gives the same keys and pending state;
//! 7. nothing is ever sealed for a v1 uuid; and never a panic;
//! 8. **the ahead bound** (PROTOCOL.md 9.3): every signed-only uuid's bound is the model's (the
//!    furthest after the node's clock one of its packets was accepted, 0 for a new key, kept
//!    by a rotation), a raise is journaled in the turn of the packet that raised it, and after
//!    a restart that restored keys every stamp up to the restart second plus the bound is
//!    refused as `replayed` (not merely allowed to be).
#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use arbitrary::Arbitrary;
use ddpush_fuzz::{
    contract_device, contract_frames, contract_signed_device, contract_tag, SignedShape, Stream,
};
use ddpush_proto::signed::{
    device_to_vec, DeviceKey, KeyError, KeyState, KeyUpdate, Seal, SealedDown, SignedDrop,
};
use ddpush_proto::{
    Change, Commit, Config, Dest, DeviceMsg, DevicePacket, DownMsg, Driver, Event, Limits, Node,
    Payload, Port, PushMsg, PushRequest, RecordState, Recovery, Time, Transmit, Uuid,
};
use libfuzzer_sys::fuzz_target;

const UUIDS: u8 = 3;
/// Key ids the generator uses (0..=3); ids are what a packet claims, keys what it is signed with.
const IDS: u8 = 4;
/// The node caps a rotation's grace period at 90 days (`node::signed::MAX_KEY_GRACE`).
const MAX_GRACE_S: u64 = 90 * 24 * 3600;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Seconds after 2020-09-13 (1.6e9), so timestamps stay far from u32 limits.
    start_s: u16,
    /// The replay window: 1..=120 s.
    window_s: u8,
    create_on_heartbeat: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cmd {
    Heartbeat,
    AckNotify,
    AckBits(u8),
    AckPayload,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Via {
    Udp(u8),
    Tcp(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Nonce {
    /// The device's counter, incremented.
    Next,
    /// A chosen value (collides with earlier ones).
    Fixed(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tamper {
    None,
    /// Flip one bit (position modulo the length).
    Flip(u16),
    /// Drop the last 1..=n bytes.
    Cut(u8),
    /// Append bytes.
    Extend(u8),
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Notify,
    Bits(u64),
    Payload(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    SetKey {
        who: u8,
        id: u8,
        key: u8,
        grace_s: u32,
        fail: bool,
    },
    RemoveKey {
        who: u8,
        fail: bool,
    },
    Push {
        who: u8,
        msg: Msg,
        fail: bool,
    },
    V1 {
        who: u8,
        cmd: Cmd,
        app_id: u8,
        via: Via,
    },
    Signed {
        who: u8,
        cmd: Cmd,
        /// The key id the packet names.
        id: u8,
        /// The key it is signed with (index into the key pool; may be the wrong one).
        key: u8,
        /// Timestamp relative to the node's clock, in seconds.
        ts_off: i8,
        nonce: Nonce,
        tamper: Tamper,
        via: Via,
    },
    Replay {
        idx: u8,
        via: Via,
    },
    Raw {
        via: Via,
        data: Vec<u8>,
    },
    TcpOpen {
        from: u8,
    },
    TcpClose {
        conn: u8,
    },
    Step {
        ms: u16,
    },
    StepSecs {
        s: u8,
    },
    Snapshot,
    Restart,
}

fn uuid(who: u8) -> Uuid {
    Uuid([0xA0 + who % UUIDS; 16])
}

fn who_of(u: &Uuid) -> Option<u8> {
    (0..UUIDS).find(|&w| uuid(w) == *u)
}

fn addr(from: u8) -> SocketAddr {
    let i = from % 4;
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i % 2)),
        40000 + u16::from(i),
    )
}

fn key_bytes(k: u8) -> [u8; 32] {
    [0x11 * (1 + k % 4); 32]
}

fn device_msg(c: Cmd) -> DeviceMsg {
    match c {
        Cmd::Heartbeat => DeviceMsg::Heartbeat,
        Cmd::AckNotify => DeviceMsg::AckNotify,
        Cmd::AckBits(b) => DeviceMsg::AckBits(u64::from(b)),
        Cmd::AckPayload => DeviceMsg::AckPayload,
    }
}

/// The model of one uuid's keys: `(id, key index)` current, and the previous one with the end
/// of its grace period.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MKeys {
    id: u8,
    key: [u8; 32],
    prev: Option<(u8, [u8; 32], Time)>,
}

impl MKeys {
    fn key_for(&self, id: u8, now: Time) -> Option<[u8; 32]> {
        if id == self.id {
            return Some(self.key);
        }
        self.prev.filter(|p| p.0 == id && now < p.2).map(|p| p.1)
    }
}

/// What the contract says a version-2 packet must come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Drop(SignedDrop),
    /// Passes every check the model can decide: accepted, or refused as a replay by the
    /// window's bounded memory (PROTOCOL.md 9.3).
    Fresh {
        who: u8,
        ts: u32,
        nonce: u32,
    },
}

struct Conn {
    id: u64,
}

struct World {
    cfg: Config,
    node: Node,
    driver: Driver,
    now: Time,
    window_s: u32,
    keys: BTreeMap<u8, MKeys>,
    /// `(who, ts, nonce)` accepted since the uuid's key was provisioned, in this life.
    accepted: HashSet<(u8, u32, u32)>,
    /// Pairs stamped at or before this second are refused after a restart that restored keys,
    /// until the next restart.
    floor: u32,
    /// Each signed-only uuid's ahead bound (PROTOCOL.md 9.3): how far after the node's clock
    /// an accepted packet of it was ever stamped (0 for a new key; kept by a rotation).
    ahead: BTreeMap<u8, u32>,
    /// After a restart, the keys it restored refuse stamps up to the restart second plus
    /// their ahead bound then: this second, per uuid, until the next restart (a key
    /// provisioned afresh has only `floor`).
    ahead_floor: BTreeMap<u8, u32>,
    /// Where each signed-only uuid's device proved itself (accepted signed heartbeats).
    allowed: BTreeMap<u8, HashSet<Dest>>,
    nonces: [u32; UUIDS as usize],
    conns: Vec<Conn>,
    next_conn: u64,
    captured: Vec<Vec<u8>>,
    snapshot: (Vec<RecordState>, Vec<(Uuid, KeyState)>),
    journal: Vec<Change>,
    /// Changes written by the operation's turns.
    written: Vec<Change>,
}

/// What an operation sent in, for the checks after it.
enum Sent {
    /// Not a device packet (key update, push, time, connection, snapshot, restart).
    Other(Option<u8>),
    /// Bytes that are not a whole valid v1 or v2 packet: must change nothing.
    Invalid,
    /// A well-formed v1 packet.
    V1 { p: DevicePacket, dest: Dest },
    /// A version-2 packet with the model's verdict.
    V2 {
        v: Verdict,
        dest: Dest,
        /// The command and key id, when the shape is valid.
        msg: Option<(DeviceMsg, u8)>,
    },
}

impl World {
    fn new(inp: &Input) -> Self {
        let window_s = 1 + u32::from(inp.window_s % 120);
        let cfg = Config {
            create_on_heartbeat: inp.create_on_heartbeat,
            replay_window: Duration::from_secs(u64::from(window_s)),
            hash_seed: 0x5eed,
            limits: Limits {
                enabled: false,
                ..Limits::default()
            },
            ..Config::default()
        };
        World {
            node: Node::new(cfg.clone()).expect("valid config"),
            cfg,
            driver: Driver::new(),
            now: Time::from_secs(1_600_000_000 + u64::from(inp.start_s)),
            window_s,
            keys: BTreeMap::new(),
            accepted: HashSet::new(),
            floor: 0,
            ahead: BTreeMap::new(),
            ahead_floor: BTreeMap::new(),
            allowed: BTreeMap::new(),
            nonces: [0; UUIDS as usize],
            conns: Vec::new(),
            next_conn: 1,
            captured: Vec::new(),
            snapshot: (Vec::new(), Vec::new()),
            journal: Vec::new(),
            written: Vec::new(),
        }
    }

    fn now_s(&self) -> u32 {
        self.now.secs32()
    }

    /// The verdict for one whole version-2 packet, from the model and the contract alone.
    fn verdict(&self, b: &[u8]) -> Verdict {
        let ((_, u, _, _), (id, ts, nonce, tag)) = match contract_signed_device(b) {
            Ok(f) => f,
            Err(SignedShape::Length) => return Verdict::Drop(SignedDrop::Length),
            Err(SignedShape::Command) => return Verdict::Drop(SignedDrop::Command),
        };
        let Some(who) = who_of(&Uuid(u)) else {
            return Verdict::Drop(SignedDrop::UnknownKey);
        };
        let Some(key) = self.keys.get(&who).and_then(|k| k.key_for(id, self.now)) else {
            return Verdict::Drop(SignedDrop::UnknownKey);
        };
        if contract_tag(&key, true, &b[..b.len() - 16]) != tag {
            return Verdict::Drop(SignedDrop::Tag);
        }
        if self.now_s().abs_diff(ts) > self.window_s {
            return Verdict::Drop(SignedDrop::Expired);
        }
        let ahead_floor = self.ahead_floor.get(&who).copied().unwrap_or(0);
        if self.accepted.contains(&(who, ts, nonce)) || ts <= self.floor || ts <= ahead_floor {
            return Verdict::Drop(SignedDrop::Replayed);
        }
        Verdict::Fresh { who, ts, nonce }
    }

    fn conn(&mut self, i: u8) -> Option<usize> {
        (!self.conns.is_empty()).then(|| usize::from(i) % self.conns.len())
    }

    /// Sends `bytes` as a device would: one UDP datagram, or on a TCP connection its first
    /// delimited frame (the rest of a tampered stream would desynchronise the connection; a
    /// stream with no whole frame goes on a throw-away connection, which must change nothing).
    fn send(&mut self, bytes: &[u8], via: Via) -> Sent {
        let (frame, dest) = match via {
            Via::Udp(a) => {
                let a = addr(a);
                self.node.handle_udp(self.now, a, bytes);
                (bytes.to_vec(), Dest::Udp(a))
            }
            Via::Tcp(c) => {
                let frames = match contract_frames(bytes, Stream::Device) {
                    Ok(f) | Err(f) => f,
                };
                let Some(f) = frames.first() else {
                    // No whole frame: a throw-away connection, which must change nothing.
                    let id = self.next_conn;
                    self.next_conn += 1;
                    assert!(self
                        .node
                        .handle_tcp_open(self.now, id, Port::Device, addr(c)));
                    self.node.handle_tcp_data(self.now, id, bytes);
                    self.node.handle_tcp_close(self.now, id);
                    while self.node.poll_close().is_some() {}
                    return Sent::Invalid;
                };
                let ci = match self.conn(c) {
                    Some(ci) => ci,
                    None => {
                        let id = self.next_conn;
                        self.next_conn += 1;
                        assert!(self
                            .node
                            .handle_tcp_open(self.now, id, Port::Device, addr(c)));
                        self.conns.push(Conn { id });
                        self.conns.len() - 1
                    }
                };
                let id = self.conns[ci].id;
                self.node.handle_tcp_data(self.now, id, f);
                (f.clone(), Dest::Tcp(id))
            }
        };
        if frame.first() == Some(&2) {
            let msg = contract_signed_device(&frame)
                .ok()
                .map(|((_, _, c, m), t)| {
                    let msg = match c {
                        0x00 => DeviceMsg::Heartbeat,
                        0x10 => DeviceMsg::AckNotify,
                        0x11 => DeviceMsg::AckBits(m.unwrap_or(0)),
                        _ => DeviceMsg::AckPayload,
                    };
                    (msg, t.0)
                });
            return Sent::V2 {
                v: self.verdict(&frame),
                dest,
                msg,
            };
        }
        match contract_device(&frame).and_then(|_| DevicePacket::decode(&frame).ok()) {
            Some(p) => Sent::V1 { p, dest },
            None => Sent::Invalid,
        }
    }

    fn signed_packet(&mut self, op: &Op) -> Vec<u8> {
        let Op::Signed {
            who,
            cmd,
            id,
            key,
            ts_off,
            nonce,
            tamper,
            ..
        } = op
        else {
            unreachable!()
        };
        let w = usize::from(who % UUIDS);
        let nonce = match nonce {
            Nonce::Next => {
                self.nonces[w] += 1;
                self.nonces[w]
            }
            Nonce::Fixed(n) => u32::from(*n),
        };
        let ts = self.now_s().wrapping_add_signed(i32::from(*ts_off));
        let p = DevicePacket {
            app_id: 1,
            uuid: uuid(*who),
            msg: device_msg(*cmd),
        };
        let seal = Seal {
            key_id: id % IDS,
            ts,
            nonce,
        };
        let mut b = device_to_vec(&p, seal, &DeviceKey::new(key_bytes(*key)));
        match *tamper {
            Tamper::None => {}
            Tamper::Flip(bit) => {
                let bit = usize::from(bit) % (b.len() * 8);
                b[bit / 8] ^= 1 << (bit % 8);
            }
            Tamper::Cut(n) => {
                let n = 1 + usize::from(n) % b.len();
                b.truncate(b.len() - n);
            }
            Tamper::Extend(n) => b.extend(std::iter::repeat(0x5A).take(1 + usize::from(n % 40))),
        }
        b
    }

    /// Commits the turn (its write fails if `fail`); returns whether it was written.
    fn commit(&mut self, fail: bool) -> (bool, Vec<Change>) {
        let mut changes = Vec::new();
        let c = self.driver.commit(&mut self.node, |ch: &[Change]| {
            changes = ch.to_vec();
            if fail {
                Err(())
            } else {
                Ok(())
            }
        });
        while self.driver.poll_reply().is_some() {}
        match c {
            Commit::Nothing => (true, Vec::new()),
            Commit::Written { .. } => {
                self.journal.extend(changes.iter().cloned());
                self.written.extend(changes.iter().cloned());
                (true, changes)
            }
            Commit::Failed { .. } => (false, Vec::new()),
        }
    }

    /// Connections the node closed (idle, framing) are gone from the pool.
    fn closed(&mut self) {
        while let Some(id) = self.node.poll_close() {
            self.conns.retain(|c| c.id != id);
        }
        while let Some(e) = self.node.poll_event() {
            if let Event::Closed { conn, .. } = e {
                self.conns.retain(|c| c.id != conn);
            }
        }
    }

    fn records(&self) -> BTreeMap<u8, RecordState> {
        (0..UUIDS)
            .filter_map(|w| self.node.record(&uuid(w)).map(|r| (w, r)))
            .collect()
    }

    /// The node's effective keys: for every id the generator uses, the key it verifies under.
    fn node_keys(node: &Node, now: Time) -> Vec<Vec<Option<[u8; 32]>>> {
        (0..UUIDS)
            .map(|w| {
                (0..IDS)
                    .map(|id| {
                        node.key_state(&uuid(w))
                            .and_then(|k| k.key_for(id, now).map(|k| *k.expose()))
                    })
                    .collect()
            })
            .collect()
    }

    fn model_keys(&self) -> Vec<Vec<Option<[u8; 32]>>> {
        (0..UUIDS)
            .map(|w| {
                (0..IDS)
                    .map(|id| self.keys.get(&w).and_then(|k| k.key_for(id, self.now)))
                    .collect()
            })
            .collect()
    }

    fn step(&mut self, op: &Op) {
        // Time-driven work first, so that what the operation does is all that changes.
        self.node.handle_timeout(self.now);
        let (ok, _) = self.commit(false);
        assert!(ok);
        while self.node.poll_transmit().is_some() {}
        self.closed();

        let before = self.records();
        let pending_before: BTreeMap<u8, bool> = before
            .iter()
            .map(|(w, r)| (*w, r.notify || r.bits != 0 || r.payload.is_some()))
            .collect();
        let keyed_before: BTreeSet<u8> = self.keys.keys().copied().collect();
        let stats = self.node.stats().clone();
        self.written.clear();

        let sent = match op {
            Op::SetKey {
                who,
                id,
                key,
                grace_s,
                fail: f,
            } => {
                let w = who % UUIDS;
                let (id, kb) = (id % IDS, key_bytes(*key));
                let grace = Duration::from_secs(u64::from(*grace_s % 200));
                let want = match self.keys.get(&w) {
                    None => Ok(KeyUpdate::Provisioned),
                    Some(k) if k.id == id && k.key == kb => Ok(KeyUpdate::Unchanged),
                    Some(k) if k.id == id => Err(KeyError::IdInUse(id)),
                    Some(_) => Ok(KeyUpdate::Rotated),
                };
                let got = self
                    .node
                    .set_key(self.now, uuid(w), id, DeviceKey::new(kb), grace);
                assert_eq!(got, want, "key update result");
                let (written, changes) = self.commit(*f);
                let changed = matches!(want, Ok(KeyUpdate::Provisioned | KeyUpdate::Rotated));
                if changed && written {
                    assert!(
                        matches!(&changes[..], [Change::Keyed { uuid: u, .. }] if *u == uuid(w)),
                        "a key update journals one Keyed: {changes:?}"
                    );
                    let prev = self.keys.get(&w).map(|k| {
                        let until =
                            self.now + Duration::from_secs(grace.as_secs().min(MAX_GRACE_S));
                        (k.id, k.key, until)
                    });
                    if want == Ok(KeyUpdate::Provisioned) {
                        self.accepted.retain(|a| a.0 != w);
                        self.ahead.insert(w, 0);
                        self.ahead_floor.remove(&w);
                        self.allowed.insert(w, HashSet::new());
                        if let Some(r) = self.node.record(&uuid(w)) {
                            assert_eq!(r.addr, None, "a first key forgets the v1 address");
                        }
                    }
                    self.keys.insert(w, MKeys { id, key: kb, prev });
                } else {
                    assert!(
                        changes.is_empty(),
                        "a refused key update journaled {changes:?}"
                    );
                }
                Sent::Other(Some(w))
            }
            Op::RemoveKey { who, fail: f } => {
                let w = who % UUIDS;
                let had = self.node.remove_key(self.now, &uuid(w));
                assert_eq!(had, self.keys.contains_key(&w));
                let (written, _) = self.commit(*f);
                if had && written {
                    self.keys.remove(&w);
                    self.ahead.remove(&w);
                    self.ahead_floor.remove(&w);
                    self.accepted.retain(|a| a.0 != w);
                    self.allowed.remove(&w);
                }
                Sent::Other(Some(w))
            }
            Op::Push { who, msg, fail: f } => {
                let w = who % UUIDS;
                let msg = match msg {
                    Msg::Notify => PushMsg::Notify,
                    Msg::Bits(b) => PushMsg::Bits(b | 1),
                    Msg::Payload(p) => {
                        let mut p = p[..p.len().min(64)].to_vec();
                        if p.is_empty() {
                            p.push(b'x');
                        }
                        PushMsg::Payload(ddpush_fuzz::content(&p))
                    }
                };
                let req = PushRequest {
                    app_id: 0,
                    uuid: uuid(w),
                    msg,
                };
                self.driver.handle_push(&mut self.node, self.now, req);
                self.commit(*f);
                Sent::Other(Some(w))
            }
            Op::V1 {
                who,
                cmd,
                app_id,
                via,
            } => {
                let p = DevicePacket {
                    app_id: *app_id,
                    uuid: uuid(*who),
                    msg: device_msg(*cmd),
                };
                let mut b = Vec::new();
                p.encode(&mut b);
                self.captured.push(b.clone());
                let s = self.send(&b, *via);
                self.commit(false);
                s
            }
            Op::Signed { via, .. } => {
                let b = self.signed_packet(op);
                self.captured.push(b.clone());
                let s = self.send(&b, *via);
                self.commit(false);
                s
            }
            Op::Replay { idx, via } => {
                if self.captured.is_empty() {
                    return;
                }
                let b = self.captured[usize::from(*idx) % self.captured.len()].clone();
                let s = self.send(&b, *via);
                self.commit(false);
                s
            }
            Op::Raw { via, data } => {
                let mut b = vec![2];
                b.extend_from_slice(&data[..data.len().min(80)]);
                let s = self.send(&b, *via);
                self.commit(false);
                s
            }
            Op::TcpOpen { from } => {
                let id = self.next_conn;
                self.next_conn += 1;
                assert!(self
                    .node
                    .handle_tcp_open(self.now, id, Port::Device, addr(*from)));
                self.conns.push(Conn { id });
                Sent::Other(None)
            }
            Op::TcpClose { conn } => {
                if let Some(ci) = self.conn(*conn) {
                    let c = self.conns.remove(ci);
                    self.node.handle_tcp_close(self.now, c.id);
                }
                Sent::Other(None)
            }
            Op::Step { ms } => {
                self.now = Time(self.now.0 + u64::from(*ms));
                self.node.handle_timeout(self.now);
                self.commit(false);
                Sent::Other(None)
            }
            Op::StepSecs { s } => {
                self.now = self.now + Duration::from_secs(u64::from(*s));
                self.node.handle_timeout(self.now);
                self.commit(false);
                Sent::Other(None)
            }
            Op::Snapshot => {
                self.snapshot = (self.node.records().collect(), self.node.key_states());
                self.journal.clear();
                Sent::Other(None)
            }
            Op::Restart => {
                let mut rec = Recovery::new(self.cfg.clone(), self.now).expect("valid config");
                for r in &self.snapshot.0 {
                    rec.record(r.clone());
                }
                for (u, k) in &self.snapshot.1 {
                    rec.key(*u, k.clone());
                }
                for c in &self.journal {
                    rec.change(c);
                }
                let mut restored = rec.finish();
                restored.handle_timeout(self.now);
                assert_eq!(
                    Self::node_keys(&restored, self.now),
                    Self::node_keys(&self.node, self.now),
                    "restore(snapshot) + replay(journal) differs in keys"
                );
                assert_eq!(
                    restored.pending(),
                    self.node.pending(),
                    "pending after restore"
                );
                let restored_keys = !self.snapshot.1.is_empty()
                    || self
                        .journal
                        .iter()
                        .any(|c| matches!(c, Change::Keyed { .. }));
                while restored.poll_transmit().is_some() {}
                while restored.poll_event().is_some() {}
                while restored.poll_change().is_some() {}
                self.node = restored;
                self.driver = Driver::new();
                self.conns.clear();
                // Pairs accepted before the restart are unknown to the new node: it refuses
                // every pair stamped at or before the restart second (PROTOCOL.md 9.3), and
                // nothing more can be promised about the others. That floor belongs to the keys
                // this restart restored (and those provisioned after it in the same life): a
                // restart that restores none has no key a pre-restart pair could verify under
                // (check 6), so a key provisioned after it owes no floor, whatever an earlier
                // life's restart said.
                self.accepted.clear();
                self.floor = if restored_keys { self.now_s() } else { 0 };
                // The ahead bound is journaled in the turn that raised it (check 8), so the
                // restored keys have the model's bounds.
                self.ahead_floor = self
                    .ahead
                    .iter()
                    .map(|(w, a)| (*w, self.floor.saturating_add(*a)))
                    .filter(|_| restored_keys)
                    .collect();
                for a in self.allowed.values_mut() {
                    a.retain(|d| matches!(d, Dest::Udp(_)));
                }
                Sent::Other(None)
            }
        };
        if self.captured.len() > 64 {
            self.captured.remove(0);
        }
        let transmits: Vec<Transmit> = std::iter::from_fn(|| self.node.poll_transmit()).collect();
        self.closed();
        let after = self.records();
        let st = self.node.stats().clone();

        // 6. Keys: the node's effective keys are the model's.
        assert_eq!(
            Self::node_keys(&self.node, self.now),
            self.model_keys(),
            "effective keys differ from the model after {op:?}"
        );

        // 1. The verdict's reason is the one counted.
        let mut accepted_hb: Option<(u8, Dest)> = None;
        let mut answer: Option<(u8, Dest, u8)> = None;
        match &sent {
            Sent::V2 { v, dest, msg } => {
                let acc = st.signed_accepted - stats.signed_accepted;
                let dropped: Vec<(SignedDrop, u64)> = [
                    SignedDrop::Length,
                    SignedDrop::Command,
                    SignedDrop::UnknownKey,
                    SignedDrop::Tag,
                    SignedDrop::Expired,
                    SignedDrop::Replayed,
                ]
                .into_iter()
                .map(|r| (r, st.signed_dropped.get(r) - stats.signed_dropped.get(r)))
                .filter(|(_, n)| *n > 0)
                .collect();
                match *v {
                    Verdict::Drop(r) => {
                        assert_eq!(acc, 0, "accepted a packet the contract drops ({r:?})");
                        assert_eq!(dropped, vec![(r, 1)], "counted {dropped:?}, want {r:?}");
                    }
                    Verdict::Fresh { who, ts, nonce } => {
                        let refused = dropped == vec![(SignedDrop::Replayed, 1)];
                        assert!(
                            (acc == 1 && dropped.is_empty()) || (acc == 0 && refused),
                            "fresh packet: accepted {acc}, dropped {dropped:?}"
                        );
                        if acc == 1 {
                            self.accepted.insert((who, ts, nonce));
                            // 8. A packet stamped further ahead than the bound raises it, and
                            // the raise is journaled in this turn, before its answer.
                            let ahead = ts.saturating_sub(self.now_s());
                            let bound = self.ahead.entry(who).or_insert(0);
                            if ahead > *bound {
                                *bound = ahead;
                                assert!(
                                    self.written.iter().any(|c| matches!(c,
                                        Change::Keyed { uuid: u, keys }
                                            if *u == uuid(who) && keys.ahead == ahead)),
                                    "ahead bound raised to {ahead} but not journaled: {:?}",
                                    self.written
                                );
                            }
                            let (m, id) = msg.expect("a fresh packet has a valid shape");
                            if m == DeviceMsg::Heartbeat {
                                accepted_hb = Some((who, *dest));
                                self.allowed.entry(who).or_default().insert(*dest);
                            }
                            answer = Some((who, *dest, id));
                        }
                    }
                }
            }
            // A restart starts a new node, with new counters.
            _ if matches!(op, Op::Restart) => {}
            _ => {
                assert_eq!(st.signed_accepted, stats.signed_accepted);
            }
        }
        let accepted =
            matches!(&sent, Sent::V2 { .. }) && st.signed_accepted == stats.signed_accepted + 1;

        // 8. The ahead bounds are the model's.
        for w in 0..UUIDS {
            assert_eq!(
                self.node.key_state(&uuid(w)).map(|k| k.ahead),
                self.ahead.get(&w).copied(),
                "ahead bound of uuid {w} after {op:?}"
            );
        }

        // 2. Anything that was not accepted, and is not a v1 packet of a v1 uuid, or a key
        // update, push, time step or restart: nothing changes.
        let v1_keyed = matches!(&sent, Sent::V1 { p, .. }
            if who_of(&p.uuid).is_some_and(|w| keyed_before.contains(&w)));
        let inert = match &sent {
            Sent::Invalid => true,
            Sent::V2 { .. } => !accepted,
            Sent::V1 { .. } => v1_keyed,
            Sent::Other(_) => false,
        };
        if inert {
            assert_eq!(after, before, "{op:?} changed a record");
            assert!(
                self.written.is_empty(),
                "{op:?} journaled {:?}",
                self.written
            );
        }
        if inert && !v1_keyed {
            assert!(transmits.is_empty(), "{op:?} was answered: {transmits:?}");
        }

        // 3. A v1 packet naming a signed-only uuid: at most a bare v1 0x10 to its source.
        if let Sent::V1 { p, dest } = &sent {
            if v1_keyed {
                let w = who_of(&p.uuid).expect("pool uuid");
                let want: Vec<Transmit> = if p.msg == DeviceMsg::Heartbeat
                    && pending_before.get(&w).copied().unwrap_or(false)
                {
                    vec![Transmit {
                        dest: *dest,
                        payload: Payload::Down(ddpush_proto::codec::DownPacket {
                            app_id: p.app_id,
                            msg: DownMsg::Notify,
                        }),
                    }]
                } else {
                    Vec::new()
                };
                assert_eq!(transmits, want, "v1 packet for a signed-only uuid");
            }
        }

        // 4. A signed-only uuid's address moves only on an accepted signed heartbeat.
        for w in &keyed_before {
            let (Some(b), Some(a)) = (before.get(w), after.get(w)) else {
                continue;
            };
            match accepted_hb {
                Some((hw, Dest::Udp(src))) if hw == *w => {
                    assert_eq!(
                        a.addr,
                        Some(src),
                        "accepted signed heartbeat records its source"
                    )
                }
                Some((hw, Dest::Tcp(_))) if hw == *w => {}
                // Provisioning forgets it; a restart brings back the snapshot's (older) one.
                _ if matches!(op, Op::SetKey { .. } | Op::Restart) => {}
                _ => assert_eq!(a.addr, b.addr, "{op:?} moved a signed-only uuid's address"),
            }
        }

        // 5 and 7. What went out.
        let op_uuid = match &sent {
            Sent::Other(w) => *w,
            Sent::V1 { p, .. } => who_of(&p.uuid),
            Sent::V2 { .. } => answer.map(|a| a.0),
            Sent::Invalid => None,
        };
        for t in &transmits {
            match &t.payload {
                Payload::Sealed(s) => {
                    let w = op_uuid.unwrap_or_else(|| panic!("sealed packet after {op:?}: {t:?}"));
                    let keys = self
                        .keys
                        .get(&w)
                        .unwrap_or_else(|| panic!("sealed for v1 uuid {w}: {t:?}"));
                    let k = keys
                        .key_for(s.seal.key_id, self.now)
                        .unwrap_or_else(|| panic!("sealed under a key not valid now: {s:?}"));
                    let bytes = s.to_vec();
                    let opened = SealedDown::open(&bytes, |id| {
                        (id == s.seal.key_id).then(|| DeviceKey::new(k))
                    })
                    .unwrap_or_else(|e| panic!("sealed packet does not open ({e}): {s:?}"));
                    assert_eq!(&opened, s);
                    assert_eq!(s.seal.ts, self.now_s(), "stamped with the node's clock");
                    assert!(
                        self.allowed.get(&w).is_some_and(|a| a.contains(&t.dest)),
                        "sent for a signed-only uuid to {:?}, where it never proved itself",
                        t.dest
                    );
                    if let Some((aw, src, id)) = answer {
                        if aw == w && matches!(op, Op::Signed { .. } | Op::Replay { .. }) {
                            assert_eq!(t.dest, src, "answer goes back to its source");
                            assert_eq!(s.seal.key_id, id, "answer sealed under its key id");
                        }
                    }
                }
                Payload::Down(d) => {
                    if let Some(w) = op_uuid {
                        if self.keys.contains_key(&w) && keyed_before.contains(&w) {
                            assert!(
                                v1_keyed && d.msg == DownMsg::Notify,
                                "unsealed {d:?} for a signed-only uuid after {op:?}"
                            );
                        }
                    }
                }
                Payload::Reply(_) => panic!("a push reply on a device path: {t:?}"),
            }
        }
    }
}

fuzz_target!(|inp: Input| {
    let mut w = World::new(&inp);
    for op in inp.ops.iter().take(200) {
        w.step(op);
    }
});
