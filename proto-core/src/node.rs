//! The node state machine: every client record and every protocol rule of PROTOCOL.md 4 and 8
//! (signed devices, section 9, are in [`signed`]).

mod signed;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use foldhash::fast::FixedState;
use hashbrown::HashMap;

use crate::ack::{Attribution, Parked, SendLedger, Window};
use crate::codec::{
    check_payload_len, DeviceMsg, DevicePacket, DownMsg, DownPacket, InvalidPacket, Kind, PushMsg,
    PushReject, PushReply, PushRequest, Uuid,
};
use crate::config::{Config, ConfigError, ReplyPolicy};
use crate::counters::counter_key;
use crate::idle::IdleWheel;
use crate::limits::{Guard, Limited};
use crate::output::{CloseReason, Dest, Event, Payload, Stats, Transmit, Transport};
use crate::record::{flag, Record, K_NOTIFY, K_PAYLOAD};
use crate::registry::Registry;
use crate::signed::{Keyring, VERSION as SIGNED_VERSION};
use crate::state::{Change, Pending, RecordState};
use crate::stream::{Decoded, StreamDecoder};
use crate::time::{secs32, Time};
use crate::wheel::Wheel;
use crate::ConnId;

mod turn;

/// Which listening port a TCP connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    /// Port 9966: a device stream.
    Device,
    /// Port 9999: an app server's push stream.
    Push,
}

counter_key!(Port { Device, Push });

impl Port {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Port::Device => "device",
            Port::Push => "push",
        }
    }
}

/// Where a device packet came from, and so where its answers go.
#[derive(Clone, Copy, Debug)]
enum Via {
    Udp(SocketAddr),
    Tcp(ConnId),
}

struct Conn {
    port: Port,
    ip: IpAddr,
    /// `None` only while its frames are being processed.
    decoder: Option<StreamDecoder>,
    last_active: Time,
    /// Records this connection is attached to (normally one).
    attached: Vec<u32>,
    /// Ledgers of records whose attachment moved from this connection to another one while
    /// it stayed open: acks of those sends may still come on it if it is attached again.
    parked: Parked<Uuid>,
}

/// How often the expiry sweep runs, and the least records it visits per run.
const SWEEP_EVERY_MS: u64 = 1000;
const SWEEP_MIN_CHUNK: usize = 4096;
/// A full expiry pass takes about this many sweeps on a large node.
const SWEEP_PASS: usize = 3600;

/// The whole server behaviour of DDPush v1, as a deterministic state machine.
///
/// See the crate docs for the call order. Every `handle_*` takes the current time; outputs
/// accumulate until drained by the `poll_*` methods.
pub struct Node {
    cfg: Config,
    window_s: u32,
    /// The in-flight window of the ack rule, in ledger ticks and as a duration.
    ack_window: Window,
    reg: Registry,
    wheel: Wheel,
    /// The abuse limits and connection bounds (shared with the cluster node).
    guard: Guard,
    conns: HashMap<ConnId, Conn, FixedState>,
    idle: IdleWheel,
    transmits: VecDeque<Transmit>,
    closes: VecDeque<ConnId>,
    events: VecDeque<Event>,
    changes: VecDeque<Change>,
    stats: Stats,
    now: Time,
    sweep_cursor: usize,
    next_sweep: Time,
    scratch: Vec<u32>,
    /// Ledgers and generations of records removed while a send of theirs was younger than
    /// the ack window, so a record re-created by the heartbeat that follows inherits them
    /// (see `remove_slot`); dropped at the time given. Pruned by the sweep.
    tombstones: HashMap<Uuid, Tombstone, FixedState>,
    /// What each push and operator removal of the current turn changed, so a turn whose
    /// write fails can take them back (see [`crate::driver`]). Emptied once the turn's changes are drained.
    undo: Vec<turn::Undo>,
    /// Set by [`Node::apply`] before the node knows the time: the first input then tells the
    /// signed-key replay window that a restart happened.
    replayed: bool,
    /// Keys of the signed-only uuids (PROTOCOL.md 9).
    keys: Keyring,
    /// While a verified signed packet is handled: its uuid, the key id it used (which seals
    /// the answers) and the keyring's slot hint.
    answering: Option<signed::Answering>,
    /// Key states before this turn's key updates, to take them back if the turn's write fails.
    key_undo: Vec<signed::KeyUndo>,
}

/// What a removed record leaves for a re-creation within the ack window.
struct Tombstone {
    ledger: [SendLedger; 2],
    gen: [crate::ack::Generation; 2],
    until: Time,
}

impl Node {
    /// A node with no clients.
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let window_s = secs32(cfg.online_window());
        let seed = cfg.hash_seed;
        Ok(Node {
            window_s,
            ack_window: Window::new(cfg.ack_window),
            reg: Registry::new(seed),
            wheel: Wheel::new(window_s + 1),
            guard: Guard::new(cfg.limits.clone(), seed),
            conns: HashMap::with_hasher(FixedState::with_seed(seed ^ 7)),
            idle: IdleWheel::new(),
            transmits: VecDeque::new(),
            closes: VecDeque::new(),
            events: VecDeque::new(),
            changes: VecDeque::new(),
            stats: Stats::default(),
            now: Time::ZERO,
            sweep_cursor: 0,
            next_sweep: Time::ZERO,
            scratch: Vec::new(),
            tombstones: HashMap::with_hasher(FixedState::with_seed(seed ^ 9)),
            undo: Vec::new(),
            keys: Keyring::new(cfg.replay_window, seed),
            answering: None,
            key_undo: Vec::new(),
            replayed: false,
            cfg,
        })
    }

    /// The configuration this node runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters and gauges.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Number of client records.
    pub fn len(&self) -> usize {
        self.reg.len()
    }

    /// True when no client record exists.
    pub fn is_empty(&self) -> bool {
        self.reg.len() == 0
    }

    /// Approximate heap bytes of the client state, for memory figures.
    pub fn heap_bytes(&self) -> usize {
        self.reg.heap_bytes() + self.wheel.heap_bytes() + self.keys.heap_bytes()
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
        if data.first() == Some(&SIGNED_VERSION) {
            return self.on_signed(data, Via::Udp(from));
        }
        match DevicePacket::decode(data) {
            Ok(p) => self.on_device(p, Via::Udp(from)),
            Err(e) => self.invalid(e, Transport::Udp),
        }
    }

    /// Datagrams that arrived together on the device UDP port (one `recvmmsg`), in order:
    /// the same as [`Node::handle_udp`] for each in turn. First, every signed one's keyring
    /// entry is loaded, all of them at once, then the records their slot hints name, so that
    /// their cache misses overlap each other instead of each one stalling its own packet
    /// (with the kernel's UDP path between two heartbeats of a uuid, neither is still
    /// cached; profiled, docs/BENCHMARKS.md).
    pub fn handle_udp_batch(&mut self, now: Time, batch: &[(SocketAddr, &[u8])]) {
        if batch.len() > 1 {
            self.load_ahead(batch);
        }
        for &(from, data) in batch {
            self.handle_udp(now, from, data);
        }
    }

    /// A TCP connection was accepted. Returns false if it is refused (too many in all or from
    /// its IP); the adapter then closes it without calling [`Node::handle_tcp_close`].
    ///
    /// `conn` must be unique for the life of the node.
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
            self.events.push_back(Event::Closed {
                conn,
                reason: CloseReason::Refused,
            });
            return false;
        }
        let decoder = match port {
            Port::Device => StreamDecoder::device(),
            Port::Push => StreamDecoder::new(self.cfg.max_content),
        };
        self.conns.insert(
            conn,
            Conn {
                port,
                ip: peer.ip(),
                decoder: Some(decoder),
                last_active: self.now,
                attached: Vec::new(),
                parked: Parked::default(),
            },
        );
        self.stats.conns.incr(port);
        self.idle.schedule(conn, self.now + self.idle_timeout(port));
        true
    }

    /// Bytes arrived on a TCP connection, in any split. Every whole frame is processed in order;
    /// a frame that cannot be delimited closes the connection ([`Node::poll_close`]).
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
                    Port::Device if f.header.version == SIGNED_VERSION => {
                        self.on_signed(f.raw, Via::Tcp(conn))
                    }
                    Port::Device => match DevicePacket::from_parts(&f.header, f.content) {
                        Ok(p) => self.on_device(p, Via::Tcp(conn)),
                        Err(e) => self.invalid(e, Transport::Tcp),
                    },
                    Port::Push => {
                        let reply = match PushRequest::from_parts(&f.header, f.content) {
                            Ok(req) => self.push(req),
                            Err(r) => self.reject(r),
                        };
                        self.transmits.push_back(Transmit {
                            dest: Dest::Tcp(conn),
                            payload: Payload::Reply(reply),
                        });
                    }
                },
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.stats.conns_framing += 1;
            self.close(conn, CloseReason::Framing);
        } else if let Some(c) = self.conns.get_mut(&conn) {
            c.decoder = Some(dec);
        }
    }

    /// The peer or the adapter closed a connection.
    pub fn handle_tcp_close(&mut self, now: Time, conn: ConnId) {
        self.advance(now);
        self.drop_conn(conn);
    }

    /// A push request from an app server or an operator tool, answered at once.
    ///
    /// A 0x20 payload longer than `max_content` is rejected here; on port 9999 such a request
    /// never gets this far (its connection is closed at the header).
    pub fn handle_push(&mut self, now: Time, req: PushRequest) -> PushReply {
        self.advance(now);
        if let PushMsg::Payload(p) = &req.msg {
            if check_payload_len(p.len(), self.cfg.max_content).is_err() {
                return self.reject(PushReject::Length);
            }
        }
        self.push(req)
    }

    /// Time passed: offline detection, idle connections, expiry. Call at
    /// [`Node::poll_timeout`]; calling it early or often is harmless.
    pub fn handle_timeout(&mut self, now: Time) {
        self.advance(now);
    }

    // ----------------------------------------------------------------------------------------
    // Outputs
    // ----------------------------------------------------------------------------------------

    /// The next packet or reply to send. Send them in the order returned.
    ///
    /// Before sending any transmit of a turn, make that turn's [`Node::poll_change`]s durable:
    /// a `0x00` reply promises the push survives a crash. [`crate::Driver::commit`] does that;
    /// a debug build panics if a transmit is polled while changes are still queued.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        debug_assert!(
            self.changes.is_empty(),
            "a transmit was polled before its turn's changes were committed"
        );
        self.transmits.pop_front()
    }

    /// A connection the adapter must close (after flushing what was queued for it).
    #[must_use]
    pub fn poll_close(&mut self) -> Option<ConnId> {
        self.closes.pop_front()
    }

    /// The next event for logs and tests.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next durable change for the journal. Draining them all ends the turn: its pushes
    /// count as written ([`crate::Driver::commit`] is the adapter's way to say otherwise).
    #[must_use]
    pub fn poll_change(&mut self) -> Option<Change> {
        let c = self.changes.pop_front();
        if self.changes.is_empty() {
            self.undo.clear();
        }
        c
    }

    /// When [`Node::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        let wheel = self.wheel.next_due().map(|s| Time::from_secs(u64::from(s)));
        let idle = self.idle.next_due();
        let sweep = (self.reg.len() > 0).then_some(self.next_sweep);
        [wheel, idle, sweep].into_iter().flatten().min()
    }

    // ----------------------------------------------------------------------------------------
    // State export and import
    // ----------------------------------------------------------------------------------------

    /// Every record, in slot order, for a snapshot.
    pub fn records(&self) -> impl Iterator<Item = RecordState> + '_ {
        self.reg.live_slots().map(|s| self.state_of(s))
    }

    /// One record, for operators.
    pub fn record(&self, uuid: &Uuid) -> Option<RecordState> {
        self.reg.find(uuid).map(|s| self.state_of(s))
    }

    /// Whether the client is online at the node's current time.
    pub fn is_online(&self, uuid: &Uuid) -> bool {
        self.reg
            .find(uuid)
            .is_some_and(|s| self.reg.rec(s).has(flag::ONLINE))
    }

    /// The durable part of every record, sorted by uuid: what restore + replay must reproduce.
    pub fn pending(&self) -> Vec<Pending> {
        let mut v: Vec<Pending> = self
            .reg
            .live_slots()
            .map(|s| {
                let r = self.reg.rec(s);
                Pending {
                    uuid: r.uuid,
                    notify: r.has(flag::NOTIFY),
                    bits: r.mask(),
                    payload: self.reg.payloads.get(&s).map(|p| p.to_vec()),
                }
            })
            .collect();
        v.sort();
        v
    }

    /// Loads one record from a snapshot (or an upstream import). A record whose last
    /// heartbeat is within the online window of `now` starts online; its address must be
    /// confirmed again for `sa_changed`. Its ack ledgers start empty (nothing is persisted):
    /// acks clear nothing until the first send after the restart.
    pub fn restore(&mut self, now: Time, st: RecordState) {
        // Bring the wheel's cursor up to `now` first: a fresh node's wheel starts at second 0
        // and cannot hold a deadline more than one window ahead of its cursor.
        self.advance(now);
        let now_s = self.now.secs32();
        if let Some(old) = self.reg.find(&st.uuid) {
            self.remove_slot(old);
        }
        let mut rec = Record::new(st.uuid, st.last_active.secs32());
        if let Some(hb) = st.last_heartbeat {
            rec.last_hb = hb.secs32().max(rec.last_hb);
            rec.set(flag::HAS_HB, true);
        }
        rec.last_push = st.last_push.map_or(0, Time::secs32);
        rec.set_mask(st.bits);
        rec.set(flag::NOTIFY, st.notify);
        rec.set(flag::PAYLOAD, st.payload.is_some());
        let slot = self.reg.insert(rec);
        if let Some(p) = st.payload {
            self.reg.payloads.insert(slot, p);
        }
        if let Some(a) = st.addr {
            self.reg.set_addr(slot, a);
        }
        self.stats.clients += 1;
        self.count_pending(slot, 1);
        let r = self.reg.rec(slot);
        if r.has(flag::HAS_HB) && now_s <= r.last_hb.saturating_add(self.window_s) {
            let due = r.last_hb.saturating_add(self.window_s).saturating_add(1);
            self.reg.rec_mut(slot).set(flag::ONLINE, true);
            self.stats.online += 1;
            self.wheel.schedule(slot, due);
        }
    }

    /// Replays one journaled change on top of a restored snapshot.
    pub fn apply(&mut self, change: &Change) {
        if self.now == Time::ZERO {
            // No time yet (empty snapshot): the first input tells the keys of the restart.
            self.replayed = true;
        }
        match change {
            Change::Created { uuid, at } => {
                if self.reg.find(uuid).is_none() {
                    self.create(*uuid, *at);
                }
            }
            Change::Pushed { uuid, at, msg } => {
                let slot = match self.reg.find(uuid) {
                    Some(s) => s,
                    None => self.create(*uuid, *at),
                };
                self.store(slot, *at, msg);
            }
            Change::Cleared { uuid, kind, bits } => {
                if let Some(slot) = self.reg.find(uuid) {
                    self.clear(slot, *kind, *bits);
                }
            }
            Change::Removed { uuid } => {
                if let Some(slot) = self.reg.find(uuid) {
                    self.remove_slot(slot);
                }
            }
            Change::Keyed { .. } | Change::Unkeyed { .. } => self.apply_key(change),
        }
    }

    /// Removes a record (operator action); journaled like an expiry, and taken back (the
    /// record as it was) if the turn's write fails.
    pub fn remove(&mut self, now: Time, uuid: &Uuid) -> bool {
        self.advance(now);
        match self.reg.find(uuid) {
            Some(slot) => {
                self.note_removal(slot);
                self.remove_slot(slot);
                self.changes.push_back(Change::Removed { uuid: *uuid });
                true
            }
            None => false,
        }
    }

    // ----------------------------------------------------------------------------------------
    // Rules
    // ----------------------------------------------------------------------------------------

    fn idle_timeout(&self, port: Port) -> std::time::Duration {
        match port {
            Port::Device => self.cfg.device_tcp_idle,
            Port::Push => self.cfg.push_tcp_idle,
        }
    }

    fn state_of(&self, slot: u32) -> RecordState {
        let r = self.reg.rec(slot);
        RecordState {
            uuid: r.uuid,
            last_heartbeat: r
                .has(flag::HAS_HB)
                .then(|| Time::from_secs(u64::from(r.last_hb))),
            last_active: Time::from_secs(u64::from(r.last_hb)),
            last_push: (r.last_push != 0).then(|| Time::from_secs(u64::from(r.last_push))),
            addr: self.reg.addr(slot),
            notify: r.has(flag::NOTIFY),
            bits: r.mask(),
            payload: self.reg.payloads.get(&slot).cloned(),
        }
    }

    fn invalid(&mut self, e: InvalidPacket, t: Transport) {
        self.stats.invalid.incr((t, e));
        self.events.push_back(Event::Invalid {
            reason: e,
            transport: t,
        });
    }

    fn limited(&mut self, l: Limited) {
        self.stats.limited.incr(l);
        if self.guard.held(l) {
            self.events.push_back(Event::Limited { limit: l });
        }
    }

    fn reject(&mut self, r: PushReject) -> PushReply {
        self.stats.pushes_rejected.incr(r);
        self.events.push_back(Event::PushRejected { reason: r });
        PushReply::Rejected
    }

    /// Whether a new record may be created (`max_clients`); a refusal is counted.
    fn admit_client(&mut self) -> bool {
        match self
            .guard
            .admit_client(self.reg.len(), self.cfg.max_clients)
        {
            Ok(()) => true,
            Err(first) => {
                self.stats.capacity_refused += 1;
                if first {
                    self.events.push_back(Event::CapacityReached);
                }
                false
            }
        }
    }

    fn create(&mut self, uuid: Uuid, at: Time) -> u32 {
        self.stats.clients += 1;
        self.stats.created += 1;
        let mut rec = Record::new(uuid, at.secs32());
        if let Some(t) = self.tombstones.remove(&uuid) {
            rec.ledger = t.ledger;
            rec.gen = t.gen;
        }
        self.reg.insert(rec)
    }

    /// A valid v1 device packet.
    fn on_device(&mut self, p: DevicePacket, via: Via) {
        if self.keys.contains(&p.uuid) {
            return self.unsigned(p, via);
        }
        self.dispatch(p, via);
    }

    /// A device packet that may act: a v1 packet of a v1 uuid, or a verified signed one.
    fn dispatch(&mut self, p: DevicePacket, via: Via) {
        match p.msg {
            DeviceMsg::Heartbeat => self.heartbeat(p.app_id, p.uuid, via),
            DeviceMsg::AckNotify => self.ack(p.uuid, Kind::Notify, 0, via),
            DeviceMsg::AckBits(m) => self.ack(p.uuid, Kind::Bits, m, via),
            DeviceMsg::AckPayload => self.ack(p.uuid, Kind::Payload, 0, via),
        }
    }

    /// Marks the client alive now; the first sign of life after the window starts a new
    /// online period with one wheel entry.
    fn touch(&mut self, slot: u32) {
        let now_s = self.now.secs32();
        let window = self.window_s;
        let r = self.reg.rec_mut(slot);
        r.last_hb = r.last_hb.max(now_s);
        r.set(flag::HAS_HB, true);
        if !r.has(flag::ONLINE) {
            r.set(flag::ONLINE, true);
            let uuid = r.uuid;
            self.stats.online += 1;
            self.events.push_back(Event::Online { uuid });
            self.wheel
                .schedule(slot, now_s.saturating_add(window).saturating_add(1));
        }
    }

    fn heartbeat(&mut self, app_id: u8, uuid: Uuid, via: Via) {
        self.stats.heartbeats += 1;
        let slot = match self.find_answering(&uuid) {
            Some(s) => s,
            None => {
                if !self.cfg.create_on_heartbeat {
                    self.stats.unknown_heartbeats += 1;
                    return;
                }
                if !self.admit_client() {
                    self.stats.unknown_heartbeats += 1;
                    return;
                }
                let s = self.create(uuid, self.now);
                self.changes
                    .push_back(Change::Created { uuid, at: self.now });
                self.events.push_back(Event::Created { uuid });
                s
            }
        };
        self.touch(slot);
        let addr_changed = match via {
            Via::Udp(a) => {
                let r = self.reg.rec(slot);
                let old = self.reg.addr(slot);
                let changed = !r.has(flag::SA_KNOWN) || old != Some(a);
                if old.is_some_and(|o| o != a) && !r.has(flag::TCP) {
                    // A new socket: sends to the old address can no longer be acked (acks are
                    // only taken from the recorded address, which moves now).
                    self.forget_sends(slot);
                }
                if changed {
                    self.reg.set_addr(slot, a);
                    self.reg.rec_mut(slot).set(flag::SA_KNOWN, true);
                }
                changed
            }
            Via::Tcp(c) => {
                self.attach(slot, c);
                false
            }
        };
        // The heartbeat is a fence for the ack rule (see `crate::ack`), answered or not.
        let (now, window) = (self.now, self.ack_window);
        for l in &mut self.reg.rec_mut(slot).ledger {
            l.on_fence(now, window);
        }
        if let Err(l) = self.guard.answer(self.now, slot) {
            self.limited(l);
            return;
        }
        let r = self.reg.rec(slot);
        let mut out: [Option<DownMsg>; 3] = [None, None, None];
        if r.has(flag::NOTIFY) {
            out[0] = Some(DownMsg::Notify);
        }
        if r.mask() != 0 {
            out[1] = Some(DownMsg::Bits(r.mask()));
        }
        if let Some(p) = self.reg.payloads.get(&slot) {
            out[2] = Some(DownMsg::Payload(p.clone()));
        }
        let resend = out.iter().any(Option::is_some);
        if !resend {
            let reply = match (self.cfg.reply_policy, via) {
                (_, Via::Tcp(_)) | (ReplyPolicy::Never, _) => false,
                (ReplyPolicy::Always, _) => true,
                (ReplyPolicy::SaChanged, _) => addr_changed,
            };
            if !reply {
                return;
            }
            out[0] = Some(DownMsg::HeartbeatReply);
        }
        let extra = self.down_extra(&uuid);
        let dest = match via {
            Via::Udp(a) => {
                let bytes: usize = out
                    .iter()
                    .flatten()
                    .map(|m| {
                        DownPacket {
                            app_id,
                            msg: m.clone(),
                        }
                        .encoded_len()
                            + extra
                    })
                    .sum();
                if let Err(l) = self.guard.spend(self.now, a.ip(), bytes) {
                    self.limited(l);
                    return;
                }
                Dest::Udp(a)
            }
            Via::Tcp(c) => Dest::Tcp(c),
        };
        for msg in out.into_iter().flatten() {
            let kind = match &msg {
                DownMsg::HeartbeatReply => None,
                DownMsg::Notify => Some(Kind::Notify),
                DownMsg::Bits(_) => Some(Kind::Bits),
                DownMsg::Payload(_) => Some(Kind::Payload),
            };
            match kind {
                Some(k) => {
                    self.note_send(slot, k);
                    self.stats.resends += 1;
                    self.events.push_back(Event::Resent { uuid, kind: k });
                }
                None => self.stats.heartbeat_replies += 1,
            }
            let payload = self.down_payload(&uuid, DownPacket { app_id, msg });
            self.transmits.push_back(Transmit { dest, payload });
        }
    }

    /// Notes a send of the item's current generation in its ledger (0x11 needs none: its ack
    /// names the bits it clears).
    fn note_send(&mut self, slot: u32, k: Kind) {
        let (now, window) = (self.now, self.ack_window);
        let r = self.reg.rec_mut(slot);
        if let Some(i) = ledger_index(k) {
            let g = r.gen[i];
            r.ledger[i].on_send(g, now, window);
        }
    }

    fn forget_sends(&mut self, slot: u32) {
        for l in &mut self.reg.rec_mut(slot).ledger {
            l.forget();
        }
    }

    fn attach(&mut self, slot: u32, conn: ConnId) {
        if self.reg.tcp.get(&slot) == Some(&conn) {
            return;
        }
        if !self.conns.contains_key(&conn) {
            return;
        }
        if self.reg.addr(slot).is_none() && self.reg.tcp.contains_key(&slot) {
            // Another connection replaces the attached one: sends on the old one can no longer
            // be acked (acks are only taken from the attached connection). With a UDP address
            // too, keep them. With no connection attached there is nothing to forget: a closed
            // connection's sends were forgotten when it closed, and a record re-created within
            // the ack window holds the removed record's sends, which may have gone to this very
            // connection (fuzz finding 8); if they went elsewhere, keeping them only makes the
            // next acks count as acks of older sends (a duplicate at worst) until the fence.
            let r = self.reg.rec(slot);
            let (uuid, ledger) = (r.uuid, r.ledger);
            let old = self.reg.tcp.get(&slot).copied();
            if let Some(oc) = old.and_then(|o| self.conns.get_mut(&o)) {
                oc.parked.park(uuid, ledger);
            }
            self.forget_sends(slot);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.attached.contains(&slot) {
            c.attached.push(slot);
        }
        // This connection may have been the record's before and still carry acks of what was
        // sent on it then (fuzz finding 13): they come first on the stream.
        let r = self.reg.rec_mut(slot);
        c.parked.restore(&r.uuid, &mut r.ledger);
        self.reg.tcp.insert(slot, conn);
        self.reg.rec_mut(slot).set(flag::TCP, true);
    }

    fn ack(&mut self, uuid: Uuid, kind: Kind, bits: u64, via: Via) {
        let Some(slot) = self.reg.find(&uuid) else {
            self.stats.acks_unknown += 1;
            return;
        };
        self.stats.acks += 1;
        // The SDK counts its heartbeat interval from the last packet it sent, acks included,
        // so an ack is a sign of life or the client would flap offline.
        self.touch(slot);
        // Only the path the sends went to can answer them (the SDK acks on the socket or
        // connection a message came in on).
        let on_path = match via {
            Via::Udp(a) => self.reg.addr(slot) == Some(a),
            Via::Tcp(c) => self.reg.tcp.get(&slot) == Some(&c),
        };
        let r = self.reg.rec_mut(slot);
        let (may_clear, has) = match (kind, ledger_index(kind)) {
            (Kind::Bits, _) | (_, None) => (true, r.mask() & bits != 0),
            (_, Some(i)) => {
                let a = match via {
                    _ if !on_path => Attribution::Unmatched,
                    Via::Udp(_) => r.ledger[i].on_ack(self.now, self.ack_window),
                    Via::Tcp(_) => r.ledger[i].on_stream_ack(),
                };
                if matches!(a, Attribution::Crossed(_)) {
                    self.stats.acks_crossed += 1;
                }
                let has = if i == K_NOTIFY {
                    r.has(flag::NOTIFY)
                } else {
                    r.has(flag::PAYLOAD)
                };
                (a.clears(r.gen[i]), has)
            }
        };
        let cleared = may_clear && has;
        if cleared {
            let bits = if kind == Kind::Bits {
                r.mask() & bits
            } else {
                0
            };
            self.clear(slot, kind, bits);
            self.changes.push_back(Change::Cleared { uuid, kind, bits });
            self.stats.acks_cleared += 1;
        }
        self.events.push_back(Event::Acked {
            uuid,
            kind,
            cleared,
        });
    }

    /// Applies a cleared item (live and in replay).
    fn clear(&mut self, slot: u32, kind: Kind, bits: u64) {
        self.count_pending(slot, -1);
        let r = self.reg.rec_mut(slot);
        match kind {
            Kind::Notify => r.set(flag::NOTIFY, false),
            Kind::Bits => r.set_mask(r.mask() & !bits),
            Kind::Payload => {
                r.set(flag::PAYLOAD, false);
                self.reg.payloads.remove(&slot);
            }
        }
        self.count_pending(slot, 1);
    }

    /// Adds (`sign` = 1) or removes (-1) the record's items from the pending gauges.
    fn count_pending(&mut self, slot: u32, sign: i64) {
        let r = self.reg.rec(slot);
        let items = [
            (Kind::Notify, r.has(flag::NOTIFY)),
            (Kind::Bits, r.mask() != 0),
            (Kind::Payload, r.has(flag::PAYLOAD)),
        ];
        for (k, on) in items {
            match (on, sign > 0) {
                (false, _) => {}
                (true, true) => self.stats.pending.add(k, sign.unsigned_abs()),
                (true, false) => self.stats.pending.sub(k, sign.unsigned_abs()),
            }
        }
    }

    fn push(&mut self, req: PushRequest) -> PushReply {
        let (slot, created) = match self.reg.find(&req.uuid) {
            Some(s) => (s, false),
            None => {
                if !self.admit_client() {
                    return self.reject(PushReject::Capacity);
                }
                (self.create(req.uuid, self.now), true)
            }
        };
        self.note_undo(slot, created, &req.msg);
        self.store(slot, self.now, &req.msg);
        self.changes.push_back(Change::Pushed {
            uuid: req.uuid,
            at: self.now,
            msg: req.msg.clone(),
        });
        self.stats.pushes_accepted += 1;

        let r = self.reg.rec(slot);
        let msg = match &req.msg {
            PushMsg::Notify => Some(DownMsg::Notify),
            // The whole mask goes out; a push of 0 onto an empty mask sends nothing.
            PushMsg::Bits(_) => (r.mask() != 0).then(|| DownMsg::Bits(r.mask())),
            PushMsg::Payload(p) => Some(DownMsg::Payload(p.clone())),
        };
        let mut sent = 0u8;
        if let Some(msg) = msg {
            let online = r.has(flag::ONLINE);
            let udp = online.then(|| self.reg.addr(slot)).flatten();
            let tcp = self.reg.tcp.get(&slot).copied();
            let kind = req.msg.kind();
            for dest in [udp.map(Dest::Udp), tcp.map(Dest::Tcp)]
                .into_iter()
                .flatten()
            {
                self.note_send(slot, kind);
                let payload = self.down_payload(
                    &req.uuid,
                    DownPacket {
                        app_id: 0,
                        msg: msg.clone(),
                    },
                );
                self.transmits.push_back(Transmit { dest, payload });
                sent += 1;
            }
        }
        self.stats.deliveries += u64::from(sent);
        self.events.push_back(Event::PushAccepted {
            uuid: req.uuid,
            kind: req.msg.kind(),
            sent,
        });
        PushReply::Accepted
    }

    /// Stores a push into a record (live and in replay).
    fn store(&mut self, slot: u32, at: Time, msg: &PushMsg) {
        let now_s = at.secs32();
        self.count_pending(slot, -1);
        let r = self.reg.rec_mut(slot);
        if let Some(i) = ledger_index(msg.kind()) {
            // A new generation: acks of earlier sends no longer clear the item.
            r.gen[i] = r.gen[i].wrapping_add(1);
        }
        match msg {
            PushMsg::Notify => r.set(flag::NOTIFY, true),
            PushMsg::Bits(b) => r.set_mask(r.mask() | b),
            PushMsg::Payload(p) => {
                r.set(flag::PAYLOAD, true);
                self.reg.payloads.insert(slot, p.clone());
            }
        }
        let r = self.reg.rec_mut(slot);
        r.last_push = r.last_push.max(now_s);
        self.count_pending(slot, 1);
    }

    fn remove_slot(&mut self, slot: u32) {
        let r = self.reg.rec(slot);
        // A device may still ack a send made just before the removal. The first send to a
        // re-created record follows a heartbeat (a fence), which forgets every send older
        // than the ack window, so the ledgers need to outlive the record only that long.
        let mut ledger = r.ledger;
        for l in &mut ledger {
            l.on_fence(self.now, self.ack_window);
        }
        if ledger.iter().any(|l| !l.is_empty()) {
            let until = self.now + self.cfg.ack_window;
            self.tombstones.insert(
                r.uuid,
                Tombstone {
                    ledger: r.ledger,
                    gen: r.gen,
                    until,
                },
            );
        }
        if r.has(flag::ONLINE) {
            self.stats.online -= 1;
        }
        self.count_pending(slot, -1);
        self.stats.clients -= 1;
        self.reg.remove(slot);
    }

    fn close(&mut self, conn: ConnId, reason: CloseReason) {
        if self.drop_conn(conn) {
            self.closes.push_back(conn);
            self.events.push_back(Event::Closed { conn, reason });
        }
    }

    fn drop_conn(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.remove(&conn) else {
            return false;
        };
        for slot in c.attached {
            if self.reg.tcp.get(&slot) == Some(&conn) {
                self.reg.tcp.remove(&slot);
                self.reg.rec_mut(slot).set(flag::TCP, false);
                if self.reg.addr(slot).is_none() {
                    // Nothing sent on this connection can be acked any more.
                    self.forget_sends(slot);
                }
            }
        }
        self.guard.close(c.port, c.ip);
        self.stats.conns.sub(c.port, 1);
        true
    }

    /// Moves the clock forward and runs everything that became due.
    fn advance(&mut self, now: Time) {
        self.now = self.now.max(now);
        let now = self.now;
        let now_s = now.secs32();
        if self.replayed {
            self.replayed = false;
            // Keys replayed before the node knew the time refuse pre-restart stamps from now.
            self.keys.restarted(now);
        }

        let mut due = std::mem::take(&mut self.scratch);
        self.wheel.expire(now_s, &mut due);
        for &slot in &due {
            let Some(r) = self.reg.get(slot) else {
                continue;
            };
            if !r.has(flag::ONLINE) {
                continue;
            }
            let deadline = r.last_hb.saturating_add(self.window_s).saturating_add(1);
            if deadline <= now_s {
                let uuid = r.uuid;
                self.reg.rec_mut(slot).set(flag::ONLINE, false);
                self.stats.online -= 1;
                self.events.push_back(Event::Offline { uuid });
            } else {
                self.wheel.schedule(slot, deadline);
            }
        }
        due.clear();
        self.scratch = due;

        let mut idle = Vec::new();
        self.idle.expire(now, &mut idle);
        for conn in idle {
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            let deadline = c.last_active + self.idle_timeout(c.port);
            if deadline <= now {
                self.stats.conns_idle += 1;
                self.close(conn, CloseReason::Idle);
            } else {
                self.idle.schedule(conn, deadline);
            }
        }

        if now >= self.next_sweep {
            self.next_sweep = Time(now.0.saturating_add(SWEEP_EVERY_MS));
            self.sweep(now_s);
        }
    }

    /// Visits a slice of the slots and removes expired records (PROTOCOL.md 8.7).
    fn sweep(&mut self, now_s: u32) {
        let now = self.now;
        self.tombstones.retain(|_, t| t.until >= now);
        let n = self.reg.slot_count();
        if n == 0 {
            return;
        }
        let chunk = (n / SWEEP_PASS).max(SWEEP_MIN_CHUNK).min(n);
        let idle_s = secs32(self.cfg.idle_expiry);
        let ttl_s = secs32(self.cfg.pending_ttl);
        for _ in 0..chunk {
            if self.sweep_cursor >= n {
                self.sweep_cursor = 0;
            }
            let slot = self.sweep_cursor as u32;
            self.sweep_cursor += 1;
            let Some(r) = self.reg.get(slot) else {
                continue;
            };
            let idle = now_s.saturating_sub(r.last_hb) >= idle_s;
            let stale = !r.pending() || now_s.saturating_sub(r.last_push) >= ttl_s;
            if idle && stale && !r.has(flag::TCP) {
                let uuid = r.uuid;
                self.remove_slot(slot);
                self.stats.expired += 1;
                self.changes.push_back(Change::Removed { uuid });
                self.events.push_back(Event::Expired { uuid });
            }
        }
    }
}

/// Index of an item's generation and ledger in a record; 0x11 has none.
fn ledger_index(k: Kind) -> Option<usize> {
    match k {
        Kind::Notify => Some(K_NOTIFY),
        Kind::Payload => Some(K_PAYLOAD),
        Kind::Bits => None,
    }
}
