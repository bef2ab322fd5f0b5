//! Target 2: push requests (port 9999) and the reply byte.
//!
//! The first byte picks the maximum content length (1..=600, or the default 500); the rest is
//! the byte stream an app server sends on one connection. Invariants:
//! * `PushRequest::decode` never panics, accepts a whole request exactly when the contract's
//!   reply would be `0x00`, and what it accepts re-encodes to the same bytes;
//! * fed to a `Node` on a push connection, every delimited request gets exactly one reply byte,
//!   in order, equal to the contract's rule for its header (`0x01` for a well-formed request
//!   only when the node is at its client capacity); a header announcing N > max closes the
//!   connection with no reply for it; nothing is sent to devices (no client is online).
#![no_main]

use std::net::SocketAddr;

use ddpush_fuzz::{contract_frames, contract_reply, Stream};
use ddpush_proto::codec::PushDecodeError;
use ddpush_proto::{Config, Dest, Node, Payload, Port, PushRequest, Time, Transmit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let max_content: u16 = if sel < 200 {
        500
    } else {
        1 + u16::from(sel - 200) * 11
    };

    // Whole-buffer decoding of the stream as one request.
    match PushRequest::decode(stream) {
        Ok(req) => {
            assert_eq!(req.to_vec(), stream, "accepted request does not re-encode");
            assert_eq!(contract_reply(stream, u16::MAX), Some(0x00));
        }
        Err(PushDecodeError::Reject(_)) => {
            let n = u16::from_be_bytes([stream[19], stream[20]]) as usize;
            assert_eq!(stream.len(), 21 + n);
            assert_eq!(contract_reply(stream, u16::MAX), Some(0x01));
        }
        Err(PushDecodeError::Short) => {
            assert!(
                stream.len() < 21
                    || stream.len() < 21 + u16::from_be_bytes([stream[19], stream[20]]) as usize
            );
        }
        Err(PushDecodeError::Trailing) => {
            assert!(stream.len() > 21 + u16::from_be_bytes([stream[19], stream[20]]) as usize);
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }

    // The same bytes on a live push connection. Small capacity so refusals happen.
    let cfg = Config {
        max_content,
        max_clients: 3,
        ..Config::default()
    };
    let mut node = Node::new(cfg).unwrap();
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    assert!(node.handle_tcp_open(Time::from_secs(1), 7, Port::Push, peer));
    node.handle_tcp_data(Time::from_secs(1), 7, stream);
    while node.poll_change().is_some() {}
    let replies: Vec<Transmit> = std::iter::from_fn(|| node.poll_transmit()).collect();
    let closed: Vec<u64> = std::iter::from_fn(|| node.poll_close()).collect();
    let (frames, framing_error) = match contract_frames(stream, Stream::Push(max_content)) {
        Ok(f) => (f, false),
        Err(f) => (f, true),
    };
    assert_eq!(
        replies.len(),
        frames.len(),
        "one reply per delimited request"
    );
    assert_eq!(closed, if framing_error { vec![7] } else { vec![] });
    let mut known: Vec<[u8; 16]> = Vec::new();
    for (t, f) in replies.iter().zip(&frames) {
        assert_eq!(t.dest, Dest::Tcp(7));
        let Payload::Reply(r) = &t.payload else {
            panic!("a push connection got a device packet: {t:?}");
        };
        let want = contract_reply(f, max_content).expect("delimited frame");
        let uuid: [u8; 16] = f[3..19].try_into().unwrap();
        let new_client = !known.contains(&uuid);
        if want == 0x00 && new_client && known.len() >= 3 {
            assert_eq!(r.byte(), 0x01, "capacity must refuse a fourth client");
            continue;
        }
        assert_eq!(r.byte(), want, "reply for header {:02x?}", &f[..21]);
        if want == 0x00 && new_client {
            known.push(uuid);
        }
    }
    assert_eq!(node.len(), known.len());
});
