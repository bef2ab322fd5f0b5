//! The console's JSON: `GET /console/data` for the overview and its charts, and
//! `POST /console/lookup` for one record by uuid or user name.

use std::time::Instant;

use base64::Engine;
use ddpush_proto::{Kind, Node, Port, Time, Uuid};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::history::{Rates, SERIES};
use crate::admin::{record_json, Response};
use crate::metrics::Metrics;

/// `GET /console/data?since=N`: everything the overview shows. `since` is the newest chart
/// point the poller already has, so a poll every two seconds carries one or two new points,
/// not the whole 15 minutes.
/// The `since=N` of a `/console/data` query (0 if absent).
pub(crate) fn since(query: &str) -> Result<u64, Response> {
    match query
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
        .map(str::parse::<u64>)
    {
        None => Ok(0),
        Some(Ok(n)) => Ok(n),
        Some(Err(_)) => Err(Response::error(400, "since must be a number")),
    }
}

/// The chart points of `/console/data` (`rates`), the same for a single and a cluster node.
pub(crate) fn rates_json(rates: Rates) -> Value {
    let mut series = Map::new();
    for (name, col) in SERIES.iter().zip(rates.series) {
        series.insert((*name).to_string(), json!(col));
    }
    json!({
        "interval_ms": super::history::INTERVAL.as_millis() as u64,
        "window_s": super::history::WINDOW.as_secs(),
        "seq": rates.seq,
        "t_ms": rates.t_ms,
        "series": series,
    })
}

/// The counters behind the charts, since start, by [`SERIES`] name.
pub(crate) fn totals_json(counters: [u64; SERIES.len()]) -> Value {
    let totals: Map<String, Value> = SERIES
        .iter()
        .zip(counters)
        .map(|(n, v)| ((*n).to_string(), json!(v)))
        .collect();
    Value::Object(totals)
}

pub(crate) fn overview(node: &Node, now: Time, m: &Metrics, query: &str) -> Response {
    let since = match since(query) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let s = node.stats();
    let (rates, latency) = m.console_history(since, Instant::now());
    let totals = totals_json(super::history::counters(s));
    let storage = m.storage();
    Response::json(
        200,
        json!({
            "version": env!("DDPUSH_VERSION"),
            "uptime_s": m.uptime().as_secs(),
            "now_ms": now.as_millis(),
            "clients": s.clients,
            "online": s.online,
            "pending": {
                "0x10": s.pending.get(Kind::Notify),
                "0x11": s.pending.get(Kind::Bits),
                "0x20": s.pending.get(Kind::Payload),
            },
            "totals": totals,
            "acks": s.acks,
            "tcp_connections": {
                "device": s.conns.get(Port::Device),
                "push": s.conns.get(Port::Push),
            },
            "memory_bytes": node.heap_bytes(),
            "storage": {
                // The same words as `/status`: degraded while writes to the data directory fail.
                "journal": if storage.journal_failing { "degraded" } else { "ok" },
                "journal_writes": storage.journal_writes,
                "snapshots": storage.snapshots,
                "last_snapshot_bytes": storage.snapshot_bytes,
                "last_snapshot_ms": storage.snapshot_ms,
                "last_snapshot_age_s": storage.snapshot_age.map(|d| d.as_secs()),
            },
            "latency": {
                "window_s": super::history::WINDOW.as_secs(),
                "samples": latency.samples,
                "p50_ms": latency.p50_ms,
                "p99_ms": latency.p99_ms,
            },
            "rates": rates_json(rates),
            // A single node has no peers; the console says so instead of an empty list.
            "cluster": { "mode": "single node", "peers": [] },
        }),
    )
}

/// The body of `POST /console/lookup`: exactly one of the two.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lookup {
    uuid: Option<String>,
    user: Option<String>,
}

/// `POST /console/lookup`: the record of a uuid (hex) or of a user name (MD5 of the name, as
/// the device SDKs derive it), with its pending items spelled out for display.
/// A pending 0x20 item as the console shows it (text when it is UTF-8, hex and base64 always),
/// with its age under `age_key`: the single node knows a lower bound (`min_age_s`), the
/// cluster store each item's own age (`age_s`).
pub(crate) fn payload_item(p: &[u8], age_key: &str, age: Value) -> Value {
    let mut item = json!({
        "type": "0x20",
        "len": p.len(),
        "text": std::str::from_utf8(p).ok(),
        "hex": p.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "base64": base64::engine::general_purpose::STANDARD.encode(p),
    });
    item[age_key] = age;
    item
}

pub(crate) fn lookup(node: &Node, now: Time, body: &[u8]) -> Response {
    let q: Lookup = match serde_json::from_slice(body) {
        Ok(q) => q,
        Err(e) => return Response::error(400, &format!("JSON: {e}")),
    };
    let uuid = match (q.uuid, q.user.as_deref()) {
        (Some(h), None) => match Uuid::from_hex(h.trim()) {
            Some(u) => u,
            None => return Response::error(400, "uuid must be 32 hex digits"),
        },
        (None, Some(name)) => Uuid::from_user(name),
        _ => return Response::error(400, "give exactly one of uuid or user"),
    };
    let Some(r) = node.record(&uuid) else {
        return Response::json(
            404,
            json!({ "error": "unknown uuid", "uuid": uuid.to_hex(), "user": q.user }),
        );
    };
    let mut v = record_json(&r, node.is_online(&uuid));
    // The record keeps one push time (the newest push of any type, in whole seconds), so an
    // item's age is known only from below: it was pushed at the newest push or before.
    let age = r.last_push.map(|t| now.since(t).as_secs());
    let mut items = Vec::new();
    if r.notify {
        items.push(json!({ "type": "0x10", "min_age_s": age }));
    }
    if r.bits != 0 {
        items.push(json!({ "type": "0x11", "bits": r.bits, "bits_hex": format!("{:#018x}", r.bits), "min_age_s": age }));
    }
    if let Some(p) = &r.payload {
        items.push(payload_item(p, "min_age_s", json!(age)));
    }
    if let Value::Object(o) = &mut v {
        o.insert("user".into(), json!(q.user));
        o.insert("now_ms".into(), json!(now.as_millis()));
        o.insert(
            "last_heartbeat_age_s".into(),
            json!(r.last_heartbeat.map(|t| now.since(t).as_secs())),
        );
        o.insert("pending_items".into(), json!(items));
    }
    Response::json(200, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpush_proto::Config;

    fn overview_json(m: &Metrics) -> Value {
        let node = Node::new(Config::default()).expect("default config");
        let (status, v) = overview(&node, Time(1_000_000), m, "").status_and_json();
        assert_eq!(status, 200);
        v
    }

    #[test]
    fn storage_state_follows_the_journal() {
        let m = Metrics::default();
        assert_eq!(overview_json(&m)["storage"]["journal"], "ok");
        m.journal_state(true);
        assert_eq!(overview_json(&m)["storage"]["journal"], "degraded");
        m.journal_state(false);
        assert_eq!(overview_json(&m)["storage"]["journal"], "ok");
    }
}
