//! The single node's abuse limits and bounds on a cluster node: per-IP datagram rate, per-uuid
//! answer rate, the amplification bound, the TCP connection bounds and `max_clients`. The
//! cluster node applies them with the single node's code (`limits::Guard`); each test fails if
//! it skipped that limit.

use std::net::SocketAddr;
use std::time::Duration;

use ddpush_proto::cluster::{
    ClusterConfig, ClusterEvent, ClusterNode, MemStore, NodeId, StoreError,
};
use ddpush_proto::driver::StoreConfirmed;
use ddpush_proto::{
    Config, Content, Dest, DeviceMsg, DevicePacket, Driver, Limited, Limits, Payload, Port,
    PushMsg, PushRequest, Time, Uuid,
};

/// One cluster node against the reference store, every output moved at once.
struct One {
    node: ClusterNode,
    driver: Driver,
    store: MemStore,
    now: Time,
    /// Datagrams to devices: (to, bytes).
    udp: Vec<(SocketAddr, Vec<u8>)>,
    replies: Vec<u8>,
    events: Vec<ClusterEvent>,
    /// Every store operation fails.
    store_down: bool,
}

fn ip(a: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, a], port))
}

fn uuid(i: u8) -> Uuid {
    Uuid([i; 16])
}

impl One {
    fn new(cfg: Config) -> Self {
        let node = ClusterNode::new(cfg, ClusterConfig::new(NodeId("n0".into()))).expect("cfg");
        One {
            node,
            driver: Driver::new(),
            store: MemStore::new(),
            now: Time::from_secs(1000),
            udp: Vec::new(),
            replies: Vec::new(),
            events: Vec::new(),
            store_down: false,
        }
    }

    fn with_limits(limits: Limits) -> Self {
        One::new(Config {
            limits,
            ..Config::default()
        })
    }

    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some((id, op)) = self.node.poll_store() {
                moved = true;
                let r = if self.store_down {
                    Err(StoreError::Unavailable)
                } else {
                    Ok(self.store.apply(&op))
                };
                self.node.handle_store(self.now, id, r);
            }
            let _ = self
                .driver
                .end_turn(&mut self.node, StoreConfirmed::default());
            while let Some(t) = self.node.poll_transmit() {
                let mut b = Vec::new();
                t.encode(&mut b);
                match (t.dest, t.payload) {
                    (Dest::Udp(a), _) => self.udp.push((a, b)),
                    (Dest::Tcp(_), Payload::Reply(r)) => self.replies.push(r.byte()),
                    (Dest::Tcp(_), _) => {}
                }
            }
            while self.node.poll_peer().is_some() {}
            while let Some(e) = self.node.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    fn device(&mut self, from: SocketAddr, u: Uuid, msg: DeviceMsg) {
        let mut b = Vec::new();
        DevicePacket {
            app_id: 1,
            uuid: u,
            msg,
        }
        .encode(&mut b);
        self.node.handle_udp(self.now, from, &b);
        self.settle();
    }

    /// A push through the driver's front end (the store records it, no connection needed).
    fn push(&mut self, u: Uuid, msg: PushMsg) {
        let now = self.now;
        let _ = self.driver.handle_push(
            &mut self.node,
            now,
            PushRequest {
                app_id: 1,
                uuid: u,
                msg,
            },
        );
        self.settle();
    }

    fn limited(&self, l: Limited) -> u64 {
        self.node.stats().limited.get(l)
    }
}

#[test]
fn datagrams_over_the_source_rate_are_dropped_before_anything_else() {
    let mut c = One::with_limits(Limits {
        source_rate: 1,
        source_burst: 5,
        ..Limits::default()
    });
    for i in 0..10u8 {
        c.device(ip(1, 4000 + u16::from(i)), uuid(i), DeviceMsg::Heartbeat);
    }
    assert_eq!(c.node.stats().binds, 5, "only the burst is handled");
    assert_eq!(c.node.stats().heartbeats, 5);
    assert_eq!(c.limited(Limited::SourceRate), 5);
    // Another source has its own budget.
    c.device(ip(2, 4000), uuid(20), DeviceMsg::Heartbeat);
    assert_eq!(c.node.stats().binds, 6);
    // Logged once: one event for the five held back.
    let n = c
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClusterEvent::Limited {
                    limit: Limited::SourceRate
                }
            )
        })
        .count();
    assert_eq!(n, 1);
}

#[test]
fn with_limits_off_the_same_storm_is_all_handled() {
    let mut c = One::with_limits(Limits {
        enabled: false,
        source_rate: 1,
        source_burst: 5,
        ..Limits::default()
    });
    for i in 0..10u8 {
        c.device(ip(1, 4000 + u16::from(i)), uuid(i), DeviceMsg::Heartbeat);
    }
    assert_eq!(c.node.stats().binds, 10);
    assert_eq!(c.node.stats().limited.get(Limited::SourceRate), 0);
}

#[test]
fn heartbeats_over_the_uuid_answer_rate_get_no_answer_but_stay_alive() {
    let mut c = One::with_limits(Limits {
        uuid_rate: 1,
        uuid_burst: 3,
        ..Limits::default()
    });
    let u = uuid(1);
    c.push(u, PushMsg::Notify);
    // The first heartbeat binds and is answered when the bind returns, the next two from the
    // copy; the other seven are over the burst.
    for _ in 0..10 {
        c.device(ip(1, 4000), u, DeviceMsg::Heartbeat);
    }
    assert_eq!(c.udp.len(), 3, "answers to a 10-heartbeat storm");
    assert_eq!(c.limited(Limited::UuidRate), 7);
    assert!(
        c.node.is_online(&u),
        "a held-back heartbeat is still a sign of life"
    );
    assert_eq!(c.node.stats().binds, 1);
    // One answer a second after that.
    c.now = c.now + Duration::from_secs(1);
    c.device(ip(1, 4000), u, DeviceMsg::Heartbeat);
    assert_eq!(c.udp.len(), 4);
}

#[test]
fn a_bind_answers_only_a_heartbeat_within_the_answer_budget() {
    let mut c = One::with_limits(Limits {
        uuid_rate: 1,
        uuid_burst: 1,
        ..Limits::default()
    });
    // Spend the budget on uuid 1 before it has a copy: the store is slow, so both
    // heartbeats find the same bind in flight.
    let u = uuid(1);
    c.push(u, PushMsg::Notify);
    let mut b = Vec::new();
    DevicePacket {
        app_id: 1,
        uuid: u,
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut b);
    c.node.handle_udp(c.now, ip(1, 4000), &b);
    c.node.handle_udp(c.now, ip(1, 4000), &b);
    c.settle();
    assert_eq!(c.udp.len(), 1, "the bind answers once");
    assert_eq!(c.limited(Limited::UuidRate), 1);
    // Over budget from the start: the bind happens (ownership follows the device), the
    // answer does not.
    let mut c = One::with_limits(Limits {
        uuid_rate: 1,
        uuid_burst: 1,
        ..Limits::default()
    });
    c.push(u, PushMsg::Notify);
    c.store_down = true;
    c.device(ip(1, 4000), u, DeviceMsg::Heartbeat); // spends the budget; its bind fails
    c.store_down = false;
    c.device(ip(1, 4000), u, DeviceMsg::Heartbeat);
    assert_eq!(c.node.stats().binds, 1);
    assert!(c.node.copy(&u).is_some(), "bound");
    assert!(c.udp.is_empty(), "but not answered");
    assert_eq!(c.limited(Limited::UuidRate), 1);
}

#[test]
fn an_answer_beyond_the_amplification_bound_is_not_sent() {
    let cfg = |amp_burst| Limits {
        amp_factor: 1,
        amp_burst,
        ..Limits::default()
    };
    let big = Content::new(vec![b'x'; 400]).expect("content");
    for (burst, sent) in [(100, 0), (1000, 1)] {
        let mut c = One::with_limits(cfg(burst));
        let u = uuid(1);
        c.push(u, PushMsg::Payload(big.clone()));
        // 21 bytes in earn 21 bytes of credit on top of the burst; the answer is 405.
        c.device(ip(1, 4000), u, DeviceMsg::Heartbeat);
        assert_eq!(c.udp.len(), sent, "burst {burst}");
        assert_eq!(c.limited(Limited::Amplification), 1 - sent as u64);
        // Nothing went out, so no send is in the ledger: an ack clears nothing.
        c.device(ip(1, 4000), u, DeviceMsg::AckPayload);
        assert_eq!(
            c.store.get(&u).is_some_and(|r| r.payload.is_some()),
            sent == 0,
            "burst {burst}: the payload stays pending unless it was sent and acked"
        );
    }
}

#[test]
fn connections_beyond_the_per_ip_and_total_bounds_are_refused() {
    let mut c = One::with_limits(Limits {
        conns_per_ip: 2,
        max_conns: 3,
        ..Limits::default()
    });
    let now = c.now;
    assert!(c.node.handle_tcp_open(now, 1, Port::Push, ip(1, 5000)));
    assert!(c.node.handle_tcp_open(now, 2, Port::Device, ip(1, 5001)));
    assert!(c.node.handle_tcp_open(now, 3, Port::Push, ip(1, 5002)));
    assert!(
        !c.node.handle_tcp_open(now, 4, Port::Push, ip(1, 5003)),
        "per IP and port"
    );
    assert!(
        !c.node.handle_tcp_open(now, 5, Port::Device, ip(2, 5000)),
        "in all"
    );
    assert_eq!(c.node.stats().conns_refused, 2);
    c.node.handle_tcp_close(now, 1);
    assert!(
        c.node.handle_tcp_open(now, 6, Port::Push, ip(1, 5004)),
        "a slot freed"
    );
    // A refused connection is not known to the node: its bytes are ignored.
    c.node.handle_tcp_data(now, 4, &[1, 1, 0x10]);
    c.settle();
    assert!(c.replies.is_empty());
}

#[test]
fn max_clients_bounds_the_devices_a_node_serves() {
    let mut c = One::new(Config {
        max_clients: 2,
        ..Config::default()
    });
    for i in 0..4u8 {
        c.device(ip(i + 1, 4000), uuid(i), DeviceMsg::Heartbeat);
    }
    assert_eq!(c.node.stats().binds, 2);
    assert_eq!(c.node.stats().capacity_refused, 2);
    let logged = c
        .events
        .iter()
        .filter(|e| matches!(e, ClusterEvent::CapacityReached))
        .count();
    assert_eq!(logged, 1, "logged once");
    // The clients it holds are still served...
    c.push(uuid(0), PushMsg::Notify);
    assert_eq!(c.udp.iter().filter(|(a, _)| *a == ip(1, 4000)).count(), 1);
    // ...and one that went offline frees its place.
    c.now = c.now + Duration::from_secs(61);
    c.node.handle_timeout(c.now);
    c.device(ip(3, 4000), uuid(2), DeviceMsg::Heartbeat);
    assert_eq!(c.node.stats().binds, 3);
}
