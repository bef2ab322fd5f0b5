//! The pending ttl in cluster mode: the store's record of a device expires `pending_ttl` after
//! its last push or bind, so an owner whose device stays online renews it (a bind) at the first
//! heartbeat once half the ttl is gone. Without that, the record (and its owner field) would
//! expire under a node that still serves the device from its copy, and a push at another node
//! would create an ownerless record that nobody pokes the owner about.

use std::net::SocketAddr;
use std::time::Duration;

use ddpush_proto::cluster::{ClusterConfig, ClusterNode, MemStore, NodeId, StoreOp};
use ddpush_proto::driver::StoreConfirmed;
use ddpush_proto::Driver;
use ddpush_proto::{Config, DeviceMsg, DevicePacket, Port, PushMsg, PushRequest, Time, Uuid};

const UUID: Uuid = Uuid([7; 16]);
const TTL: Duration = Duration::from_secs(600);
const T0: u64 = 10_000;

fn addr() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 9], 4000))
}

struct Two {
    store: MemStore,
    nodes: [ClusterNode; 2],
    drivers: [Driver; 2],
    binds: usize,
}

impl Two {
    fn new() -> Self {
        let cfg = Config {
            pending_ttl: TTL,
            ..Config::default()
        };
        let node = |i: usize| {
            let mut n = ClusterNode::new(cfg.clone(), ClusterConfig::new(NodeId(format!("n{i}"))))
                .expect("config");
            assert!(n.handle_tcp_open(Time::from_secs(T0), 1, Port::Push, addr()));
            n
        };
        Two {
            store: MemStore::new(),
            nodes: [node(0), node(1)],
            drivers: [Driver::new(), Driver::new()],
            binds: 0,
        }
    }

    /// Runs every store operation (counting binds) and poke until nothing moves.
    fn settle(&mut self, now: Time) {
        loop {
            let mut moved = false;
            for i in 0..2 {
                while let Some((id, op)) = self.nodes[i].poll_store() {
                    moved = true;
                    if matches!(op, StoreOp::Bind { .. }) {
                        self.binds += 1;
                    }
                    let r = self.store.apply(&op);
                    self.nodes[i].handle_store(now, id, Ok(r));
                }
                let _ = self.drivers[i].end_turn(&mut self.nodes[i], StoreConfirmed::default());
                while let Some((_, msg)) = self.nodes[i].poll_peer() {
                    moved = true;
                    self.nodes[1 - i].handle_peer(now, msg);
                }
                while self.nodes[i].poll_transmit().is_some() {}
                while self.nodes[i].poll_event().is_some() {}
            }
            if !moved {
                return;
            }
        }
    }

    fn heartbeat(&mut self, secs: u64) {
        let now = Time::from_secs(T0 + secs);
        let mut b = Vec::new();
        DevicePacket {
            app_id: 1,
            uuid: UUID,
            msg: DeviceMsg::Heartbeat,
        }
        .encode(&mut b);
        self.nodes[0].handle_udp(now, addr(), &b);
        self.settle(now);
    }

    fn push_at_n1(&mut self, secs: u64) {
        let now = Time::from_secs(T0 + secs);
        let mut b = Vec::new();
        PushRequest {
            app_id: 1,
            uuid: UUID,
            msg: PushMsg::Bits(1),
        }
        .encode(&mut b);
        self.nodes[1].handle_tcp_data(now, 1, &b);
        self.settle(now);
    }
}

#[test]
fn an_online_owner_renews_its_record_once_half_the_ttl_is_gone() {
    let mut c = Two::new();
    c.heartbeat(0);
    assert_eq!(c.binds, 1, "first contact binds");
    let epoch = c.store.get(&UUID).expect("record").epoch;
    // Heartbeats every 50 s up to half the ttl cost the store nothing.
    for s in (50..300).step_by(50) {
        c.heartbeat(s);
    }
    assert_eq!(c.binds, 1, "no store operation before half the ttl");
    c.heartbeat(300);
    assert_eq!(c.binds, 2, "the first heartbeat at half the ttl renews");
    let r = c.store.get(&UUID).expect("record");
    assert_eq!(r.owner, Some(NodeId("n0".into())));
    assert_eq!(r.epoch, epoch + 1);
    assert!(c.nodes[0].copy(&UUID).is_some(), "served from the new copy");
    // The next heartbeats are free again until the next half ttl.
    for s in (350..600).step_by(50) {
        c.heartbeat(s);
    }
    assert_eq!(c.binds, 2);
    c.heartbeat(600);
    assert_eq!(c.binds, 3);
}

#[test]
fn a_push_restarts_the_ttl_so_it_delays_the_renewal() {
    let mut c = Two::new();
    for s in [0, 50, 100, 150, 200] {
        c.heartbeat(s);
    }
    // A push at the other node restarts the record's expiry; the owner learns it (poke) and
    // counts half the ttl from the push.
    c.push_at_n1(200);
    assert_eq!(
        c.nodes[0].copy(&UUID).map(|r| r.bits),
        Some(1),
        "the poke reached the owner"
    );
    for s in (250..500).step_by(50) {
        c.heartbeat(s);
    }
    assert_eq!(c.binds, 1, "renewal counted from the push at 200 s");
    c.heartbeat(500);
    assert_eq!(c.binds, 2);
}

#[test]
fn a_ttl_shorter_than_two_windows_renews_one_window_before_it_ends() {
    // ttl 100 s, online window 60 s: renew after 40 s, so a device heartbeating every 50 s
    // renews at every heartbeat from then on and its record never expires while online.
    let cfg = Config {
        pending_ttl: Duration::from_secs(100),
        ..Config::default()
    };
    let mut n = ClusterNode::new(cfg, ClusterConfig::new(NodeId("n0".into()))).expect("cfg");
    let mut store = MemStore::new();
    let mut binds = 0;
    let mut b = Vec::new();
    DevicePacket {
        app_id: 1,
        uuid: UUID,
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut b);
    for (s, want) in [(0, 1), (30, 1), (45, 2), (80, 2), (90, 3)] {
        let now = Time::from_secs(T0 + s);
        n.handle_udp(now, addr(), &b);
        while let Some((id, op)) = n.poll_store() {
            binds += usize::from(matches!(op, StoreOp::Bind { .. }));
            let r = store.apply(&op);
            n.handle_store(now, id, Ok(r));
        }
        assert_eq!(binds, want, "binds after the heartbeat at {s} s");
    }
}
