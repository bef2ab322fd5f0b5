//! The admin HTTP endpoint: `/metrics`, `/status`, `/clients/{uuid}`, `POST /push`,
//! `POST /clients/{uuid}/clear`, the keys of signed devices (`/clients/{uuid}/key`, see
//! [`keys`]), the probes `/healthz` and `/readyz`, and the web console (`/`, `/console/...`,
//! see [`console`]).
//!
//! Connection tasks parse requests (httparse), apply the browser rules of [`guard`], serve the
//! console's static files, and check the bearer token; the request then goes to the event
//! loop, which owns the node, and the answer comes back once the turn's journal write is done,
//! so a push reported "accepted" here is as durable as a `0x00` on 9999.
//!
//! [`console`]: crate::console

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use async_channel::Sender;
use async_io::{Async, Timer};
use base64::Engine;
use ddpush_proto::driver::Core;
use ddpush_proto::{
    Content, Driver, Kind, Node, Port, PushMsg, PushReply, PushRequest, RecordState, Ticket, Time,
    Uuid,
};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use serde::Deserialize;
use serde_json::{json, Value};

mod keys;

use crate::console::{assets, data, guard};
use crate::metrics::Metrics;
use crate::server::{Executor, Msg};

/// Largest request (headers and body) read.
const MAX_REQUEST: usize = 1 << 20;
/// A client must send its whole request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request on its way to the loop.
pub(crate) struct AdminRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    pub(crate) reply: Sender<Response>,
}

impl AdminRequest {
    /// The HTTP method.
    pub(crate) fn method(&self) -> &str {
        &self.method
    }

    /// The path, with the query.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The body.
    pub(crate) fn body(&self) -> &[u8] {
        &self.body
    }
}

/// Status code, content type, body.
pub(crate) struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    /// The status and the body as JSON, for unit tests of the handlers.
    #[cfg(test)]
    pub(crate) fn status_and_json(&self) -> (u16, Value) {
        (
            self.status,
            serde_json::from_str(&self.body).unwrap_or(Value::Null),
        )
    }

    pub(crate) fn json(status: u16, v: Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: v.to_string(),
        }
    }

    /// A Prometheus text exposition.
    pub(crate) fn prometheus(body: String) -> Self {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body,
        }
    }

    pub(crate) fn error(status: u16, msg: &str) -> Self {
        Self::json(status, json!({ "error": msg }))
    }
}

pub(crate) async fn serve(
    ex: Executor,
    l: Async<TcpListener>,
    tx: Sender<Msg>,
    token: Option<String>,
) {
    let token: Arc<Option<String>> = Arc::new(token);
    // Load balancers and orchestrators probe without credentials; that is safe only while
    // nobody but this host can reach the port.
    let open_probes = l.get_ref().local_addr().is_ok_and(|a| a.ip().is_loopback());
    loop {
        let Ok((stream, _)) = l.accept().await else {
            Timer::after(Duration::from_millis(50)).await;
            continue;
        };
        let tx = tx.clone();
        let token = token.clone();
        ex.spawn(async move {
            let resp = future::or(
                async { request(&stream, &tx, token.as_deref(), open_probes).await },
                async {
                    Timer::after(REQUEST_TIMEOUT).await;
                    Response::error(408, "request timeout")
                },
            )
            .await;
            let reason = match resp.status {
                200 => "OK",
                400 => "Bad Request",
                401 => "Unauthorized",
                403 => "Forbidden",
                404 => "Not Found",
                405 => "Method Not Allowed",
                408 => "Request Timeout",
                409 => "Conflict",
                413 => "Payload Too Large",
                415 => "Unsupported Media Type",
                501 => "Not Implemented",
                503 => "Service Unavailable",
                _ => "Error",
            };
            let head = format!(
                "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}connection: close\r\n\r\n",
                resp.status,
                resp.content_type,
                resp.body.len(),
                guard::HEADERS,
            );
            let mut s = &stream;
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(resp.body.as_bytes()).await;
            let _ = s.flush().await;
        })
        .detach();
    }
}

async fn request(
    stream: &Async<std::net::TcpStream>,
    tx: &Sender<Msg>,
    token: Option<&str>,
    open_probes: bool,
) -> Response {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut s = stream;
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Response::error(400, "connection closed mid-request"),
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Response::error(413, "request too large");
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Response::error(400, &format!("bad request: {e}")),
        };
        let mut content_length = 0usize;
        let mut auth = None;
        let mut browser = guard::BrowserHeaders::default();
        for h in req.headers.iter() {
            let value = std::str::from_utf8(h.value).ok().map(str::trim);
            if h.name.eq_ignore_ascii_case("content-length") {
                match value.and_then(|v| v.parse().ok()) {
                    Some(n) => content_length = n,
                    None => return Response::error(400, "bad content-length"),
                }
            } else if h.name.eq_ignore_ascii_case("authorization") {
                auth = value.map(str::to_string);
            } else if h.name.eq_ignore_ascii_case("host") {
                browser.host = value;
            } else if h.name.eq_ignore_ascii_case("origin") {
                browser.origin = value;
            } else if h.name.eq_ignore_ascii_case("content-type") {
                browser.content_type = value;
            } else if h.name.eq_ignore_ascii_case(guard::CSRF_HEADER) {
                browser.csrf = value.is_some_and(|v| !v.is_empty());
            }
        }
        if head_len + content_length > MAX_REQUEST {
            return Response::error(413, "request too large");
        }
        if buf.len() < head_len + content_length {
            continue;
        }
        let method = req.method.unwrap_or("");
        let path = req.path.unwrap_or("");
        if let Err(r) = guard::check(method, &browser, token.is_some()) {
            return Response::error(r.status, r.msg);
        }
        let bare_path = path.split('?').next().unwrap_or("");
        // The console's files hold no data: served without the token, so the page can ask.
        if method == "GET" {
            if let Some(a) = assets::get(bare_path) {
                return Response {
                    status: 200,
                    content_type: a.content_type,
                    body: a.body.to_string(),
                };
            }
        }
        if token.is_none() && bare_path.starts_with("/clients/") && bare_path.ends_with("/key") {
            return Response::error(
                403,
                "device keys are managed only with an admin token: start ddpushd with --admin-token",
            );
        }
        let probe = method == "GET" && matches!(bare_path, "/healthz" | "/readyz");
        if let Some(t) = token.filter(|_| !(probe && open_probes)) {
            let given = auth.as_deref().and_then(|a| a.strip_prefix("Bearer "));
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), t.as_bytes())) {
                return Response::error(401, "missing or wrong bearer token");
            }
        }
        let (rtx, rrx) = async_channel::bounded(1);
        let r = AdminRequest {
            method: method.to_string(),
            path: path.to_string(),
            body: buf[head_len..head_len + content_length].to_vec(),
            reply: rtx,
        };
        if tx.send(Msg::Admin(r)).await.is_err() {
            return Response::error(503, "shutting down");
        }
        return rrx
            .recv()
            .await
            .unwrap_or_else(|_| Response::error(503, "shutting down"));
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One push in `POST /push`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushItem {
    uuid: Option<String>,
    user: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    bits: Option<u64>,
    text: Option<String>,
    base64: Option<String>,
}

fn parse_item(it: PushItem) -> Result<PushRequest, String> {
    let uuid = match (it.uuid, it.user) {
        (Some(h), None) => Uuid::from_hex(&h).ok_or("uuid must be 32 hex digits")?,
        (None, Some(u)) => Uuid::from_user(&u),
        _ => return Err("give exactly one of uuid or user".into()),
    };
    let msg = match it.kind.as_str() {
        "notify" | "0x10" => PushMsg::Notify,
        "bits" | "0x11" => PushMsg::Bits(it.bits.ok_or("type bits needs \"bits\"")?),
        "payload" | "0x20" => match (it.text, it.base64) {
            (Some(t), None) => PushMsg::Payload(Content::try_from(t).map_err(|e| e.to_string())?),
            (None, Some(b)) => PushMsg::Payload(
                Content::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|e| format!("base64: {e}"))?,
                )
                .map_err(|e| e.to_string())?,
            ),
            _ => return Err("type payload needs exactly one of text or base64".into()),
        },
        other => return Err(format!("unknown type {other:?} (notify, bits, payload)")),
    };
    Ok(PushRequest {
        app_id: 0,
        uuid,
        msg,
    })
}

pub(crate) fn record_json(r: &RecordState, online: bool) -> Value {
    let ms = |t: Option<Time>| t.map(|t| t.as_millis());
    json!({
        "uuid": r.uuid.to_hex(),
        "online": online,
        "last_heartbeat_ms": ms(r.last_heartbeat),
        "last_push_ms": ms(r.last_push),
        "addr": r.addr.map(|a| a.to_string()),
        "pending": {
            "notify": r.notify,
            "bits": r.bits,
            "payload_base64": r.payload.as_ref().map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
        }
    })
}

/// The loop's answer to one request: now, or once the turn's commit decided its pushes.
pub(crate) enum Answer {
    /// Complete.
    Now(Response),
    /// A `POST /push` whose results depend on the turn's write (see [`Driver::commit`]).
    AfterCommit(HeldPush),
    /// A change other than a push (a key update, a removal), in effect only if the turn's
    /// write succeeds.
    AfterWrite(HeldWrite),
}

/// A 200 answer that holds only if its turn's journal write succeeds; otherwise 503 with
/// `not_written` (the core took the change back with the turn).
pub(crate) struct HeldWrite {
    pub(crate) body: Value,
    pub(crate) not_written: &'static str,
}

impl HeldWrite {
    /// The response once the turn's write succeeded (`written`) or failed.
    pub(crate) fn finish(self, written: bool) -> Response {
        if written {
            Response::json(200, self.body)
        } else {
            Response::error(503, self.not_written)
        }
    }
}

/// What a single node's failed item says: its turn's journal write failed.
const NOT_WRITTEN: &str = "storage unavailable: the push was not written and is not stored";

/// A `POST /push` answer waiting for the acceptance step that decides its pushes: its turn's
/// commit (single node), or the store's confirmations, possibly turns later (cluster node).
pub(crate) struct HeldPush {
    batch: bool,
    /// Per item: its uuid and ticket, or why it was invalid.
    items: Vec<Result<(String, Ticket), String>>,
    /// The error of an item that was not accepted (what "failed" means in this mode).
    failed: &'static str,
}

impl HeldPush {
    /// The tickets whose replies [`HeldPush::finish`] needs.
    pub(crate) fn tickets(&self) -> impl Iterator<Item = Ticket> + '_ {
        self.items
            .iter()
            .filter_map(|it| it.as_ref().ok().map(|(_, t)| *t))
    }

    /// The response, given the driver's final replies. Any push not accepted (the failed
    /// write took it back, or the store did not confirm it) makes the whole answer a 503.
    pub(crate) fn finish(self, replies: &[(Ticket, PushReply)]) -> Response {
        let replies: std::collections::BTreeMap<Ticket, PushReply> =
            replies.iter().copied().collect();
        let mut failed = false;
        let results: Vec<Value> = self
            .items
            .into_iter()
            .map(|it| match it {
                Err(e) => json!({ "result": "invalid", "error": e }),
                Ok((uuid, t)) => match replies.get(&t) {
                    Some(PushReply::Accepted) => json!({ "result": "accepted", "uuid": uuid }),
                    Some(PushReply::Rejected) => json!({ "result": "rejected", "uuid": uuid }),
                    _ => {
                        failed = true;
                        json!({ "result": "failed", "uuid": uuid, "error": self.failed })
                    }
                },
            })
            .collect();
        let body = if self.batch {
            json!({ "results": results })
        } else {
            results.into_iter().next().unwrap_or(Value::Null)
        };
        Response::json(if failed { 503 } else { 200 }, body)
    }
}

/// Answers one request on the loop; pushes are answered after the turn's commit.
pub(crate) fn handle(
    req: &AdminRequest,
    node: &mut Node,
    driver: &mut Driver,
    now: Time,
    m: &Metrics,
) -> Answer {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    Answer::Now(match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["console", "data"]) => data::overview(node, now, m, query),
        ("POST", ["console", "lookup"]) => data::lookup(node, now, &req.body),
        ("GET", ["metrics"]) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: m.render(node.stats()),
        },
        ("GET", ["status"]) => {
            let s = node.stats();
            Response::json(
                200,
                json!({
                    "clients": s.clients,
                    "online": s.online,
                    "pending": {
                        "0x10": s.pending.get(Kind::Notify),
                        "0x11": s.pending.get(Kind::Bits),
                        "0x20": s.pending.get(Kind::Payload),
                    },
                    "pushes_accepted": s.pushes_accepted,
                    "heartbeats": s.heartbeats,
                    "resends": s.resends,
                    "acks": s.acks,
                    "tcp_connections": {
                        "device": s.conns.get(Port::Device),
                        "push": s.conns.get(Port::Push),
                    },
                    "memory_bytes": node.heap_bytes(),
                    "storage": if m.storage_ok() { "ok" } else { "degraded" },
                    "degraded": !m.storage_ok(),
                }),
            )
        }
        // Liveness: answered by the event loop itself, so a wedged loop fails the probe.
        ("GET", ["healthz"]) => Response::json(200, json!({ "status": "alive" })),
        // Readiness: the loop runs only once the state is loaded and every listener is bound,
        // so what is left to check is that the journal accepts writes.
        ("GET", ["readyz"]) => {
            let storage = !m.storage().journal_failing;
            Response::json(
                if storage { 200 } else { 503 },
                json!({
                    "ready": storage,
                    "state_loaded": true,
                    "listeners_bound": true,
                    "storage_writable": storage,
                }),
            )
        }
        ("GET", ["clients", hex]) => match Uuid::from_hex(hex) {
            None => Response::error(400, "uuid must be 32 hex digits"),
            Some(u) => match node.record(&u) {
                Some(r) => Response::json(200, record_json(&r, node.is_online(&u))),
                None => Response::error(404, "unknown uuid"),
            },
        },
        // Answered after the turn's write, like a push: "removed" means a restart does not
        // bring the record back; a failed write takes the removal back and answers 503.
        ("POST", ["clients", hex, "clear"]) => match Uuid::from_hex(hex) {
            None => Response::error(400, "uuid must be 32 hex digits"),
            Some(u) if node.remove(now, &u) => {
                return Answer::AfterWrite(HeldWrite {
                    body: json!({ "removed": true }),
                    not_written:
                        "storage unavailable: the removal was not written; the record is kept",
                })
            }
            Some(_) => Response::error(404, "unknown uuid"),
        },
        ("GET", ["clients", hex, "key"]) => match Uuid::from_hex(hex) {
            None => Response::error(400, "uuid must be 32 hex digits"),
            Some(u) => keys::get(node, &u),
        },
        (m @ ("PUT" | "DELETE"), ["clients", hex, "key"]) => {
            let Some(u) = Uuid::from_hex(hex) else {
                return Answer::Now(Response::error(400, "uuid must be 32 hex digits"));
            };
            let a = if m == "PUT" {
                keys::put(node, now, u, &req.body)
            } else {
                keys::delete(node, now, &u)
            };
            return match a {
                keys::KeyAnswer::Now(r) => Answer::Now(r),
                keys::KeyAnswer::AfterCommit(h) => Answer::AfterWrite(h),
            };
        }
        ("POST", ["push"]) => {
            return match push(&req.body, node, driver, now, NOT_WRITTEN) {
                Ok(held) => Answer::AfterCommit(held),
                Err(r) => Answer::Now(r),
            };
        }
        (_, ["metrics" | "status" | "push" | "healthz" | "readyz"])
        | (_, ["clients" | "console", ..]) => Response::error(405, "method not allowed"),
        _ => Response::error(404, "no such endpoint"),
    })
}

/// `POST /push` on either core: parses the body (one item or an array) and hands every valid
/// item to the driver as a front-end push; the answer waits for the replies of its tickets.
/// `failed` is what an item that was not accepted says in this mode.
pub(crate) fn push<C: Core>(
    body: &[u8],
    core: &mut C,
    driver: &mut Driver,
    now: Time,
    failed: &'static str,
) -> Result<HeldPush, Response> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| Response::error(400, &format!("JSON: {e}")))?;
    let batch = v.is_array();
    let items = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    let items = items
        .into_iter()
        .map(|it| {
            serde_json::from_value::<PushItem>(it)
                .map_err(|e| e.to_string())
                .and_then(parse_item)
                .map(|p| (p.uuid.to_hex(), driver.handle_push(core, now, p)))
        })
        .collect();
    Ok(HeldPush {
        batch,
        items,
        failed,
    })
}
