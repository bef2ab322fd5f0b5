//! Model-based test: random operation lists against a reference model of PROTOCOL.md 4 and 8.
//!
//! Three devices (one uuid each, two UDP source ports, an optional TCP stream) obey the SDK:
//! every received message is acked, the acks leave within a few seconds (always inside
//! `ack_horizon`) and may be lost, as may any datagram to the device. Checked after every
//! operation and at the end:
//! * the 0x11 mask equals pushes OR'ed minus the bits of acks that arrived (bits are cleared
//!   only by an ack carrying them);
//! * a pending 0x20 is the last one pushed, and a cleared 0x20/0x10 was seen by the device
//!   after its last push (no accepted message is lost, however acks and pushes interleave);
//! * restore(snapshot) + replay of the changes since equals the live `pending()`;
//! * after a final loss-free heartbeat and ack round, more than `ack_horizon` after the last
//!   push, the device has seen the last payload and the next heartbeat sends nothing;
//! * the same operations on a second node give the same outputs (determinism).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;

use common::*;
use ddpush_proto::testing::{Harness, Output};
use ddpush_proto::{
    Change, ConnId, DeviceMsg, DownMsg, Node, Payload, Port, PushMsg, RecordState, Time, Uuid,
};
use proptest::prelude::*;

const DEVICES: u8 = 3;

#[derive(Clone, Debug)]
enum Op {
    PushNotify { dev: u8, lose: bool },
    PushBits { dev: u8, bit: u8, lose: bool },
    PushPayload { dev: u8, lose: bool },
    Heartbeat { dev: u8, port: u8, lose: bool },
    FlushAcks { dev: u8, lose: bool },
    Step { ms: u32 },
    TcpOpen { dev: u8 },
    TcpHeartbeat { dev: u8 },
    TcpClose { dev: u8 },
    Snapshot,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0..DEVICES;
    prop_oneof![
        3 => (dev.clone(), any::<bool>()).prop_map(|(dev, lose)| Op::PushNotify { dev, lose }),
        3 => (dev.clone(), 0u8..6, any::<bool>())
            .prop_map(|(dev, bit, lose)| Op::PushBits { dev, bit, lose }),
        4 => (dev.clone(), any::<bool>()).prop_map(|(dev, lose)| Op::PushPayload { dev, lose }),
        5 => (dev.clone(), 0u8..2, prop::bool::weighted(0.3))
            .prop_map(|(dev, port, lose)| Op::Heartbeat { dev, port, lose }),
        5 => (dev.clone(), prop::bool::weighted(0.3))
            .prop_map(|(dev, lose)| Op::FlushAcks { dev, lose }),
        5 => prop_oneof![0u32..3_000, 0u32..120_001].prop_map(|ms| Op::Step { ms }),
        1 => dev.clone().prop_map(|dev| Op::TcpOpen { dev }),
        2 => dev.clone().prop_map(|dev| Op::TcpHeartbeat { dev }),
        1 => dev.prop_map(|dev| Op::TcpClose { dev }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Restart),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Udp,
    Tcp,
}

#[derive(Default)]
struct Device {
    port: Option<u8>,
    conn: Option<ConnId>,
    /// Acks not yet sent: (ack, transport it answers, when queued).
    outbox: Vec<(DeviceMsg, Via, Time)>,
    seen_payloads: HashSet<Vec<u8>>,
    /// Operation index at which a 0x10 last arrived.
    notify_seen: Option<usize>,
    // Reference model of the record.
    mask: u64,
    last_payload: Option<Vec<u8>>,
    notify_pushed: Option<usize>,
}

fn dev_uuid(d: u8) -> Uuid {
    uuid(100 + u32::from(d))
}

fn dev_addr(d: u8, port: u8) -> SocketAddr {
    addr(u16::from(d) + 1, 5000 + u16::from(port))
}

struct World {
    h: Harness,
    devs: Vec<Device>,
    snap: Vec<RecordState>,
    since_snap: Vec<Change>,
    trace: Vec<(Time, Output)>,
    step: usize,
    next_payload: u32,
}

impl World {
    fn new() -> Self {
        let mut h = Harness::new(unlimited()).unwrap().with_trace();
        h.advance(secs(1_000));
        World {
            h,
            devs: (0..DEVICES).map(|_| Device::default()).collect(),
            snap: Vec::new(),
            since_snap: Vec::new(),
            trace: Vec::new(),
            step: 0,
            next_payload: 0,
        }
    }

    fn owner_of_addr(&self, a: SocketAddr) -> u8 {
        (0..DEVICES)
            .find(|&d| (0..2).any(|p| dev_addr(d, p) == a))
            .expect("datagram to an unknown address")
    }

    /// Routes every transmit to its device; UDP ones are dropped if `lose_udp`.
    fn deliver(&mut self, lose_udp: bool) {
        let now = self.h.now();
        for t in self.h.take_transmits() {
            let (d, via) = match t.dest {
                ddpush_proto::Dest::Udp(a) => {
                    if lose_udp {
                        continue;
                    }
                    (self.owner_of_addr(a), Via::Udp)
                }
                ddpush_proto::Dest::Tcp(c) => {
                    let d = (0..DEVICES)
                        .find(|&d| self.devs[usize::from(d)].conn == Some(c))
                        .expect("bytes for a connection no device holds");
                    (d, Via::Tcp)
                }
            };
            let Payload::Down(p) = t.payload else {
                panic!("push reply on a device path");
            };
            let dev = &mut self.devs[usize::from(d)];
            let ack = match p.msg {
                DownMsg::Notify => {
                    dev.notify_seen = Some(self.step);
                    DeviceMsg::AckNotify
                }
                DownMsg::Bits(m) => {
                    assert_eq!(m, dev.mask, "the whole mask is sent");
                    DeviceMsg::AckBits(m)
                }
                DownMsg::Payload(b) => {
                    assert_eq!(
                        Some(&b[..]),
                        dev.last_payload.as_deref(),
                        "only the last payload is ever sent"
                    );
                    dev.seen_payloads.insert(b.to_vec());
                    DeviceMsg::AckPayload
                }
                DownMsg::HeartbeatReply => panic!("policy never: no heartbeat reply"),
            };
            dev.outbox.push((ack, via, now));
        }
    }

    fn flush(&mut self, d: u8, lose: bool) {
        let dv = &mut self.devs[usize::from(d)];
        let acks = std::mem::take(&mut dv.outbox);
        let (conn, port) = (dv.conn, dv.port);
        for (msg, via, _) in acks {
            if lose {
                continue;
            }
            let u = dev_uuid(d);
            match (via, conn, port) {
                (Via::Tcp, Some(c), _) => {
                    let mut b = Vec::new();
                    ddpush_proto::DevicePacket {
                        app_id: 1,
                        uuid: u,
                        msg,
                    }
                    .encode(&mut b);
                    self.h.tcp_data(c, &b);
                }
                (_, _, Some(p)) => self.h.ack(dev_addr(d, p), 1, u, msg),
                _ => continue,
            }
            // The node's view of the mask: an ack clears exactly what it carries.
            if let DeviceMsg::AckBits(m) = msg {
                self.devs[usize::from(d)].mask &= !m;
            }
            self.deliver(false);
        }
    }

    fn apply(&mut self, op: &Op) {
        self.step += 1;
        match *op {
            Op::PushNotify { dev, lose } => {
                assert_eq!(self.h.push(dev_uuid(dev), PushMsg::Notify).byte(), 0);
                self.devs[usize::from(dev)].notify_pushed = Some(self.step);
                self.deliver(lose);
            }
            Op::PushBits { dev, bit, lose } => {
                let b = 1u64 << (bit * 11);
                self.devs[usize::from(dev)].mask |= b;
                assert_eq!(self.h.push(dev_uuid(dev), PushMsg::Bits(b)).byte(), 0);
                self.deliver(lose);
            }
            Op::PushPayload { dev, lose } => {
                self.next_payload += 1;
                let p = format!("payload-{}", self.next_payload).into_bytes();
                self.devs[usize::from(dev)].last_payload = Some(p.clone());
                assert_eq!(self.h.push(dev_uuid(dev), payload(&p)).byte(), 0);
                self.deliver(lose);
            }
            Op::Heartbeat { dev, port, lose } => {
                self.devs[usize::from(dev)].port = Some(port);
                self.h.heartbeat(dev_addr(dev, port), 1, dev_uuid(dev));
                self.deliver(lose);
            }
            Op::FlushAcks { dev, lose } => self.flush(dev, lose),
            Op::Step { ms } => {
                // Acks leave the device well within ack_horizon (10 s) of the send.
                let to = self.h.now() + millis(u64::from(ms));
                for d in 0..DEVICES {
                    let oldest = self.devs[usize::from(d)].outbox.first().map(|a| a.2);
                    if oldest.is_some_and(|t| to >= t + secs(8)) {
                        self.flush(d, false);
                    }
                }
                self.h.advance_to(to);
                self.deliver(false);
            }
            Op::TcpOpen { dev } => {
                if self.devs[usize::from(dev)].conn.is_none() {
                    let c = self.h.tcp_open(Port::Device, dev_addr(dev, 9)).unwrap();
                    self.devs[usize::from(dev)].conn = Some(c);
                }
            }
            Op::TcpHeartbeat { dev } => {
                if let Some(c) = self.devs[usize::from(dev)].conn {
                    let mut b = Vec::new();
                    ddpush_proto::DevicePacket {
                        app_id: 1,
                        uuid: dev_uuid(dev),
                        msg: DeviceMsg::Heartbeat,
                    }
                    .encode(&mut b);
                    self.h.tcp_data(c, &b);
                    self.deliver(false);
                }
            }
            Op::TcpClose { dev } => {
                if let Some(c) = self.devs[usize::from(dev)].conn.take() {
                    self.h.tcp_close(c);
                }
            }
            Op::Snapshot => {
                self.collect();
                self.snap = self.h.node.records().collect();
                self.since_snap.clear();
            }
            Op::Restart => {
                self.collect();
                let node = self.restored();
                let now = self.h.now();
                assert_eq!(node.pending(), self.h.node.pending(), "restore + replay");
                self.h = Harness::with_node(node, now).with_trace();
                for d in &mut self.devs {
                    d.conn = None;
                }
            }
        }
        // An adapter connection close must not leave stray TCP bytes behind.
        for c in self.h.take_closes() {
            for d in &mut self.devs {
                if d.conn == Some(c) {
                    d.conn = None;
                }
            }
        }
        self.collect();
        self.check();
    }

    /// Moves drained changes to the journal and outputs to the trace.
    fn collect(&mut self) {
        self.since_snap.extend(self.h.take_changes());
        if let Some(t) = &mut self.h.trace {
            self.trace.append(t);
        }
        self.h.take_events();
    }

    fn restored(&self) -> Node {
        let mut node = Node::new(self.h.node.config().clone()).unwrap();
        for r in &self.snap {
            node.restore(self.h.now(), r.clone());
        }
        for c in &self.since_snap {
            node.apply(c);
        }
        node
    }

    fn check(&self) {
        for d in 0..DEVICES {
            let dev = &self.devs[usize::from(d)];
            let rec = self.h.node.record(&dev_uuid(d));
            let (notify, bits, payload) = rec
                .map(|r| (r.notify, r.bits, r.payload.map(|p| p.to_vec())))
                .unwrap_or((false, 0, None));
            assert_eq!(bits, dev.mask, "dev {d}: 0x11 mask");
            match (&payload, &dev.last_payload) {
                (Some(p), last) => assert_eq!(Some(p), last.as_ref(), "dev {d}: last wins"),
                (None, Some(last)) => assert!(
                    dev.seen_payloads.contains(last),
                    "dev {d}: payload {:?} cleared but never delivered",
                    String::from_utf8_lossy(last)
                ),
                (None, None) => {}
            }
            if let (false, Some(pushed)) = (notify, dev.notify_pushed) {
                assert!(
                    dev.notify_seen.is_some_and(|s| s >= pushed),
                    "dev {d}: 0x10 pushed at op {pushed} cleared but last seen at {:?}",
                    dev.notify_seen
                );
            }
        }
    }

    /// The final round: every device heartbeats without loss and acks everything, more than
    /// ack_horizon after the last push; then nothing is pending and nothing is re-sent.
    fn finish(&mut self) {
        self.apply(&Op::Step { ms: 11_000 });
        for d in 0..DEVICES {
            let port = self.devs[usize::from(d)].port.unwrap_or(0);
            self.apply(&Op::Heartbeat {
                dev: d,
                port,
                lose: false,
            });
            self.apply(&Op::FlushAcks {
                dev: d,
                lose: false,
            });
        }
        self.apply(&Op::Step { ms: 1_000 });
        assert!(self
            .h
            .node
            .pending()
            .iter()
            .all(|p| !p.notify && p.bits == 0 && p.payload.is_none()));
        for d in 0..DEVICES {
            let dev = &self.devs[usize::from(d)];
            if let Some(last) = &dev.last_payload {
                assert!(
                    dev.seen_payloads.contains(last),
                    "dev {d}: last payload seen"
                );
            }
            let port = dev.port.unwrap_or(0);
            self.h.heartbeat(dev_addr(d, port), 1, dev_uuid(d));
            assert!(
                self.h.take_transmits().is_empty(),
                "dev {d}: nothing re-sent after a full ack round"
            );
        }
        self.collect();
        let node = self.restored();
        assert_eq!(
            node.pending(),
            self.h.node.pending(),
            "restore + replay at the end"
        );
    }
}

fn run(ops: &[Op]) -> Vec<(Time, Output)> {
    let mut w = World::new();
    for op in ops {
        w.apply(op);
    }
    w.finish();
    w.trace
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn node_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let a = run(&ops);
        let b = run(&ops);
        prop_assert!(!a.is_empty());
        prop_assert!(a == b, "two runs of the same operations differ");
    }
}

/// A fixed interleaving that needs the ack rule: a push lands between a send and its ack.
#[test]
fn model_catches_the_classic_race() {
    let ops = [
        Op::Heartbeat {
            dev: 0,
            port: 0,
            lose: false,
        },
        Op::PushPayload {
            dev: 0,
            lose: false,
        },
        Op::PushPayload { dev: 0, lose: true },
        Op::FlushAcks {
            dev: 0,
            lose: false,
        },
        Op::Step { ms: 50_000 },
        Op::Restart,
        // Acks right after a restart are not trusted for ack_horizon.
        Op::Step { ms: 11_000 },
        Op::Heartbeat {
            dev: 0,
            port: 1,
            lose: false,
        },
        Op::FlushAcks {
            dev: 0,
            lose: false,
        },
    ];
    let mut w = World::new();
    for op in &ops {
        w.apply(op);
    }
    assert!(w.h.node.record(&dev_uuid(0)).unwrap().payload.is_none());
    assert!(w.devs[0].seen_payloads.contains(b"payload-2".as_slice()));
    w.finish();
}
