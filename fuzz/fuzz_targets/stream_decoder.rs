//! Target 3: the TCP stream decoders (port 9966: content <= 8, and a version-2 frame carries
//! the 25-byte signed trailer after its content; port 9999: content <= max, never a trailer).
//!
//! Input: `[max selector][split length][split bytes...][stream...]`. Invariants, for both
//! decoders:
//! * the raw frames (and the framing error, if any) are the same whether the stream is fed
//!   whole, in the fuzzer-chosen split, or one byte at a time, and equal to the naive contract
//!   framer's (`ddpush_fuzz::contract_frames`, which models the trailer independently);
//! * each frame's header and content are the ones its raw bytes hold;
//! * `buffered() <= bound()` after every call, and `bound()` is the largest frame of the
//!   stream: `21 + 8 + 25` on a device stream, `21 + max` on a push stream;
//! * once failed, the decoder stays failed with the same error.
#![no_main]

use ddpush_fuzz::{contract_frames, split, Stream, UP};
use ddpush_proto::{Decoded, FramingError, StreamDecoder};
use libfuzzer_sys::fuzz_target;

type Outcome = (Vec<Vec<u8>>, Option<FramingError>);

fn run(mut dec: StreamDecoder, pieces: &[&[u8]]) -> Outcome {
    let bound = dec.bound();
    let mut frames = Vec::new();
    let mut err = None;
    'outer: for piece in pieces {
        let mut input: &[u8] = piece;
        loop {
            let before = input.len();
            match dec.decode(&mut input) {
                Ok(Decoded::Frame(f)) => {
                    assert_eq!(f.content.len(), usize::from(f.header.len));
                    let mut h = vec![f.header.version, f.header.app_id, f.header.cmd];
                    h.extend_from_slice(&f.header.uuid.0);
                    h.extend_from_slice(&f.header.len.to_be_bytes());
                    assert_eq!(&f.raw[..UP], &h[..], "header fields vs raw bytes");
                    assert_eq!(
                        f.raw.get(UP..UP + f.content.len()),
                        Some(f.content),
                        "content is not the bytes after the header"
                    );
                    frames.push(f.raw.to_vec());
                }
                Ok(Decoded::NeedMore) => {
                    assert!(
                        input.is_empty(),
                        "NeedMore with {} bytes unread",
                        input.len()
                    );
                    assert!(dec.buffered() <= bound);
                    break;
                }
                Err(e) => {
                    assert_eq!(dec.decode(&mut input), Err(e), "decoder must stay failed");
                    err = Some(e);
                    break 'outer;
                }
            }
            assert!(input.len() <= before);
            assert!(
                dec.buffered() <= bound,
                "buffer {} past bound {bound}",
                dec.buffered()
            );
        }
    }
    (frames, err)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Some((&nsplit, rest)) = rest.split_first() else {
        return;
    };
    let nsplit = usize::from(nsplit).min(rest.len());
    let (seed, stream) = rest.split_at(nsplit);
    let push_max: u16 = if sel < 128 {
        500
    } else {
        u16::from(sel - 127) * 3
    };

    for (dec, kind) in [
        (StreamDecoder::device(), Stream::Device),
        (StreamDecoder::new(push_max), Stream::Push(push_max)),
    ] {
        assert_eq!(dec.bound(), kind.max_frame());
        let whole = run(dec.clone(), &[stream]);
        let chosen = run(dec.clone(), &split(stream, seed));
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let single = run(dec.clone(), &bytes);
        assert_eq!(whole, chosen, "split changed the frames");
        assert_eq!(whole, single, "byte-at-a-time changed the frames");
        let want = contract_frames(stream, kind);
        match (&want, &whole.1) {
            (Ok(f), None) => assert_eq!(&whole.0, f),
            (Err(f), Some(e)) => {
                assert_eq!(&whole.0, f);
                assert_eq!(e.max, kind.max_content());
                assert!(e.len > e.max);
            }
            _ => panic!("decoder {whole:?} vs contract {want:?}"),
        }
    }
});
