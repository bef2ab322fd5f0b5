//! The signed-packet codec against `tests/data/signed-vectors.json` (docs/PROTOCOL.md section
//! 9; computed with Python's hmac module, independently of this code), plus property tests.

use std::path::PathBuf;
use std::time::Duration;

use ddpush_proto::signed::{
    device_to_vec, DeviceKey, Keyring, Seal, SealedDown, SignedDrop, SignedFrame, TRAILER_LEN,
};
use ddpush_proto::{Content, DeviceMsg, DevicePacket, DownMsg, DownPacket, Time, Uuid};
use proptest::prelude::*;

fn vectors() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/signed-vectors.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("signed vectors are required: {}: {e}", path.display()));
    serde_json::from_str(&text).expect("signed-vectors.json is not valid JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

fn str_of<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("field {k} missing"))
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("field {k} missing"))
}

fn rows<'a>(v: &'a serde_json::Value, k: &str) -> &'a Vec<serde_json::Value> {
    v[k].as_array()
        .unwrap_or_else(|| panic!("array {k} missing"))
}

struct Fixture {
    uuid: Uuid,
    key_id: u8,
    key: DeviceKey,
    ts: u32,
}

fn fixture(g: &serde_json::Value) -> Fixture {
    Fixture {
        uuid: Uuid::from_hex(str_of(g, "uuid")).unwrap(),
        key_id: num(g, "key_id") as u8,
        key: DeviceKey::from_hex(str_of(g, "key")).unwrap(),
        ts: num(g, "ts") as u32,
    }
}

fn ring(f: &Fixture) -> Keyring {
    let mut r = Keyring::new(Duration::from_secs(60), 0);
    r.update(f.uuid, f.key_id, f.key.clone(), Time::ZERO)
        .unwrap();
    r
}

#[test]
fn device_vectors_verify_and_reencode_byte_for_byte() {
    let g = vectors();
    let f = fixture(&g);
    let list = rows(&g, "device_to_server");
    assert_eq!(list.len(), 4);
    for r in list {
        let name = str_of(r, "name");
        let bytes = unhex(str_of(r, "hex"));
        let frame = SignedFrame::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let msg = match name {
            "heartbeat" => DeviceMsg::Heartbeat,
            "ack_0x10" => DeviceMsg::AckNotify,
            "ack_0x11_mask_5" => DeviceMsg::AckBits(num(r, "mask")),
            "ack_0x20" => DeviceMsg::AckPayload,
            other => panic!("unexpected vector {other}"),
        };
        let packet = DevicePacket {
            app_id: num(r, "app_id") as u8,
            uuid: f.uuid,
            msg,
        };
        let seal = Seal {
            key_id: f.key_id,
            ts: f.ts,
            nonce: num(r, "nonce") as u32,
        };
        assert_eq!(frame.packet, packet, "{name}");
        assert_eq!(frame.seal, seal, "{name}");
        assert!(frame.verify(&f.key), "{name}: tag");
        assert_eq!(
            hex::encode(device_to_vec(&packet, seal, &f.key)),
            str_of(r, "hex")
        );
        // And through the keyring, at the vectors' time.
        let v = ring(&f).verify(Time::from_secs(u64::from(f.ts)), &bytes);
        assert_eq!(v.map(|v| v.packet), Ok(packet), "{name}");
    }
}

#[test]
fn each_bad_vector_is_dropped_for_its_reason() {
    let g = vectors();
    let f = fixture(&g);
    let now = Time::from_secs(u64::from(f.ts));
    let list = rows(&g, "device_to_server_dropped_at_ts");
    assert_eq!(list.len(), 9);
    for r in list {
        let want = match str_of(r, "drop") {
            "tag" => SignedDrop::Tag,
            "unknown_key" => SignedDrop::UnknownKey,
            "length" => SignedDrop::Length,
            "command" => SignedDrop::Command,
            "expired" => SignedDrop::Expired,
            other => panic!("unexpected reason {other}"),
        };
        let got = ring(&f).verify(now, &unhex(str_of(r, "hex")));
        assert_eq!(got, Err(want), "{}", str_of(r, "name"));
        assert_eq!(want.label(), str_of(r, "drop"));
    }
    // A replay is a vector accepted twice.
    let hb = unhex(str_of(&rows(&g, "device_to_server")[0], "hex"));
    let mut k = ring(&f);
    assert!(k.verify(now, &hb).is_ok());
    assert_eq!(k.verify(now, &hb), Err(SignedDrop::Replayed));
    // A uuid without a key has no key of any id.
    let mut empty = Keyring::new(Duration::from_secs(60), 0);
    assert_eq!(empty.verify(now, &hb), Err(SignedDrop::UnknownKey));
}

#[test]
fn drift_within_the_window_is_accepted() {
    let g = vectors();
    let f = fixture(&g);
    let now = Time::from_secs(u64::from(f.ts));
    for r in rows(&g, "device_to_server_accepted_drift") {
        let got = ring(&f).verify(now, &unhex(str_of(r, "hex")));
        assert!(got.is_ok(), "{}: {got:?}", str_of(r, "name"));
    }
}

#[test]
fn server_vectors_seal_byte_for_byte_and_open() {
    let g = vectors();
    let f = fixture(&g);
    let list = rows(&g, "server_to_device");
    assert_eq!(list.len(), 5);
    for r in list {
        let name = str_of(r, "name");
        let msg = match name {
            "0x10" => DownMsg::Notify,
            "0x11_mask_5" => DownMsg::Bits(num(r, "mask")),
            "0x20_hello" | "immediate_0x20_hello" => {
                DownMsg::Payload(Content::try_from(str_of(r, "payload_utf8")).unwrap())
            }
            "heartbeat_reply" => DownMsg::HeartbeatReply,
            other => panic!("unexpected vector {other}"),
        };
        let packet = DownPacket {
            app_id: num(r, "app_id") as u8,
            msg,
        };
        let seal = Seal {
            key_id: f.key_id,
            ts: f.ts,
            nonce: num(r, "nonce") as u32,
        };
        let sealed = SealedDown::new(packet.clone(), seal, &f.key);
        assert_eq!(hex::encode(sealed.to_vec()), str_of(r, "hex"), "{name}");
        assert_eq!(sealed.encoded_len(), packet.encoded_len() + TRAILER_LEN);
        let bytes = unhex(str_of(r, "hex"));
        let key = f.key.clone();
        let opened = SealedDown::open(&bytes, |id| (id == f.key_id).then(|| key.clone()));
        assert_eq!(opened, Ok(sealed), "{name}");
        let other = DeviceKey::new([0xee; 32]);
        assert_eq!(
            SealedDown::open(&bytes, |_| Some(other.clone())),
            Err(SignedDrop::Tag)
        );
    }
}

fn device_msg() -> impl Strategy<Value = DeviceMsg> {
    prop_oneof![
        Just(DeviceMsg::Heartbeat),
        Just(DeviceMsg::AckNotify),
        any::<u64>().prop_map(DeviceMsg::AckBits),
        Just(DeviceMsg::AckPayload),
    ]
}

fn down_msg() -> impl Strategy<Value = DownMsg> {
    prop_oneof![
        Just(DownMsg::HeartbeatReply),
        Just(DownMsg::Notify),
        any::<u64>().prop_map(DownMsg::Bits),
        proptest::collection::vec(any::<u8>(), 1..=500)
            .prop_map(|v| DownMsg::Payload(Content::try_from(v).unwrap())),
    ]
}

fn seal() -> impl Strategy<Value = Seal> {
    (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(key_id, ts, nonce)| Seal {
        key_id,
        ts,
        nonce,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// decode(encode(x)) == x, and the tag verifies under the key and no other.
    #[test]
    fn device_round_trip(app_id: u8, uuid: [u8; 16], msg in device_msg(), s in seal(),
                         key: [u8; 32], other: [u8; 32]) {
        let p = DevicePacket { app_id, uuid: Uuid(uuid), msg };
        let k = DeviceKey::new(key);
        let b = device_to_vec(&p, s, &k);
        let f = SignedFrame::parse(&b).unwrap();
        prop_assert_eq!(f.packet, p);
        prop_assert_eq!(f.seal, s);
        prop_assert!(f.verify(&k));
        prop_assume!(key != other);
        prop_assert!(!f.verify(&DeviceKey::new(other)));
    }

    /// Any change to any byte is refused, by shape or by tag.
    #[test]
    fn any_modification_is_refused(msg in device_msg(), s in seal(), key: [u8; 32],
                                   at: usize, x in 1u8..) {
        let p = DevicePacket { app_id: 1, uuid: Uuid([3; 16]), msg };
        let k = DeviceKey::new(key);
        let mut b = device_to_vec(&p, s, &k);
        let i = at % b.len();
        b[i] ^= x;
        if let Ok(f) = SignedFrame::parse(&b) {
            prop_assert!(!f.verify(&k), "byte {} changed and still verifies", i);
        }
    }

    /// Parsing arbitrary bytes never panics, and what parses is the canonical encoding.
    #[test]
    fn parse_is_total_and_strict(mut b in proptest::collection::vec(any::<u8>(), 0..64),
                                 first_two in any::<bool>()) {
        if first_two && !b.is_empty() {
            b[0] = 2;
        }
        if let Ok(f) = SignedFrame::parse(&b) {
            let k = DeviceKey::new([0; 32]);
            let again = device_to_vec(&f.packet, f.seal, &k);
            prop_assert_eq!(again.len(), b.len());
            prop_assert_eq!(&again[..again.len() - 16], &b[..b.len() - 16]);
        }
        let _ = SealedDown::open(&b, |_| Some(DeviceKey::new([0; 32])));
    }

    /// Downstream: open(seal(x)) == x under the key, refused under another.
    #[test]
    fn down_round_trip(app_id: u8, msg in down_msg(), s in seal(), key: [u8; 32]) {
        let k = DeviceKey::new(key);
        let d = SealedDown::new(DownPacket { app_id, msg }, s, &k);
        let b = d.to_vec();
        prop_assert_eq!(b.len(), d.encoded_len());
        prop_assert_eq!(SealedDown::open(&b, |id| (id == s.key_id).then(|| k.clone())), Ok(d));
    }

    /// The replay window never accepts a pair twice, whatever the order of arrival.
    #[test]
    fn replay_window_accepts_each_pair_at_most_once(
        pairs in proptest::collection::vec((0u32..40, 0u32..6), 0..200),
    ) {
        let mut w = ddpush_proto::signed::ReplayWindow::new();
        let mut accepted = std::collections::HashSet::new();
        let mut now = 0u32;
        for (dt, nonce) in pairs {
            // Time moves forward; stamps are within 20 s of now, like the node's time check.
            now += dt / 10;
            let ts = (now + dt % 20).saturating_sub(10);
            if now.abs_diff(ts) > 20 {
                continue;
            }
            if w.check(now, 20, ts, nonce).is_ok() {
                prop_assert!(accepted.insert((ts, nonce)), "{:?} accepted twice", (ts, nonce));
            }
        }
    }
}
