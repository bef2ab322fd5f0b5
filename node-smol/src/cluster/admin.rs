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
//! * `GET /console/data`: the web console's overview in the single node's shape, with this
//!   node's counters and charts, the store's state in place of the journal's, and the peers
//!   with the state of their links ([`console_data`]). Figures only the store knows
//!   (pending items of all clients, every client's count) are `null`.
//! * `POST /console/lookup`: the record as the store holds it, in the shape the console's
//!   lookup shows (by uuid or user name; each pending item with its own age, which the store
//!   keeps per type).
//! * `POST /clients/{uuid}/clear` and the device keys (`/clients/{uuid}/key`): `501`.

use std::collections::BTreeMap;

use async_channel::Sender;
use base64::Engine;
use ddpush_proto::cluster::{ClusterNode, StoredRecord};
use ddpush_proto::{Driver, PushReply, Ticket, Uuid};
use serde_json::{json, Value};

use std::time::{Duration, Instant};

use ddpush_proto::Time;

use super::status::{self, AdapterStats};
use crate::admin::{AdminRequest, HeldPush, Response};
use crate::console::{data, history};

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
    /// `POST /console/lookup`: the same read, answered with [`lookup_json`]; `user` is the
    /// name the uuid was derived from, if the lookup gave one.
    Lookup(Uuid, Option<String>),
}

/// The body of `POST /console/lookup`, as on a single node: exactly one of the two.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupBody {
    uuid: Option<String>,
    user: Option<String>,
}

fn lookup_route(body: &[u8]) -> Route {
    let q: LookupBody = match serde_json::from_slice(body) {
        Ok(q) => q,
        Err(e) => return Route::Now(Response::error(400, &format!("JSON: {e}"))),
    };
    match (q.uuid, q.user) {
        (Some(h), None) => match Uuid::from_hex(h.trim()) {
            Some(u) => Route::Lookup(u, None),
            None => Route::Now(Response::error(400, "uuid must be 32 hex digits")),
        },
        (None, Some(name)) => Route::Lookup(Uuid::from_user(&name), Some(name)),
        _ => Route::Now(Response::error(400, "give exactly one of uuid or user")),
    }
}

/// `POST /console/lookup` in cluster mode: the store's record with its pending items spelled
/// out, each with its own age (`None`: no record).
pub(super) fn lookup_json(
    uuid: &Uuid,
    user: Option<String>,
    rec: Option<&StoredRecord>,
    owned: bool,
    online: bool,
    now: Time,
) -> Response {
    let Some(rec) = rec else {
        return Response::json(
            404,
            json!({ "error": "unknown uuid", "uuid": uuid.to_hex(), "user": user }),
        );
    };
    let age = |i: usize| rec.pushed_at[i].map(|t| now.since(t).as_secs());
    let mut items = Vec::new();
    if rec.notify.is_some() {
        items.push(json!({ "type": "0x10", "age_s": age(0) }));
    }
    if rec.bits != 0 {
        items.push(json!({
            "type": "0x11",
            "bits": rec.bits,
            "bits_hex": format!("{:#018x}", rec.bits),
            "age_s": age(1),
        }));
    }
    if let Some((_, p)) = &rec.payload {
        items.push(crate::console::data::payload_item(
            p.bytes(),
            "age_s",
            json!(age(2)),
        ));
    }
    let mut v = record_json(uuid, rec, owned, online);
    if let Value::Object(o) = &mut v {
        o.insert("user".into(), json!(user));
        o.insert("now_ms".into(), json!(now.as_millis()));
        o.insert("pending_items".into(), json!(items));
    }
    Response::json(200, v)
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

/// The loop's clock and age, for the console's data.
#[derive(Clone, Copy)]
pub(super) struct View {
    /// The loop's clock now.
    pub now: Time,
    /// Time since the loop started.
    pub uptime: Duration,
}

/// `GET /console/data` of a cluster node (the module docs say what differs).
fn console_data(node: &ClusterNode, a: &AdapterStats, v: View, query: &str) -> Response {
    let since = match data::since(query) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let s = node.stats();
    let now = Instant::now();
    let peers: Vec<Value> = a
        .peers
        .iter()
        .map(|(id, l)| {
            json!({
                "id": id.0,
                "state": if l.up { "up" } else { "down" },
                "since_s": now.saturating_duration_since(l.since).as_secs(),
                "links_up": l.ups,
                "links_lost": l.losses,
            })
        })
        .collect();
    let store = json!({
        "connected": a.store_connected,
        "errors": s.store_errors,
        "timeouts": s.store_timeouts,
        "latency_ms": { "p50": a.quantile_ms(0.5), "p99": a.quantile_ms(0.99) },
    });
    Response::json(
        200,
        json!({
            "version": env!("DDPUSH_VERSION"),
            "uptime_s": v.uptime.as_secs(),
            "now_ms": v.now.as_millis(),
            // The clients this node serves from its copy; the store holds every client.
            "clients": s.owned,
            "online": s.online,
            "pending": { "0x10": null, "0x11": null, "0x20": null },
            "totals": data::totals_json(history::cluster_counters(s)),
            "acks": s.acks[0],
            "tcp_connections": { "device": null, "push": null },
            "memory_bytes": null,
            "storage": {
                "journal": if a.store_connected { "ok" } else { "degraded" },
                "store": store,
            },
            // Push->ack latency is measured by the single node's journal path only.
            "latency": {
                "window_s": history::WINDOW.as_secs(),
                "samples": null,
                "p50_ms": null,
                "p99_ms": null,
            },
            "rates": data::rates_json(a.history.rates(since)),
            "cluster": {
                "mode": "cluster",
                "node_id": node.id().0,
                "store_connected": a.store_connected,
                "peers": peers,
                "peer_refused": a.peer_refused,
                "pokes": { "sent": s.pokes[0], "received": s.pokes[1], "dropped": a.pokes_dropped },
            },
        }),
    )
}

/// Routes one admin request.
pub(super) fn route(req: &AdminRequest, node: &ClusterNode, a: &AdapterStats, v: View) -> Route {
    let (path, query) = req.path().split_once('?').unwrap_or((req.path(), ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    Route::Now(match (req.method(), parts.as_slice()) {
        ("GET", ["console", "data"]) => console_data(node, a, v, query),
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
        ("POST", ["console", "lookup"]) => return lookup_route(req.body()),
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
