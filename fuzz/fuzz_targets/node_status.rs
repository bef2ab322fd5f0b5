//! Target 5a: upstream's `nodeStatus.dat` reader (PROTOCOL.md 5), used for migration.
//!
//! Invariants: corrupt input gives an error, never a panic; no allocation is out of proportion
//! to the input (a length field cannot make the reader reserve memory the file does not hold);
//! anything accepted is a fixed point of write-then-read (the writer drops times of items that
//! are not pending, so the bytes need not match, but the records must), and every payload is
//! non-empty and present in the file.
#![no_main]

use ddpush_fuzz::{alloc_budget, within_budget, TrackingAlloc};
use ddpush_proto::upstream::{read_node_status, write_node_status, UpstreamError};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

fuzz_target!(|data: &[u8]| {
    let got = within_budget(data.len(), alloc_budget(data.len()), || {
        read_node_status(data)
    });
    match got {
        Ok(records) => {
            let mut payload_bytes = 0;
            for r in &records {
                if let Some(p) = &r.payload {
                    assert!(!p.is_empty(), "L = 0 means no payload");
                    payload_bytes += p.len();
                }
            }
            assert_eq!(records.len() * 77 + payload_bytes, data.len());
            let mut out = Vec::new();
            write_node_status(&records, &mut out);
            assert_eq!(out.len(), data.len());
            let again = read_node_status(&out).expect("what the writer writes must read back");
            assert_eq!(again, records);
        }
        Err(UpstreamError::Truncated { offset, need, have }) => {
            assert!(offset < data.len() && have == data.len() - offset && need > have);
        }
        Err(UpstreamError::Malformed { offset, .. }) => {
            assert!(offset + 77 <= data.len());
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
});
