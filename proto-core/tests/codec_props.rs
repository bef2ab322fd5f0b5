//! Property tests for the codecs and the TCP stream decoder.

use ddpush_proto::codec::{DOWN_HEADER_LEN, UP_HEADER_LEN};
use ddpush_proto::{
    Content, Decoded, DeviceMsg, DevicePacket, DownMsg, DownPacket, PushMsg, PushRequest,
    StreamDecoder, Uuid,
};
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

fn any_uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid)
}

fn device_msg() -> impl Strategy<Value = DeviceMsg> {
    prop_oneof![
        Just(DeviceMsg::Heartbeat),
        Just(DeviceMsg::AckNotify),
        any::<u64>().prop_map(DeviceMsg::AckBits),
        Just(DeviceMsg::AckPayload),
    ]
}

fn payload_bytes() -> impl Strategy<Value = Content> {
    proptest::collection::vec(any::<u8>(), 1..=500)
        .prop_map(|v| Content::new(v).expect("500 bytes fit a length field"))
}

fn down_msg() -> impl Strategy<Value = DownMsg> {
    prop_oneof![
        Just(DownMsg::HeartbeatReply),
        Just(DownMsg::Notify),
        any::<u64>().prop_map(DownMsg::Bits),
        payload_bytes().prop_map(DownMsg::Payload),
    ]
}

fn push_msg() -> impl Strategy<Value = PushMsg> {
    prop_oneof![
        Just(PushMsg::Notify),
        any::<u64>().prop_map(PushMsg::Bits),
        payload_bytes().prop_map(PushMsg::Payload),
    ]
}

/// Arbitrary bytes biased toward almost-valid packets (version 1, known commands).
fn fuzzy_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (
            prop_oneof![Just(1u8), any::<u8>()],
            any::<u8>(),
            prop_oneof![Just(0u8), Just(0x10), Just(0x11), Just(0x20), any::<u8>()],
            any::<[u8; 16]>(),
            0u16..12,
            proptest::collection::vec(any::<u8>(), 0..12),
        )
            .prop_map(|(v, a, c, u, n, rest)| {
                let mut b = vec![v, a, c];
                b.extend_from_slice(&u);
                b.extend_from_slice(&n.to_be_bytes());
                b.extend(rest);
                b
            }),
    ]
}

proptest! {
    #![proptest_config(cfg())]

    /// Never panics, and anything accepted is exactly the canonical encoding.
    #[test]
    fn device_decode_is_total_and_strict(b in fuzzy_bytes()) {
        if let Ok(p) = DevicePacket::decode(&b) {
            let mut out = Vec::new();
            p.encode(&mut out);
            prop_assert_eq!(out, b);
        }
    }

    #[test]
    fn down_decode_is_total_and_strict(b in fuzzy_bytes()) {
        if let Ok(p) = DownPacket::decode(&b) {
            prop_assert_eq!(&p.to_vec(), &b);
        }
        // Downstream headers are 5 bytes: try the tail of the fuzzy packet too.
        if b.len() > 16 {
            if let Ok(p) = DownPacket::decode(&b[16..]) {
                prop_assert_eq!(&p.to_vec()[..], &b[16..]);
            }
        }
    }

    #[test]
    fn push_decode_is_total_and_strict(b in fuzzy_bytes()) {
        if let Ok(p) = PushRequest::decode(&b) {
            prop_assert_eq!(p.to_vec(), b);
        }
    }

    #[test]
    fn device_round_trip(app_id in any::<u8>(), uuid in any_uuid(), msg in device_msg()) {
        let p = DevicePacket { app_id, uuid, msg };
        let mut out = Vec::new();
        p.encode(&mut out);
        prop_assert_eq!(out.len(), p.encoded_len());
        prop_assert_eq!(DevicePacket::decode(&out), Ok(p));
    }

    #[test]
    fn down_round_trip(app_id in any::<u8>(), msg in down_msg()) {
        let p = DownPacket { app_id, msg };
        let out = p.to_vec();
        prop_assert_eq!(out.len(), p.encoded_len());
        prop_assert_eq!(DownPacket::decode(&out), Ok(p));
    }

    #[test]
    fn push_round_trip(app_id in any::<u8>(), uuid in any_uuid(), msg in push_msg()) {
        let p = PushRequest { app_id, uuid, msg };
        let out = p.to_vec();
        prop_assert_eq!(PushRequest::decode(&out), Ok(p));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every encodable length, up to the 65,535 a length field holds, is written exactly: the
    /// length field equals the bytes that follow, and the packet decodes back whole.
    #[test]
    fn length_fields_match_the_content(len in prop_oneof![0..=600usize, 65_000..=65_535usize], fill in any::<u8>()) {
        let c = Content::new(vec![fill; len]).expect("at most 65535 bytes");
        let req = PushRequest { app_id: 1, uuid: Uuid([3; 16]), msg: PushMsg::Payload(c.clone()) };
        let up = req.to_vec();
        prop_assert_eq!(up.len(), UP_HEADER_LEN + len);
        prop_assert_eq!(usize::from(u16::from_be_bytes([up[19], up[20]])), len);
        prop_assert_eq!(req.encoded_len(), up.len());
        let down = DownPacket { app_id: 0, msg: DownMsg::Payload(c) };
        let dv = down.to_vec();
        prop_assert_eq!(dv.len(), DOWN_HEADER_LEN + len);
        prop_assert_eq!(usize::from(u16::from_be_bytes([dv[3], dv[4]])), len);
        prop_assert_eq!(down.encoded_len(), dv.len());
        if len > 0 {
            prop_assert_eq!(PushRequest::decode(&up), Ok(req));
            prop_assert_eq!(DownPacket::decode(&dv), Ok(down));
        }
    }

    /// Content that no length field can announce cannot be made, so it cannot be encoded.
    #[test]
    fn content_over_a_length_field_is_refused(extra in 1..=1024usize) {
        let n = Content::MAX + extra;
        prop_assert!(Content::new(vec![0u8; n]).is_err());
        prop_assert!(Content::copy_from_slice(&vec![0u8; n]).is_err());
    }
}

/// A stream of upstream frames with arbitrary header fields and content up to `max + 2`
/// bytes (so some frames are over the limit), plus a set of split points.
fn stream_case() -> impl Strategy<Value = (u16, Vec<Vec<u8>>, Vec<usize>)> {
    prop_oneof![Just(8u16), Just(40u16)].prop_flat_map(|max| {
        let frame = (
            any::<u8>(),
            any::<u8>(),
            any::<[u8; 16]>(),
            prop_oneof![
                8 => 0..=usize::from(max),
                1 => usize::from(max) + 1..usize::from(max) + 3,
            ],
        )
            .prop_map(|(v, c, u, n)| {
                let mut b = vec![v, 7, c];
                b.extend_from_slice(&u);
                b.extend_from_slice(&(n as u16).to_be_bytes());
                b.extend((0..n).map(|i| i as u8));
                b
            });
        (
            Just(max),
            proptest::collection::vec(frame, 0..8),
            proptest::collection::vec(0usize..400, 0..20),
        )
    })
}

/// Feeds `chunks` to a decoder; returns the frames (header bytes + content) and whether it
/// failed, checking the buffer bound after every step.
fn run(max: u16, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
    let mut dec = StreamDecoder::new(max);
    let mut frames = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        loop {
            let r = dec.decode(&mut input);
            match r {
                Ok(Decoded::Frame(f)) => {
                    assert_eq!(f.content.len(), usize::from(f.header.len));
                    let mut b = vec![f.header.version, f.header.app_id, f.header.cmd];
                    b.extend_from_slice(&f.header.uuid.0);
                    b.extend_from_slice(&f.header.len.to_be_bytes());
                    b.extend_from_slice(f.content);
                    frames.push(b);
                }
                Ok(Decoded::NeedMore) => {
                    assert!(input.is_empty(), "NeedMore with input left");
                    break;
                }
                Err(e) => {
                    assert!(e.len > max);
                    return (frames, true);
                }
            }
            assert!(dec.buffered() <= dec.bound());
        }
        assert!(dec.buffered() <= dec.bound());
    }
    (frames, false)
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn stream_decoder_is_split_invariant((max, frames, cuts) in stream_case()) {
        let stream: Vec<u8> = frames.concat();
        // What the stream must yield: every frame up to the first oversized one.
        let ok = frames
            .iter()
            .take_while(|f| usize::from(u16::from_be_bytes([f[19], f[20]])) <= usize::from(max))
            .cloned()
            .collect::<Vec<_>>();
        let fails = ok.len() < frames.len();

        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([stream.len()]) {
            chunks.push(&stream[at..c]);
            at = c;
        }
        let (got, failed) = run(max, &chunks);
        prop_assert_eq!(&got, &ok);
        prop_assert_eq!(failed, fails);

        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (got1, failed1) = run(max, &bytes);
        prop_assert_eq!(&got1, &ok);
        prop_assert_eq!(failed1, fails);
        prop_assert!(UP_HEADER_LEN + usize::from(max) == StreamDecoder::new(max).bound());
    }
}
