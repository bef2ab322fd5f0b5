//! Device keys and the per-uuid key state: the current key, and the previous one while a
//! rotation's grace period lasts.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Time;

/// A 256-bit device key. `Debug` never shows it, so it cannot leak into a log by accident.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKey([u8; 32]);

impl DeviceKey {
    /// Bytes of a key.
    pub const LEN: usize = 32;

    /// A key from its bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        DeviceKey(bytes)
    }

    /// Parses exactly 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(DeviceKey(out))
    }

    /// Lowercase hex (for key files written by tools; never logged).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The secret bytes, for the MAC.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// The key that was current before the last rotation, valid until `until`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousKey {
    /// Its key id.
    pub id: u8,
    /// The key.
    pub key: DeviceKey,
    /// Packets under this key are refused from this time on.
    pub until: Time,
}

/// A uuid's keys: what is persisted in the snapshot and journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// Id of the current key.
    pub id: u8,
    /// The current key.
    pub key: DeviceKey,
    /// The key before the last rotation, during its grace period (out of line: rare, and
    /// every signed-only uuid would otherwise carry its 48 bytes).
    pub previous: Option<Box<PreviousKey>>,
    /// The ahead bound (PROTOCOL.md 9.3): no packet of this uuid was ever accepted stamped
    /// more than this many seconds after the server's clock. Raised (and journaled, before
    /// the packet that raised it is answered) when a device's clock is found further ahead;
    /// a restart at second R refuses every stamp up to R + `ahead`, which closes the replay
    /// of packets a fast clock stamped after the restart second. 0 for a device never ahead.
    pub ahead: u32,
}

/// A key update the node refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The id is the current key's, with different key bytes: a device could not tell the two
    /// apart, so a rotation must use a new id.
    #[error("key id {0} is already in use with a different key; rotate to a new id")]
    IdInUse(u8),
}

/// What a key update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUpdate {
    /// The uuid had no key: it is signed-only from now on.
    Provisioned,
    /// The old current key stays valid until the given time.
    Rotated,
    /// The same id and key were already current: nothing changed.
    Unchanged,
}

impl KeyState {
    /// A first key.
    pub fn new(id: u8, key: DeviceKey) -> Self {
        KeyState {
            id,
            key,
            previous: None,
            ahead: 0,
        }
    }

    /// Makes `(id, key)` current; the old current key stays valid until `until`. The key that
    /// was previous before is forgotten.
    pub fn rotate(&mut self, id: u8, key: DeviceKey, until: Time) -> Result<KeyUpdate, KeyError> {
        if id == self.id {
            return if key == self.key {
                Ok(KeyUpdate::Unchanged)
            } else {
                Err(KeyError::IdInUse(id))
            };
        }
        let old = std::mem::replace(&mut self.key, key);
        self.previous = Some(Box::new(PreviousKey {
            id: self.id,
            key: old,
            until,
        }));
        self.id = id;
        Ok(KeyUpdate::Rotated)
    }

    /// The key a packet with `key_id` must verify under at `now`, if any.
    pub fn key_for(&self, key_id: u8, now: Time) -> Option<&DeviceKey> {
        if key_id == self.id {
            return Some(&self.key);
        }
        self.previous
            .as_ref()
            .filter(|p| p.id == key_id && now < p.until)
            .map(|p| &p.key)
    }

    /// Forgets the previous key once its grace period is over.
    pub fn prune(&mut self, now: Time) {
        if self.previous.as_ref().is_some_and(|p| now >= p.until) {
            self.previous = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> DeviceKey {
        DeviceKey::new([b; 32])
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_grace_period_only() {
        let mut s = KeyState::new(1, k(1));
        assert_eq!(
            s.rotate(2, k(2), Time::from_secs(100)),
            Ok(KeyUpdate::Rotated)
        );
        assert_eq!(s.key_for(2, Time::from_secs(99)), Some(&k(2)));
        assert_eq!(s.key_for(1, Time::from_secs(99)), Some(&k(1)));
        assert_eq!(s.key_for(1, Time::from_secs(100)), None);
        assert_eq!(s.key_for(3, Time::ZERO), None);
        s.prune(Time::from_secs(100));
        assert_eq!(s.previous, None);
    }

    #[test]
    fn an_id_cannot_be_reused_for_another_key() {
        let mut s = KeyState::new(1, k(1));
        assert_eq!(s.rotate(1, k(1), Time::ZERO), Ok(KeyUpdate::Unchanged));
        assert_eq!(s.rotate(1, k(9), Time::ZERO), Err(KeyError::IdInUse(1)));
        assert_eq!(s, KeyState::new(1, k(1)));
    }

    #[test]
    fn hex_round_trip_and_debug_hides_the_key() {
        let key = DeviceKey::new(std::array::from_fn(|i| i as u8));
        assert_eq!(DeviceKey::from_hex(&key.to_hex()), Some(key.clone()));
        assert_eq!(
            DeviceKey::from_hex(&key.to_hex().to_uppercase()),
            Some(key.clone())
        );
        assert_eq!(DeviceKey::from_hex("00"), None);
        assert_eq!(DeviceKey::from_hex(&"g".repeat(64)), None);
        assert!(!format!("{key:?}").contains("0001"));
    }
}
