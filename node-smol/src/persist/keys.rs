//! The on-disk form of a signed-only uuid's keys (PROTOCOL.md 9.1), shared by the journal's
//! `Keyed` change and the snapshot's key chunks.
//!
//! `id u8, key [32], flags u8 (bit 0: a previous key follows, bit 1: the ahead bound follows),
//! [previous id u8, previous key [32], until u64 ms], [ahead u32 s]`: 34 bytes, 75 during a
//! rotation's grace period, 4 more once the device's clock was found ahead (PROTOCOL.md 9.3).
//! Flags 0 and 1 are the only ones the release before wrote, so its files read unchanged.
//! Keys are secrets: the data directory is created owner-only (see OPERATIONS.md), and
//! nothing here is ever logged.

use ddpush_proto::signed::{DeviceKey, KeyState, PreviousKey};
use ddpush_proto::Time;

use super::frame::Cursor;

/// Bit 0 of the flags byte: a previous key follows.
const HAS_PREVIOUS: u8 = 1;
/// Bit 1 of the flags byte: the ahead bound follows (u32 seconds), last. A state whose bound
/// is 0 is written without it, byte for byte as before the bound existed.
const HAS_AHEAD: u8 = 2;

/// Appends one key state.
pub(crate) fn put_key_state(out: &mut Vec<u8>, k: &KeyState) {
    out.push(k.id);
    out.extend_from_slice(k.key.expose());
    let flags = if k.previous.is_some() {
        HAS_PREVIOUS
    } else {
        0
    } | if k.ahead > 0 { HAS_AHEAD } else { 0 };
    out.push(flags);
    if let Some(p) = &k.previous {
        out.push(p.id);
        out.extend_from_slice(p.key.expose());
        out.extend_from_slice(&p.until.0.to_be_bytes());
    }
    if k.ahead > 0 {
        out.extend_from_slice(&k.ahead.to_be_bytes());
    }
}

/// Reads one key state from the front of `rd`.
pub(crate) fn get_key_state(rd: &mut Cursor<'_>) -> Result<KeyState, String> {
    let id = rd.u8()?;
    let current = DeviceKey::new(rd.arr()?);
    let flags = rd.u8()?;
    if flags & !(HAS_PREVIOUS | HAS_AHEAD) != 0 {
        return Err(format!("bad key-state flags {flags}"));
    }
    let previous = if flags & HAS_PREVIOUS != 0 {
        let pid = rd.u8()?;
        let pkey = DeviceKey::new(rd.arr()?);
        Some(Box::new(PreviousKey {
            id: pid,
            key: pkey,
            until: Time(rd.u64()?),
        }))
    } else {
        None
    };
    let ahead = if flags & HAS_AHEAD != 0 {
        match u32::from_be_bytes(rd.arr()?) {
            0 => return Err("ahead bound flagged but 0".into()),
            a => a,
        }
    } else {
        0
    };
    if previous.as_ref().is_some_and(|p| p.id == id) {
        return Err(format!("previous key has the current key's id {id}"));
    }
    Ok(KeyState {
        id,
        key: current,
        previous,
        ahead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_truncation_is_an_error() {
        let states = [
            KeyState::new(1, DeviceKey::new([7; 32])),
            KeyState {
                id: 2,
                key: DeviceKey::new([8; 32]),
                previous: Some(Box::new(PreviousKey {
                    id: 1,
                    key: DeviceKey::new([7; 32]),
                    until: Time(1_700_000_000_123),
                })),
                ahead: 0,
            },
            KeyState {
                ahead: 17,
                ..KeyState::new(3, DeviceKey::new([9; 32]))
            },
            KeyState {
                id: 4,
                key: DeviceKey::new([10; 32]),
                previous: Some(Box::new(PreviousKey {
                    id: 3,
                    key: DeviceKey::new([9; 32]),
                    until: Time(1_700_000_000_456),
                })),
                ahead: 60,
            },
        ];
        for s in &states {
            let mut b = Vec::new();
            put_key_state(&mut b, s);
            let len = if s.previous.is_some() { 75 } else { 34 } + if s.ahead > 0 { 4 } else { 0 };
            assert_eq!(b.len(), len);
            let mut rd = Cursor::new(&b, "cut");
            assert_eq!(get_key_state(&mut rd).as_ref(), Ok(s));
            assert_eq!(rd.remaining(), 0);
            for n in 0..b.len() {
                assert!(
                    get_key_state(&mut Cursor::new(&b[..n], "cut")).is_err(),
                    "cut at {n}"
                );
            }
        }
        let mut bad = Vec::new();
        put_key_state(&mut bad, &states[0]);
        bad[33] = 4;
        assert!(get_key_state(&mut Cursor::new(&bad, "cut")).is_err());
        // The bound is written only when it is not 0, so a 0 behind the flag is damage.
        let mut zero = Vec::new();
        put_key_state(&mut zero, &states[0]);
        zero[33] = 2;
        zero.extend_from_slice(&[0; 4]);
        assert!(get_key_state(&mut Cursor::new(&zero, "cut")).is_err());
    }
}

/// Keys through the real files: snapshot key chunks, journal `Keyed`/`Unkeyed`, start-up.
#[cfg(test)]
mod store_tests {
    use ddpush_proto::signed::{DeviceKey, KeyState, PreviousKey};
    use ddpush_proto::{Change, Config, Recovery, Time, Uuid};

    use crate::persist::snapshot::{read_snapshot_keys, scan_snapshot};
    use crate::persist::{
        encode_snapshot, encode_snapshot_keys, encode_snapshot_signed, write_snapshot_file, Store,
    };

    fn keys(n: u8) -> Vec<(Uuid, KeyState)> {
        (0..n)
            .map(|i| {
                let mut k = KeyState::new(1, DeviceKey::new([i; 32]));
                if i % 2 == 1 {
                    k.previous = Some(Box::new(PreviousKey {
                        id: 9,
                        key: DeviceKey::new([0xAA; 32]),
                        until: Time::from_secs(5_000),
                    }));
                }
                (Uuid([i; 16]), k)
            })
            .collect()
    }

    #[test]
    fn snapshot_key_chunks_round_trip_and_leave_keyless_snapshots_unchanged() {
        let ks = keys(5);
        let with = encode_snapshot_keys(4, 9, &ks, std::iter::empty());
        let mut back = Vec::new();
        let h = read_snapshot_keys(
            "s",
            &with,
            |_| panic!("no records"),
            |u, k| back.push((u, k)),
        )
        .unwrap();
        assert_eq!((h.gen, back), (4, ks.clone()));
        assert_eq!(scan_snapshot(&with, |_| {}).keys, 5);
        // No keys: the bytes the release before wrote.
        assert_eq!(
            encode_snapshot_keys(4, 9, &[], std::iter::empty()),
            encode_snapshot(4, 9, std::iter::empty())
        );
        // A damaged key chunk stops the start with an offset.
        let mut bad = with.clone();
        bad[40] ^= 0x01;
        let e = read_snapshot_keys("s", &bad, |_| {}, |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("corrupt at byte offset"), "{e}");
    }

    fn recovery() -> Recovery {
        Recovery::new(Config::default(), Time::from_secs(10_000)).unwrap()
    }

    #[test]
    fn a_removal_floor_survives_the_snapshot_and_the_restart() {
        use ddpush_proto::signed::SignedDrop;
        use ddpush_proto::testing::signed_heartbeat;
        use std::net::SocketAddr;
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let (u, key) = (Uuid([7; 16]), DeviceKey::new([7; 32]));
        let from: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let hb = |ts: u32, nonce: u32| signed_heartbeat(u, &key, 1, ts, nonce);
        let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
        let mut node = recovery().finish();
        let t = Time::from_secs;
        node.set_key(t(10_000), u, 1, key.clone(), Duration::ZERO)
            .unwrap();
        // A device 20 s ahead of the server: accepted, and its ahead bound is 20.
        let captured = hb(10_020, 1);
        node.handle_udp(t(10_000), from, &captured);
        assert_eq!(node.stats().signed_accepted, 1);
        // The key is removed at 10_001, then a snapshot is taken (its journal goes).
        assert!(node.remove_key(t(10_001), &u));
        assert_eq!(node.removal_floors(), vec![(u, 10_021)]);
        let g = st.rotate().unwrap();
        let bytes = encode_snapshot_signed(
            g,
            0,
            &node.key_states(),
            &node.removal_floors(),
            node.records(),
        );
        assert_eq!(scan_snapshot(&bytes, |_| {}).removed, 1);
        write_snapshot_file(dir.path(), &bytes).unwrap();
        st.snapshot_done(g);
        drop(st);
        // A restart at 10_002; the same key bytes are provisioned again. The captured packet
        // (stamped 10_020, inside the window, above the restart second) is a replay.
        let mut r = Recovery::new(Config::default(), t(10_002)).unwrap();
        let (_st, _) = Store::open(dir.path(), &mut r).unwrap();
        let mut again = r.finish();
        again
            .set_key(t(10_002), u, 1, key.clone(), Duration::ZERO)
            .unwrap();
        again.handle_udp(t(10_003), from, &captured);
        assert_eq!(again.stats().signed_accepted, 0, "a replay was accepted");
        assert_eq!(again.stats().signed_dropped.get(SignedDrop::Replayed), 1);
        // Up to the removal second plus the bound (10_021); the device's next one is heard.
        again.handle_udp(t(10_003), from, &hb(10_021, 2));
        assert_eq!(again.stats().signed_accepted, 0);
        again.handle_udp(t(10_003), from, &hb(10_022, 3));
        assert_eq!(again.stats().signed_accepted, 1);
    }

    #[test]
    fn keys_survive_the_journal_and_the_snapshot_and_removal_too() {
        let dir = tempfile::tempdir().unwrap();
        let ks = keys(3);
        {
            let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
            let changes: Vec<Change> = ks
                .iter()
                .map(|(u, k)| Change::Keyed {
                    uuid: *u,
                    keys: k.clone(),
                })
                .chain(std::iter::once(Change::Unkeyed { uuid: ks[0].0 }))
                .collect();
            st.commit(&changes, true).unwrap();
        }
        let mut r = recovery();
        let (mut st, _) = Store::open(dir.path(), &mut r).unwrap();
        let node = r.finish();
        assert_eq!(node.key_states(), ks[1..].to_vec(), "from the journal");
        // Now a snapshot holds them, and the journals before it go.
        let g = st.rotate().unwrap();
        let bytes = encode_snapshot_keys(g, 0, &node.key_states(), node.records());
        write_snapshot_file(dir.path(), &bytes).unwrap();
        st.snapshot_done(g);
        drop(st);
        let mut r = recovery();
        let (_st, _) = Store::open(dir.path(), &mut r).unwrap();
        assert_eq!(
            r.finish().key_states(),
            ks[1..].to_vec(),
            "from the snapshot"
        );
    }
}
