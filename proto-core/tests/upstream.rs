//! Reading upstream's nodeStatus.dat: every error names the offset of the bad record.

use ddpush_proto::upstream::{
    read_node_status, write_node_status, UpstreamError, RECORD_FIXED_LEN,
};
use ddpush_proto::{Content, RecordState, Time, Uuid};

fn rec(n: u8, payload: Option<&[u8]>) -> RecordState {
    let hb = Time::from_millis(1_700_000_000_000 + u64::from(n));
    let push = Time::from_millis(1_700_000_100_000 + u64::from(n));
    RecordState {
        uuid: Uuid([n; 16]),
        last_heartbeat: Some(hb),
        last_active: hb,
        last_push: Some(push),
        addr: None,
        notify: n.is_multiple_of(2),
        bits: u64::from(n) << 40 | 3,
        payload: payload.map(|p| Content::copy_from_slice(p).expect("short test payload")),
    }
}

fn file() -> (Vec<RecordState>, Vec<u8>) {
    let recs = vec![
        rec(1, Some(b"hello")),
        rec(2, None),
        rec(3, Some(&[0xAA; 300])),
    ];
    let mut out = Vec::new();
    write_node_status(&recs, &mut out);
    (recs, out)
}

#[test]
fn round_trip() {
    let (recs, bytes) = file();
    assert_eq!(bytes.len(), 3 * RECORD_FIXED_LEN + 5 + 300);
    assert_eq!(read_node_status(&bytes).unwrap(), recs);
    assert_eq!(read_node_status(&[]).unwrap(), vec![]);
}

#[test]
fn truncated_tails_are_reported_with_offsets() {
    let (_, bytes) = file();
    let second = RECORD_FIXED_LEN + 5;
    let third = second + RECORD_FIXED_LEN;
    // Inside the fixed part of the second record.
    assert_eq!(
        read_node_status(&bytes[..second + 10]),
        Err(UpstreamError::Truncated {
            offset: second,
            need: RECORD_FIXED_LEN,
            have: 10
        })
    );
    // Inside the payload of the first record.
    assert_eq!(
        read_node_status(&bytes[..RECORD_FIXED_LEN + 2]),
        Err(UpstreamError::Truncated {
            offset: 0,
            need: RECORD_FIXED_LEN + 5,
            have: RECORD_FIXED_LEN + 2
        })
    );
    // Inside the payload of the third.
    assert_eq!(
        read_node_status(&bytes[..bytes.len() - 1]),
        Err(UpstreamError::Truncated {
            offset: third,
            need: RECORD_FIXED_LEN + 300,
            have: RECORD_FIXED_LEN + 299
        })
    );
    // Every cut that is not a record boundary fails.
    let bounds = [0, second, third, bytes.len()];
    for cut in 0..bytes.len() {
        let r = read_node_status(&bytes[..cut]);
        assert_eq!(r.is_ok(), bounds.contains(&cut), "cut at {cut}");
    }
}

#[test]
fn malformed_fields_name_the_record() {
    let (_, bytes) = file();
    let second = RECORD_FIXED_LEN + 5;
    let cases: [(usize, &[u8], &str); 4] = [
        (3, b"g", "uuid is not ASCII hex"),
        (0, &[0xC3], "uuid is not ASCII hex"),
        (40, &[2], "0x10 flag is neither 0 nor 1"),
        (65, &[0xFF, 0xFF, 0xFF, 0xFE], "negative payload length"),
    ];
    for (field, val, what) in cases {
        let mut b = bytes.clone();
        b[second + field..second + field + val.len()].copy_from_slice(val);
        assert_eq!(
            read_node_status(&b),
            Err(UpstreamError::Malformed {
                offset: second,
                what
            }),
            "{what}"
        );
    }
    let mut b = bytes.clone();
    b[second + 65..second + 69].copy_from_slice(&70_000i32.to_be_bytes());
    assert_eq!(
        read_node_status(&b),
        Err(UpstreamError::Malformed {
            offset: second,
            what: "payload longer than 65535 bytes"
        })
    );
}

#[test]
fn never_seen_and_no_push_times() {
    let mut b = Vec::new();
    b.extend_from_slice(b"0123456789abcdef0123456789ABCDEF");
    b.extend_from_slice(&(-1i64).to_be_bytes()); // never heartbeat
    b.push(1);
    b.extend_from_slice(&5000i64.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes());
    b.extend_from_slice(&2i32.to_be_bytes());
    b.extend_from_slice(&7000i64.to_be_bytes());
    b.extend_from_slice(b"hi");
    let r = &read_node_status(&b).unwrap()[0];
    assert_eq!(r.uuid.to_hex(), "0123456789abcdef0123456789abcdef");
    assert_eq!(r.last_heartbeat, None);
    assert!(r.notify);
    assert_eq!(r.last_push, Some(Time::from_millis(7000)));
    assert_eq!(r.last_active, Time::from_millis(7000));
    assert_eq!(r.payload.as_deref(), Some(&b"hi"[..]));
}
