//! What the node hands back to its adapter: transmits, closes, events and counters.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::codec::{DownPacket, InvalidPacket, Kind, PushReject, PushReply, Uuid};
use crate::counters::{counter_key, Counters};
use crate::limits::Limited;
use crate::node::Port;
use crate::signed::{SealedDown, SignedDrop, Unsigned};
use crate::ConnId;

/// Where a transmit goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    /// A UDP datagram to this address (from the device socket).
    Udp(SocketAddr),
    /// Bytes appended to this TCP connection's write queue.
    Tcp(ConnId),
}

/// The bytes of a transmit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A packet for a device.
    Down(DownPacket),
    /// The one-byte answer to a push request.
    Reply(PushReply),
    /// A packet for a signed-only device, sealed under its key (PROTOCOL.md 9.4).
    Sealed(SealedDown),
}

/// One thing to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dest: Dest,
    /// What.
    pub payload: Payload,
}

impl Transmit {
    /// Encodes the bytes to send; for UDP this is exactly one datagram.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        match &self.payload {
            Payload::Down(p) => p.encode(out),
            Payload::Reply(r) => out.put_u8(r.byte()),
            Payload::Sealed(p) => p.encode(out),
        }
    }

    /// Encoded size.
    pub fn len(&self) -> usize {
        match &self.payload {
            Payload::Down(p) => p.encoded_len(),
            Payload::Reply(_) => 1,
            Payload::Sealed(p) => p.encoded_len(),
        }
    }

    /// Never empty; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The transport an input arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP on the device port.
    Udp,
    /// TCP on the device port.
    Tcp,
    /// TCP on the push port.
    Push,
}

counter_key!(Transport { Udp, Tcp, Push });

impl Transport {
    /// A short stable label.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Push => "push",
        }
    }
}

/// Why a TCP connection was closed by the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// A frame announced more content than the port allows.
    Framing,
    /// No bytes for longer than the idle timeout.
    Idle,
    /// Refused at open: too many connections in all or from this IP.
    Refused,
}

/// What happened, for logs and tests. Counters for metrics are in [`Stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A record was created by a heartbeat.
    Created {
        /// The client.
        uuid: Uuid,
    },
    /// A client's heartbeat arrived while it was offline.
    Online {
        /// The client.
        uuid: Uuid,
    },
    /// The online window passed without a heartbeat.
    Offline {
        /// The client.
        uuid: Uuid,
    },
    /// A push was stored (and `sent` packets went out at once).
    PushAccepted {
        /// The client.
        uuid: Uuid,
        /// The message kind.
        kind: Kind,
        /// Immediate sends (UDP and/or TCP).
        sent: u8,
    },
    /// A push was taken back and answered `0xFF` because its turn's write failed.
    PushFailed {
        /// The client.
        uuid: Uuid,
        /// The message kind.
        kind: Kind,
    },
    /// A push got `0x01`.
    PushRejected {
        /// Why.
        reason: PushReject,
    },
    /// A pending item went out in answer to a heartbeat.
    Resent {
        /// The client.
        uuid: Uuid,
        /// The message kind.
        kind: Kind,
    },
    /// An ack arrived for a known client.
    Acked {
        /// The client.
        uuid: Uuid,
        /// The message kind.
        kind: Kind,
        /// Whether it cleared anything (see the ack rule in `record`).
        cleared: bool,
    },
    /// An input was dropped.
    Invalid {
        /// Why.
        reason: InvalidPacket,
        /// Where it came from.
        transport: Transport,
    },
    /// An abuse limit held something back (logged once per kind by adapters).
    Limited {
        /// Which limit.
        limit: Limited,
    },
    /// A record was removed by expiry.
    Expired {
        /// The client.
        uuid: Uuid,
    },
    /// A new uuid was refused because `max_clients` records exist.
    CapacityReached,
    /// The node closed a connection.
    Closed {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
}

/// Monotonic counters and gauges, read by the adapter's metrics and shutdown log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Records held (gauge).
    pub clients: u64,
    /// Clients online (gauge).
    pub online: u64,
    /// Pending items by kind (gauge).
    pub pending: Counters<Kind, 3>,
    /// Heartbeats processed.
    pub heartbeats: u64,
    /// Pushes accepted.
    pub pushes_accepted: u64,
    /// Pushes answered `0xFF` because their turn could not be written (see `Driver`).
    pub pushes_failed: u64,
    /// Pushes rejected, by reason.
    pub pushes_rejected: Counters<PushReject, 4>,
    /// Packets sent at once on a push.
    pub deliveries: u64,
    /// Packets re-sent in answer to heartbeats.
    pub resends: u64,
    /// Heartbeat replies (`0x00`) sent.
    pub heartbeat_replies: u64,
    /// Acks from known clients.
    pub acks: u64,
    /// Acks that cleared something.
    pub acks_cleared: u64,
    /// UDP acks attributed to a send that crossed an older one still in flight, which clear
    /// nothing (`ack::Attribution::Crossed`; each costs one re-send on the next heartbeat).
    pub acks_crossed: u64,
    /// Acks from unknown uuids (ignored).
    pub acks_unknown: u64,
    /// Invalid inputs by transport and reason.
    pub invalid: Counters<(Transport, InvalidPacket), 15>,
    /// Inputs held back, by limit.
    pub limited: Counters<Limited, 3>,
    /// Records removed by expiry.
    pub expired: u64,
    /// Records created.
    pub created: u64,
    /// New uuids refused for capacity (pushes and heartbeats).
    pub capacity_refused: u64,
    /// Heartbeats from unknown uuids dropped (creation off or capacity).
    pub unknown_heartbeats: u64,
    /// Open TCP connections by port (gauge).
    pub conns: Counters<Port, 2>,
    /// TCP connections refused at open.
    pub conns_refused: u64,
    /// TCP connections closed for framing errors.
    pub conns_framing: u64,
    /// TCP connections closed for idleness.
    pub conns_idle: u64,
    /// Signed-only uuids (gauge).
    pub keys: u64,
    /// Signed packets that passed every check.
    pub signed_accepted: u64,
    /// Raises of a uuid's ahead bound (a signed device's clock found further ahead of the
    /// server's than before), each journaled (PROTOCOL.md 9.3).
    pub ahead_raised: u64,
    /// Signed packets dropped, by reason.
    pub signed_dropped: Counters<SignedDrop, 6>,
    /// v1 packets naming a signed-only uuid (they change nothing), by kind.
    pub unsigned_refused: Counters<Unsigned, 2>,
}
