//! Target 1: a UDP datagram on port 9966.
//!
//! Invariants: decoding never panics; it accepts exactly what PROTOCOL.md 2.1 calls valid
//! (independent oracle in `ddpush_fuzz::contract_device`); anything accepted re-encodes to the
//! same bytes with the same fields. The same bytes read as a downstream packet (what a device
//! SDK decodes) must also round-trip when accepted.
#![no_main]

use ddpush_fuzz::contract_device;
use ddpush_proto::codec::DownPacket;
use ddpush_proto::{DeviceMsg, DevicePacket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let got = DevicePacket::decode(data);
    let want = contract_device(data);
    match (&got, want) {
        (Ok(p), Some((app_id, uuid, cmd, mask))) => {
            assert_eq!(p.app_id, app_id);
            assert_eq!(p.uuid.0, uuid);
            let (c, m) = match p.msg {
                DeviceMsg::Heartbeat => (0x00, None),
                DeviceMsg::AckNotify => (0x10, None),
                DeviceMsg::AckBits(m) => (0x11, Some(m)),
                DeviceMsg::AckPayload => (0x20, None),
            };
            assert_eq!((c, m), (cmd, mask));
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
});
