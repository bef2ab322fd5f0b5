//! The web console's HTTP behaviour against the real `ddpushd`, without a browser: the
//! embedded page, the security headers on every response, the cross-site refusals, the token,
//! and the fields of the JSON the page polls. (`tests/console.rs` drives the page in Chromium.)

#[path = "server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use server::*;

/// A raw answer: status, headers (names lowercased), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request with exactly the headers given (plus content-length).
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// What the console itself sends on a state-changing request.
const CONSOLE_POST: [(&str, &str); 3] = [
    ("host", "127.0.0.1"),
    ("content-type", "application/json"),
    ("x-ddpush-csrf", "1"),
];

fn get(addr: SocketAddr, path: &str) -> Answer {
    raw(addr, "GET", path, &[("host", "127.0.0.1")], "")
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Answer {
    raw(addr, "POST", path, &CONSOLE_POST, body)
}

fn admin_server(dir: &std::path::Path, extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--admin-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let s = Server::start(dir, &args);
    let a = s.admin.expect("admin address in the listening line");
    (s, a)
}

fn assert_strict_csp(a: &Answer, what: &str) {
    let csp = a
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no content-security-policy"));
    for part in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{what}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{what}: {csp}");
    assert_eq!(
        a.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(a.header("cache-control"), Some("no-store"), "{what}");
}

#[test]
fn every_admin_response_carries_a_strict_csp() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, a) = admin_server(dir.path(), &[]);
    let page = get(a, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("<script src=\"/console/app.js\""));
    for (path, ct) in [
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
        ("/console/icon.svg", "image/svg+xml"),
    ] {
        let r = get(a, path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(ct), "{path}");
        assert_strict_csp(&r, path);
    }
    assert_strict_csp(&page, "/");
    for path in [
        "/status",
        "/metrics",
        "/console/data",
        "/nope",
        "/console/nope.js",
    ] {
        assert_strict_csp(&get(a, path), path);
    }
    let refused = raw(a, "POST", "/push", &[("host", "127.0.0.1")], "{}");
    assert_eq!(refused.status, 403);
    assert_strict_csp(&refused, "a refusal");
}

#[test]
fn cross_site_style_posts_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, a) = admin_server(dir.path(), &[]);
    let body = format!(r#"{{"uuid":"{UUID_HEX}","type":"payload","text":"x"}}"#);
    // What a cross-site HTML form or a "simple" cross-site fetch can send.
    let cases: [(&[(&str, &str)], u16); 5] = [
        (&[("host", "127.0.0.1")], 403),
        (
            &[
                ("host", "127.0.0.1"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            403,
        ),
        (
            &[("host", "127.0.0.1"), ("content-type", "application/json")],
            403,
        ),
        (
            &[
                ("host", "127.0.0.1"),
                ("content-type", "text/plain"),
                ("x-ddpush-csrf", "1"),
            ],
            415,
        ),
        (
            &[
                ("host", "127.0.0.1:9900"),
                ("origin", "http://evil.example"),
                ("content-type", "application/json"),
                ("x-ddpush-csrf", "1"),
            ],
            403,
        ),
    ];
    for (headers, want) in cases {
        let r = raw(a, "POST", "/push", headers, &body);
        assert_eq!(r.status, want, "{headers:?}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
    // Nothing was stored by any of them.
    assert_eq!(get(a, &format!("/clients/{UUID_HEX}")).status, 404);
    assert_eq!(get(a, "/status").json()["pushes_accepted"], 0);

    // The console's own request is accepted, and a same-origin Origin is fine.
    let mut same = CONSOLE_POST.to_vec();
    same[0] = ("host", "127.0.0.1:9900");
    same.push(("origin", "http://127.0.0.1:9900"));
    let r = raw(a, "POST", "/push", &same, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"], "accepted");

    // Removal follows the same rules.
    let clear = format!("/clients/{UUID_HEX}/clear");
    let r = raw(a, "POST", &clear, &[("host", "127.0.0.1")], "");
    assert_eq!(r.status, 403);
    assert_eq!(get(a, &format!("/clients/{UUID_HEX}")).status, 200);
    assert_eq!(post(a, &clear, "{}").status, 200);
    assert_eq!(get(a, &format!("/clients/{UUID_HEX}")).status, 404);

    // DNS rebinding: without a token, a host name other than localhost is refused.
    let r = raw(a, "GET", "/status", &[("host", "rebind.example:9900")], "");
    assert_eq!(r.status, 403);
    assert_eq!(
        raw(a, "GET", "/status", &[("host", "localhost:9900")], "").status,
        200
    );
}

#[test]
fn with_a_token_the_page_loads_but_every_data_request_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, a) = admin_server(dir.path(), &["--admin-token", "s3cret"]);
    // The page and its files hold no data: served so the page can ask for the token.
    assert_eq!(get(a, "/").status, 200);
    assert_eq!(get(a, "/console/app.js").status, 200);
    let lookup = format!(r#"{{"uuid":"{UUID_HEX}"}}"#);
    for bearer in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Basic czNjcmV0"),
    ] {
        let mut h = vec![("host", "127.0.0.1")];
        if let Some(b) = bearer {
            h.push(("authorization", b));
        }
        let r = raw(a, "GET", "/console/data", &h, "");
        assert_eq!(r.status, 401, "{bearer:?}");
        assert!(!r.body.contains("clients"), "no data without the token");
        h.extend([("content-type", "application/json"), ("x-ddpush-csrf", "1")]);
        assert_eq!(raw(a, "POST", "/console/lookup", &h, &lookup).status, 401);
        assert_eq!(
            raw(a, "POST", "/push", &h, r#"{"user":"x","type":"notify"}"#).status,
            401
        );
    }
    let h = [("host", "127.0.0.1"), ("authorization", "Bearer s3cret")];
    let r = raw(a, "GET", "/console/data", &h, "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["clients"], 0);
    // With a token, any Host: the token is what protects the port.
    let h = [
        ("host", "ddpush.internal"),
        ("authorization", "Bearer s3cret"),
    ];
    assert_eq!(raw(a, "GET", "/console/data", &h, "").status, 200);
}

/// Polls `/console/data` until `done` holds (at most 15 s).
fn data_until(a: SocketAddr, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = get(a, "/console/data").json();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "condition never held; last: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn console_data_has_the_overview_rates_latency_storage_and_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, a) = admin_server(dir.path(), &[]);
    let d = srv.device();
    for _ in 0..5 {
        d.send(&heartbeat(1)).unwrap();
    }
    // Online before the push, so the push is a delivery rather than a re-send.
    data_until(a, |v| v["online"] == 1);
    let push = format!(r#"{{"uuid":"{UUID_HEX}","type":"payload","text":"hello"}}"#);
    assert_eq!(post(a, "/push", &push).json()["result"], "accepted");
    recv_n(&d, 1);
    d.send(&up(1, 1, 0x20, &[])).unwrap(); // the ack: one push->ack latency
    post(a, "/push", r#"{"user":"bob","type":"notify"}"#);

    let v = data_until(a, |v| {
        let hb = &v["rates"]["series"]["heartbeats"];
        hb.as_array()
            .is_some_and(|c| c.iter().any(|x| x.as_f64() > Some(0.0)))
            && v["latency"]["samples"] == 1
    });
    assert_eq!(v["version"], env!("DDPUSH_VERSION"));
    assert_eq!(v["clients"], 2);
    assert_eq!(v["online"], 1);
    assert_eq!(v["pending"]["0x10"], 1);
    assert_eq!(v["pending"]["0x20"], 0);
    assert_eq!(v["totals"]["heartbeats"], 5);
    assert_eq!(v["totals"]["pushes_accepted"], 2);
    assert_eq!(v["totals"]["deliveries"], 1);
    assert_eq!(v["acks"], 1);
    assert_eq!(v["storage"]["journal"], "ok");
    assert!(v["storage"]["journal_writes"].as_u64() >= Some(2));
    assert_eq!(v["cluster"]["mode"], "single node");
    assert_eq!(v["cluster"]["peers"], serde_json::json!([]));
    // Push->ack with 1 s resolution (the record keeps whole seconds).
    let p50 = v["latency"]["p50_ms"].as_u64().unwrap();
    assert!(p50 <= 2_000, "{p50}");
    assert_eq!(v["latency"]["p99_ms"], p50);
    assert_eq!(v["latency"]["window_s"], 900);

    let r = &v["rates"];
    assert_eq!(r["interval_ms"], 2000);
    assert_eq!(r["window_s"], 900);
    let t: Vec<u64> = r["t_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(!t.is_empty() && t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    for name in [
        "heartbeats",
        "pushes_accepted",
        "pushes_rejected",
        "deliveries",
        "resends",
        "invalid",
        "limited",
    ] {
        let col = r["series"][name].as_array().unwrap();
        assert_eq!(col.len(), t.len(), "{name}");
    }
    // ~5 heartbeats in one sample interval of ~2 s: a rate between 1/s and 5/s.
    let peak = r["series"]["heartbeats"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .fold(0.0, f64::max);
    assert!((1.0..=5.0).contains(&peak), "{peak}");

    // A poller that has every point gets none again; a bad `since` is refused.
    let seq = r["seq"].as_u64().unwrap();
    let again = get(a, &format!("/console/data?since={seq}")).json();
    let new_points = again["rates"]["t_ms"].as_array().unwrap().len() as u64;
    assert_eq!(again["rates"]["seq"].as_u64().unwrap() - seq, new_points);
    assert_eq!(get(a, "/console/data?since=x").status, 400);
}

#[test]
fn lookup_by_uuid_or_user_name_shows_pending_items() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, a) = admin_server(dir.path(), &[]);
    post(
        a,
        "/push",
        r#"{"user":"user100001","type":"payload","text":"hello"}"#,
    );
    post(
        a,
        "/push",
        r#"{"user":"user100001","type":"bits","bits":18446744073709551615}"#,
    );
    let by_user = post(a, "/console/lookup", r#"{"user":"user100001"}"#);
    assert_eq!(by_user.status, 200, "{}", by_user.body);
    let v = by_user.json();
    // MD5("user100001"), as the SDKs derive it.
    assert_eq!(v["uuid"], UUID_HEX);
    assert_eq!(v["user"], "user100001");
    assert_eq!(v["online"], false);
    assert_eq!(v["last_heartbeat_ms"], Value::Null);
    let items = v["pending_items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0]["type"], "0x11");
    assert_eq!(items[0]["bits_hex"], "0xffffffffffffffff");
    assert_eq!(items[1]["type"], "0x20");
    assert_eq!(items[1]["text"], "hello");
    assert_eq!(items[1]["hex"], "68656c6c6f");
    assert!(items[1]["min_age_s"].as_u64() <= Some(5));

    let by_uuid = post(a, "/console/lookup", &format!(r#"{{"uuid":"{UUID_HEX}"}}"#)).json();
    assert_eq!(by_uuid["pending_items"], v["pending_items"]);

    let unknown = post(a, "/console/lookup", r#"{"user":"nobody"}"#);
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["uuid"], "6e854442cd2a940c9e95941dce4ad598");
    for bad in [
        r#"{"uuid":"zz"}"#,
        r#"{}"#,
        r#"{"uuid":"a","user":"b"}"#,
        "not json",
    ] {
        assert_eq!(post(a, "/console/lookup", bad).status, 400, "{bad}");
    }
    assert_eq!(get(a, "/console/lookup").status, 405);
}
