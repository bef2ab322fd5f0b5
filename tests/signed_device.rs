//! The Rust `Device` as a signed device against the real binary (issue 18, PROTOCOL.md 9),
//! over UDP and TCP: with the provisioned key it receives a push and its signed ack clears
//! it; a v1 device of the same uuid gets at most a bare 0x10, never the payload, and moves
//! nothing; a device with a wrong key receives nothing at all.

#[path = "server.rs"]
mod server;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ddpush_client::{
    Content, Device, DeviceEvent, DownMsg, PushOutcome, PushRequest, PushRequestExt, Pusher,
    Transport, Uuid,
};
use ddpush_proto::signed::DeviceKey;
use serde_json::Value;
use server::*;

const TOKEN: &str = "s3cret-token";
const KEY_HEX: &str = "5f0b1e6a3c2d4e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8";
const STEP: Duration = Duration::from_secs(10);

fn start(dir: &std::path::Path) -> Server {
    Server::start(
        dir,
        &["--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN],
    )
}

fn admin(srv: &Server) -> SocketAddr {
    srv.admin.expect("admin port")
}

fn record(srv: &Server, u: Uuid) -> Value {
    let (status, body) = http(admin(srv), "GET", &format!("/clients/{u}"), Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn pending_payload(srv: &Server, u: Uuid) -> Option<String> {
    record(srv, u)["pending"]["payload_base64"]
        .as_str()
        .map(str::to_string)
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn push_text(srv: &Server, u: Uuid, text: &str) {
    let mut p = Pusher::new(srv.push.to_string());
    let req = PushRequest::text(u, text).unwrap();
    assert_eq!(p.push(&req).unwrap(), PushOutcome::Accepted);
}

fn device(srv: &Server, u: Uuid, t: Transport, key: Option<(u8, &str)>) -> Device {
    let addr = match t {
        Transport::Udp => srv.udp,
        Transport::Tcp => srv.tcp,
    };
    let mut b = Device::builder(addr, u)
        .transport(t)
        .interval(Duration::from_secs(3600));
    if let Some((id, hex)) = key {
        // Server and device share this machine's clock: a device start then costs ~2 s.
        b = b
            .key(id, DeviceKey::from_hex(hex).unwrap())
            .server_ahead(Duration::from_secs(1));
    }
    let d = b.start().unwrap();
    d.wait_connected(STEP).expect("a socket or connection");
    d
}

/// Everything `d` reports for `span`, heartbeating every 200 ms.
fn watch(d: &Device, span: Duration) -> Vec<DeviceEvent> {
    let deadline = Instant::now() + span;
    let mut got = Vec::new();
    let mut next_kick = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_kick {
            d.heartbeat_now();
            next_kick += Duration::from_millis(200);
        }
        if let Some(e) = d.recv_event(Duration::from_millis(50)) {
            got.push(e);
        }
    }
    got
}

fn messages(events: &[DeviceEvent]) -> Vec<DownMsg> {
    events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Message(p) => Some(p.msg.clone()),
            _ => None,
        })
        .collect()
}

/// Gives `u` key 3 (`KEY_HEX`) over the admin API.
fn provision(srv: &Server, u: Uuid) {
    let (status, body) = http(
        admin(srv),
        "PUT",
        &format!("/clients/{u}/key"),
        Some(TOKEN),
        &format!(r#"{{"key_id": 3, "key": "{KEY_HEX}"}}"#),
    );
    assert_eq!(status, 200, "{body}");
}

fn signed_device_end_to_end(t: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let u = Uuid::from_user(&format!("alice-{t:?}"));
    provision(&srv, u);

    // The signed device: its first heartbeat verifies, an immediate push arrives sealed, and
    // its signed ack clears the payload.
    let dev = device(&srv, u, t, Some((3, KEY_HEX)));
    eventually("the signed heartbeat recorded", || {
        let (status, body) = http(
            admin(&srv),
            "GET",
            &format!("/clients/{u}"),
            Some(TOKEN),
            "",
        );
        status == 200 && serde_json::from_str::<Value>(&body).unwrap()["online"] == true
    });
    push_text(&srv, u, "secret-1");
    let got = dev.recv(STEP).expect("the payload");
    assert_eq!(got.msg, DownMsg::Payload(Content::from_static(b"secret-1")));
    eventually("the signed ack cleared the payload", || {
        pending_payload(&srv, u).is_none()
    });
    let addr_before = record(&srv, u)["addr"].clone();
    dev.stop();

    // While it is away a second payload waits.
    push_text(&srv, u, "secret-2");
    assert!(pending_payload(&srv, u).is_some());

    // A v1 device for the same uuid (an old app build, or anyone who knows the name): only
    // bare 0x10s, which it acks in v1, and that changes nothing.
    let v1 = device(&srv, u, t, None);
    let events = watch(&v1, Duration::from_secs(2));
    let msgs = messages(&events);
    assert!(!msgs.is_empty(), "a v1 heartbeat learns there is news");
    assert!(
        msgs.iter().all(|m| *m == DownMsg::Notify),
        "a v1 device got more than a bare 0x10: {msgs:?}"
    );
    v1.stop();
    assert!(pending_payload(&srv, u).is_some(), "a v1 ack cleared it");
    assert_eq!(
        record(&srv, u)["addr"],
        addr_before,
        "a v1 heartbeat moved it"
    );

    // Wrong key bytes under the right id, and the right bytes under another id: nothing
    // comes back at all.
    let wrong = "00".repeat(32);
    for (id, hex) in [(3, wrong.as_str()), (4, KEY_HEX)] {
        let bad = device(&srv, u, t, Some((id, hex)));
        let events = watch(&bad, Duration::from_secs(2));
        assert!(
            messages(&events).is_empty(),
            "key id {id}: a wrong key received {events:?}"
        );
        bad.stop();
        assert!(pending_payload(&srv, u).is_some());
        assert_eq!(record(&srv, u)["addr"], addr_before, "a wrong key moved it");
    }

    // The real device comes back: the waiting payload arrives at its first heartbeat.
    let dev = device(&srv, u, t, Some((3, KEY_HEX)));
    let got = dev.recv(STEP).expect("the waiting payload");
    assert_eq!(got.msg, DownMsg::Payload(Content::from_static(b"secret-2")));
    eventually("cleared again", || pending_payload(&srv, u).is_none());
    assert!(dev.acks_sent() >= 1);
}

#[test]
fn signed_device_over_udp() {
    signed_device_end_to_end(Transport::Udp);
}

#[test]
fn signed_device_over_tcp() {
    signed_device_end_to_end(Transport::Tcp);
}

/// Seconds since the Unix epoch on this machine's clock (the server's clock too).
fn wall_s() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

fn replayed_drops(srv: &Server) -> u64 {
    let (_, m) = http(admin(srv), "GET", "/metrics", Some(TOKEN), "");
    m.lines()
        .find(|l| l.starts_with("ddpush_signed_dropped_total{reason=\"replayed\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The clock-ahead restart hole (PROTOCOL.md 9.3), against the real binary: a device whose
/// clock is 20 s ahead heartbeats, ddpushd is killed with SIGKILL and restarted, and an
/// attacker replays the device's last captured heartbeat (stamped after the restart second).
/// The replay is refused and the address stays the device's; the device is heard again
/// within a second of the restart.
#[test]
fn a_replay_after_kill_9_of_a_packet_stamped_by_a_fast_clock_is_refused() {
    use ddpush_proto::testing::signed_heartbeat;
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let u = Uuid::from_user("alice-fast-clock");
    provision(&srv, u);
    let key = DeviceKey::from_hex(KEY_HEX).unwrap();
    let mut nonce = 0u32;
    let mut heartbeat = || {
        nonce += 1;
        signed_heartbeat(u, &key, 3, wall_s() + 20, nonce)
    };
    let dev = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dev_addr = dev.local_addr().unwrap().to_string();
    let mut captured = Vec::new();
    for _ in 0..3 {
        captured = heartbeat();
        dev.send_to(&captured, srv.udp).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    eventually("the fast device is recorded", || {
        record(&srv, u)["addr"] == dev_addr.as_str()
    });
    srv.kill9();

    let srv = start(dir.path());
    let attacker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker.send_to(&captured, srv.udp).unwrap();
    eventually("the replay is counted", || replayed_drops(&srv) == 1);
    assert_ne!(
        record(&srv, u)["addr"],
        attacker.local_addr().unwrap().to_string().as_str(),
        "the replay moved the address to the attacker"
    );
    // The device, still 20 s ahead, is heard again once the restart second is over.
    std::thread::sleep(Duration::from_millis(1100));
    dev.send_to(&heartbeat(), srv.udp).unwrap();
    eventually("the device is heard again", || {
        record(&srv, u)["addr"] == dev_addr.as_str()
    });
}
