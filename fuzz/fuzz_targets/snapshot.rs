//! Target 5b: the server's snapshot reader (`ddpushd::persist::read_snapshot`).
//!
//! Two modes, chosen by the first input byte:
//! * raw: the bytes are the file;
//! * structured: arbitrary records go through the server's own writer (`encode_snapshot`),
//!   and the valid file is then damaged (byte flips, truncation, optionally with every frame's
//!   CRC recomputed so the damage reaches the CBOR decoder).
//!
//! Invariants: never a panic; no allocation out of proportion to the file; an undamaged file
//! reads back exactly what was written; whatever is accepted re-encodes and reads back the
//! same (header and records).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ddpush_fuzz::persisted::{Damage, Rec};
use ddpush_fuzz::{alloc_budget_cbor, within_budget, TrackingAlloc};
use ddpushd::persist::{encode_snapshot, read_snapshot};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

fn read(
    buf: &[u8],
) -> (
    Result<ddpushd::persist::SnapHeader, String>,
    Vec<ddpush_proto::RecordState>,
) {
    let mut recs = Vec::new();
    let r = within_budget(buf.len(), alloc_budget_cbor(buf.len()), || {
        read_snapshot("snapshot.cbor", buf, |r| recs.push(r)).map_err(|e| e.to_string())
    });
    (r, recs)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (file, expect) = if mode & 1 == 0 {
        (rest.to_vec(), None)
    } else {
        let mut u = Unstructured::new(rest);
        let Ok((gen, taken, recs, damage)) =
            <(u64, u64, Vec<Rec>, Option<Damage>)>::arbitrary(&mut u)
        else {
            return;
        };
        let states: Vec<_> = recs.iter().map(Rec::state).collect();
        let mut file = encode_snapshot(gen, taken, states.clone().into_iter());
        match damage {
            Some(d) => {
                d.apply(&mut file, 12);
                (file, None)
            }
            None => (file, Some((gen, taken, states))),
        }
    };
    let (r, recs) = read(&file);
    if let Some((gen, taken, states)) = expect {
        let h = r.unwrap_or_else(|e| panic!("an undamaged snapshot does not read: {e}"));
        assert_eq!((h.gen, h.taken_ms), (gen, taken));
        assert_eq!(recs, states, "snapshot round trip changed the records");
    } else if let Ok(h) = r {
        let again = encode_snapshot(h.gen, h.taken_ms, recs.clone().into_iter());
        let (r2, recs2) = read(&again);
        assert_eq!(r2.expect("re-encoded snapshot must read"), h);
        assert_eq!(recs2, recs);
    }
});
