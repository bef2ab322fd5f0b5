//! The cluster node state machine (see the module docs of [`crate::cluster`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::codec::{
    check_payload_len, DeviceMsg, DevicePacket, DownMsg, DownPacket, InvalidPacket, Kind, PushMsg,
    PushReply, PushRequest, Uuid,
};
use crate::config::{Config, ConfigError, ReplyPolicy};
use crate::output::{Dest, Payload, Transmit};
use crate::stream::{Decoded, StreamDecoder};
use crate::time::Time;
use crate::{ConnId, Port};

use crate::ack::{Attribution, Parked, SendLedger, Window};
use crate::counters::Counters;
use crate::limits::{Guard, Limited};

use super::store::{Gen, OpId, StoreError, StoreOp, StoreReply, StoreResult, StoredRecord};
use super::{NodeId, PeerMsg};

/// Cluster knobs of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name (`--node-id`).
    pub node: NodeId,
    /// A store operation without a result after this long has failed (a push gets `0xFF`).
    pub store_timeout: Duration,
    /// How often the node drains its dirty marks (pushes whose poke it may have missed).
    pub drain_every: Duration,
    /// Marks fetched per drain operation.
    pub drain_limit: usize,
}

impl ClusterConfig {
    /// Defaults for a node called `node`.
    pub fn new(node: NodeId) -> Self {
        ClusterConfig {
            node,
            store_timeout: Duration::from_millis(500),
            drain_every: Duration::from_secs(1),
            drain_limit: 64,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node.0.is_empty() {
            return Err(ConfigError("the node id must not be empty".into()));
        }
        if self.store_timeout.is_zero() || self.drain_every.is_zero() {
            return Err(ConfigError(
                "store time-out and drain period must be positive".into(),
            ));
        }
        if self.drain_limit == 0 {
            return Err(ConfigError("drain_limit must be at least 1".into()));
        }
        Ok(())
    }
}

/// What happened, for logs, tests and the simulator.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterEvent {
    /// A client's first sign of life after being offline (or unknown) here.
    Online {
        /// The client.
        uuid: Uuid,
    },
    /// The online window passed; the node dropped its copy.
    Offline {
        /// The client.
        uuid: Uuid,
    },
    /// The store bound the client to this node.
    Bound {
        /// The client.
        uuid: Uuid,
        /// The new epoch.
        epoch: u64,
    },
    /// The node learned that another node owns the client (or a newer epoch exists) and
    /// dropped its copy.
    Dropped {
        /// The client.
        uuid: Uuid,
    },
    /// A 0x10 or 0x20 went out under an epoch (what an ack may later be attributed to).
    Sent {
        /// The client.
        uuid: Uuid,
        /// 0x10 or 0x20.
        kind: Kind,
        /// Its generation.
        gen: Gen,
        /// The epoch of the copy it was sent from.
        epoch: u64,
    },
    /// A push got its reply.
    PushAnswered {
        /// The client.
        uuid: Uuid,
        /// Which kind.
        kind: Kind,
        /// The reply.
        reply: PushReply,
        /// Packets sent at once by this node.
        sent: u8,
    },
    /// A store operation failed or timed out.
    StoreFailed {
        /// The operation.
        id: OpId,
        /// How.
        error: StoreError,
    },
    /// An input was dropped.
    Invalid {
        /// Why.
        reason: InvalidPacket,
    },
    /// The first input or answer of its kind held back by an abuse limit (later ones are
    /// only counted), as on a single node.
    Limited {
        /// Which limit.
        limit: Limited,
    },
    /// The first heartbeat of a new client refused at `max_clients` (later ones are counted).
    CapacityReached,
    /// A TCP connection was refused at the connection bounds; the adapter closes it.
    Refused {
        /// The connection.
        conn: ConnId,
    },
}

/// Counters of one cluster node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Heartbeats processed.
    pub heartbeats: u64,
    /// Store operations issued by kind [push, ack, bind, drain].
    pub store_ops: [u64; 4],
    /// Store operations that failed (unavailable).
    pub store_errors: u64,
    /// Store operations that timed out.
    pub store_timeouts: u64,
    /// Results that came after their time-out (ignored).
    pub store_late: u64,
    /// Pushes answered `0x00`, `0x01`, `0xFF`.
    pub pushes: [u64; 3],
    /// Pokes sent and received.
    pub pokes: [u64; 2],
    /// Binds completed.
    pub binds: u64,
    /// Dirty marks drained.
    pub drained: u64,
    /// Copies dropped because the store or a peer showed another owner or epoch.
    pub dropped: u64,
    /// Packets sent at once (push, poke, drain).
    pub deliveries: u64,
    /// Packets re-sent in answer to heartbeats.
    pub resends: u64,
    /// Pushes the store ran on its primary but did not replicate in time, answered `0xFF`
    /// under [`crate::driver::WaitPolicy::Refuse`].
    pub unreplicated_refused: u64,
    /// Acks from devices, and those the store cleared with.
    pub acks: [u64; 2],
    /// Acks of 0x10/0x20 the ack rule attributed to no send of the pending generation: to an
    /// older or superseded send, to no send at all, or from a path no send went to (never
    /// clear; no store operation).
    pub acks_unattributed: u64,
    /// Acks for clients without a copy here (ignored; the item is re-sent after a bind).
    pub acks_uncopied: u64,
    /// Invalid device packets.
    pub invalid: u64,
    /// Inputs or answers held back by the abuse limits (the single node's limits, applied by
    /// the same code: `crate::limits::Guard`).
    pub limited: Counters<Limited, 3>,
    /// TCP connections refused at `max_conns` or the per-IP bound.
    pub conns_refused: u64,
    /// Heartbeats of new clients refused because this node holds `max_clients`.
    pub capacity_refused: u64,
    /// Clients online here (gauge).
    pub online: u64,
    /// Copies held (gauge): clients this node serves from its cache.
    pub owned: u64,
}

/// What the store said about a push, for the acceptance step ([`crate::driver::StoreConfirmed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// Stored (and replicated as asked).
    Stored,
    /// Stored on the primary; the replicas did not confirm it in time.
    Unreplicated,
    /// Not confirmed: an error or a time-out (the push may or may not be in the store).
    Failed(StoreError),
}

impl Confirmation {
    /// What a push operation's result says (a reply of another kind is a store fault).
    pub fn of(result: &StoreResult) -> Confirmation {
        match result {
            Ok(StoreReply::Pushed(_)) => Confirmation::Stored,
            Ok(StoreReply::PushedUnreplicated(_)) => Confirmation::Unreplicated,
            Ok(_) => Confirmation::Failed(StoreError::Unavailable),
            Err(e) => Confirmation::Failed(*e),
        }
    }
}

/// A push whose store operation finished and that the acceptance step has not decided yet.
#[derive(Debug)]
struct Finished {
    id: OpId,
    conn: Option<ConnId>,
    uuid: Uuid,
    kind: Kind,
    result: StoreResult,
}

/// Where a device packet came from.
#[derive(Clone, Copy, Debug)]
enum Via {
    Udp(SocketAddr),
    Tcp(ConnId),
}

/// The node's copy of a record it owns.
#[derive(Clone, Debug)]
struct Copy {
    rec: StoredRecord,
    /// When the store last restarted the record's `--pending-ttl` (its bind here, or the
    /// newest push the copy has seen: both expire the record again).
    renewed: Time,
}

/// The node-local part of one client.
#[derive(Debug, Default)]
struct Entry {
    addr: Option<SocketAddr>,
    sa_known: bool,
    tcp: Option<ConnId>,
    last_seen: Time,
    online: bool,
    copy: Option<Copy>,
    /// A bind in flight, and the heartbeat to answer when it returns: (op, appId, path,
    /// address changed, an answer is wanted: within the uuid's answer budget).
    bind: Option<(OpId, u8, Via, bool, bool)>,
    /// A poke or drain that came while the bind was in flight.
    early: Option<StoredRecord>,
    /// The ack rule's ledgers of [0x10, 0x20] (`crate::ack`), by store generation. They
    /// outlive a dropped copy (superseded, see [`ClusterNode`]'s `drop_copy`) so that late acks
    /// of its sends are still consumed in order.
    ledger: [SendLedger<Gen>; 2],
}

/// What a store operation in flight was for.
#[derive(Debug)]
enum Purpose {
    Push {
        conn: Option<ConnId>,
        uuid: Uuid,
        kind: Kind,
    },
    Ack {
        uuid: Uuid,
    },
    Bind {
        uuid: Uuid,
    },
    Drain {
        done: Vec<(Uuid, u64)>,
    },
}

struct PushConn {
    port: Port,
    ip: IpAddr,
    decoder: Option<StreamDecoder>,
    last_active: Time,
    /// Replies in request order: `Err(op)` waits for the store.
    replies: VecDeque<Result<PushReply, OpId>>,
    attached: Vec<Uuid>,
    /// Ledgers of devices whose connection moved from this one to another while this one
    /// stayed open (as on a single node, `crate::ack::Parked`).
    parked: Parked<Uuid, Gen>,
}

/// A DDPush node in a cluster. See [`crate::cluster`] for the call order.
pub struct ClusterNode {
    cfg: Config,
    cc: ClusterConfig,
    window: Duration,
    /// The ack rule's in-flight window (`Config::ack_window`).
    ack_window: Window,
    /// The abuse limits and connection bounds (the single node's, the same code).
    guard: Guard,
    entries: BTreeMap<Uuid, Entry>,
    offline_due: BinaryHeap<Reverse<(Time, Uuid)>>,
    conns: BTreeMap<ConnId, PushConn>,
    idle: BinaryHeap<Reverse<(Time, ConnId)>>,
    inflight: BTreeMap<OpId, Purpose>,
    deadlines: BinaryHeap<Reverse<(Time, OpId)>>,
    next_op: OpId,
    next_drain: Time,
    drain_now: bool,
    draining: bool,
    done: Vec<(Uuid, u64)>,
    ops: VecDeque<(OpId, StoreOp)>,
    /// Pushes whose results came in this turn, in order, waiting for the acceptance step.
    finished: VecDeque<Finished>,
    peer_out: VecDeque<(NodeId, PeerMsg)>,
    transmits: VecDeque<Transmit>,
    closes: VecDeque<ConnId>,
    events: VecDeque<ClusterEvent>,
    stats: ClusterStats,
    now: Time,
}

fn kind_idx(k: Kind) -> Option<usize> {
    match k {
        Kind::Notify => Some(0),
        Kind::Payload => Some(1),
        Kind::Bits => None,
    }
}

impl ClusterNode {
    /// A node with no clients. `cfg` is the same device-side configuration as a single node.
    pub fn new(cfg: Config, cc: ClusterConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        cc.validate()?;
        Ok(ClusterNode {
            window: cfg.online_window(),
            ack_window: Window::new(cfg.ack_window),
            guard: Guard::new(cfg.limits.clone(), cfg.hash_seed),
            cfg,
            cc,
            entries: BTreeMap::new(),
            offline_due: BinaryHeap::new(),
            conns: BTreeMap::new(),
            idle: BinaryHeap::new(),
            inflight: BTreeMap::new(),
            deadlines: BinaryHeap::new(),
            next_op: 1,
            next_drain: Time::ZERO,
            drain_now: true,
            draining: false,
            done: Vec::new(),
            ops: VecDeque::new(),
            finished: VecDeque::new(),
            peer_out: VecDeque::new(),
            transmits: VecDeque::new(),
            closes: VecDeque::new(),
            events: VecDeque::new(),
            stats: ClusterStats::default(),
            now: Time::ZERO,
        })
    }

    /// This node's name.
    pub fn id(&self) -> &NodeId {
        &self.cc.node
    }

    /// Counters.
    pub fn stats(&self) -> &ClusterStats {
        &self.stats
    }

    /// Store operations in flight (an adapter applies back-pressure on pushes above a bound).
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The copy this node serves a client from, if any: (epoch, record).
    pub fn copy(&self, uuid: &Uuid) -> Option<&StoredRecord> {
        self.entries
            .get(uuid)
            .and_then(|e| e.copy.as_ref())
            .map(|c| &c.rec)
    }

    /// Whether the client is online here.
    pub fn is_online(&self, uuid: &Uuid) -> bool {
        self.entries.get(uuid).is_some_and(|e| e.online)
    }

    // ----------------------------------------------------------------------------------------
    // Inputs
    // ----------------------------------------------------------------------------------------

    /// A datagram arrived on the device UDP port.
    pub fn handle_udp(&mut self, now: Time, from: SocketAddr, data: &[u8]) {
        self.advance(now);
        if let Err(l) = self.guard.datagram(self.now, from.ip(), data.len()) {
            self.limited(l);
            return;
        }
        match DevicePacket::decode(data) {
            Ok(p) => self.on_device(p, Via::Udp(from)),
            Err(e) => self.invalid(e),
        }
    }

    /// A TCP connection was accepted on either port from `peer`. Returns false if it is
    /// refused (too many in all or from its IP, the single node's bounds); the adapter then
    /// closes it without calling [`ClusterNode::handle_tcp_close`].
    pub fn handle_tcp_open(
        &mut self,
        now: Time,
        conn: ConnId,
        port: Port,
        peer: SocketAddr,
    ) -> bool {
        self.advance(now);
        if !self.guard.open(self.conns.len(), port, peer.ip()) {
            self.stats.conns_refused += 1;
            self.events.push_back(ClusterEvent::Refused { conn });
            return false;
        }
        let decoder = match port {
            Port::Device => StreamDecoder::device(),
            Port::Push => StreamDecoder::new(self.cfg.max_content),
        };
        self.conns.insert(
            conn,
            PushConn {
                port,
                ip: peer.ip(),
                decoder: Some(decoder),
                last_active: self.now,
                replies: VecDeque::new(),
                attached: Vec::new(),
                parked: Parked::default(),
            },
        );
        self.idle
            .push(Reverse((self.now + self.idle_timeout(port), conn)));
        true
    }

    /// Bytes arrived on a TCP connection. Push replies leave in request order, each once its
    /// store operation has a result.
    pub fn handle_tcp_data(&mut self, now: Time, conn: ConnId, data: &[u8]) {
        self.advance(now);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.last_active = self.now;
        let port = c.port;
        let Some(mut dec) = c.decoder.take() else {
            return;
        };
        let mut input = data;
        let mut failed = false;
        loop {
            match dec.decode(&mut input) {
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::Frame(f)) => match port {
                    Port::Device => match DevicePacket::from_parts(&f.header, f.content) {
                        Ok(p) => self.on_device(p, Via::Tcp(conn)),
                        Err(e) => self.invalid(e),
                    },
                    Port::Push => {
                        let slot = match PushRequest::from_parts(&f.header, f.content) {
                            Ok(req) => Err(self.push(Some(conn), req)),
                            Err(_) => {
                                self.stats.pushes[1] += 1;
                                Ok(PushReply::Rejected)
                            }
                        };
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.replies.push_back(slot);
                        }
                        self.flush_replies(conn);
                    }
                },
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.drop_conn(conn);
            self.closes.push_back(conn);
        } else if let Some(c) = self.conns.get_mut(&conn) {
            c.decoder = Some(dec);
        }
    }

    /// A push from a front end other than port 9999, through [`crate::Driver::handle_push`]:
    /// the store operation it became, or its reply at once (`0x01` for a 0x20 payload longer
    /// than `max_content`, which on port 9999 never gets this far).
    pub fn handle_push(&mut self, now: Time, req: PushRequest) -> Result<OpId, PushReply> {
        self.advance(now);
        if let PushMsg::Payload(p) = &req.msg {
            if check_payload_len(p.len(), self.cfg.max_content).is_err() {
                self.stats.pushes[1] += 1;
                return Err(PushReply::Rejected);
            }
        }
        Ok(self.push(None, req))
    }

    /// A connection closed.
    pub fn handle_tcp_close(&mut self, now: Time, conn: ConnId) {
        self.advance(now);
        self.drop_conn(conn);
    }

    /// The result of store operation `id` (late results, after the time-out, are ignored).
    pub fn handle_store(&mut self, now: Time, id: OpId, result: StoreResult) {
        self.advance(now);
        let Some(p) = self.inflight.remove(&id) else {
            self.stats.store_late += 1;
            return;
        };
        self.on_result(id, p, result);
    }

    /// A message from another node.
    pub fn handle_peer(&mut self, now: Time, msg: PeerMsg) {
        self.advance(now);
        match msg {
            PeerMsg::Poke { uuid, record } => {
                self.stats.pokes[1] += 1;
                if self.learn(uuid, record.clone()) {
                    self.done.push((uuid, record.ver));
                }
            }
        }
    }

    /// A node-to-node link broke: pokes may have been lost, so drain at once.
    pub fn handle_peer_lost(&mut self, now: Time) {
        self.advance(now);
        self.drain_now = true;
        self.maybe_drain();
    }

    /// Time passed: offline detection, store time-outs, drains, idle connections.
    pub fn handle_timeout(&mut self, now: Time) {
        self.advance(now);
    }

    // ----------------------------------------------------------------------------------------
    // Outputs
    // ----------------------------------------------------------------------------------------

    /// The next store operation to send, with its id.
    #[must_use]
    pub fn poll_store(&mut self) -> Option<(OpId, StoreOp)> {
        self.ops.pop_front()
    }

    /// The next message for another node.
    #[must_use]
    pub fn poll_peer(&mut self) -> Option<(NodeId, PeerMsg)> {
        self.peer_out.pop_front()
    }

    /// The next packet or reply to send, in order. Run the turn's acceptance step
    /// ([`crate::Driver::end_turn`] with [`crate::driver::StoreConfirmed`]) first: a debug
    /// build panics if a push result is still undecided.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        debug_assert!(
            self.finished.is_empty(),
            "a transmit was polled before the turn's acceptance step decided its pushes"
        );
        self.transmits.pop_front()
    }

    /// A connection to close after flushing.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<ConnId> {
        self.closes.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClusterEvent> {
        self.events.pop_front()
    }

    /// When [`ClusterNode::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        let off = self.offline_due.peek().map(|Reverse((t, _))| *t);
        let op = self.deadlines.peek().map(|Reverse((t, _))| *t);
        let idle = self.idle.peek().map(|Reverse((t, _))| *t);
        let drain = (!self.draining).then_some(self.next_drain);
        [off, op, idle, drain].into_iter().flatten().min()
    }

    // ----------------------------------------------------------------------------------------
    // Device side
    // ----------------------------------------------------------------------------------------

    fn on_device(&mut self, p: DevicePacket, via: Via) {
        match p.msg {
            DeviceMsg::Heartbeat => self.heartbeat(p.app_id, p.uuid, via),
            DeviceMsg::AckNotify => self.ack(p.uuid, Kind::Notify, 0, via),
            DeviceMsg::AckBits(m) => self.ack(p.uuid, Kind::Bits, m, via),
            DeviceMsg::AckPayload => self.ack(p.uuid, Kind::Payload, 0, via),
        }
    }

    /// Marks the client alive; the first sign of life of an online period schedules one
    /// offline check (later heartbeats cost nothing: the check re-reads `last_seen`).
    fn touch(&mut self, uuid: Uuid) {
        let now = self.now;
        let e = self.entries.entry(uuid).or_default();
        e.last_seen = e.last_seen.max(now);
        if !e.online {
            e.online = true;
            self.stats.online += 1;
            self.events.push_back(ClusterEvent::Online { uuid });
            self.offline_due.push(Reverse((
                now + self.window + Duration::from_millis(1),
                uuid,
            )));
        }
    }

    fn heartbeat(&mut self, app_id: u8, uuid: Uuid, via: Via) {
        self.stats.heartbeats += 1;
        if !self.entries.contains_key(&uuid) {
            // `max_clients` bounds the clients this node serves (its entries), as it bounds a
            // single node's records; pushes create records in the store, not here.
            if let Err(first) = self
                .guard
                .admit_client(self.entries.len(), self.cfg.max_clients)
            {
                self.stats.capacity_refused += 1;
                if first {
                    self.events.push_back(ClusterEvent::CapacityReached);
                }
                return;
            }
        }
        self.touch(uuid);
        let Some(e) = self.entries.get_mut(&uuid) else {
            return;
        };
        let changed = match via {
            Via::Udp(a) => {
                let changed = !e.sa_known || e.addr != Some(a);
                if e.addr.is_some_and(|o| o != a) && e.tcp.is_none() {
                    // A new socket: sends to the old address can no longer be acked (acks are
                    // only taken from the recorded address, which moves now).
                    e.ledger.iter_mut().for_each(SendLedger::forget);
                }
                e.addr = Some(a);
                e.sa_known = true;
                changed
            }
            Via::Tcp(c) => {
                if e.tcp != Some(c) {
                    if e.addr.is_none() {
                        // A new connection: sends on the old one can no longer be acked. With a
                        // UDP address too, keep them (as a single node does). If the old one
                        // stays open and comes back, what was sent on it is answered first.
                        if let Some(old) = e.tcp.and_then(|o| self.conns.get_mut(&o)) {
                            old.parked.park(uuid, e.ledger);
                        }
                        e.ledger.iter_mut().for_each(SendLedger::forget);
                    }
                    if let Some(conn) = self.conns.get_mut(&c) {
                        conn.parked.restore(&uuid, &mut e.ledger);
                    }
                }
                e.tcp = Some(c);
                false
            }
        };
        // The heartbeat is a fence for the ack rule (`crate::ack`), whatever it leads to.
        let (now, window) = (self.now, self.ack_window);
        for l in &mut e.ledger {
            l.on_fence(now, window);
        }
        if let Via::Tcp(c) = via {
            if let Some(conn) = self.conns.get_mut(&c) {
                if !conn.attached.contains(&uuid) {
                    conn.attached.push(uuid);
                }
            }
        }
        // The per-uuid answer budget, as on a single node: over it, the heartbeat still counts
        // as liveness (and still binds), but gets no answer.
        let wanted = match self.guard.answer(self.now, uuid.0) {
            Ok(()) => true,
            Err(l) => {
                self.limited(l);
                false
            }
        };
        let renew = self.renew_after();
        let Some(e) = self.entries.get_mut(&uuid) else {
            return;
        };
        if let Some(c) = e.copy.as_ref() {
            if self.now < c.renewed + renew {
                if wanted {
                    self.answer(uuid, app_id, via, changed);
                }
                return;
            }
            // The store's record expires `--pending-ttl` after its last push or bind, but a
            // device that stays online here needs its record (and its owner field: pushes at
            // other nodes find us through it). So the owner renews it by binding again, at the
            // first heartbeat once the ttl is half gone: one store operation per device per
            // half ttl. The copy is dropped first, so this heartbeat takes the first-contact
            // path (answered when the bind returns; a failed bind retries at the next one).
            self.drop_copy(uuid);
        }
        let Some(e) = self.entries.get_mut(&uuid) else {
            return;
        };
        if let Some(b) = e.bind.as_mut() {
            // A bind is in flight: answer this (newest) heartbeat when it returns.
            b.1 = app_id;
            b.2 = via;
            b.3 |= changed;
            b.4 |= wanted;
            return;
        }
        let id = self.issue(
            StoreOp::Bind {
                uuid,
                node: self.cc.node.clone(),
                at: self.now,
            },
            Purpose::Bind { uuid },
        );
        if let Some(e) = self.entries.get_mut(&uuid) {
            e.bind = Some((id, app_id, via, changed, wanted));
        }
    }

    /// Sends every pending item of the copy, as after any heartbeat (PROTOCOL.md 4.4).
    fn answer(&mut self, uuid: Uuid, app_id: u8, via: Via, changed: bool) {
        let now = self.now;
        let Some(c) = self.entries.get(&uuid).and_then(|e| e.copy.as_ref()) else {
            return;
        };
        let mut out: Vec<(DownMsg, Option<(usize, Gen)>)> = Vec::new();
        if let Some(g) = c.rec.notify {
            out.push((DownMsg::Notify, Some((0, g))));
        }
        if c.rec.bits != 0 {
            out.push((DownMsg::Bits(c.rec.bits), None));
        }
        if let Some((g, p)) = &c.rec.payload {
            out.push((DownMsg::Payload(p.clone()), Some((1, *g))));
        }
        let epoch = c.rec.epoch;
        if out.is_empty() {
            let reply = match (self.cfg.reply_policy, via) {
                (_, Via::Tcp(_)) | (ReplyPolicy::Never, _) => false,
                (ReplyPolicy::Always, _) => true,
                (ReplyPolicy::SaChanged, _) => changed,
            };
            if !reply {
                return;
            }
            out.push((DownMsg::HeartbeatReply, None));
        }
        if let Via::Udp(a) = via {
            // The amplification bound toward the source, as on a single node: the whole
            // answer goes out or none of it.
            let bytes: usize = out
                .iter()
                .map(|(msg, _)| {
                    DownPacket {
                        app_id,
                        msg: msg.clone(),
                    }
                    .encoded_len()
                })
                .sum();
            if let Err(l) = self.guard.spend(now, a.ip(), bytes) {
                self.limited(l);
                return;
            }
        }
        let Some(e) = self.entries.get_mut(&uuid) else {
            return;
        };
        for (msg, send) in out {
            if let Some((k, gen)) = send {
                e.ledger[k].on_send(gen, now, self.ack_window);
                self.events.push_back(ClusterEvent::Sent {
                    uuid,
                    kind: if k == 0 { Kind::Notify } else { Kind::Payload },
                    gen,
                    epoch,
                });
            }
            if msg != DownMsg::HeartbeatReply {
                self.stats.resends += 1;
            }
            self.transmits.push_back(Transmit {
                dest: dest(via),
                payload: Payload::Down(DownPacket { app_id, msg }),
            });
        }
    }

    /// An ack from `via`. 0x10/0x20: the ack rule (`crate::ack`, the single node's rule)
    /// attributes it to a send; only an ack attributed to the generation the copy holds as
    /// pending becomes an `Ack` op, and the store clears only if that is still the record's
    /// generation (and this node still owns it at the copy's epoch). 0x11 clears its bits.
    fn ack(&mut self, uuid: Uuid, kind: Kind, bits: u64, via: Via) {
        let now = self.now;
        self.stats.acks[0] += 1;
        let Some(e) = self.entries.get_mut(&uuid) else {
            self.stats.acks_uncopied += 1;
            return;
        };
        // Only the path the sends went to can answer them (the SDK acks on the socket or
        // connection a message came in on). The ack is consumed even without a copy: it
        // answers a send made from the copy that was dropped.
        let on_path = match via {
            Via::Udp(a) => e.addr == Some(a),
            Via::Tcp(c) => e.tcp == Some(c),
        };
        let attribution = kind_idx(kind).map(|k| match via {
            _ if !on_path => Attribution::Unmatched,
            Via::Udp(_) => e.ledger[k].on_ack(now, self.ack_window),
            Via::Tcp(_) => e.ledger[k].on_stream_ack(),
        });
        if e.copy.is_none() {
            self.stats.acks_uncopied += 1;
            return;
        }
        // An ack is a sign of life (the SDK counts its interval from its last packet).
        self.touch(uuid);
        let Some(e) = self.entries.get_mut(&uuid) else {
            return;
        };
        let Some(c) = e.copy.as_ref() else {
            return;
        };
        let epoch = c.rec.epoch;
        let (gen, pending) = match attribution {
            Some(Attribution::Generation(g)) => {
                let pending = match kind {
                    Kind::Notify => c.rec.notify,
                    _ => c.rec.payload.as_ref().map(|p| p.0),
                };
                (g, pending == Some(g))
            }
            Some(_) => {
                self.stats.acks_unattributed += 1;
                return;
            }
            None => (0, c.rec.bits & bits != 0),
        };
        if !pending {
            // The attributed send is no longer the pending item: nothing to clear.
            return;
        }
        self.issue(
            StoreOp::Ack {
                uuid,
                node: self.cc.node.clone(),
                epoch,
                kind,
                gen,
                bits,
                at: now,
            },
            Purpose::Ack { uuid },
        );
    }

    fn push(&mut self, conn: Option<ConnId>, req: PushRequest) -> OpId {
        let kind = req.msg.kind();
        self.issue(
            StoreOp::Push {
                uuid: req.uuid,
                msg: req.msg,
                at: self.now,
            },
            Purpose::Push {
                conn,
                uuid: req.uuid,
                kind,
            },
        )
    }

    // ----------------------------------------------------------------------------------------
    // Store results
    // ----------------------------------------------------------------------------------------

    fn issue(&mut self, op: StoreOp, purpose: Purpose) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        let k = match op {
            StoreOp::Push { .. } => 0,
            StoreOp::Ack { .. } => 1,
            StoreOp::Bind { .. } => 2,
            StoreOp::Drain { .. } => 3,
        };
        self.stats.store_ops[k] += 1;
        self.ops.push_back((id, op));
        self.inflight.insert(id, purpose);
        self.deadlines
            .push(Reverse((self.now + self.cc.store_timeout, id)));
        id
    }

    fn on_result(&mut self, id: OpId, p: Purpose, result: StoreResult) {
        if let Err(error) = &result {
            match error {
                StoreError::Timeout => self.stats.store_timeouts += 1,
                StoreError::Unavailable => self.stats.store_errors += 1,
            }
            self.events
                .push_back(ClusterEvent::StoreFailed { id, error: *error });
        }
        match p {
            Purpose::Push { conn, uuid, kind } => {
                // Decided by the acceptance step at the end of the turn, not here.
                self.finished.push_back(Finished {
                    id,
                    conn,
                    uuid,
                    kind,
                    result,
                });
            }
            Purpose::Ack { uuid } => match result {
                Ok(StoreReply::Acked { record, cleared }) => {
                    if cleared {
                        self.stats.acks[1] += 1;
                    }
                    self.learn(uuid, record);
                }
                Ok(StoreReply::Stale(_)) => self.drop_copy(uuid),
                // Not stored: the item stays pending and is re-sent at the next heartbeat.
                _ => {}
            },
            Purpose::Bind { uuid } => {
                let Some(e) = self.entries.get_mut(&uuid) else {
                    return;
                };
                let Some((_, app_id, via, changed, wanted)) = e.bind.take() else {
                    return;
                };
                let early = e.early.take();
                let Ok(StoreReply::Bound(rec)) = result else {
                    // No items known: the next heartbeat binds again.
                    return;
                };
                let epoch = rec.epoch;
                let fresh = e.copy.is_none();
                // Any send still in the ledger was made from a copy that was dropped, so it
                // is superseded already: its ack is consumed first and clears nothing.
                e.copy = Some(Copy {
                    renewed: newest_push(&rec).max(self.now),
                    rec,
                });
                let online = e.online;
                self.stats.binds += 1;
                if fresh {
                    self.stats.owned += 1;
                }
                self.events.push_back(ClusterEvent::Bound { uuid, epoch });
                if let Some(r) = early {
                    let ver = r.ver;
                    if self.learn(uuid, r) {
                        self.done.push((uuid, ver));
                    }
                }
                if online && wanted {
                    self.answer(uuid, app_id, via, changed);
                }
            }
            Purpose::Drain { done } => {
                self.draining = false;
                match result {
                    Ok(StoreReply::Drained { marks, more }) => {
                        for m in marks {
                            self.stats.drained += 1;
                            self.learn(m.uuid, m.record);
                            self.done.push((m.uuid, m.ver));
                        }
                        self.drain_now |= more;
                    }
                    _ => {
                        // Those marks may still be set: tell the store again next time.
                        let mut d = done;
                        d.append(&mut self.done);
                        self.done = d;
                    }
                }
                self.maybe_drain();
            }
        }
    }

    /// The acceptance step's way in ([`crate::driver::StoreConfirmed`]): takes the oldest
    /// push whose store operation finished, lets `rule` decide its reply from what the store
    /// said, and applies the decision: an accepted push updates the copy and is sent, or
    /// pokes its owner; a refused one sends nothing. Its reply slot is filled and the
    /// connection's replies leave in request order.
    pub(crate) fn settle_next(
        &mut self,
        rule: impl FnOnce(&Confirmation) -> PushReply,
    ) -> Option<(OpId, PushReply)> {
        let f = self.finished.pop_front()?;
        let confirmation = Confirmation::of(&f.result);
        let rec = match f.result {
            Ok(StoreReply::Pushed(rec) | StoreReply::PushedUnreplicated(rec)) => Some(rec),
            _ => None,
        };
        let (reply, sent) = match (rule(&confirmation), rec) {
            // Only a stored record can be accepted, whatever the rule says.
            (PushReply::Accepted, Some(rec)) => {
                self.stats.pushes[0] += 1;
                (PushReply::Accepted, self.pushed(f.uuid, rec))
            }
            _ => {
                self.stats.pushes[2] += 1;
                if confirmation == Confirmation::Unreplicated {
                    self.stats.unreplicated_refused += 1;
                }
                (PushReply::Failed, 0)
            }
        };
        self.events.push_back(ClusterEvent::PushAnswered {
            uuid: f.uuid,
            kind: f.kind,
            reply,
            sent,
        });
        if let Some(conn) = f.conn {
            if let Some(c) = self.conns.get_mut(&conn) {
                if let Some(s) = c.replies.iter_mut().find(|s| **s == Err(f.id)) {
                    *s = Ok(reply);
                }
            }
            self.flush_replies(conn);
        }
        Some((f.id, reply))
    }

    /// A push is stored: update our copy and send, or poke the owner.
    fn pushed(&mut self, uuid: Uuid, rec: StoredRecord) -> u8 {
        match &rec.owner {
            Some(o) if *o == self.cc.node => {
                let before = self.stats.deliveries;
                let ver = rec.ver;
                if self.learn(uuid, rec) {
                    // Merged from the reply: the push's dirty mark for us goes with the next
                    // drain instead of coming back in it.
                    self.done.push((uuid, ver));
                }
                (self.stats.deliveries - before) as u8
            }
            Some(o) => {
                // Another owner: a copy of ours is stale (dropped here rather than at the next
                // drain, so that no send of ours goes out from it meanwhile).
                self.learn(uuid, rec.clone());
                self.stats.pokes[0] += 1;
                self.peer_out
                    .push_back((o.clone(), PeerMsg::Poke { uuid, record: rec }));
                0
            }
            None => 0,
        }
    }

    /// Merges a record seen in a store reply, poke or drain into our copy, sending what is new
    /// to an online device. Returns true when the record needs nothing more from us (merged,
    /// or not ours to hold), so a dirty mark at its version may be removed.
    fn learn(&mut self, uuid: Uuid, rec: StoredRecord) -> bool {
        let mine = rec.owner.as_ref() == Some(&self.cc.node);
        let Some(e) = self.entries.get_mut(&uuid) else {
            return true;
        };
        if e.bind.is_some() {
            if mine && e.early.as_ref().is_none_or(|x| x.ver < rec.ver) {
                e.early = Some(rec);
            }
            return false;
        }
        let Some(c) = e.copy.as_mut() else {
            return true;
        };
        if !mine || rec.epoch > c.rec.epoch {
            self.drop_copy(uuid);
            return true;
        }
        if rec.epoch < c.rec.epoch || rec.ver <= c.rec.ver {
            return true;
        }
        c.renewed = c.renewed.max(newest_push(&rec));
        let old = std::mem::replace(&mut c.rec, rec);
        let new = &c.rec;
        let mut out: Vec<(DownMsg, Option<(usize, Gen)>)> = Vec::new();
        if let Some(g) = new.notify.filter(|g| old.notify != Some(*g)) {
            out.push((DownMsg::Notify, Some((0, g))));
        }
        if new.bits & !old.bits != 0 {
            out.push((DownMsg::Bits(new.bits), None));
        }
        if let Some((g, p)) = new
            .payload
            .as_ref()
            .filter(|p| old.payload.as_ref() != Some(*p))
        {
            out.push((DownMsg::Payload(p.clone()), Some((1, *g))));
        }
        let dests: Vec<Dest> = [
            e.online.then_some(e.addr).flatten().map(Dest::Udp),
            e.tcp.map(Dest::Tcp),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (msg, send) in out {
            for d in &dests {
                if let Some((k, gen)) = send {
                    e.ledger[k].on_send(gen, self.now, self.ack_window);
                    self.events.push_back(ClusterEvent::Sent {
                        uuid,
                        kind: if k == 0 { Kind::Notify } else { Kind::Payload },
                        gen,
                        epoch: c.rec.epoch,
                    });
                }
                self.stats.deliveries += 1;
                self.transmits.push_back(Transmit {
                    dest: *d,
                    payload: Payload::Down(DownPacket {
                        app_id: 0,
                        msg: msg.clone(),
                    }),
                });
            }
        }
        true
    }

    fn drop_copy(&mut self, uuid: Uuid) {
        if let Some(e) = self.entries.get_mut(&uuid) {
            if e.copy.take().is_some() {
                self.stats.owned -= 1;
                self.stats.dropped += 1;
                // The record may move on without us: no ack of an earlier send may clear.
                e.ledger.iter_mut().for_each(SendLedger::supersede);
                self.events.push_back(ClusterEvent::Dropped { uuid });
            }
        }
    }

    fn maybe_drain(&mut self) {
        if self.draining || !(self.drain_now || self.now >= self.next_drain) {
            return;
        }
        self.drain_now = false;
        self.draining = true;
        self.next_drain = self.now + self.cc.drain_every;
        let done = std::mem::take(&mut self.done);
        self.issue(
            StoreOp::Drain {
                node: self.cc.node.clone(),
                done: done.clone(),
                limit: self.cc.drain_limit,
            },
            Purpose::Drain { done },
        );
    }

    // ----------------------------------------------------------------------------------------
    // Connections, time
    // ----------------------------------------------------------------------------------------

    fn flush_replies(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        while let Some(Ok(r)) = c.replies.front() {
            self.transmits.push_back(Transmit {
                dest: Dest::Tcp(conn),
                payload: Payload::Reply(*r),
            });
            c.replies.pop_front();
        }
    }

    fn drop_conn(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.guard.close(c.port, c.ip);
        for u in c.attached {
            if let Some(e) = self.entries.get_mut(&u) {
                if e.tcp == Some(conn) {
                    e.tcp = None;
                    if e.addr.is_none() {
                        // Nothing sent on this connection can be acked any more.
                        e.ledger.iter_mut().for_each(SendLedger::forget);
                    }
                }
            }
        }
    }

    /// How long after its last renewal a copy's record is bound again: half the pending ttl,
    /// and at least one online window before it ends (a device online here heartbeats within
    /// every window, so its record is renewed before it expires).
    fn renew_after(&self) -> Duration {
        (self.cfg.pending_ttl / 2).min(self.cfg.pending_ttl.saturating_sub(self.window))
    }

    fn idle_timeout(&self, port: Port) -> Duration {
        match port {
            Port::Device => self.cfg.device_tcp_idle,
            Port::Push => self.cfg.push_tcp_idle,
        }
    }

    fn limited(&mut self, l: Limited) {
        self.stats.limited.incr(l);
        if self.guard.held(l) {
            self.events.push_back(ClusterEvent::Limited { limit: l });
        }
    }

    fn invalid(&mut self, reason: InvalidPacket) {
        self.stats.invalid += 1;
        self.events.push_back(ClusterEvent::Invalid { reason });
    }

    fn advance(&mut self, now: Time) {
        self.now = self.now.max(now);
        let now = self.now;
        while let Some(Reverse((t, uuid))) = self.offline_due.peek().copied() {
            if t > now {
                break;
            }
            self.offline_due.pop();
            let Some(e) = self.entries.get_mut(&uuid) else {
                continue;
            };
            if !e.online {
                continue;
            }
            let due = e.last_seen + self.window + Duration::from_millis(1);
            if due > now {
                self.offline_due.push(Reverse((due, uuid)));
                continue;
            }
            // Offline here: the device may bind elsewhere now, so our copy can go stale. Drop
            // it; the store keeps the items and the next heartbeat binds again.
            e.online = false;
            self.stats.online -= 1;
            if e.copy.take().is_some() {
                self.stats.owned -= 1;
            }
            e.ledger.iter_mut().for_each(SendLedger::supersede);
            self.events.push_back(ClusterEvent::Offline { uuid });
            if e.bind.is_none() && e.tcp.is_none() {
                self.entries.remove(&uuid);
            }
        }
        while let Some(Reverse((t, id))) = self.deadlines.peek().copied() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            if let Some(p) = self.inflight.remove(&id) {
                self.on_result(id, p, Err(StoreError::Timeout));
            }
        }
        while let Some(Reverse((t, conn))) = self.idle.peek().copied() {
            if t > now {
                break;
            }
            self.idle.pop();
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            let deadline = c.last_active + self.idle_timeout(c.port);
            if deadline <= now {
                self.drop_conn(conn);
                self.closes.push_back(conn);
            } else {
                self.idle.push(Reverse((deadline, conn)));
            }
        }
        self.maybe_drain();
    }
}

/// The newest push time in a record (a push restarts the record's expiry).
fn newest_push(rec: &StoredRecord) -> Time {
    rec.pushed_at
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(Time::ZERO)
}

fn dest(via: Via) -> Dest {
    match via {
        Via::Udp(a) => Dest::Udp(a),
        Via::Tcp(c) => Dest::Tcp(c),
    }
}
