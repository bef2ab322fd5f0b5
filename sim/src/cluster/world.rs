//! State shared by the hosts of a cluster simulation and its driver (all on turmoil's thread).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;

use ddpush_proto::cluster::{ClusterEvent, MemStore, StoreOp, StoreReply};
use ddpush_proto::{DownMsg, PushMsg, Uuid};

/// Node names; node `i` is host `n{i}`.
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// The store host's state. It lives here, outside the host, so that a crash of the store host
/// keeps the replica (and the primary, unless the driver fails over).
#[derive(Default)]
pub struct StoreState {
    /// What the serving store holds.
    pub primary: MemStore,
    /// The replica: every op applied at least `lag` ms ago.
    pub replica: MemStore,
    /// Ops applied to the primary but not yet to the replica: (applied at ms, log index, op).
    pub unreplicated: VecDeque<(u64, usize, StoreOp)>,
    /// Replication lag (ms).
    pub lag: u64,
    /// Every applied op, in store order.
    pub log: Vec<Applied>,
    /// Fail-overs done.
    pub failovers: u32,
}

/// One op the store applied.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Sim time (ms).
    pub at: u64,
    /// The op.
    pub op: StoreOp,
    /// Its reply.
    pub reply: StoreReply,
    /// Dropped by a fail-over before it reached the replica.
    pub lost: bool,
}

impl StoreState {
    /// Applies every op older than the lag to the replica.
    pub fn catch_up(&mut self, now: u64) {
        while let Some((at, _, _)) = self.unreplicated.front() {
            if at + self.lag > now {
                break;
            }
            if let Some((_, _, op)) = self.unreplicated.pop_front() {
                self.replica.apply(&op);
            }
        }
    }

    /// The replica takes over: writes it had not received are gone.
    pub fn fail_over(&mut self, now: u64) {
        self.catch_up(now);
        for (_, i, _) in self.unreplicated.drain(..) {
            self.log[i].lost = true;
        }
        self.primary = self.replica.clone();
        self.failovers += 1;
    }
}

/// One packet a device accepted.
#[derive(Clone, Debug)]
pub struct Rx {
    /// Sim time (ms).
    pub at: u64,
    /// The node it came from (index), if it came from a node's device port.
    pub from: Option<usize>,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Decoded.
    pub msg: DownMsg,
    /// The node the device sent its last packet to.
    pub routed: usize,
}

/// What one simulated device saw.
#[derive(Default)]
pub struct DeviceLog {
    /// Heartbeats: (ms, node index).
    pub heartbeats: Vec<(u64, usize)>,
    /// Everything received and acked.
    pub rx: Vec<Rx>,
}

/// One push attempt of an app server.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// Index of the planned push.
    pub push: usize,
    /// Target device.
    pub device: usize,
    /// The message.
    pub msg: PushMsg,
    /// The node it went to.
    pub node: usize,
    /// Sent (ms).
    pub sent_at: u64,
    /// The reply byte, None if none came (time-out or broken connection).
    pub reply: Option<u8>,
}

/// A node event with its time and node.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Sim time (ms).
    pub at: u64,
    /// Node index.
    pub node: usize,
    /// The event.
    pub event: ClusterEvent,
}

/// What the network does to the devices' datagrams (the `cluster-acks` scenario; none in the
/// others). Each device draws from its own RNG seeded from `seed`, so a run stays a pure function
/// of its seed. Faults happen only from `from` until `until` (ms): the steady window before and
/// the clean phase after have none.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceFaults {
    /// Probability that a datagram to a device is lost (the SDK never sees it, so never acks it).
    pub down_loss: f64,
    /// Probability that an ack the SDK sends is lost on its way.
    pub ack_loss: f64,
    /// Probability, per heartbeat, that the device first moves to a new socket (an app restart
    /// or a NAT rebind: a new source port; datagrams to the old one are lost). A TCP device
    /// opens a new connection instead (what was on its way on the old one is lost); the two
    /// loss probabilities apply to UDP devices only.
    pub rebind: f64,
    /// Faults start at this time (ms).
    pub from: u64,
    /// Faults stop at this time (ms).
    pub until: u64,
    /// Seed of the devices' RNGs.
    pub seed: u64,
}

impl DeviceFaults {
    /// Whether any fault is configured.
    pub fn any(&self) -> bool {
        self.down_loss > 0.0 || self.ack_loss > 0.0 || self.rebind > 0.0
    }
}

/// What the device faults did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultCounts {
    /// Datagrams to devices lost.
    pub lost_down: u64,
    /// Acks lost.
    pub lost_acks: u64,
    /// New sockets (UDP) and new connections after an app restart (TCP).
    pub rebinds: u64,
    /// TCP device connections opened (first ones, after a node died or was reset by the load
    /// balancer, and after app restarts).
    pub tcp_connects: u64,
}

/// Per-node counters, summed over restarts.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeCounts {
    /// Store ops [push, ack, bind, drain].
    pub store_ops: [u64; 4],
    /// Heartbeats.
    pub heartbeats: u64,
    /// Pokes sent, received.
    pub pokes: [u64; 2],
    /// Store time-outs and errors.
    pub store_failures: u64,
    /// Acks whose send could not be attributed.
    pub unattributed: u64,
    /// Pokes dropped because their link's queue was full.
    pub pokes_dropped: u64,
}

impl NodeCounts {
    /// Adds `o` to these counters.
    pub fn add(&mut self, o: &NodeCounts) {
        for k in 0..4 {
            self.store_ops[k] += o.store_ops[k];
        }
        self.heartbeats += o.heartbeats;
        self.pokes[0] += o.pokes[0];
        self.pokes[1] += o.pokes[1];
        self.store_failures += o.store_failures;
        self.unattributed += o.unattributed;
        self.pokes_dropped += o.pokes_dropped;
    }
}

/// A stretch of time in which a node's outbound link to a peer was down: from a break (or a
/// failed dial) until a dial succeeded again.
#[derive(Clone, Copy, Debug)]
pub struct LinkDown {
    /// The node whose link it is.
    pub from: usize,
    /// The peer.
    pub to: usize,
    /// Down since (ms).
    pub since: u64,
    /// Up again at (ms), if it came back.
    pub until: Option<u64>,
}

/// Everything shared in one cluster simulation.
pub struct World {
    /// Node count.
    pub nodes: usize,
    /// The store.
    pub store: RefCell<StoreState>,
    /// Reply only after the write reached the replica (Redis `WAIT`, part 2).
    pub wait_replica: bool,
    /// Device uuids.
    pub uuids: Vec<Uuid>,
    /// Which devices are on TCP (the others on UDP).
    pub tcp: Vec<bool>,
    /// Device logs.
    pub devices: Vec<RefCell<DeviceLog>>,
    /// The load balancer's view: which nodes pass their health check.
    pub lb_up: RefCell<Vec<bool>>,
    /// Push attempts.
    pub attempts: RefCell<Vec<Attempt>>,
    /// Node events (no `Sent` for immediate duplicates is dropped: all are kept).
    pub events: RefCell<Vec<Logged>>,
    /// Counters of finished node incarnations.
    pub past: RefCell<Vec<NodeCounts>>,
    /// Counters of the running incarnations.
    pub live: RefCell<Vec<NodeCounts>>,
    /// Node device-port addresses, by index (set by the driver).
    pub node_addrs: RefCell<Vec<SocketAddr>>,
    /// The network's faults on device datagrams.
    pub faults: DeviceFaults,
    /// What they did.
    pub fault_counts: RefCell<FaultCounts>,
    /// Down stretches of the nodes' outbound node-to-node links.
    pub links_down: RefCell<Vec<LinkDown>>,
    /// Node-to-node links that came up: (ms, dialer, listener).
    pub links_up: RefCell<Vec<(u64, usize, usize)>>,
    /// Each `handle_peer_lost` call: (ms, node, the peer whose link went down).
    pub peer_lost: RefCell<Vec<(u64, usize, usize)>>,
}

impl World {
    /// A world of `nodes` nodes and these devices.
    pub fn new(
        nodes: usize,
        uuids: Vec<Uuid>,
        tcp: Vec<bool>,
        lag: u64,
        wait_replica: bool,
        faults: DeviceFaults,
    ) -> Rc<Self> {
        Rc::new(World {
            nodes,
            store: RefCell::new(StoreState {
                lag,
                ..StoreState::default()
            }),
            wait_replica,
            devices: uuids.iter().map(|_| RefCell::default()).collect(),
            uuids,
            tcp,
            lb_up: RefCell::new(vec![true; nodes]),
            attempts: RefCell::default(),
            events: RefCell::default(),
            past: RefCell::new(vec![NodeCounts::default(); nodes]),
            live: RefCell::new(vec![NodeCounts::default(); nodes]),
            node_addrs: RefCell::default(),
            faults,
            fault_counts: RefCell::default(),
            links_down: RefCell::default(),
            links_up: RefCell::default(),
            peer_lost: RefCell::default(),
        })
    }

    /// The L4 load balancer: rendezvous hashing of the uuid over the healthy nodes, so a
    /// device stays on its node, moves only when that node fails its health check, and moves
    /// back when it passes again.
    pub fn route(&self, device: usize) -> Option<usize> {
        let up = self.lb_up.borrow();
        (0..self.nodes)
            .filter(|&n| up[n])
            .max_by_key(|&n| mix(device as u64, n as u64))
    }

    /// The node the load balancer sends `device` to while every node is up.
    pub fn home(nodes: usize, device: usize) -> usize {
        (0..nodes)
            .max_by_key(|&n| mix(device as u64, n as u64))
            .unwrap_or(0)
    }

    /// Counters summed over every incarnation of every node.
    pub fn counts(&self) -> NodeCounts {
        let mut t = NodeCounts::default();
        for c in self.past.borrow().iter().chain(self.live.borrow().iter()) {
            t.add(c);
        }
        t
    }
}

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}
