//! State export and import: what an adapter persists.
//!
//! * A snapshot is every record as a [`RecordState`] (serde; the server writes CBOR).
//! * The change stream ([`Change`]) holds every durable state change since, in order. The adapter
//!   must make the changes of a turn durable before it sends that turn's push replies, so a
//!   push answered `0x00` is never lost. Heartbeat times and addresses are not in the stream:
//!   periodic snapshots capture them.
//!
//! Changes record effects, not causes (an ack that cleared bits is `Cleared`, not "ack"), so
//! replay needs no clock and gives the same pending state as the live node.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::codec::{Content, Kind, PushMsg, Uuid};
use crate::signed::KeyState;
use crate::time::Time;

/// One client record, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordState {
    /// The client.
    pub uuid: Uuid,
    /// Last heartbeat (None: never).
    pub last_heartbeat: Option<Time>,
    /// Last device activity or, before any, creation time: idle expiry counts from here.
    pub last_active: Time,
    /// Newest accepted push.
    pub last_push: Option<Time>,
    /// Last UDP source address.
    pub addr: Option<SocketAddr>,
    /// 0x10 flag pending.
    pub notify: bool,
    /// 0x11 pending mask.
    pub bits: u64,
    /// 0x20 pending payload.
    pub payload: Option<Content>,
}

/// One durable state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A heartbeat created a record (pushes create theirs through `Pushed`).
    Created {
        /// The client.
        uuid: Uuid,
        /// When.
        at: Time,
    },
    /// A push was accepted (creating the record if needed).
    Pushed {
        /// The client.
        uuid: Uuid,
        /// When.
        at: Time,
        /// What.
        msg: PushMsg,
    },
    /// An ack cleared an item (for `Bits`, exactly `bits`).
    Cleared {
        /// The client.
        uuid: Uuid,
        /// Which item.
        kind: Kind,
        /// The bits cleared (0 for other kinds).
        bits: u64,
    },
    /// A record was removed (expiry or an operator).
    Removed {
        /// The client.
        uuid: Uuid,
    },
    /// A uuid's key was provisioned or rotated: its whole key state from now on.
    Keyed {
        /// The client.
        uuid: Uuid,
        /// Current key and, during a rotation's grace period, the previous one.
        keys: KeyState,
    },
    /// A uuid's key was removed: it speaks v1 again.
    Unkeyed {
        /// The client.
        uuid: Uuid,
    },
}

impl Change {
    /// The client this change is about.
    pub fn uuid(&self) -> Uuid {
        match self {
            Change::Created { uuid, .. }
            | Change::Pushed { uuid, .. }
            | Change::Cleared { uuid, .. }
            | Change::Removed { uuid }
            | Change::Keyed { uuid, .. }
            | Change::Unkeyed { uuid } => *uuid,
        }
    }
}

/// The durable part of a client: what a restore plus replay must reproduce exactly.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pending {
    /// The client.
    pub uuid: Uuid,
    /// 0x10 flag.
    pub notify: bool,
    /// 0x11 mask.
    pub bits: u64,
    /// 0x20 payload.
    pub payload: Option<Vec<u8>>,
}
