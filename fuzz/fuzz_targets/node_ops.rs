//! Target 4: the node state machine under an arbitrary list of operations.
//!
//! Operations: pushes (direct and framed on port 9999), heartbeats and acks over UDP and TCP
//! from a small pool of uuids and addresses, raw datagrams and raw TCP bytes, TCP
//! open/close, time steps (ms to years), operator removal, snapshot, restart from
//! snapshot + journal, a restore+replay check that keeps the live node, and network
//! duplication over UDP: a copy of an ack the device sent (`DupAck`, right after the original
//! or later) and a copy of a send, which the device acks again (`DupSend`). A stream duplicates
//! nothing, so TCP acks are never copied.
//!
//! Invariants checked after every operation:
//! 1. **No accepted push is lost unless superseded.** A model built from the reply bytes (and
//!    the contract's own framing of the bytes sent) holds what must be pending; the node's
//!    pending state equals it for every uuid. The model only forgets an item on a `Cleared`
//!    change that an ack in the same operation justifies, or on `Removed` (expiry/operator).
//! 2. **0x11 bits are cleared only by acks that carry them**; 0x10/0x20 only by an ack of the
//!    same kind from the same uuid. While every accepted ack of a (uuid, kind) is well-behaved
//!    (the conditions of `ddpush_proto::ack`, docs/PROTOCOL-NOTES.md: one ack per send, on the
//!    path the send went to, not after a heartbeat that came more than `ack_window` after the
//!    send, no address change or restart since the send) or a network copy that the crossing
//!    rule covers, a 0x10/0x20 is cleared only if the device has acked a send of its current
//!    version, i.e. has seen it (PROTOCOL.md 8.2). The promise is the one
//!    proto-core/tests/model.rs holds the node to, in this target's operations:
//!    * a copy of send `s` (of its datagram or of its ack; a second `AckOf` of a UDP send is
//!      one too) is covered when the item's current version is newer than `s`'s and its first
//!      send **crossed** `s`: it went out in a later operation, while `s` was not yet acked,
//!      and more than the burst gap (a quarter of `ack_window`) after the send before it; no
//!      heartbeat came more than `ack_window` after `s` (a fence), the address did not change
//!      and the node did not restart since `s`; the copy arrives within the stray window
//!      (10 x `ack_window`) of `s`; and it is the first copy of an ack of that (uuid, kind)
//!      within the stray window (the rule distrusts one ack per generation after a crossing:
//!      one stray per crossing, not two). Lossy seed 3660 (a NAT's copy of the ack of an older
//!      payload cleared a newer one whose immediate send was lost) and finding 11 (that copy
//!      taking the place of the newer send's own, slower ack) are such copies;
//!    * a first ack more than the stray window after its send is outside the promise when a
//!      copy of an ack of that item arrived after its send or within the stray window before
//!      it (a copy shifts every later attribution by one send, and the rule bounds the shifted
//!      acks by the stray window);
//!    * anything else outside the promise (the rule's documented residual risk, condition B
//!      of docs/PROTOCOL-NOTES.md: `s` acked before the newer version went out and a late
//!      downlink copy of it, the newer send within a burst of the one before it, a copy with
//!      no newer version sent yet, a second copy, one after a fence or outside the stray
//!      window) taints the (uuid, kind) until the next restart, which empties the ledgers.
//!    `AckOf` acks any earlier send in any order, so a push between a send and its ack, acks
//!    reordered among themselves, one ack after several re-sends and sends lost for good are
//!    all generated; acks from another address than the recorded one must clear nothing.
//! 3. **restore(snapshot) + replay(journal) equals the live state**, and restoring emits no
//!    changes; a restart continues from the restored node.
//! 4. **Outputs are well-formed**: every packet decodes and re-encodes to the same bytes; 0x11
//!    carries a non-zero mask equal to the pending mask; 0x20 carries the pending payload;
//!    replies go only to push connections, one per request, equal to the contract's rule;
//!    device packets go only to device connections or to UDP; heartbeat answers carry the
//!    heartbeat's appId and go back where it came from, pushes carry appId 0; the change stream
//!    holds exactly the accepted pushes, in order.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::Arbitrary;
use ddpush_fuzz::{content, contract_device, contract_reply, SIGNED_TRAILER, UP};
use ddpush_proto::codec::DownPacket;
use ddpush_proto::{
    Change, Config, ConnId, Dest, DeviceMsg, DevicePacket, DownMsg, Event, Kind, Limits, Node,
    Payload, Pending, Port, PushMsg, PushReply, PushRequest, RecordState, Recovery, ReplyPolicy,
    Time, Transmit, Uuid,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    cfg: Cfg,
    start_ms: u32,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct Cfg {
    policy: u8,
    limits: bool,
    /// The ack window in 10 ms steps (0..=1 s).
    window_10ms: u8,
    max_clients: u8,
    create_on_heartbeat: bool,
    interval_s: u8,
    idle_expiry_s: u16,
    pending_ttl_s: u16,
    max_content: u16,
    device_idle_s: u16,
    push_idle_s: u16,
}

#[derive(Arbitrary, Debug, Clone)]
enum Msg {
    Notify,
    Bits(u64),
    Payload(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum AckKind {
    Notify,
    Bits(u64),
    Payload,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Push {
        who: u8,
        app_id: u8,
        msg: Msg,
    },
    PushTcp {
        conn: u8,
        who: u8,
        app_id: u8,
        msg: Msg,
    },
    Heartbeat {
        who: u8,
        from: u8,
        app_id: u8,
    },
    HeartbeatTcp {
        conn: u8,
        who: u8,
        app_id: u8,
    },
    Ack {
        who: u8,
        from: u8,
        kind: AckKind,
    },
    /// The device's ack of the `back`-th latest send (0: the latest), on the connection the
    /// send went to if `tcp` (else over UDP).
    AckOf {
        back: u16,
        tcp: bool,
    },
    /// The network duplicates an ack the device sent over UDP: the `back`-th latest UDP ack
    /// delivered so far arrives again (0: right after the original).
    DupAck {
        back: u8,
    },
    /// The network duplicates a UDP send: the device receives it twice and acks each copy.
    /// If its ack was not delivered yet, both acks arrive now; otherwise the late copy's.
    DupSend {
        back: u16,
    },
    Udp {
        from: u8,
        data: Vec<u8>,
    },
    TcpOpen {
        push: bool,
        from: u8,
    },
    TcpData {
        conn: u8,
        data: Vec<u8>,
    },
    TcpClose {
        conn: u8,
    },
    Step {
        ms: u16,
    },
    StepSecs {
        s: u16,
    },
    Jump {
        s: u32,
    },
    Remove {
        who: u8,
    },
    Snapshot,
    Restart,
    CheckReplay,
    /// Issue 12's races on one uuid, in one operation: a push (its immediate send reaches the
    /// device), `gap` x 8 ms later a newer push of the same item (its immediate send lost, or
    /// only slow to be acked), then the device's ack of the first send (`ack`) and a network
    /// copy of that ack right behind it (`copy`, lossy seed 3660), a heartbeat from the uuid's
    /// address (`hb`: a fence, whose answer re-sends the newer version), a third push of the
    /// item right after it (`again`, its send lost) and the newer push's own ack, late
    /// (`late`). Later operations may ack any of these sends (`AckOf` counts from the
    /// latest), copy them, push again or restart.
    Race {
        who: u8,
        notify: bool,
        gap: u8,
        ack: bool,
        copy: bool,
        hb: bool,
        again: bool,
        late: bool,
    },
}

fn uuid(who: u8) -> Uuid {
    let mut u = [0u8; 16];
    u[0] = 0xC0;
    u[15] = who % 5;
    Uuid(u)
}

fn addr(from: u8) -> SocketAddr {
    let i = from % 6;
    let ip = if i < 4 {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i % 2))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i)))
    };
    SocketAddr::new(ip, 40000 + u16::from(i))
}

fn config(c: &Cfg) -> Config {
    Config {
        reply_policy: match c.policy % 3 {
            0 => ReplyPolicy::Never,
            1 => ReplyPolicy::Always,
            _ => ReplyPolicy::SaChanged,
        },
        heartbeat_interval: Duration::from_secs(1 + u64::from(c.interval_s % 60)),
        online_grace: Duration::from_secs(10),
        max_content: 1 + c.max_content % 600,
        max_clients: if c.max_clients == 0 {
            10_000
        } else {
            1 + usize::from(c.max_clients % 6)
        },
        create_on_heartbeat: c.create_on_heartbeat,
        idle_expiry: Duration::from_secs(u64::from(c.idle_expiry_s % 4000)),
        pending_ttl: Duration::from_secs(u64::from(c.pending_ttl_s % 4000)),
        ack_window: Duration::from_millis(10 * u64::from(c.window_10ms % 101)),
        device_tcp_idle: Duration::from_secs(1 + u64::from(c.device_idle_s % 900)),
        push_tcp_idle: Duration::from_secs(1 + u64::from(c.push_idle_s % 900)),
        hash_seed: 0x5eed,
        replay_window: Duration::from_secs(60),
        limits: if c.limits {
            Limits {
                table_size: 64,
                ..Limits::default()
            }
        } else {
            Limits {
                enabled: false,
                ..Limits::default()
            }
        },
    }
}

fn push_msg(m: &Msg) -> PushMsg {
    match m {
        Msg::Notify => PushMsg::Notify,
        Msg::Bits(b) => PushMsg::Bits(*b),
        Msg::Payload(p) => PushMsg::Payload(content(p)),
    }
}

/// What must be pending for one client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    notify: bool,
    bits: u64,
    payload: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
struct Send {
    uuid: Uuid,
    kind: Kind,
    version: u64,
    bits: u64,
    at: Time,
    dest: Dest,
    acked: bool,
    /// Operation in which the send was made, and in which its first ack arrived.
    op: u64,
    acked_op: Option<u64>,
    /// Address changes of the uuid and restarts of the node before the send.
    epoch: u64,
    restarts: u64,
}

struct ConnState {
    id: ConnId,
    port: Port,
    /// Bytes the contract framer has not yet delimited.
    pending: Vec<u8>,
    /// The contract framer saw a header with N > max: the node must close the connection.
    failed: bool,
}

/// One delimited frame from the contract's point of view.
enum Framed {
    Device(Option<DevicePacket>),
    Push([u8; 16], Option<PushMsg>, u8),
}

struct Harness {
    cfg: Config,
    node: Node,
    now: Time,
    next_conn: ConnId,
    conns: Vec<ConnState>,
    snapshot: Vec<RecordState>,
    journal: Vec<Change>,
    model: BTreeMap<Uuid, Model>,
    versions: BTreeMap<(Uuid, u8), u64>,
    sends: Vec<Send>,
    /// Sends whose ack was delivered over UDP, in delivery order (what `DupAck` copies).
    udp_acks: Vec<usize>,
    /// Operations run so far.
    ops: u64,
    tainted: HashSet<(Uuid, u8)>,
    /// Latest heartbeat per uuid (any path; counted even if the node then dropped it).
    hb_at: BTreeMap<Uuid, Time>,
    /// Per (uuid, kind): when the latest network copy of an ack of it reached the node.
    copy_at: BTreeMap<(Uuid, u8), Time>,
    /// Recorded UDP address per uuid, and how often it changed.
    addrs: BTreeMap<Uuid, (Option<SocketAddr>, u64)>,
    restarts: u64,
}

fn kidx(k: Kind) -> u8 {
    match k {
        Kind::Notify => 0,
        Kind::Bits => 1,
        Kind::Payload => 2,
    }
}

/// What an operation fed in, for judging what came out.
#[derive(Default)]
struct Ctx {
    /// Acks the contract says were delivered: (uuid, kind, bits).
    acks: Vec<(Uuid, Kind, u64)>,
    /// Pushes answered 0x00, in order.
    accepted: Vec<(Uuid, PushMsg)>,
    /// Sends answered in this operation by a well-behaved ack, or by a network copy that the
    /// crossing rule covers: a `Cleared` of their (uuid, kind) is held to the ack rule.
    checked: Vec<usize>,
    /// Acks that came from another address than the uuid's recorded one: the node must not
    /// count them, so they do not make later checks unreliable.
    off_path: Vec<(Uuid, Kind)>,
    /// Uuids that sent a heartbeat in this operation.
    heartbeats: Vec<Uuid>,
    /// A single heartbeat: (uuid, app id, where answers go).
    heartbeat: Option<(Uuid, u8, Dest)>,
    /// A single push: its uuid.
    push: Option<Uuid>,
    /// Reply bytes expected on each push connection, in order (None: capacity may refuse).
    replies: Vec<(ConnId, u8, [u8; 16], Option<PushMsg>)>,
}

impl Harness {
    fn new(cfg: Config, now: Time) -> Self {
        Harness {
            node: Node::new(cfg.clone()).expect("valid config"),
            cfg,
            now,
            next_conn: 1,
            conns: Vec::new(),
            snapshot: Vec::new(),
            journal: Vec::new(),
            model: BTreeMap::new(),
            versions: BTreeMap::new(),
            sends: Vec::new(),
            udp_acks: Vec::new(),
            ops: 0,
            tainted: HashSet::new(),
            hb_at: BTreeMap::new(),
            copy_at: BTreeMap::new(),
            addrs: BTreeMap::new(),
            restarts: 0,
        }
    }

    fn conn(&self, i: u8, port: Port) -> Option<usize> {
        let idx: Vec<usize> = (0..self.conns.len())
            .filter(|&c| self.conns[c].port == port)
            .collect();
        (!idx.is_empty()).then(|| idx[usize::from(i) % idx.len()])
    }

    /// Feeds bytes to a connection and to the contract framer; returns the frames delimited.
    fn tcp_bytes(&mut self, ci: usize, data: &[u8], ctx: &mut Ctx) {
        let id = self.conns[ci].id;
        let port = self.conns[ci].port;
        let max = match port {
            Port::Device => 8,
            Port::Push => self.cfg.max_content,
        };
        self.node.handle_tcp_data(self.now, id, data);
        let c = &mut self.conns[ci];
        c.pending.extend_from_slice(data);
        let mut frames = Vec::new();
        let mut used = 0;
        loop {
            let rest = &c.pending[used..];
            if rest.len() < UP {
                break;
            }
            let n = u16::from_be_bytes([rest[19], rest[20]]);
            if n > max {
                // The node must close this connection; checked in `finish` via poll_close.
                c.failed = true;
                break;
            }
            // A version-2 frame on the device port carries the signed trailer (PROTOCOL.md
            // 9.3); no key exists here, so the node drops it (`unknown_key`), but it must be
            // delimited as the contract says or the rest of the stream is read out of step.
            let trailer = if port == Port::Device && rest[0] == 2 {
                SIGNED_TRAILER
            } else {
                0
            };
            let total = UP + usize::from(n) + trailer;
            if rest.len() < total {
                break;
            }
            let f = &rest[..total];
            frames.push(match port {
                Port::Device => Framed::Device(DevicePacket::decode(f).ok()),
                Port::Push => {
                    let u: [u8; 16] = f[3..19].try_into().unwrap();
                    let reply = contract_reply(f, max).unwrap();
                    let msg = (reply == 0).then(|| match f[2] {
                        0x10 => PushMsg::Notify,
                        0x11 => PushMsg::Bits(u64::from_be_bytes(f[21..29].try_into().unwrap())),
                        _ => PushMsg::Payload(content(&f[21..])),
                    });
                    Framed::Push(u, msg, reply)
                }
            });
            used += total;
        }
        c.pending.drain(..used);
        for f in frames {
            match f {
                Framed::Device(Some(p)) => note_device(&p, ctx),
                Framed::Device(None) => {}
                Framed::Push(u, msg, reply) => ctx.replies.push((id, reply, u, msg)),
            }
        }
    }

    /// Whether the ack rule promises that a network copy of send `i`'s datagram (or of its
    /// ack), arriving now, clears nothing the device has not seen (docs/PROTOCOL-NOTES.md "The
    /// rule"; the same conditions as `covered` in proto-core/tests/model.rs):
    /// * the record's current version of that item is newer than the send's, and its first
    ///   send **crossed** send `i`: it went out in a later operation, while send `i` was not yet
    ///   acked, and more than the burst gap (a quarter of `ack_window`, in whole ledger ticks)
    ///   after the send of that item before it (within a burst the rule trusts the acks, and a
    ///   copy there is its documented residual risk);
    /// * no other copy of an ack of that (uuid, kind) arrived within the stray window before
    ///   this one: the rule distrusts one ack per generation after a crossing, so it covers one
    ///   stray per crossing, not two;
    /// * the copy arrives within the stray window (10 x `ack_window`) of send `i`;
    /// * and, as for every ack (`keeps`): send `i` went over UDP, no heartbeat came more than
    ///   `ack_window` after it, the uuid's address has not changed and the node has not
    ///   restarted since.
    ///
    /// Then the copy is an ack the ledger takes as `Crossed` (or as an older send's), and it
    /// must not clear the newer version the device has not acked.
    fn covered(&self, i: usize) -> bool {
        let s = &self.sends[i];
        let key = (s.uuid, kidx(s.kind));
        let v = self.versions.get(&key).copied().unwrap_or(0);
        if v <= s.version || !matches!(s.dest, Dest::Udp(_)) || !self.keeps(s) {
            return false;
        }
        let Some(fi) = self
            .sends
            .iter()
            .position(|x| x.uuid == s.uuid && x.kind == s.kind && x.version == v)
        else {
            return false;
        };
        let first = &self.sends[fi];
        let last = self.sends[..fi]
            .iter()
            .rfind(|x| x.uuid == s.uuid && x.kind == s.kind);
        let tick = ddpush_proto::ack::TICK_MS;
        let burst_ticks = (self.cfg.ack_window.as_millis() as u64).div_ceil(tick) / 4;
        let apart = Duration::from_millis(tick * (burst_ticks + 1));
        let stray = self.stray();
        let first_copy = self.copy_at.get(&key).is_none_or(|&t| self.now > t + stray);
        first.op > s.op
            && last.is_some_and(|l| first.at >= l.at + apart)
            && s.acked_op.is_none_or(|a| a > first.op)
            && first_copy
            && self.now <= s.at + stray
    }

    /// The stray window: copies of a datagram (or of its ack) arrive within it of the send.
    fn stray(&self) -> Duration {
        self.cfg.ack_window * 10
    }

    /// The conditions every ack of send `s` arriving now must meet to be held to the rule
    /// (docs/PROTOCOL-NOTES.md, C-E): no heartbeat came more than `ack_window` after the send
    /// (the fence settled it), the uuid's UDP address has not changed since (an address that
    /// changes hands may carry acks of another socket), and the node has not restarted since.
    fn keeps(&self, s: &Send) -> bool {
        let fenced = self
            .hb_at
            .get(&s.uuid)
            .is_some_and(|&h| h > s.at + self.cfg.ack_window);
        let moved = self.addrs.get(&s.uuid).map_or(0, |a| a.1) != s.epoch;
        !(fenced || moved || s.restarts != self.restarts)
    }

    /// The device's ack of send `i` arrives now: its first (`copy` false) or a copy made by the
    /// network (`copy` true; always over UDP). A further `AckOf` of a UDP send already acked
    /// is such a copy too.
    fn ack_send(&mut self, i: usize, tcp: bool, copy: bool, ctx: &mut Ctx) {
        let s = self.sends[i].clone();
        let key = (s.uuid, kidx(s.kind));
        let udp = matches!(s.dest, Dest::Udp(_));
        let copy = copy || (s.acked && udp);
        let tcp_gone = match s.dest {
            Dest::Tcp(id) => !(tcp && self.conns.iter().any(|c| c.id == id)),
            Dest::Udp(_) => false,
        };
        let covered = if copy {
            self.covered(i)
        } else {
            // A copy takes the place of an ack still on its way, and every later ack is
            // counted one send further on. The rule distrusts the shifted acks only within the
            // stray window of their sends (its bound on a round trip plus the copies' spread),
            // so an ack more than that late is outside the promise when a copy of that item
            // arrived while it was in flight (after its send) or within the stray window
            // before it.
            let stray = self.stray();
            let late_after_copy = self.now > s.at + stray
                && self
                    .copy_at
                    .get(&key)
                    .is_some_and(|&t| t >= s.at || self.now <= t + stray);
            self.keeps(&s) && !tcp_gone && !s.acked && !late_after_copy
        };
        if covered {
            ctx.checked.push(i);
        } else {
            // Beyond what the node promises to attribute exactly: the device acked twice on a
            // stream, a network copy that crossed no newer send or came second within the
            // stray window (condition B's residual risk), an ack shifted by a copy and later
            // than the stray window, the ack came after a heartbeat that settled its send,
            // from an address that may have changed hands, across a restart, or on another
            // path than its send. Loss is then possible by design.
            self.tainted.insert(key);
        }
        if copy {
            self.copy_at.insert(key, self.now);
        }
        if !self.sends[i].acked {
            self.sends[i].acked = true;
            self.sends[i].acked_op = Some(self.ops);
        }
        let msg = match s.kind {
            Kind::Notify => DeviceMsg::AckNotify,
            Kind::Bits => DeviceMsg::AckBits(s.bits),
            Kind::Payload => DeviceMsg::AckPayload,
        };
        let p = DevicePacket {
            app_id: 1,
            uuid: s.uuid,
            msg,
        };
        let mut b = Vec::new();
        p.encode(&mut b);
        let via_tcp = match s.dest {
            Dest::Tcp(id) if tcp && !copy => self
                .conns
                .iter()
                .position(|c| c.id == id && c.pending.is_empty()),
            _ => None,
        };
        match (via_tcp, s.dest) {
            (Some(ci), _) => self.tcp_bytes(ci, &b, ctx),
            (None, Dest::Udp(a)) => {
                self.node.handle_udp(self.now, a, &b);
                note_device(&p, ctx);
                self.udp_acks.push(i);
            }
            (None, Dest::Tcp(_)) => {
                self.node.handle_udp(self.now, addr(0), &b);
                note_device(&p, ctx);
            }
        }
    }

    /// Index of the `back`-th latest send (0: the latest), counting round the list.
    fn latest(&self, back: u16) -> Option<usize> {
        let n = self.sends.len();
        (n > 0).then(|| n - 1 - usize::from(back) % n)
    }

    /// `Op::Race`: runs its steps as operations of their own, each checked as usual.
    fn race(&mut self, who: u8, notify: bool, gap: u8, flags: [bool; 5]) {
        let [ack, copy, hb, again, late] = flags;
        let u = uuid(who);
        let kind = if notify { Kind::Notify } else { Kind::Payload };
        let push = |ops: u64| Op::Push {
            who,
            app_id: 0,
            msg: if notify {
                Msg::Notify
            } else {
                // One byte fits every `max_content`; the content tells the versions apart.
                Msg::Payload(vec![b'a' + (ops % 26) as u8])
            },
        };
        // The immediate send of a push (none if the uuid was offline).
        let sent_by = |h: &mut Self, op: Op| {
            let n = h.sends.len();
            h.run(&op);
            (n..h.sends.len()).find(|&i| h.sends[i].uuid == u && h.sends[i].kind == kind)
        };
        let first = sent_by(self, push(self.ops));
        self.run(&Op::Step {
            ms: u16::from(gap) * 8,
        });
        let second = sent_by(self, push(self.ops));
        if let Some(i) = first.filter(|_| ack || copy) {
            let back = (self.sends.len() - 1 - i) as u16;
            self.run(&Op::AckOf { back, tcp: true });
            if copy && matches!(self.sends[i].dest, Dest::Udp(_)) {
                self.run(&Op::DupAck { back: 0 });
            }
        }
        let recorded = self.node.record(&u).and_then(|r| r.addr);
        if let Some(from) = (0..6).find(|&f| hb && recorded == Some(addr(f))) {
            self.run(&Op::Heartbeat {
                who,
                from,
                app_id: 1,
            });
        }
        if again {
            self.run(&push(self.ops));
        }
        if let Some(i) = second.filter(|_| late) {
            let back = (self.sends.len() - 1 - i) as u16;
            self.run(&Op::AckOf { back, tcp: true });
        }
    }

    fn run(&mut self, op: &Op) {
        self.ops += 1;
        let mut ctx = Ctx::default();
        let before: BTreeMap<Uuid, Pending> = self
            .node
            .pending()
            .into_iter()
            .map(|p| (p.uuid, p))
            .collect();
        let conns_before: Vec<(ConnId, Port)> = self.conns.iter().map(|c| (c.id, c.port)).collect();
        match op {
            Op::Push { who, app_id, msg } => {
                let req = PushRequest {
                    app_id: *app_id,
                    uuid: uuid(*who),
                    msg: push_msg(msg),
                };
                let r = self.node.handle_push(self.now, req.clone());
                let valid = match &req.msg {
                    PushMsg::Payload(p) => {
                        !p.is_empty() && p.len() <= usize::from(self.cfg.max_content)
                    }
                    _ => true,
                };
                let known = self.model.contains_key(&req.uuid);
                let full = !known && self.model.len() >= self.cfg.max_clients;
                if !valid {
                    assert_eq!(r, PushReply::Rejected, "direct push {req:?}");
                } else if !full {
                    // (When full, the sweep inside handle_push may make room; `finish` checks
                    // that an accepted push was stored and the node stays within capacity.)
                    assert_eq!(r, PushReply::Accepted, "direct push {req:?}");
                }
                if r == PushReply::Accepted {
                    ctx.accepted.push((req.uuid, req.msg));
                    ctx.push = Some(req.uuid);
                }
            }
            Op::PushTcp {
                conn,
                who,
                app_id,
                msg,
            } => {
                let Some(ci) = self.conn(*conn, Port::Push) else {
                    return self.finish(ctx, before, conns_before);
                };
                let (cmd, content) = match msg {
                    Msg::Notify => (0x10u8, Vec::new()),
                    Msg::Bits(b) => (0x11, b.to_be_bytes().to_vec()),
                    Msg::Payload(p) => (0x20, p.clone()),
                };
                let mut f = vec![1, *app_id, cmd];
                f.extend_from_slice(&uuid(*who).0);
                f.extend_from_slice(&(content.len() as u16).to_be_bytes());
                f.extend_from_slice(&content);
                if self.conns[ci].pending.is_empty() {
                    ctx.push = Some(uuid(*who));
                }
                self.tcp_bytes(ci, &f, &mut ctx);
            }
            Op::Heartbeat { who, from, app_id } => {
                let p = DevicePacket {
                    app_id: *app_id,
                    uuid: uuid(*who),
                    msg: DeviceMsg::Heartbeat,
                };
                let mut b = Vec::new();
                p.encode(&mut b);
                self.node.handle_udp(self.now, addr(*from), &b);
                ctx.heartbeat = Some((p.uuid, *app_id, Dest::Udp(addr(*from))));
                ctx.heartbeats.push(p.uuid);
            }
            Op::HeartbeatTcp { conn, who, app_id } => {
                let Some(ci) = self.conn(*conn, Port::Device) else {
                    return self.finish(ctx, before, conns_before);
                };
                let p = DevicePacket {
                    app_id: *app_id,
                    uuid: uuid(*who),
                    msg: DeviceMsg::Heartbeat,
                };
                let mut b = Vec::new();
                p.encode(&mut b);
                if self.conns[ci].pending.is_empty() {
                    ctx.heartbeat = Some((p.uuid, *app_id, Dest::Tcp(self.conns[ci].id)));
                }
                self.tcp_bytes(ci, &b, &mut ctx);
            }
            Op::Ack { who, from, kind } => {
                let msg = match kind {
                    AckKind::Notify => DeviceMsg::AckNotify,
                    AckKind::Bits(b) => DeviceMsg::AckBits(*b),
                    AckKind::Payload => DeviceMsg::AckPayload,
                };
                let p = DevicePacket {
                    app_id: 1,
                    uuid: uuid(*who),
                    msg,
                };
                let mut b = Vec::new();
                p.encode(&mut b);
                let recorded = self.node.record(&p.uuid).and_then(|r| r.addr);
                if recorded != Some(addr(*from)) {
                    ctx.off_path.push((p.uuid, ack_kind(&p.msg)));
                }
                self.node.handle_udp(self.now, addr(*from), &b);
                note_device(&p, &mut ctx);
            }
            Op::AckOf { back, tcp } => {
                let Some(i) = self.latest(*back) else {
                    return self.finish(ctx, before, conns_before);
                };
                self.ack_send(i, *tcp, false, &mut ctx);
            }
            Op::DupAck { back } => {
                if self.udp_acks.is_empty() {
                    return self.finish(ctx, before, conns_before);
                }
                let n = self.udp_acks.len();
                let i = self.udp_acks[n - 1 - usize::from(*back) % n];
                self.ack_send(i, false, true, &mut ctx);
            }
            Op::DupSend { back } => {
                let Some(i) = self.latest(*back) else {
                    return self.finish(ctx, before, conns_before);
                };
                if !matches!(self.sends[i].dest, Dest::Udp(_)) {
                    // A stream duplicates nothing.
                    return self.finish(ctx, before, conns_before);
                }
                if !self.sends[i].acked {
                    self.ack_send(i, false, false, &mut ctx);
                }
                self.ack_send(i, false, true, &mut ctx);
            }
            Op::Udp { from, data } => {
                self.node.handle_udp(self.now, addr(*from), data);
                if let Some(p) = contract_device(data).and_then(|_| DevicePacket::decode(data).ok())
                {
                    note_device(&p, &mut ctx);
                }
            }
            Op::TcpOpen { push, from } => {
                let port = if *push { Port::Push } else { Port::Device };
                let id = self.next_conn;
                self.next_conn += 1;
                if self.node.handle_tcp_open(self.now, id, port, addr(*from)) {
                    self.conns.push(ConnState {
                        id,
                        port,
                        pending: Vec::new(),
                        failed: false,
                    });
                }
            }
            Op::TcpData { conn, data } => {
                if self.conns.is_empty() {
                    return self.finish(ctx, before, conns_before);
                }
                let ci = usize::from(*conn) % self.conns.len();
                self.tcp_bytes(ci, data, &mut ctx);
            }
            Op::TcpClose { conn } => {
                if self.conns.is_empty() {
                    return self.finish(ctx, before, conns_before);
                }
                let ci = usize::from(*conn) % self.conns.len();
                let c = self.conns.remove(ci);
                self.node.handle_tcp_close(self.now, c.id);
            }
            Op::Step { ms } => {
                self.now = Time(self.now.0 + u64::from(*ms));
                self.node.handle_timeout(self.now);
            }
            Op::StepSecs { s } => {
                self.now = self.now + Duration::from_secs(u64::from(*s));
                self.node.handle_timeout(self.now);
            }
            Op::Jump { s } => {
                self.now = self.now + Duration::from_secs(u64::from(*s));
                self.node.handle_timeout(self.now);
            }
            Op::Remove { who } => {
                let u = uuid(*who);
                let had = self.node.remove(self.now, &u);
                // The sweep inside `remove` may have expired it first.
                assert!(!had || self.model.contains_key(&u));
            }
            Op::Snapshot => {
                self.snapshot = self.node.records().collect();
                self.journal.clear();
            }
            Op::Race {
                who,
                notify,
                gap,
                ack,
                copy,
                hb,
                again,
                late,
            } => {
                // Its steps are operations of their own, each finished and checked.
                return self.race(*who, *notify, *gap, [*ack, *copy, *hb, *again, *late]);
            }
            Op::Restart | Op::CheckReplay => {
                // The core's own recovery, as every adapter runs it.
                let mut rec = Recovery::new(self.cfg.clone(), self.now).unwrap();
                for r in &self.snapshot {
                    rec.record(r.clone());
                }
                for c in &self.journal {
                    rec.change(c);
                }
                let mut restored = rec.finish();
                assert_eq!(
                    restored.poll_change(),
                    None,
                    "restore and replay must not journal"
                );
                assert_eq!(
                    restored.pending(),
                    self.node.pending(),
                    "restore(snapshot) + replay(journal) differs from the live node"
                );
                assert_eq!(restored.len(), self.node.len());
                if matches!(op, Op::Restart) {
                    // A crash: connections are gone, the process starts from the files.
                    while restored.poll_transmit().is_some() {}
                    while restored.poll_event().is_some() {}
                    self.node = restored;
                    self.conns.clear();
                    // Ledgers start empty: what earlier acks did to them no longer matters,
                    // and acks of earlier sends are outside the promise (condition E).
                    self.restarts += 1;
                    self.tainted.clear();
                    self.node.handle_timeout(self.now);
                }
            }
        }
        self.finish(ctx, before, conns_before)
    }

    fn finish(
        &mut self,
        ctx: Ctx,
        before: BTreeMap<Uuid, Pending>,
        conns_before: Vec<(ConnId, Port)>,
    ) {
        // The turn's changes are drained (committed) before any transmit, as the driver does.
        let changes: Vec<Change> = std::iter::from_fn(|| self.node.poll_change()).collect();
        // Pushes framed on port 9999 count as accepted when their reply byte says so.
        let transmits: Vec<Transmit> = std::iter::from_fn(|| self.node.poll_transmit()).collect();
        let mut accepted_list = ctx.accepted.clone();
        {
            let mut replies = ctx.replies.iter();
            for t in &transmits {
                if let Payload::Reply(r) = &t.payload {
                    let (_, _, u, msg) = replies.next().expect("a reply nobody asked for");
                    if *r == PushReply::Accepted {
                        let m = msg
                            .clone()
                            .expect("0x00 for a request the contract rejects");
                        accepted_list.push((Uuid(*u), m));
                    }
                }
            }
        }

        // --- the change stream, replayed against the model ---
        let mut accepted = accepted_list.iter();
        let mut cleared_any = false;
        for ch in changes {
            self.journal.push(ch.clone());
            match &ch {
                Change::Keyed { .. } | Change::Unkeyed { .. } => {
                    panic!("key change with no key operation: {ch:?}")
                }
                Change::Created { uuid, at } => {
                    assert!(
                        self.cfg.create_on_heartbeat,
                        "heartbeat created a record with creation off"
                    );
                    assert!(*at <= self.now);
                    assert!(
                        !self.model.contains_key(uuid),
                        "Created for an existing record"
                    );
                    self.model.insert(*uuid, Model::default());
                }
                Change::Pushed { uuid, at, msg } => {
                    assert_eq!(*at, self.now);
                    let (u, m) = accepted
                        .next()
                        .unwrap_or_else(|| panic!("Pushed {ch:?} without a 0x00 reply"));
                    assert_eq!((u, m), (uuid, msg), "journal order differs from replies");
                    let e = self.model.entry(*uuid).or_default();
                    match msg {
                        PushMsg::Notify => e.notify = true,
                        PushMsg::Bits(b) => e.bits |= b,
                        PushMsg::Payload(p) => e.payload = Some(p.to_vec()),
                    }
                    if !matches!(msg, PushMsg::Bits(_)) {
                        *self.versions.entry((*uuid, kidx(msg.kind()))).or_default() += 1;
                    }
                }
                Change::Cleared { uuid, kind, bits } => {
                    cleared_any = true;
                    let acks: Vec<_> = ctx
                        .acks
                        .iter()
                        .filter(|a| a.0 == *uuid && a.1 == *kind)
                        .collect();
                    assert!(
                        !acks.is_empty(),
                        "{ch:?} without an ack of that kind from that uuid"
                    );
                    let e = self
                        .model
                        .get_mut(uuid)
                        .expect("Cleared for an unknown record");
                    match kind {
                        Kind::Notify => {
                            assert!(e.notify, "cleared a 0x10 that was not pending");
                            e.notify = false;
                        }
                        Kind::Payload => {
                            assert!(e.payload.is_some(), "cleared a 0x20 that was not pending");
                            e.payload = None;
                        }
                        Kind::Bits => {
                            let carried = acks.iter().fold(0u64, |m, a| m | a.2);
                            assert_ne!(*bits, 0, "empty Cleared of 0x11");
                            assert_eq!(bits & !carried, 0, "cleared 0x11 bits no ack carried");
                            assert_eq!(
                                bits & !e.bits,
                                0,
                                "cleared 0x11 bits that were not pending"
                            );
                            e.bits &= !bits;
                        }
                    }
                    // Records keep u32 seconds: past 2106-02-07 (u32::MAX s of Unix time)
                    // every time saturates and the ack rule cannot tell sends apart. The node
                    // must still not panic there; the ordering promise is only checked inside
                    // the representable range.
                    let in_range = self.now.secs32() < u32::MAX - 4000;
                    let held = ctx.checked.iter().any(|&i| {
                        let s = &self.sends[i];
                        s.uuid == *uuid && s.kind == *kind
                    });
                    if in_range
                        && held
                        && *kind != Kind::Bits
                        && !self.tainted.contains(&(*uuid, kidx(*kind)))
                    {
                        let v = self
                            .versions
                            .get(&(*uuid, kidx(*kind)))
                            .copied()
                            .unwrap_or(0);
                        // Acks may be reordered: the ack of an older send may clear the newer
                        // version once the device has acked a send of it.
                        let seen = self.sends.iter().any(|x| {
                            x.acked && x.uuid == *uuid && x.kind == *kind && x.version == v
                        });
                        let answered: Vec<_> = ctx
                            .checked
                            .iter()
                            .map(|&i| (self.sends[i].version, self.sends[i].at))
                            .collect();
                        assert!(
                            seen,
                            "an ack of a send of version (version, sent at) {answered:?} cleared \
                             version {v}, which the device never acked (now {:?}, window {:?})",
                            self.now, self.cfg.ack_window
                        );
                    }
                }
                Change::Removed { uuid } => {
                    assert!(
                        self.model.remove(uuid).is_some(),
                        "Removed an unknown record"
                    );
                    // Acks of sends made before a removal stay held to the ack rule: the node
                    // keeps the removed record's ledgers for one window (finding 3); later a
                    // heartbeat (the first send to a re-created record follows one) settles
                    // them, and the address change marks them.
                }
            }
        }
        assert!(
            accepted.next().is_none(),
            "a push answered 0x00 was not journaled"
        );
        let _ = cleared_any;

        // Every other ack in this op makes later checks of that (uuid, kind) unreliable only if
        // it was not a well-behaved ack; raw and spurious acks taint.
        let events: Vec<Event> = std::iter::from_fn(|| self.node.poll_event()).collect();
        for ev in &events {
            if let Event::Acked { uuid, kind, .. } = ev {
                let wb = ctx
                    .checked
                    .iter()
                    .any(|&i| self.sends[i].uuid == *uuid && self.sends[i].kind == *kind);
                let off = ctx.off_path.contains(&(*uuid, *kind));
                if !wb && !off {
                    self.tainted.insert((*uuid, kidx(*kind)));
                }
            }
        }

        // --- the node's pending state equals the model ---
        let pending: BTreeMap<Uuid, Pending> = self
            .node
            .pending()
            .into_iter()
            .map(|p| (p.uuid, p))
            .collect();
        assert_eq!(
            pending.keys().collect::<Vec<_>>(),
            self.model.keys().collect::<Vec<_>>(),
            "records differ from the model"
        );
        for (u, m) in &self.model {
            let p = &pending[u];
            assert_eq!(
                (p.notify, p.bits, &p.payload),
                (m.notify, m.bits, &m.payload),
                "pending state of {u} differs from the model (accepted push lost?)"
            );
        }
        assert!(self.node.len() <= self.cfg.max_clients);
        let _ = before;

        // --- the ack rule's bookkeeping: heartbeats (fences) and address changes ---
        for u in &ctx.heartbeats {
            self.hb_at.insert(*u, self.now);
        }
        for (u, m) in &self.model {
            let _ = m;
            let now_addr = self.node.record(u).and_then(|r| r.addr);
            let e = self.addrs.entry(*u).or_insert((now_addr, 0));
            if e.0 != now_addr {
                *e = (now_addr, e.1 + 1);
            }
        }
        for u in self.addrs.keys().copied().collect::<Vec<_>>() {
            if !self.model.contains_key(&u) {
                // Removed: a re-created record starts without an address.
                let e = self.addrs.get_mut(&u).expect("key");
                if e.0.is_some() {
                    *e = (None, e.1 + 1);
                }
            }
        }

        // --- outputs ---
        let closes: Vec<ConnId> = std::iter::from_fn(|| self.node.poll_close()).collect();
        let mut all_conns = conns_before.clone();
        all_conns.extend(self.conns.iter().map(|c| (c.id, c.port)));
        let port_of = |id: ConnId| all_conns.iter().find(|c| c.0 == id).map(|c| c.1);
        let mut replies = ctx.replies.iter();
        let mut hb_kinds = Vec::new();
        for t in &transmits {
            match (&t.payload, t.dest) {
                (Payload::Reply(r), Dest::Tcp(id)) => {
                    assert_eq!(
                        port_of(id),
                        Some(Port::Push),
                        "reply to a non-push connection"
                    );
                    let (cid, want, u, _) = replies.next().expect("a reply nobody asked for");
                    assert_eq!(*cid, id, "replies out of order");
                    if r.byte() != *want {
                        // Only a capacity refusal may differ from the header rule.
                        assert!(
                            *want == 0x00
                                && r.byte() == 0x01
                                && !self.model.contains_key(&Uuid(*u))
                                && self.model.len() >= self.cfg.max_clients,
                            "reply {:02x} where the contract says {want:02x}",
                            r.byte()
                        );
                    }
                }
                (Payload::Reply(_), Dest::Udp(_)) => panic!("a reply byte sent over UDP"),
                // Signed devices have their own target (signed_ops): no key exists here.
                (Payload::Sealed(s), _) => panic!("sealed packet with no key provisioned: {s:?}"),
                (Payload::Down(p), dest) => {
                    if let Dest::Tcp(id) = dest {
                        assert_eq!(
                            port_of(id),
                            Some(Port::Device),
                            "device packet to a push connection"
                        );
                    }
                    let bytes = p.to_vec();
                    assert_eq!(
                        DownPacket::decode(&bytes).as_ref(),
                        Ok(p),
                        "malformed output {bytes:02x?}"
                    );
                    let who = ctx.heartbeat.map(|h| h.0).or(ctx.push);
                    match &p.msg {
                        DownMsg::Bits(m) => assert_ne!(*m, 0, "0x11 with an empty mask"),
                        DownMsg::Payload(b) => {
                            assert!(!b.is_empty() && b.len() <= usize::from(self.cfg.max_content))
                        }
                        _ => {}
                    }
                    if let Some(u) = who {
                        let m = &self.model[&u];
                        match &p.msg {
                            DownMsg::Notify => assert!(m.notify, "0x10 sent but not pending"),
                            DownMsg::Bits(b) => {
                                assert_eq!(*b, m.bits, "0x11 must carry the whole mask")
                            }
                            DownMsg::Payload(b) => assert_eq!(Some(b.to_vec()), m.payload),
                            DownMsg::HeartbeatReply => {
                                assert!(ctx.heartbeat.is_some(), "heartbeat reply to a push")
                            }
                        }
                        if let Some((_, app, hdest)) = ctx.heartbeat {
                            assert_eq!(p.app_id, app, "heartbeat answer with another appId");
                            assert_eq!(dest, hdest, "heartbeat answered elsewhere");
                            hb_kinds.push(p.msg.clone());
                        } else {
                            assert_eq!(p.app_id, 0, "immediate push with appId != 0");
                        }
                        let kind = match &p.msg {
                            DownMsg::Notify => Some(Kind::Notify),
                            DownMsg::Bits(_) => Some(Kind::Bits),
                            DownMsg::Payload(_) => Some(Kind::Payload),
                            DownMsg::HeartbeatReply => None,
                        };
                        if let Some(kind) = kind {
                            self.sends.push(Send {
                                uuid: u,
                                kind,
                                version: self.versions.get(&(u, kidx(kind))).copied().unwrap_or(0),
                                bits: if let DownMsg::Bits(b) = &p.msg { *b } else { 0 },
                                at: self.now,
                                dest,
                                acked: false,
                                op: self.ops,
                                acked_op: None,
                                epoch: self.addrs.get(&u).map_or(0, |a| a.1),
                                restarts: self.restarts,
                            });
                        }
                    }
                }
            }
        }
        assert!(replies.next().is_none(), "a push request got no reply");

        // A heartbeat with limits off answers with exactly what is pending, in order.
        if let Some((u, _, dest)) = ctx.heartbeat {
            if !self.cfg.limits.enabled {
                if let Some(m) = self.model.get(&u) {
                    let mut want = Vec::new();
                    if m.notify {
                        want.push(DownMsg::Notify);
                    }
                    if m.bits != 0 {
                        want.push(DownMsg::Bits(m.bits));
                    }
                    if let Some(p) = &m.payload {
                        want.push(DownMsg::Payload(content(p)));
                    }
                    if want.is_empty() {
                        match (self.cfg.reply_policy, dest) {
                            (_, Dest::Tcp(_)) | (ReplyPolicy::Never, _) => {}
                            (ReplyPolicy::Always, _) => want.push(DownMsg::HeartbeatReply),
                            (ReplyPolicy::SaChanged, _) => {
                                if hb_kinds.len() == 1 {
                                    want.push(DownMsg::HeartbeatReply);
                                }
                            }
                        }
                    }
                    assert_eq!(
                        hb_kinds, want,
                        "heartbeat answer differs from the pending items"
                    );
                }
            }
        }

        for id in closes {
            let before_len = self.conns.len();
            self.conns.retain(|c| c.id != id);
            assert!(
                self.conns.len() < before_len || conns_before.iter().any(|c| c.0 == id),
                "closed a connection that was not open"
            );
        }
        // A framing error the contract predicts must have closed its connection.
        for c in &self.conns {
            assert!(
                !c.failed,
                "frame with N > max did not close connection {}",
                c.id
            );
        }
    }
}

fn ack_kind(m: &DeviceMsg) -> Kind {
    match m {
        DeviceMsg::AckNotify | DeviceMsg::Heartbeat => Kind::Notify,
        DeviceMsg::AckBits(_) => Kind::Bits,
        DeviceMsg::AckPayload => Kind::Payload,
    }
}

fn note_device(p: &DevicePacket, ctx: &mut Ctx) {
    match p.msg {
        DeviceMsg::Heartbeat => ctx.heartbeats.push(p.uuid),
        DeviceMsg::AckNotify => ctx.acks.push((p.uuid, Kind::Notify, 0)),
        DeviceMsg::AckBits(b) => ctx.acks.push((p.uuid, Kind::Bits, b)),
        DeviceMsg::AckPayload => ctx.acks.push((p.uuid, Kind::Payload, 0)),
    }
}

fuzz_target!(|input: Input| {
    let cfg = config(&input.cfg);
    let now = Time::from_millis(u64::from(input.start_ms) * 1000 / 7);
    let mut h = Harness::new(cfg, now);
    for op in input.ops.iter().take(300) {
        h.run(op);
    }
});
