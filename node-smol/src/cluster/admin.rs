//! The cluster node's admin API: the single node's endpoints where they mean the same with
//! the store as the durability, and a clear `501` naming the reason where they do not
//! (docs/CLUSTER.md "The admin API in cluster mode"). Authentication and the browser rules are
//! the single node's, applied before a request gets here ([`crate::admin`]).
//!
//! * `POST /push`: the single node's body and per-item answers, through the core's driver
//!   (`Driver::handle_push`) and the same acceptance step as port 9999: "accepted" only once
//!   the store confirmed the push (and its replicas, per `--cluster-wait-fail`), otherwise
//!   "failed" and HTTP 503. The answer waits, across turns, for every item's confirmation
//!   ([`HeldPushes`]); each item is decided within `--cluster-store-timeout`.
//! * `GET /clients/{uuid}`: the record as the store holds it (one `HMGET`, outside the core:
//!   it changes and decides nothing).
//! * `POST /clients/{uuid}/clear`, the device keys (`/clients/{uuid}/key`) and the console's
//!   data (`/console/data`, `/console/lookup`): `501`.

use std::collections::BTreeMap;

use async_channel::Sender;
use base64::Engine;
use ddpush_proto::cluster::{ClusterNode, StoredRecord};
use ddpush_proto::{Driver, PushReply, Ticket, Uuid};
use serde_json::{json, Value};

use super::status::{self, AdapterStats};
use crate::admin::{AdminRequest, HeldPush, Response};

/// What a `POST /push` item that was not accepted says in cluster mode. Unlike a single
/// node's failed write, the push may have reached the store (a time-out, a short `WAIT`):
/// it is then delivered, and a retry merges with it (at worst a duplicate, never a loss).
pub(super) const NOT_CONFIRMED: &str = "the store did not confirm the push (unreachable, \
    timed out, or fewer replicas than --cluster-wait-replicas in time under \
    --cluster-wait-fail ff); retry it: if it did reach the store, the retry merges with it \
    (at worst a duplicate delivery, never a loss)";

/// Where a request goes.
pub(super) enum Route {
    /// Answered at once.
    Now(Response),
    /// `POST /push`: the loop hands the body to the driver and holds the answer.
    Push,
    /// `GET /clients/{uuid}`: the loop reads the record from the store.
    Record(Uuid),
}

fn unavailable(what: &str, why: &str) -> Response {
    Response::error(
        501,
        &format!(
            "{what} is not available in cluster mode: {why} (docs/CLUSTER.md, \
             \"The admin API in cluster mode\")"
        ),
    )
}

/// Routes one admin request.
pub(super) fn route(req: &AdminRequest, node: &ClusterNode, a: &AdapterStats) -> Route {
    let path = req.path().split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    Route::Now(match (req.method(), parts.as_slice()) {
        ("GET", ["status"]) => Response::json(200, status::status(node, a)),
        ("GET", ["metrics"]) => Response::prometheus(status::metrics(node, a)),
        ("GET", ["healthz"]) => Response::json(200, json!({ "status": "alive" })),
        ("GET", ["readyz"]) => Response::json(
            if a.store_connected { 200 } else { 503 },
            json!({
                "ready": a.store_connected,
                "listeners_bound": true,
                "store_connected": a.store_connected,
            }),
        ),
        ("POST", ["push"]) => return Route::Push,
        ("GET", ["clients", hex]) => match Uuid::from_hex(hex) {
            None => Response::error(400, "uuid must be 32 hex digits"),
            Some(u) => return Route::Record(u),
        },
        ("POST", ["clients", _, "clear"]) => unavailable(
            "removing a record",
            "records live in the store, shared by every node; their items are cleared by \
             the device's acks and an idle record expires after --pending-ttl",
        ),
        ("GET" | "PUT" | "DELETE", ["clients", _, "key"]) => unavailable(
            "device keys (signed-only uuids)",
            "cluster nodes speak DDPush v1 only",
        ),
        ("GET", ["console", "data"]) | ("POST", ["console", "lookup"]) => unavailable(
            "the web console's data",
            "use GET /status and /metrics for the node, GET /clients/{uuid} for a record",
        ),
        (_, ["status" | "metrics" | "healthz" | "readyz" | "push"])
        | (_, ["clients" | "console", ..]) => Response::error(405, "method not allowed"),
        _ => Response::error(404, "no such endpoint"),
    })
}

/// `GET /clients/{uuid}` in cluster mode: the store's record. `owned` is whether this node
/// serves the device now (it holds a copy), `online` whether it is online here; whether it is
/// online at another owner only that node knows, so `online` is null then.
pub(super) fn record_json(uuid: &Uuid, rec: &StoredRecord, owned: bool, online: bool) -> Value {
    let last_push = rec.pushed_at.iter().flatten().map(|t| t.as_millis()).max();
    json!({
        "uuid": uuid.to_hex(),
        "owner": rec.owner.as_ref().map(|o| o.0.clone()),
        "epoch": rec.epoch,
        "owned_here": owned,
        "online": if owned { Value::Bool(online) } else { Value::Null },
        "last_push_ms": last_push,
        "pending": {
            "notify": rec.notify.is_some(),
            "bits": rec.bits,
            "payload_base64": rec.payload.as_ref().map(|(_, p)|
                base64::engine::general_purpose::STANDARD.encode(p.bytes())),
        }
    })
}

/// `POST /push` answers waiting for the store to decide their items (turns later: a store
/// round trip, a `WAIT`, at most `--cluster-store-timeout`).
#[derive(Default)]
pub(super) struct HeldPushes {
    held: Vec<(Sender<Response>, HeldPush)>,
    /// Replies of held tickets, taken from the driver, until their answer goes out.
    replies: BTreeMap<Ticket, PushReply>,
}

impl HeldPushes {
    /// Holds one answer; it goes out from [`HeldPushes::settle`] once every item is decided.
    pub(super) fn hold(&mut self, reply: Sender<Response>, push: HeldPush) {
        self.held.push((reply, push));
    }

    /// After the turn's acceptance step: takes the driver's replies and sends every held
    /// answer whose items are all decided.
    pub(super) fn settle(&mut self, driver: &mut Driver) {
        while let Some((t, r)) = driver.poll_reply() {
            self.replies.insert(t, r);
        }
        if self.held.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.held.len() {
            let push = &self.held[i].1;
            if !push.tickets().all(|t| self.replies.contains_key(&t)) {
                i += 1;
                continue;
            }
            let (tx, push) = self.held.swap_remove(i);
            let mine: Vec<(Ticket, PushReply)> = push
                .tickets()
                .filter_map(|t| self.replies.remove(&t).map(|r| (t, r)))
                .collect();
            // The requester may have gone (its time-out); the pushes stand either way.
            let _ = tx.try_send(push.finish(&mine));
        }
    }
}
