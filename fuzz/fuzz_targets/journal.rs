//! Target 5c: the server's journal reader (`ddpushd::persist::read_journal`).
//!
//! Modes as in the snapshot target: raw bytes, or arbitrary turns of changes written in the
//! journal format (magic, version, generation, one CRC'd frame per turn; version 2 binary or
//! version 1 CBOR) and then damaged.
//!
//! Invariants: never a panic; no allocation out of proportion to the file; an undamaged
//! journal reads back exactly the changes written, with a clean tail; a journal cut anywhere
//! reads as a prefix of the turns written (a torn tail is dropped, never misread); whatever is
//! accepted re-encodes and reads back the same.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ddpush_fuzz::persisted::{journal, journal_v2, Chg, Damage};
use ddpush_fuzz::{alloc_budget_cbor, within_budget, TrackingAlloc};
use ddpush_proto::Change;
use ddpushd::persist::{read_journal, Tail};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

fn read(buf: &[u8]) -> (Result<(u64, Tail), String>, Vec<Change>) {
    let mut out = Vec::new();
    let r = within_budget(buf.len(), alloc_budget_cbor(buf.len()), || {
        read_journal("journal-1.log", buf, |c| out.push(c)).map_err(|e| e.to_string())
    });
    (r, out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let (r, changes) = read(rest);
        if let Ok((gen, _)) = r {
            let again = journal(gen, &[changes.clone()]);
            let (r2, changes2) = read(&again);
            assert_eq!(
                r2.expect("re-encoded journal must read"),
                (gen, Tail::Clean)
            );
            assert_eq!(changes2, changes);
        }
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok((gen, turns, damage, cut)) =
        <(u64, Vec<Vec<Chg>>, Option<Damage>, Option<u32>)>::arbitrary(&mut u)
    else {
        return;
    };
    let turns: Vec<Vec<Change>> = turns
        .iter()
        .map(|t| t.iter().map(Chg::change).collect())
        .collect();
    // Bit 1 of the mode: the current format (version 2) or the one earlier releases wrote.
    let mut file = if mode & 2 == 0 {
        journal_v2(gen, &turns)
    } else {
        journal(gen, &turns)
    };
    let all: Vec<Change> = turns.concat();
    match (damage, cut) {
        (Some(d), _) => {
            d.apply(&mut file, 20);
            let _ = read(&file);
        }
        (None, Some(c)) => {
            // A crash mid-write: any prefix must read as whole turns, never a misread change.
            let n = c as usize % (file.len() + 1);
            file.truncate(n);
            let (r, changes) = read(&file);
            let (_, tail) = r.unwrap_or_else(|e| panic!("a cut journal must read: {e}"));
            assert!(
                all.starts_with(&changes),
                "cut journal read changes that were not written"
            );
            let whole_turns = turns.iter().scan(0, |n, t| {
                *n += t.len();
                Some(*n)
            });
            assert!(changes.is_empty() || whole_turns.clone().any(|k| k == changes.len()));
            if n == file.len() && tail == Tail::Clean {
                assert!(n < 20 || changes.len() <= all.len());
            }
        }
        (None, None) => {
            let (r, changes) = read(&file);
            assert_eq!(
                r.expect("an undamaged journal must read"),
                (gen, Tail::Clean)
            );
            assert_eq!(changes, all);
        }
    }
});
