//! `PUT`, `GET` and `DELETE /clients/{uuid}/key`: the keys of signed-only uuids
//! (PROTOCOL.md 9.1).
//!
//! The app server provisions a device's key here and gives the same key to the device through
//! its own channel. These endpoints need an admin token to be configured (checked in the
//! connection task, before the request reaches the loop). A request body is never logged and
//! never echoed: errors name the field, not its value. A key update is answered only after the
//! turn's journal write, like a push: "provisioned" means it survives a crash, and a failed
//! write takes it back and answers 503.

use std::time::Duration;

use ddpush_proto::signed::{DeviceKey, KeyError, KeyUpdate};
use ddpush_proto::{Node, Time, Uuid};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{HeldWrite, Response};

/// The default rotation grace period: how long the previous key stays valid.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    key_id: u8,
    key: String,
    grace_s: Option<u64>,
}

/// What a key update says when its turn's write failed.
const NOT_WRITTEN: &str =
    "storage unavailable: the key change was not written and is not in effect";

/// A key update waiting for its turn's commit.
fn held(body: Value) -> HeldWrite {
    HeldWrite {
        body,
        not_written: NOT_WRITTEN,
    }
}

/// What the loop answers to a key request: now, or after the turn's commit.
pub(crate) enum KeyAnswer {
    Now(Response),
    AfterCommit(HeldWrite),
}

fn info(node: &Node, uuid: &Uuid) -> Value {
    match node.key_state(uuid) {
        None => json!({ "uuid": uuid.to_hex(), "signed_only": false }),
        Some(k) => json!({
            "uuid": uuid.to_hex(),
            "signed_only": true,
            "key_id": k.id,
            "previous_key_id": k.previous.as_ref().map(|p| p.id),
            "previous_valid_until_ms": k.previous.as_ref().map(|p| p.until.as_millis()),
        }),
    }
}

/// `GET /clients/{uuid}/key`: whether the uuid is signed-only, and its key ids (never a key).
pub(crate) fn get(node: &Node, uuid: &Uuid) -> Response {
    Response::json(200, info(node, uuid))
}

/// `PUT /clients/{uuid}/key` with `{"key_id": 1, "key": "<64 hex digits>", "grace_s": 86400}`.
pub(crate) fn put(node: &mut Node, now: Time, uuid: Uuid, body: &[u8]) -> KeyAnswer {
    let bad = |msg: &str| KeyAnswer::Now(Response::error(400, msg));
    // serde's messages can quote the value they choke on; the key must not come back.
    let Ok(b) = serde_json::from_slice::<KeyBody>(body) else {
        return bad(
            "body must be JSON {\"key_id\": 0-255, \"key\": \"<64 hex digits>\", \
             \"grace_s\": seconds (optional)}",
        );
    };
    let Some(key) = DeviceKey::from_hex(&b.key) else {
        return bad("key must be 64 hex digits (32 bytes)");
    };
    let grace = b.grace_s.map_or(DEFAULT_GRACE, Duration::from_secs);
    match node.set_key(now, uuid, b.key_id, key, grace) {
        Err(KeyError::IdInUse(id)) => KeyAnswer::Now(Response::error(
            409,
            &format!("key id {id} is current with a different key: rotate to a new key id"),
        )),
        Err(e) => KeyAnswer::Now(Response::error(409, &e.to_string())),
        Ok(u) => {
            let result = match u {
                KeyUpdate::Provisioned => "provisioned",
                KeyUpdate::Rotated => "rotated",
                KeyUpdate::Unchanged => "unchanged",
            };
            let mut body = info(node, &uuid);
            body["result"] = json!(result);
            KeyAnswer::AfterCommit(held(body))
        }
    }
}

/// `DELETE /clients/{uuid}/key`: the uuid speaks v1 again.
pub(crate) fn delete(node: &mut Node, now: Time, uuid: &Uuid) -> KeyAnswer {
    if node.remove_key(now, uuid) {
        KeyAnswer::AfterCommit(held(json!({ "uuid": uuid.to_hex(), "removed": true })))
    } else {
        KeyAnswer::Now(Response::error(404, "the uuid has no key"))
    }
}
