//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ddpush_proto::testing::Harness;
use ddpush_proto::{Config, DownMsg, DownPacket, Limits, PushMsg, PushRequest, Uuid};

/// The uuid of the golden vectors: MD5("user100001").
pub const GOLDEN_UUID: &str = "2e72361924ef37a6166e0b228d1cbbb0";

pub fn golden_uuid() -> Uuid {
    Uuid::from_hex(GOLDEN_UUID).unwrap()
}

/// Loads `proto-core/tests/data/golden-vectors.json` (docs/PROTOCOL.md section 7); a missing
/// file is a failure, never a skip.
pub fn golden() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-vectors.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden vectors are required: cannot read {}: {e}",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("golden-vectors.json is not valid JSON")
}

pub fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.replace(' ', "")).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

/// A distinct uuid per number.
pub fn uuid(n: u32) -> Uuid {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b[15] = 0x5a;
    Uuid(b)
}

/// A device address: 10.0.x.y:port.
pub fn addr(n: u16, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8)),
        port,
    )
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Encoded server -> device packet.
pub fn down(app_id: u8, msg: DownMsg) -> Vec<u8> {
    DownPacket { app_id, msg }.to_vec()
}

pub fn payload(s: &[u8]) -> PushMsg {
    PushMsg::Payload(
        ddpush_proto::Content::copy_from_slice(s).expect("test payloads fit a length field"),
    )
}

pub fn down_payload(app_id: u8, s: &[u8]) -> Vec<u8> {
    down(
        app_id,
        DownMsg::Payload(
            ddpush_proto::Content::copy_from_slice(s).expect("test payloads fit a length field"),
        ),
    )
}

/// An encoded push request (app id 1), as a `Pusher` writes it on port 9999.
pub fn push_bytes(uuid: Uuid, msg: PushMsg) -> Vec<u8> {
    PushRequest {
        app_id: 1,
        uuid,
        msg,
    }
    .to_vec()
}

/// An encoded upstream packet with arbitrary fields (for malformed input).
pub fn raw_up(version: u8, app_id: u8, cmd: u8, uuid: Uuid, content: &[u8]) -> Vec<u8> {
    raw_up_len(version, app_id, cmd, uuid, content.len() as u16, content)
}

pub fn raw_up_len(version: u8, app_id: u8, cmd: u8, uuid: Uuid, n: u16, content: &[u8]) -> Vec<u8> {
    let mut v = vec![version, app_id, cmd];
    v.extend_from_slice(&uuid.0);
    v.extend_from_slice(&n.to_be_bytes());
    v.extend_from_slice(content);
    v
}

/// Default config, time starting well after zero (as a Unix-epoch adapter would).
pub fn harness(cfg: Config) -> Harness {
    let mut h = Harness::new(cfg).unwrap();
    h.advance(secs(1_000));
    h
}

pub fn default_harness() -> Harness {
    harness(Config::default())
}

/// Config with abuse limits off, for tests of raw protocol behaviour.
pub fn unlimited() -> Config {
    Config {
        limits: Limits {
            enabled: false,
            ..Limits::default()
        },
        ..Config::default()
    }
}
