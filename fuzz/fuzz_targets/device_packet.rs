//! Target 1: a UDP datagram on port 9966.
//!
//! Invariants: decoding never panics; it accepts exactly what PROTOCOL.md 2.1 calls valid
//! (independent oracle in `ddpush_fuzz::contract_device`); anything accepted re-encodes to the
//! same bytes with the same fields. The same bytes read as a downstream packet (what a device
//! SDK decodes) must also round-trip when accepted.
//!
//! Signed packets (PROTOCOL.md 9, version `0x02`): `SignedFrame::parse` accepts exactly the
//! shapes `ddpush_fuzz::contract_signed_device` accepts, refuses the others for the same
//! reason, reads the same fields, and its tag check under the vector key agrees with the
//! contract's HMAC; a parsed packet re-encoded with its seal under the vector key is the input
//! exactly when that tag was right. `SealedDown::open` (what a signed device runs) accepts
//! exactly what `contract_signed_down` accepts and re-encodes it to the same bytes. The seed
//! corpus holds the signed vectors, so valid tags are in reach.
#![no_main]

use ddpush_fuzz::{
    contract_device, contract_signed_device, contract_signed_down, contract_tag, SignedShape,
    VECTOR_KEY,
};
use ddpush_proto::codec::{DownMsg, DownPacket};
use ddpush_proto::signed::{device_to_vec, DeviceKey, SealedDown, SignedDrop, SignedFrame};
use ddpush_proto::{DeviceMsg, DevicePacket};
use libfuzzer_sys::fuzz_target;

fn cmd_of(msg: DeviceMsg) -> (u8, Option<u64>) {
    match msg {
        DeviceMsg::Heartbeat => (0x00, None),
        DeviceMsg::AckNotify => (0x10, None),
        DeviceMsg::AckBits(m) => (0x11, Some(m)),
        DeviceMsg::AckPayload => (0x20, None),
    }
}

fn signed(data: &[u8]) {
    let key = DeviceKey::new(VECTOR_KEY);
    match (SignedFrame::parse(data), contract_signed_device(data)) {
        (Ok(f), Ok(((app_id, uuid, cmd, mask), (key_id, ts, nonce, tag)))) => {
            assert_eq!(f.packet.app_id, app_id);
            assert_eq!(f.packet.uuid.0, uuid);
            assert_eq!(cmd_of(f.packet.msg), (cmd, mask));
            assert_eq!(
                (f.seal.key_id, f.seal.ts, f.seal.nonce),
                (key_id, ts, nonce)
            );
            let good = contract_tag(&VECTOR_KEY, true, &data[..data.len() - 16]) == tag;
            assert_eq!(
                f.verify(&key),
                good,
                "tag check differs from the contract's HMAC"
            );
            let again = device_to_vec(&f.packet, f.seal, &key);
            assert_eq!(again == data, good, "re-signing differs from the contract");
            // A tag never verifies under another key (the contract's HMAC says which is right).
            let other = DeviceKey::new([0xA5; 32]);
            let good_other = contract_tag(&[0xA5; 32], true, &data[..data.len() - 16]) == tag;
            assert_eq!(f.verify(&other), good_other);
        }
        (Err(SignedDrop::Length), Err(SignedShape::Length)) => {}
        (Err(SignedDrop::Command), Err(SignedShape::Command)) => {}
        (got, want) => {
            panic!("signed parse {got:?} but the contract says {want:?} for {data:02x?}")
        }
    }

    let opened = SealedDown::open(data, |id| (id == 1).then(|| key.clone()));
    match (opened, contract_signed_down(data)) {
        (Ok(d), Some((app_id, cmd, content, (key_id, ts, nonce, tag)))) => {
            assert_eq!(d.packet.app_id, app_id);
            let (c, body) = match &d.packet.msg {
                DownMsg::HeartbeatReply => (0x00, Vec::new()),
                DownMsg::Notify => (0x10, Vec::new()),
                DownMsg::Bits(m) => (0x11, m.to_be_bytes().to_vec()),
                DownMsg::Payload(p) => (0x20, p.to_vec()),
            };
            assert_eq!((c, body), (cmd, content));
            assert_eq!(
                (d.seal.key_id, d.seal.ts, d.seal.nonce),
                (key_id, ts, nonce)
            );
            assert_eq!(d.tag, tag);
            assert_eq!(d.to_vec(), data, "opened packet does not re-encode");
            assert_eq!(d.encoded_len(), data.len());
            assert_eq!(SealedDown::new(d.packet.clone(), d.seal, &key), d);
        }
        (Err(_), None) => {}
        (got, want) => panic!("open {got:?} but the contract says {want:?} for {data:02x?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let got = DevicePacket::decode(data);
    let want = contract_device(data);
    match (&got, want) {
        (Ok(p), Some((app_id, uuid, cmd, mask))) => {
            assert_eq!(p.app_id, app_id);
            assert_eq!(p.uuid.0, uuid);
            assert_eq!(cmd_of(p.msg), (cmd, mask));
            let mut out = Vec::new();
            p.encode(&mut out);
            assert_eq!(
                out, data,
                "accepted packet does not re-encode to the same bytes"
            );
            assert_eq!(p.encoded_len(), data.len());
        }
        (Err(_), None) => {}
        (got, want) => panic!("decode {got:?} but the contract says {want:?} for {data:02x?}"),
    }

    if let Ok(d) = DownPacket::decode(data) {
        assert_eq!(
            d.to_vec(),
            data,
            "downstream packet does not re-encode to the same bytes"
        );
        assert_eq!(d.encoded_len(), data.len());
    }

    signed(data);
});
