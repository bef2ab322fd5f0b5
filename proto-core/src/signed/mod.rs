//! Signed devices (PROTOCOL.md section 9): a device whose uuid has a key proves every packet
//! with a truncated HMAC-SHA256 tag, and the server seals every packet it sends that device.
//!
//! DDPush v1 uuids are MD5 of a user name, so anyone who knows the name can heartbeat as the
//! device, read its pending messages and move its address. A uuid with a key is
//! **signed-only**: v1 packets naming it change nothing (a v1 heartbeat gets at most a bare
//! `0x10` so an old app build learns to update, never content).
//!
//! * [`codec`]: the bytes of signed packets, both directions, and the tag.
//! * [`keys`]: a device key and a uuid's key state (current key, previous key in a grace
//!   period).
//! * [`replay`]: the fixed-size replay window of one uuid.
//! * [`Keyring`]: all signed-only uuids, and the one `verify` every adapter goes through.
//!
//! Cost per signed-only uuid, in memory: one 192-byte keyring entry (uuid, key ids, ahead
//! bound, the 72-byte replay window, the 64 bytes of HMAC pad states, the key) plus the hash
//! table's control byte and slack, 221 bytes measured (BENCHMARKS.md); a rotation's previous
//! key costs a side-map entry during its grace period only. A v1 uuid costs nothing here.

pub mod codec;
pub mod keyring;
pub mod keys;
pub mod replay;

pub use codec::{
    device_len, device_to_vec, encode_device, KeyedMac, MacKey, Seal, SealedDown, SignedFrame,
    TAG_LEN, TRAILER_LEN, VERSION,
};
pub use keyring::{Keyring, Removed, Verified};
pub use keys::{DeviceKey, KeyError, KeyState, KeyUpdate, PreviousKey};
pub use replay::ReplayWindow;

use crate::counters::counter_key;

/// Why a signed packet was dropped. Each is counted, never answered, and changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum SignedDrop {
    /// Not exactly `21 + N + 25` bytes, or N is not the one its command requires.
    #[error("signed packet of the wrong length")]
    Length,
    /// The command is not one a device sends.
    #[error("signed packet with an unknown command")]
    Command,
    /// The uuid has no key, or the key id is neither its current key nor a previous key still
    /// within its grace period.
    #[error("unknown key id")]
    UnknownKey,
    /// The tag does not verify under the key named.
    #[error("wrong tag")]
    Tag,
    /// The timestamp is further than the replay window from the server's clock.
    #[error("timestamp outside the replay window")]
    Expired,
    /// The `(ts, nonce)` pair was already accepted for this uuid.
    #[error("replayed nonce")]
    Replayed,
}

counter_key!(SignedDrop {
    Length,
    Command,
    UnknownKey,
    Tag,
    Expired,
    Replayed
});

impl SignedDrop {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            SignedDrop::Length => "length",
            SignedDrop::Command => "command",
            SignedDrop::UnknownKey => "unknown_key",
            SignedDrop::Tag => "tag",
            SignedDrop::Expired => "expired",
            SignedDrop::Replayed => "replayed",
        }
    }
}

/// A v1 packet that named a signed-only uuid, and so changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unsigned {
    /// A v1 heartbeat: answered with at most a bare `0x10`.
    Heartbeat,
    /// A v1 ack: ignored.
    Ack,
}

counter_key!(Unsigned { Heartbeat, Ack });

impl Unsigned {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Unsigned::Heartbeat => "heartbeat",
            Unsigned::Ack => "ack",
        }
    }
}
