//! Signed devices end to end (docs/PROTOCOL.md section 9, SECURITY.md): the real binary, real
//! sockets. The attack of issue 18 (knowing only the name "alice", heartbeat with MD5("alice")
//! from any address) fails for a signed-only uuid and still works, as upstream, for a v1 uuid.

#[path = "server.rs"]
mod server;

use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ddpush_proto::signed::{DeviceKey, SealedDown};
use ddpush_proto::testing::signed_packet;
use ddpush_proto::{DeviceMsg, DownMsg, Uuid};
use server::*;

const TOKEN: &str = "s3cret-token";
const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn start(dir: &std::path::Path) -> Server {
    let s = Server::start(
        dir,
        &["--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN],
    );
    assert!(s.admin.is_some());
    s
}

fn now_s() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

/// A signed device on its own UDP socket.
struct Signed {
    sock: UdpSocket,
    uuid: Uuid,
    key: DeviceKey,
    nonce: u32,
}

impl Signed {
    fn new(srv: &Server, uuid: Uuid) -> Self {
        Signed {
            sock: srv.device(),
            uuid,
            key: DeviceKey::from_hex(KEY_HEX).unwrap(),
            nonce: 0,
        }
    }
    fn packet(&mut self, msg: DeviceMsg) -> Vec<u8> {
        self.nonce += 1;
        signed_packet(self.uuid, msg, &self.key, 1, now_s(), self.nonce)
    }
    fn recv(&self, n: usize) -> Vec<DownMsg> {
        self.sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = [0u8; 1024];
        (0..n)
            .map(|_| {
                let len = self.sock.recv(&mut buf).expect("a sealed packet");
                let k = self.key.clone();
                SealedDown::open(&buf[..len], |id| (id == 1).then(|| k.clone()))
                    .expect("sealed under the device key")
                    .packet
                    .msg
            })
            .collect()
    }
}

fn push_payload(srv: &Server, uuid: &Uuid, body: &[u8]) {
    let mut p = srv.pusher();
    let mut req = vec![1, 1, 0x20];
    req.extend_from_slice(&uuid.0);
    req.extend_from_slice(&(body.len() as u16).to_be_bytes());
    req.extend_from_slice(body);
    assert_eq!(push(&mut p, &req), Some(0));
}

#[test]
fn the_attack_fails_for_a_signed_only_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.admin.unwrap();
    let alice = Uuid::from_user("alice");
    let path = format!("/clients/{}/key", alice.to_hex());
    let body = format!("{{\"key_id\": 1, \"key\": \"{KEY_HEX}\"}}");
    // Without the token: refused.
    let (st, _) = http(a, "PUT", &path, None, &body);
    assert_eq!(st, 401);
    let (st, resp) = http(a, "PUT", &path, Some(TOKEN), &body);
    assert_eq!(st, 200, "{resp}");
    assert!(resp.contains("\"provisioned\""), "{resp}");
    assert!(!resp.contains(KEY_HEX), "the key never comes back");

    // The device heartbeats, signed: its address is recorded.
    let mut dev = Signed::new(&srv, alice);
    let hb = dev.packet(DeviceMsg::Heartbeat);
    dev.sock.send(&hb).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    push_payload(&srv, &alice, b"for alice only");
    let got = dev.recv(1);
    assert!(matches!(&got[0], DownMsg::Payload(p) if &p[..] == b"for alice only"));

    // The attacker knows only the name.
    let attacker = srv.device();
    attacker.send(&heartbeat(1)[..3]).ok(); // garbage first: dropped
    let mut v1 = vec![1, 1, 0];
    v1.extend_from_slice(&alice.0);
    v1.extend_from_slice(&[0, 0]);
    attacker.send(&v1).unwrap();
    assert_eq!(
        recv_n(&attacker, 1),
        vec!["0101100000".to_string()],
        "a bare 0x10 only"
    );
    recv_none(&attacker, Duration::from_millis(300));
    // Replaying the device's captured heartbeat from the attacker's socket: nothing.
    attacker.send(&hb).unwrap();
    recv_none(&attacker, Duration::from_millis(300));
    // The next push still goes to the device, never to the attacker.
    push_payload(&srv, &alice, b"second");
    let got = dev.recv(1);
    assert!(matches!(&got[0], DownMsg::Payload(p) if &p[..] == b"second"));
    recv_none(&attacker, Duration::from_millis(300));

    let (_, m) = http(a, "GET", "/metrics", Some(TOKEN), "");
    assert_eq!(
        sample(&m, "ddpush_signed_dropped_total{reason=\"replayed\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "ddpush_unsigned_refused_total{kind=\"heartbeat\"}"),
        1.0
    );
    assert_eq!(sample(&m, "ddpush_signed_clients"), 1.0);
    let (_, c) = http(
        a,
        "GET",
        &format!("/clients/{}", alice.to_hex()),
        Some(TOKEN),
        "",
    );
    let port = dev.sock.local_addr().unwrap().port();
    assert!(
        c.contains(&format!(":{port}\"")),
        "address is the device's: {c}"
    );
}

#[test]
fn the_attack_still_works_for_a_v1_uuid_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let bob = Uuid::from_user("bob");
    push_payload(&srv, &bob, b"for bob");
    let attacker = srv.device();
    let mut v1 = vec![1, 1, 0];
    v1.extend_from_slice(&bob.0);
    v1.extend_from_slice(&[0, 0]);
    attacker.send(&v1).unwrap();
    assert_eq!(
        recv_n(&attacker, 1),
        vec![format!("0101200007{}", hex::encode(b"for bob"))]
    );
}

#[test]
fn keys_survive_kill_9_and_can_be_rotated_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Uuid::from_user("alice");
    let path = format!("/clients/{}/key", alice.to_hex());
    {
        let srv = start(dir.path());
        let body = format!("{{\"key_id\": 1, \"key\": \"{KEY_HEX}\"}}");
        assert_eq!(
            http(srv.admin.unwrap(), "PUT", &path, Some(TOKEN), &body).0,
            200
        );
        srv.kill9();
    }
    let srv = start(dir.path());
    let a = srv.admin.unwrap();
    let (st, info) = http(a, "GET", &path, Some(TOKEN), "");
    assert_eq!(st, 200);
    assert!(info.contains("\"signed_only\":true"), "{info}");
    // Still signed-only after the crash: a v1 heartbeat records nothing.
    push_payload(&srv, &alice, b"x");
    let attacker = srv.device();
    let mut v1 = vec![1, 1, 0];
    v1.extend_from_slice(&alice.0);
    v1.extend_from_slice(&[0, 0]);
    attacker.send(&v1).unwrap();
    assert_eq!(recv_n(&attacker, 1), vec!["0101100000".to_string()]);
    // Same id, other key: refused. New id: rotated.
    let other = "ff".repeat(32);
    let (st, _) = http(
        a,
        "PUT",
        &path,
        Some(TOKEN),
        &format!("{{\"key_id\": 1, \"key\": \"{other}\"}}"),
    );
    assert_eq!(st, 409);
    let (st, r) = http(
        a,
        "PUT",
        &path,
        Some(TOKEN),
        &format!("{{\"key_id\": 2, \"key\": \"{other}\", \"grace_s\": 60}}"),
    );
    assert_eq!(st, 200);
    assert!(
        r.contains("\"rotated\"") && r.contains("\"previous_key_id\":1"),
        "{r}"
    );
    // The device still on key 1 is answered within the grace period. (Stamps up to the
    // restart second are refused after a restart, PROTOCOL.md 9.3: wait for the next one.)
    std::thread::sleep(Duration::from_millis(1100));
    let mut dev = Signed::new(&srv, alice);
    let hb = dev.packet(DeviceMsg::Heartbeat);
    dev.sock.send(&hb).unwrap();
    let got = dev.recv(1);
    assert!(
        matches!(&got[0], DownMsg::Payload(p) if &p[..] == b"x"),
        "{got:?}"
    );
    // Removed: v1 again, and the payload goes to a v1 heartbeat.
    assert_eq!(http(a, "DELETE", &path, Some(TOKEN), "").0, 200);
    attacker.send(&v1).unwrap();
    assert_eq!(recv_n(&attacker, 1), vec!["010120000178".to_string()]);
}
