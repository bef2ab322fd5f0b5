//! Cluster node against the reference store, with hand-moved messages: the rules of
//! docs/CLUSTER.md one at a time. The simulator (sim/src/cluster) covers faults at scale.

use std::net::SocketAddr;
use std::time::Duration;

use ddpush_proto::cluster::{
    ClusterConfig, ClusterNode, MemStore, NodeId, OpId, StoreError, StoreOp, StoreReply,
};
use ddpush_proto::driver::{StoreConfirmed, WaitPolicy};
use ddpush_proto::Driver;
use ddpush_proto::{
    Config, Content, Dest, DeviceMsg, DevicePacket, Payload, Port, PushMsg, PushReply, PushRequest,
    Time, Uuid,
};

struct Cluster {
    store: MemStore,
    nodes: Vec<ClusterNode>,
    /// The turn driver of each node (the acceptance step: the store's confirmations).
    drivers: Vec<Driver>,
    now: Time,
    /// Store down: every op fails.
    store_down: bool,
    /// Pokes are dropped.
    drop_pokes: bool,
    /// Pushes are stored but reported as not replicated in time (a short Redis `WAIT`).
    unreplicated: bool,
    /// The acceptance step's replica policy.
    wait: WaitPolicy,
    /// Ops held back (not answered yet), per node.
    held: Vec<(usize, OpId, StoreOp)>,
    hold: bool,
    /// Datagrams to devices: (node, addr, bytes).
    udp: Vec<(usize, SocketAddr, Vec<u8>)>,
    /// Push replies: (node, conn, byte).
    replies: Vec<(usize, u64, u8)>,
    /// Packets to devices on TCP connections: (node, conn, bytes).
    tcp: Vec<(usize, u64, Vec<u8>)>,
    /// Device-port connections opened: (node, conn).
    tcp_open: Vec<(usize, u64)>,
}

const UUID: Uuid = Uuid([
    0x2e, 0x72, 0x36, 0x19, 0x24, 0xef, 0x37, 0xa6, 0x16, 0x6e, 0x0b, 0x22, 0x8d, 0x1c, 0xbb, 0xb0,
]);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

impl Cluster {
    fn new(n: usize) -> Self {
        let nodes = (0..n)
            .map(|i| {
                let id = NodeId(format!("n{i}"));
                let mut node =
                    ClusterNode::new(Config::default(), ClusterConfig::new(id)).expect("config");
                assert!(node.handle_tcp_open(Time::from_secs(1000), 1, Port::Push, addr(9999)));
                node
            })
            .collect();
        Cluster {
            store: MemStore::new(),
            drivers: (0..n).map(|_| Driver::new()).collect(),
            nodes,
            now: Time::from_secs(1000),
            store_down: false,
            drop_pokes: false,
            unreplicated: false,
            wait: WaitPolicy::default(),
            held: Vec::new(),
            hold: false,
            udp: Vec::new(),
            replies: Vec::new(),
            tcp: Vec::new(),
            tcp_open: Vec::new(),
        }
    }

    fn idx(&self, id: &NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id() == id)
            .expect("known node")
    }

    /// Moves every output until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some((id, op)) = self.nodes[i].poll_store() {
                    moved = true;
                    if self.hold {
                        self.held.push((i, id, op));
                        continue;
                    }
                    let r = if self.store_down {
                        Err(StoreError::Unavailable)
                    } else {
                        match self.store.apply(&op) {
                            StoreReply::Pushed(r) if self.unreplicated => {
                                Ok(StoreReply::PushedUnreplicated(r))
                            }
                            r => Ok(r),
                        }
                    };
                    self.nodes[i].handle_store(self.now, id, r);
                }
                // The turn's acceptance step, before any output leaves.
                let step = StoreConfirmed { wait: self.wait };
                let _ = self.drivers[i].end_turn(&mut self.nodes[i], step);
                while let Some((to, msg)) = self.nodes[i].poll_peer() {
                    moved = true;
                    if !self.drop_pokes {
                        let j = self.idx(&to);
                        self.nodes[j].handle_peer(self.now, msg);
                    }
                }
                while let Some(t) = self.nodes[i].poll_transmit() {
                    moved = true;
                    let mut b = Vec::new();
                    t.encode(&mut b);
                    match (t.dest, t.payload) {
                        (Dest::Udp(a), _) => self.udp.push((i, a, b)),
                        (Dest::Tcp(c), Payload::Reply(r)) => self.replies.push((i, c, r.byte())),
                        (Dest::Tcp(c), _) => self.tcp.push((i, c, b)),
                    }
                }
                while self.nodes[i].poll_event().is_some() {}
            }
            if !moved {
                return;
            }
        }
    }

    fn release(&mut self) {
        for (i, id, op) in std::mem::take(&mut self.held) {
            let r = self.store.apply(&op);
            self.nodes[i].handle_store(self.now, id, Ok(r));
        }
        self.settle();
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
        for n in &mut self.nodes {
            n.handle_timeout(self.now);
        }
        self.settle();
    }

    fn device(&mut self, node: usize, port: u16, msg: DeviceMsg) {
        let p = DevicePacket {
            app_id: 1,
            uuid: UUID,
            msg,
        };
        let mut b = Vec::new();
        p.encode(&mut b);
        self.nodes[node].handle_udp(self.now, addr(port), &b);
        self.settle();
    }

    /// A device packet on device-port TCP connection `conn` of `node` (opened if new).
    fn device_tcp(&mut self, node: usize, conn: u64, msg: DeviceMsg) {
        if !self.tcp_open.contains(&(node, conn)) {
            self.tcp_open.push((node, conn));
            let ok = self.nodes[node].handle_tcp_open(self.now, conn, Port::Device, addr(7000));
            assert!(ok, "connection {conn} admitted");
        }
        let p = DevicePacket {
            app_id: 1,
            uuid: UUID,
            msg,
        };
        let mut b = Vec::new();
        p.encode(&mut b);
        self.nodes[node].handle_tcp_data(self.now, conn, &b);
        self.settle();
    }

    fn take_tcp(&mut self) -> Vec<(usize, u64, String)> {
        std::mem::take(&mut self.tcp)
            .into_iter()
            .map(|(n, c, b)| (n, c, hex::encode(b)))
            .collect()
    }

    fn push(&mut self, node: usize, msg: PushMsg) -> u8 {
        let req = PushRequest {
            app_id: 1,
            uuid: UUID,
            msg,
        }
        .to_vec();
        let before = self.replies.len();
        self.nodes[node].handle_tcp_data(self.now, 1, &req);
        self.settle();
        self.replies.get(before).map_or(0xEE, |r| r.2)
    }

    fn take_udp(&mut self) -> Vec<(usize, String)> {
        std::mem::take(&mut self.udp)
            .into_iter()
            .map(|(n, _, b)| (n, hex::encode(b)))
            .collect()
    }

    fn store_ops(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.stats().store_ops.iter().sum::<u64>())
            .sum()
    }
}

#[test]
fn push_at_any_node_is_delivered_by_the_owner_with_the_golden_bytes() {
    let mut c = Cluster::new(3);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.nodes[0].stats().binds, 1);
    assert_eq!(c.push(1, PushMsg::Notify), 0x00);
    assert_eq!(c.push(2, PushMsg::Bits(5)), 0x00);
    assert_eq!(
        c.push(1, PushMsg::Payload(Content::from_static(b"hello"))),
        0x00
    );
    assert_eq!(
        c.take_udp(),
        vec![
            (0, "0100100000".to_string()),
            (0, "01001100080000000000000005".to_string()),
            (0, "010020000568656c6c6f".to_string()),
        ]
    );
    assert_eq!(c.nodes[1].stats().pokes[0], 2);
    assert_eq!(c.nodes[0].stats().pokes[1], 3);
}

#[test]
fn steady_heartbeats_never_touch_the_store() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    c.advance(Duration::from_secs(2));
    let before = c.store_ops();
    let drains_before: u64 = c.nodes.iter().map(|n| n.stats().store_ops[3]).sum();
    for _ in 0..20 {
        c.advance(Duration::from_secs(50));
        c.device(0, 4000, DeviceMsg::Heartbeat);
    }
    let drains: u64 = c.nodes.iter().map(|n| n.stats().store_ops[3]).sum::<u64>() - drains_before;
    assert_eq!(
        c.store_ops() - before,
        drains,
        "only periodic drains, no per-heartbeat op"
    );
    assert_eq!(c.nodes[0].stats().binds, 1);
}

#[test]
fn heartbeat_of_a_device_that_was_offline_binds_again() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    c.advance(Duration::from_secs(61));
    assert!(c.nodes[0].copy(&UUID).is_none(), "offline drops the copy");
    c.device(1, 4001, DeviceMsg::Heartbeat);
    assert_eq!(c.store.get(&UUID).map(|r| r.epoch), Some(2));
}

#[test]
fn store_down_push_gets_ff_and_heartbeats_get_cached_items() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.push(1, PushMsg::Bits(2)), 0x00);
    c.take_udp();
    c.store_down = true;
    assert_eq!(c.push(0, PushMsg::Notify), 0xFF);
    c.advance(Duration::from_secs(50));
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(
        c.take_udp(),
        vec![(0, "01011100080000000000000002".to_string())]
    );
    // The ack cannot be stored: the bits stay pending and come again.
    c.device(0, 4000, DeviceMsg::AckBits(2));
    c.advance(Duration::from_secs(50));
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.take_udp().len(), 1, "re-delivered, never lost");
    c.store_down = false;
    c.device(0, 4000, DeviceMsg::AckBits(2));
    assert_eq!(c.store.get(&UUID).map(|r| r.bits), Some(0));
}

#[test]
fn store_timeout_answers_ff() {
    let mut c = Cluster::new(1);
    c.hold = true;
    let before = c.replies.len();
    let req = PushRequest {
        app_id: 1,
        uuid: UUID,
        msg: PushMsg::Notify,
    }
    .to_vec();
    c.nodes[0].handle_tcp_data(c.now, 1, &req);
    c.settle();
    assert_eq!(c.replies.len(), before, "no reply before the store answers");
    c.advance(Duration::from_secs(1));
    assert_eq!(c.replies.last().map(|r| r.2), Some(0xFF));
    c.release(); // the late result is ignored
    assert_eq!(c.replies.len(), before + 1);
    // The push and the periodic drain held with it both came late.
    assert_eq!(c.nodes[0].stats().store_late, 2);
}

#[test]
fn pipelined_replies_keep_request_order() {
    let mut c = Cluster::new(1);
    c.hold = true;
    let mut bytes = PushRequest {
        app_id: 1,
        uuid: UUID,
        msg: PushMsg::Notify,
    }
    .to_vec();
    bytes.extend_from_slice(
        &hex::decode("0101302e72361924ef37a6166e0b228d1cbbb00000").expect("hex"),
    );
    c.nodes[0].handle_tcp_data(c.now, 1, &bytes);
    c.settle();
    assert!(
        c.replies.is_empty(),
        "the 0x01 waits behind the pending 0x00"
    );
    c.release();
    let got: Vec<u8> = c.replies.iter().map(|r| r.2).collect();
    assert_eq!(got, vec![0x00, 0x01]);
}

#[test]
fn old_ack_crossing_a_newer_push_at_another_node_does_not_clear_it() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    c.push(0, PushMsg::Payload(Content::from_static(b"old")));
    c.take_udp();
    // The newer push is stored at node 1, its poke is lost; the device acks "old".
    c.drop_pokes = true;
    c.push(1, PushMsg::Payload(Content::from_static(b"new")));
    c.device(0, 4000, DeviceMsg::AckPayload);
    let rec = c.store.get(&UUID).cloned().expect("record");
    assert_eq!(
        rec.payload.map(|p| p.1),
        Some(Content::from_static(b"new")),
        "the ack of the older send must not clear the newer payload"
    );
    // The ack's store reply carried the newer record: it goes out at once.
    assert_eq!(c.take_udp(), vec![(0, "01002000036e6577".to_string())]);
    c.device(0, 4000, DeviceMsg::AckPayload);
    assert!(c.store.get(&UUID).is_some_and(|r| r.payload.is_none()));
}

#[test]
fn a_lost_poke_is_found_by_the_drain() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    c.drop_pokes = true;
    c.push(1, PushMsg::Notify);
    assert!(c.take_udp().is_empty());
    c.advance(Duration::from_millis(1100));
    assert_eq!(c.take_udp(), vec![(0, "0100100000".to_string())]);
    assert!(c.nodes[0].stats().drained >= 1);
    // The mark is removed once handled.
    c.advance(Duration::from_millis(1100));
    assert_eq!(c.store.dirty_count(&NodeId::from("n0")), 0);
}

#[test]
fn a_stale_owner_never_clears_and_drops_its_copy() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    c.push(0, PushMsg::Notify);
    c.take_udp();
    // The device moves to node 1 (node 0 still thinks it owns it).
    c.nodes[1].handle_timeout(c.now);
    let p = DevicePacket {
        app_id: 1,
        uuid: UUID,
        msg: DeviceMsg::Heartbeat,
    };
    let mut b = Vec::new();
    p.encode(&mut b);
    c.hold = true;
    c.nodes[1].handle_udp(c.now, addr(5000), &b);
    c.settle();
    c.hold = false;
    c.release();
    assert_eq!(c.store.get(&UUID).map(|r| r.epoch), Some(2));
    // An ack reaching node 0 now cannot clear: node 0 is stale.
    c.device(0, 4000, DeviceMsg::AckNotify);
    assert!(c.store.get(&UUID).is_some_and(|r| r.notify.is_some()));
    assert!(c.nodes[0].copy(&UUID).is_none(), "stale copy dropped");
}

// ------------------------------------------------------------------------------------------
// The ack rule of issue 12 through cluster nodes (one rule, `ddpush_proto::ack`, both modes)
// ------------------------------------------------------------------------------------------

/// Steps of the sequences: as little as 0.15 s apart.
const STEP: Duration = Duration::from_millis(150);

/// `01 <app> 20 <len> <text>` as hex.
fn down_20(app: u8, text: &str) -> String {
    format!(
        "01{app:02x}20{:04x}{}",
        text.len(),
        hex::encode(text.as_bytes())
    )
}

fn payload(text: &'static str) -> PushMsg {
    PushMsg::Payload(Content::from_static(text.as_bytes()))
}

fn pending_payload(c: &Cluster) -> Option<Content> {
    c.store
        .get(&UUID)
        .and_then(|r| r.payload.as_ref().map(|p| p.1.clone()))
}

/// Case 1: heartbeat -> "three" (not acked); push "four" at another node (sent at once by the
/// owner); heartbeat -> "four"; one ack: the next heartbeat gets nothing. Steps 150 ms apart.
#[test]
fn compat_one_ack_of_the_resend_clears_through_a_cluster() {
    let mut c = Cluster::new(3);
    assert_eq!(c.push(1, payload("three")), 0x00);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.take_udp(), vec![(0, down_20(1, "three"))]);
    c.advance(STEP);
    assert_eq!(c.push(2, payload("four")), 0x00);
    assert_eq!(c.take_udp(), vec![(0, down_20(0, "four"))]);
    c.advance(STEP);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.take_udp(), vec![(0, down_20(1, "four"))]);
    c.advance(STEP);
    c.device(0, 4000, DeviceMsg::AckPayload);
    assert_eq!(pending_payload(&c), None, "the one ack cleared \"four\"");
    c.advance(STEP);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert!(c.take_udp().is_empty(), "nothing after the ack");
}

/// Case 1: an item sent on three heartbeats and acked once, then a new push at another node, a
/// heartbeat re-send and one ack: nothing more. For 0x20 and 0x10.
#[test]
fn compat_resends_acked_once_then_a_new_push_through_a_cluster() {
    for notify in [false, true] {
        let mut c = Cluster::new(2);
        let (first, second, ack) = if notify {
            (PushMsg::Notify, PushMsg::Notify, DeviceMsg::AckNotify)
        } else {
            (payload("x"), payload("y"), DeviceMsg::AckPayload)
        };
        let item = |hb: bool, text: &str| {
            let app = u8::from(hb);
            if notify {
                format!("01{app:02x}100000")
            } else {
                down_20(app, text)
            }
        };
        assert_eq!(c.push(1, first), 0x00);
        for _ in 0..3 {
            c.device(0, 4000, DeviceMsg::Heartbeat);
            assert_eq!(c.take_udp(), vec![(0, item(true, "x"))]);
            c.advance(STEP);
        }
        c.device(0, 4000, ack);
        let rec = c.store.get(&UUID).cloned().expect("record");
        assert!(
            rec.notify.is_none() && rec.payload.is_none(),
            "one ack cleared"
        );
        c.advance(STEP);
        assert_eq!(c.push(1, second), 0x00);
        assert_eq!(c.take_udp(), vec![(0, item(false, "y"))]);
        c.advance(STEP);
        c.device(0, 4000, DeviceMsg::Heartbeat);
        assert_eq!(c.take_udp(), vec![(0, item(true, "y"))]);
        c.advance(STEP);
        c.device(0, 4000, ack);
        c.advance(STEP);
        c.device(0, 4000, DeviceMsg::Heartbeat);
        assert!(c.take_udp().is_empty(), "notify={notify}: nothing more");
    }
}

/// Case 2: an immediate push (made at another node) acked at once is not re-sent.
#[test]
fn sdk_acked_immediate_push_is_not_resent_through_a_cluster() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.push(1, payload("hello")), 0x00);
    assert_eq!(c.take_udp(), vec![(0, down_20(0, "hello"))]);
    c.device(0, 4000, DeviceMsg::AckPayload);
    assert_eq!(pending_payload(&c), None);
    c.advance(Duration::from_secs(50));
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert!(c.take_udp().is_empty());
}

/// Case 2: the app is killed (still online for the node); "one" and "two" go out at once to the
/// dead socket; the app comes back on a new socket, at the same node or (the load balancer moved
/// it) at another: its first heartbeat gets "two", the SDK's ack clears it, nothing more comes.
#[test]
fn sdk_new_socket_after_sends_to_the_dead_one_through_a_cluster() {
    for back_at in [0, 1] {
        let mut c = Cluster::new(3);
        c.device(0, 4000, DeviceMsg::Heartbeat);
        assert_eq!(c.push(2, payload("one")), 0x00);
        assert_eq!(c.push(2, payload("two")), 0x00);
        assert_eq!(c.take_udp().len(), 2, "both sent to the dead socket");
        c.advance(Duration::from_secs(3));
        c.device(back_at, 4001, DeviceMsg::Heartbeat);
        assert_eq!(c.take_udp(), vec![(back_at, down_20(1, "two"))]);
        c.device(back_at, 4001, DeviceMsg::AckPayload);
        assert_eq!(
            pending_payload(&c),
            None,
            "back at node {back_at}: the ack cleared"
        );
        c.advance(Duration::from_secs(2));
        c.device(back_at, 4001, DeviceMsg::Heartbeat);
        assert!(
            c.take_udp().is_empty(),
            "back at node {back_at}: no duplicate"
        );
    }
}

/// Case 3: heartbeat -> "A"; push "B" at another node (the owner's immediate send is lost); the
/// ack of "A" arrives after "B" was pushed: "B" comes with the next heartbeat, and the ack of
/// that re-send stops it. The same for the 0x10 flag. With the poke delivered the owner's ledger
/// attributes the ack to the older send (no store op at all); with the poke lost the store's
/// compare refuses it (the other test above).
#[test]
fn ack_of_an_older_send_does_not_clear_a_newer_push_made_at_another_node() {
    for notify in [false, true] {
        let mut c = Cluster::new(2);
        let (a, b, ack) = if notify {
            (PushMsg::Notify, PushMsg::Notify, DeviceMsg::AckNotify)
        } else {
            (payload("A"), payload("B"), DeviceMsg::AckPayload)
        };
        assert_eq!(c.push(0, a), 0x00);
        c.device(0, 4000, DeviceMsg::Heartbeat);
        assert_eq!(c.take_udp().len(), 1, "A");
        c.advance(STEP);
        assert_eq!(c.push(1, b), 0x00);
        assert_eq!(c.take_udp().len(), 1, "B's immediate send (lost)");
        let acks_before = c.nodes[0].stats().store_ops[1];
        c.device(0, 4000, ack);
        assert_eq!(
            c.nodes[0].stats().store_ops[1],
            acks_before,
            "attributed to the older send: no ack op"
        );
        let rec = c.store.get(&UUID).cloned().expect("record");
        assert!(
            rec.notify.is_some() || rec.payload.is_some(),
            "notify={notify}: the newer push is still pending"
        );
        c.advance(Duration::from_secs(50));
        c.device(0, 4000, DeviceMsg::Heartbeat);
        let want = if notify {
            "0101100000".to_string()
        } else {
            down_20(1, "B")
        };
        assert_eq!(c.take_udp(), vec![(0, want)]);
        c.device(0, 4000, ack);
        let rec = c.store.get(&UUID).cloned().expect("record");
        assert!(
            rec.notify.is_none() && rec.payload.is_none(),
            "the re-send's ack clears"
        );
        c.advance(Duration::from_secs(50));
        c.device(0, 4000, DeviceMsg::Heartbeat);
        assert!(c.take_udp().is_empty());
    }
}

/// Case 3 over a device TCP connection: "B" pushed at another node is on the stream when the
/// device acks "A"; the device then acks both copies of "B" it reads.
#[test]
fn ack_of_an_older_send_does_not_clear_a_newer_push_over_tcp() {
    let mut c = Cluster::new(2);
    assert_eq!(c.push(1, payload("A")), 0x00);
    c.device_tcp(0, 7, DeviceMsg::Heartbeat);
    assert_eq!(c.take_tcp(), vec![(0, 7, down_20(1, "A"))]);
    c.advance(STEP);
    assert_eq!(c.push(1, payload("B")), 0x00);
    assert_eq!(c.take_tcp(), vec![(0, 7, down_20(0, "B"))]);
    c.device_tcp(0, 7, DeviceMsg::AckPayload); // the ack of A
    assert_eq!(pending_payload(&c), Some(Content::from_static(b"B")));
    c.advance(Duration::from_secs(50));
    c.device_tcp(0, 7, DeviceMsg::Heartbeat);
    assert_eq!(c.take_tcp(), vec![(0, 7, down_20(1, "B"))]);
    c.device_tcp(0, 7, DeviceMsg::AckPayload);
    c.device_tcp(0, 7, DeviceMsg::AckPayload);
    assert_eq!(pending_payload(&c), None);
}

/// Acks count only from the path the sends went to: an ack from another UDP address of the same
/// uuid clears nothing.
#[test]
fn an_ack_from_another_address_does_not_clear() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.push(1, payload("p")), 0x00);
    c.take_udp();
    c.device(0, 4999, DeviceMsg::AckPayload);
    assert_eq!(pending_payload(&c), Some(Content::from_static(b"p")));
    assert_eq!(c.nodes[0].stats().acks_unattributed, 1);
    c.device(0, 4000, DeviceMsg::AckPayload);
    assert_eq!(pending_payload(&c), None);
}

/// A copy dropped (the device was bound elsewhere) supersedes its sends: a late ack of a send
/// made under the old epoch, arriving after the device came back and was bound again, clears
/// nothing; the ack of the send made under the new epoch does.
#[test]
fn a_late_ack_of_a_send_under_an_old_epoch_never_clears() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.push(0, payload("p")), 0x00);
    assert_eq!(
        c.take_udp().len(),
        1,
        "sent under epoch 1, its ack still on the way"
    );
    // The device shows up at node 1 (bound there, epoch 2); node 0 learns it from the reply
    // to a 0x11 pushed through it, which names the new owner.
    c.device(1, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.take_udp(), vec![(1, down_20(1, "p"))]);
    assert_eq!(c.push(0, PushMsg::Bits(1)), 0x00);
    assert!(c.nodes[0].copy(&UUID).is_none(), "node 0 dropped its copy");
    c.device(1, 4000, DeviceMsg::AckBits(1));
    c.take_udp();
    // ...and back at node 0 within the ack window of node 0's send: epoch 3.
    c.advance(Duration::from_millis(50));
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.store.get(&UUID).map(|r| r.epoch), Some(3));
    assert_eq!(c.take_udp(), vec![(0, down_20(1, "p"))]);
    c.device(0, 4000, DeviceMsg::AckPayload); // the late ack of the epoch-1 send
    assert_eq!(pending_payload(&c), Some(Content::from_static(b"p")));
    c.device(0, 4000, DeviceMsg::AckPayload); // the ack of the epoch-3 send
                                              // The epoch-3 send crossed the superseded epoch-1 send, which may have carried another
                                              // generation: a duplicate of it would look like this ack (`ack::Attribution::Crossed`), so
                                              // it clears nothing. The next heartbeat settles the old send; the re-send's ack clears.
    assert_eq!(pending_payload(&c), Some(Content::from_static(b"p")));
    c.advance(Duration::from_secs(1));
    c.device(0, 4000, DeviceMsg::Heartbeat);
    assert_eq!(c.take_udp(), vec![(0, down_20(1, "p"))]);
    c.device(0, 4000, DeviceMsg::AckPayload);
    assert_eq!(pending_payload(&c), None);
}

// ---------------------------------------------------------------------------------------------
// The acceptance step (`Driver::end_turn` with `StoreConfirmed`): the driver the single node
// uses, with the cluster's rule.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_push_the_replicas_did_not_confirm_is_ff_and_unsent_unless_the_policy_accepts_it() {
    for (wait, want, sent) in [(WaitPolicy::Refuse, 0xFF, 0), (WaitPolicy::Accept, 0x00, 1)] {
        let mut c = Cluster::new(1);
        c.wait = wait;
        c.device(0, 4000, DeviceMsg::Heartbeat);
        c.take_udp();
        c.unreplicated = true;
        assert_eq!(c.push(0, PushMsg::Notify), want, "{wait:?}");
        assert_eq!(c.take_udp().len(), sent, "{wait:?}: sent at once");
        let s = c.nodes[0].stats();
        assert_eq!(s.unreplicated_refused, 1 - sent as u64, "{wait:?}");
        assert_eq!(s.store_errors, 0, "a short WAIT is not a store error");
        // Either way the push is in the store: under Refuse the owner's next drain brings it
        // (the app server's retry is then a duplicate, never a loss).
        assert!(c.store.get(&UUID).and_then(|r| r.notify).is_some());
        c.unreplicated = false;
        c.advance(Duration::from_secs(2));
        assert_eq!(c.take_udp().len(), 1 - sent, "{wait:?}: sent by the drain");
        assert_eq!(
            c.drivers[0].storage_ok(),
            sent == 1,
            "{wait:?}: durability health"
        );
    }
}

#[test]
fn a_front_end_push_through_the_driver_is_answered_once_the_store_confirmed_it() {
    let mut c = Cluster::new(2);
    c.device(0, 4000, DeviceMsg::Heartbeat);
    c.take_udp();
    let req = |msg| PushRequest {
        app_id: 1,
        uuid: UUID,
        msg,
    };
    c.hold = true;
    let now = c.now;
    let t = c.drivers[1].handle_push(&mut c.nodes[1], now, req(PushMsg::Notify));
    c.settle();
    assert_eq!(
        c.drivers[1].poll_reply(),
        None,
        "no answer before the store"
    );
    assert_eq!(c.drivers[1].undecided(), 1);
    c.hold = false;
    c.release();
    assert_eq!(c.drivers[1].poll_reply(), Some((t, PushReply::Accepted)));
    assert_eq!(
        c.take_udp(),
        vec![(0, "0100100000".to_string())],
        "delivered by the owner"
    );
    // The store down: 0xFF, and the durability episode starts once.
    c.store_down = true;
    let t = c.drivers[1].handle_push(&mut c.nodes[1], now, req(PushMsg::Bits(1)));
    c.settle();
    assert_eq!(c.drivers[1].poll_reply(), Some((t, PushReply::Failed)));
    assert!(!c.drivers[1].storage_ok());
    // A payload over max_content is 0x01 at once, with no store operation.
    let ops = c.store_ops();
    let big = Content::new(vec![b'x'; 501]).expect("content");
    let t = c.drivers[1].handle_push(&mut c.nodes[1], now, req(PushMsg::Payload(big)));
    c.settle();
    assert_eq!(c.drivers[1].poll_reply(), Some((t, PushReply::Rejected)));
    assert_eq!(c.store_ops(), ops);
    assert_eq!(c.drivers[1].undecided(), 0);
}

#[test]
#[should_panic(expected = "acceptance step")]
#[cfg(debug_assertions)]
fn polling_a_transmit_before_the_acceptance_step_panics_in_debug_builds() {
    let mut n = ClusterNode::new(Config::default(), ClusterConfig::new("n0".into())).expect("cfg");
    assert!(n.handle_tcp_open(Time::from_secs(1), 1, Port::Push, addr(9999)));
    let req = PushRequest {
        app_id: 1,
        uuid: UUID,
        msg: PushMsg::Notify,
    }
    .to_vec();
    n.handle_tcp_data(Time::from_secs(1), 1, &req);
    let mut store = MemStore::new();
    while let Some((id, op)) = n.poll_store() {
        let r = store.apply(&op);
        n.handle_store(Time::from_secs(1), id, Ok(r));
    }
    let _ = n.poll_transmit();
}

/// Fuzz finding 13 on a cluster node (the single node's test is in rules.rs): the ack of a send
/// made on a connection before another replaced it, arriving after it was attached again, must
/// not clear the newer 0x10 sent since.
#[test]
fn a_connection_attached_again_answers_its_old_sends_first() {
    let mut c = Cluster::new(1);
    c.device_tcp(0, 10, DeviceMsg::Heartbeat);
    assert_eq!(c.push(0, PushMsg::Notify), 0x00); // version 1, sent on 10
    c.device_tcp(0, 11, DeviceMsg::Heartbeat); // 11 replaces 10: version 1 again, on 11
    assert_eq!(c.push(0, PushMsg::Notify), 0x00); // version 2, sent on 11
    c.device_tcp(0, 10, DeviceMsg::Heartbeat); // 10 again: version 2, on 10
    let sent: Vec<_> = c.take_tcp().into_iter().map(|(_, conn, _)| conn).collect();
    assert_eq!(sent, vec![10, 11, 11, 10]);
    c.device_tcp(0, 10, DeviceMsg::AckNotify); // the ack of version 1's send on 10
    c.device_tcp(0, 10, DeviceMsg::Heartbeat);
    let again: Vec<_> = c.take_tcp().into_iter().map(|(_, conn, _)| conn).collect();
    assert_eq!(
        again,
        vec![10],
        "version 2 is still pending: the old send's ack cleared nothing"
    );
    c.device_tcp(0, 10, DeviceMsg::AckNotify); // version 2's ack
    c.device_tcp(0, 10, DeviceMsg::AckNotify); // the re-send's
    c.device_tcp(0, 10, DeviceMsg::Heartbeat);
    assert!(c.take_tcp().is_empty(), "acked: nothing more");
}
