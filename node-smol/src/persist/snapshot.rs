//! The snapshot format (`snapshot.cbor`), versioned by hand.
//!
//! `DDPUSHSN` + u32 version, then frames: a [`SnapHeader`], chunks of records, a [`SnapEnd`].
//!
//! * Version 2 (written): record chunks in the fixed binary layout of [`put_record`]; header
//!   and end frames are CBOR maps of the two small structs below, whose field names are pinned
//!   with `serde(rename)` so a refactor cannot change them.
//! * Version 1 (read only): record chunks were CBOR arrays of the core's `RecordState`.
//!
//! * Key chunks (version 2, since signed devices, PROTOCOL.md 9): after the header, frames
//!   tagged [`KEY_CHUNK_TAG`] hold the signed-only uuids with their keys
//!   ([`super::keys`]); the end frame then also counts them. A snapshot with no key is
//!   byte for byte what the release before wrote; one with keys is refused by that release
//!   ("not a record chunk"), never half read.
//! * Removal floors (version 2, since issue 18's restart fix): frames tagged
//!   [`FLOOR_CHUNK_TAG`], `count u32, (uuid [16], until u32 s)*`, hold the uuids whose key
//!   was removed less than a replay window before the snapshot, with the second up to which
//!   a key provisioned for them again refuses stamps (PROTOCOL.md 9.3); the end frame counts
//!   them as `removed`. None: the bytes are as before.
//!
//! Golden files under `node-smol/tests/data/` pin the bytes of both versions.

use ddpush_proto::signed::KeyState;
use ddpush_proto::{Content, RecordState, Uuid};
use serde::{Deserialize, Serialize};

use super::frame::{cbor, decode, frame_into, frames, Cursor, Tail, FRAME_HEAD};
use super::journal::End;
use super::PersistError;

pub(crate) const SNAP_MAGIC: &[u8; 8] = b"DDPUSHSN";
/// Version 1: CBOR record chunks (read only).
const SNAP_V1: u32 = 1;
/// Snapshot version 2: record chunks in a fixed binary layout ([`put_record`]) instead of CBOR,
/// so a million records encode and decode in tens of milliseconds. Version 1 is still read.
const SNAP_VERSION: u32 = 2;
/// First byte of a version-2 record chunk (CBOR major type 0, so never taken for the end map).
const CHUNK_TAG: u8 = 0x02;
/// Records per snapshot frame.
const CHUNK: usize = 4096;
/// First byte of a key chunk (CBOR major type 0 too).
const KEY_CHUNK_TAG: u8 = 0x03;
/// First byte of a removal-floor chunk (CBOR major type 0 too).
const FLOOR_CHUNK_TAG: u8 = 0x04;

/// First frame of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapHeader {
    /// Journals older than this generation are contained in the snapshot.
    #[serde(rename = "gen")]
    pub gen: u64,
    /// Wall-clock ms when it was taken.
    #[serde(rename = "taken_ms")]
    pub taken_ms: u64,
}

/// Last frame of a snapshot: its presence and count prove the file is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapEnd {
    /// Records written before it.
    #[serde(rename = "records")]
    pub records: u64,
    /// Signed-only uuids written before it (absent, so the bytes are unchanged, when 0).
    #[serde(rename = "keys", default, skip_serializing_if = "is_zero")]
    pub keys: u64,
    /// Removal floors written before it (absent when 0).
    #[serde(rename = "removed", default, skip_serializing_if = "is_zero")]
    pub removed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What [`scan_snapshot`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapScan {
    /// Format version (0 if the magic is wrong).
    pub version: u32,
    /// The header frame, if it was read.
    pub header: Option<SnapHeader>,
    /// Whole frames read (header and chunks; the end frame included when present).
    pub frames: u64,
    /// Records in the chunks read.
    pub records: u64,
    /// Signed-only uuids in the key chunks read.
    pub keys: u64,
    /// Removal floors in the floor chunks read.
    pub removed: u64,
    /// Byte offset just past the last whole record chunk (or the header frame).
    pub good_len: u64,
    /// `Clean` only with a valid end frame; a snapshot is whole or damaged, never torn.
    pub end: End,
}

/// Reads a snapshot frame by frame, handing out the records of every whole chunk before the
/// end or the first damage. Never fails: damage is reported in [`SnapScan::end`].
pub fn scan_snapshot(buf: &[u8], on_record: impl FnMut(RecordState)) -> SnapScan {
    scan_snapshot_keys(buf, on_record, |_, _| {})
}

/// [`scan_snapshot`], also handing out every signed-only uuid with its keys.
pub fn scan_snapshot_keys(
    buf: &[u8],
    on_record: impl FnMut(RecordState),
    on_key: impl FnMut(Uuid, KeyState),
) -> SnapScan {
    scan_snapshot_signed(buf, on_record, on_key, |_, _| {})
}

/// [`scan_snapshot_keys`], also handing out every removal floor.
pub fn scan_snapshot_signed(
    buf: &[u8],
    mut on_record: impl FnMut(RecordState),
    mut on_key: impl FnMut(Uuid, KeyState),
    mut on_floor: impl FnMut(Uuid, u32),
) -> SnapScan {
    let mut scan = SnapScan {
        version: 0,
        header: None,
        frames: 0,
        records: 0,
        keys: 0,
        removed: 0,
        good_len: 0,
        end: End::Clean,
    };
    let damaged = |offset: u64, what: String| End::Damaged { offset, what };
    if buf.len() < 12 || &buf[..8] != SNAP_MAGIC {
        scan.end = damaged(0, "not a ddpushd snapshot (bad magic)".into());
        return scan;
    }
    let v = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if v != SNAP_V1 && v != SNAP_VERSION {
        scan.end = damaged(8, format!("unsupported snapshot version {v}"));
        return scan;
    }
    scan.version = v;
    scan.good_len = 12;
    let mut header: Option<SnapHeader> = None;
    let (mut seen, mut n_frames, mut good) = (0u64, 0u64, 12u64);
    let mut keys = 0u64;
    let mut removed = 0u64;
    let mut ended = false;
    let r = frames(buf, 12, |off, p| {
        if ended {
            return Err("data after the end frame".into());
        }
        let end_of_frame = off + (FRAME_HEAD + p.len()) as u64;
        if header.is_none() {
            header = Some(decode(p)?);
        } else if p.first().is_some_and(|b| b >> 5 == 5) {
            // A chunk is a CBOR array or a tagged binary chunk and the end frame a map: the
            // first byte tells them apart, so neither decode is attempted twice.
            let e: SnapEnd = decode(p)?;
            if e.records != seen {
                return Err(format!("end frame says {} records, read {seen}", e.records));
            }
            if e.keys != keys {
                return Err(format!("end frame says {} keys, read {keys}", e.keys));
            }
            if e.removed != removed {
                return Err(format!(
                    "end frame says {} removal floors, read {removed}",
                    e.removed
                ));
            }
            ended = true;
            n_frames += 1;
            return Ok(());
        } else if v == SNAP_VERSION && p.first() == Some(&KEY_CHUNK_TAG) {
            keys += get_key_chunk(p, &mut on_key)?;
        } else if v == SNAP_VERSION && p.first() == Some(&FLOOR_CHUNK_TAG) {
            removed += get_floor_chunk(p, &mut on_floor)?;
        } else if v == SNAP_VERSION {
            seen += get_chunk(p, &mut on_record)?;
        } else {
            let chunk: Vec<RecordState> = decode(p)?;
            seen += chunk.len() as u64;
            chunk.into_iter().for_each(&mut on_record);
        }
        n_frames += 1;
        good = end_of_frame;
        Ok(())
    });
    scan.header = header;
    scan.frames = n_frames;
    scan.records = seen;
    scan.keys = keys;
    scan.removed = removed;
    scan.good_len = good;
    scan.end = match r {
        Err((o, w)) => damaged(o, w),
        Ok(Tail::Torn(o)) => damaged(o, "truncated frame".into()),
        Ok(Tail::Clean) if !ended || scan.header.is_none() => damaged(
            buf.len() as u64,
            "snapshot is incomplete (no end frame)".into(),
        ),
        Ok(Tail::Clean) => End::Clean,
    };
    scan
}

/// Reads a whole snapshot, handing each record to `on_record`. `name` labels errors.
pub fn read_snapshot(
    name: &str,
    buf: &[u8],
    on_record: impl FnMut(RecordState),
) -> Result<SnapHeader, PersistError> {
    read_snapshot_keys(name, buf, on_record, |_, _| {})
}

/// [`read_snapshot`], also handing out every signed-only uuid with its keys (start-up uses
/// this one: keys are state).
pub fn read_snapshot_keys(
    name: &str,
    buf: &[u8],
    on_record: impl FnMut(RecordState),
    on_key: impl FnMut(Uuid, KeyState),
) -> Result<SnapHeader, PersistError> {
    read_snapshot_signed(name, buf, on_record, on_key, |_, _| {})
}

/// [`read_snapshot_keys`], also handing out every removal floor (start-up uses this one).
pub fn read_snapshot_signed(
    name: &str,
    buf: &[u8],
    on_record: impl FnMut(RecordState),
    on_key: impl FnMut(Uuid, KeyState),
    on_floor: impl FnMut(Uuid, u32),
) -> Result<SnapHeader, PersistError> {
    let s = scan_snapshot_signed(buf, on_record, on_key, on_floor);
    match (s.end, s.header) {
        (End::Clean, Some(h)) => Ok(h),
        (End::Damaged { offset, what }, _) => Err(PersistError::Corrupt {
            file: name.to_string(),
            offset,
            what,
        }),
        (_, _) => Err(PersistError::Corrupt {
            file: name.to_string(),
            offset: buf.len() as u64,
            what: "snapshot is incomplete".into(),
        }),
    }
}

/// The bytes of a snapshot that keeps the header and the whole chunks before `good_len` of
/// `buf`, with a new end frame counting their `records` (for `ddpushd recover`).
pub(crate) fn truncated_snapshot(
    buf: &[u8],
    good_len: u64,
    records: u64,
    keys: u64,
    removed: u64,
) -> Vec<u8> {
    let mut out = buf[..good_len as usize].to_vec();
    frame_into(
        &mut out,
        &cbor(&SnapEnd {
            records,
            keys,
            removed,
        }),
    );
    out
}

/// Encodes a snapshot of `records` (an iterator, so a million records need not be collected
/// first). The count goes in the end frame, so the header can be written before it is known.
pub fn encode_snapshot(
    gen: u64,
    taken_ms: u64,
    records: impl Iterator<Item = RecordState>,
) -> Vec<u8> {
    encode_snapshot_keys(gen, taken_ms, &[], records)
}

/// [`encode_snapshot`] with the signed-only uuids and their keys.
pub fn encode_snapshot_keys(
    gen: u64,
    taken_ms: u64,
    keys: &[(Uuid, KeyState)],
    records: impl Iterator<Item = RecordState>,
) -> Vec<u8> {
    encode_snapshot_signed(gen, taken_ms, keys, &[], records)
}

/// [`encode_snapshot_keys`] with the removal floors too (the server uses this one).
pub fn encode_snapshot_signed(
    gen: u64,
    taken_ms: u64,
    keys: &[(Uuid, KeyState)],
    floors: &[(Uuid, u32)],
    records: impl Iterator<Item = RecordState>,
) -> Vec<u8> {
    let (lower, _) = records.size_hint();
    let mut out = Vec::with_capacity(64 + lower * 56 + keys.len() * 92);
    out.extend_from_slice(SNAP_MAGIC);
    out.extend_from_slice(&SNAP_VERSION.to_be_bytes());
    frame_into(&mut out, &cbor(&SnapHeader { gen, taken_ms }));
    let mut payload = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        payload.clear();
        payload.push(KEY_CHUNK_TAG);
        payload.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        for (uuid, k) in chunk {
            payload.extend_from_slice(&uuid.0);
            super::keys::put_key_state(&mut payload, k);
        }
        frame_into(&mut out, &payload);
    }
    for chunk in floors.chunks(CHUNK) {
        payload.clear();
        payload.push(FLOOR_CHUNK_TAG);
        payload.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        for (uuid, until) in chunk {
            payload.extend_from_slice(&uuid.0);
            payload.extend_from_slice(&until.to_be_bytes());
        }
        frame_into(&mut out, &payload);
    }
    let mut n = 0u64;
    let mut in_chunk = 0u32;
    payload.reserve(CHUNK * 64);
    let start_chunk = |payload: &mut Vec<u8>| {
        payload.clear();
        payload.push(CHUNK_TAG);
        payload.extend_from_slice(&[0; 4]);
    };
    let end_chunk = |payload: &mut Vec<u8>, count: u32, out: &mut Vec<u8>| {
        payload[1..5].copy_from_slice(&count.to_be_bytes());
        frame_into(out, payload);
    };
    start_chunk(&mut payload);
    for r in records {
        put_record(&mut payload, &r);
        n += 1;
        in_chunk += 1;
        if in_chunk as usize == CHUNK {
            end_chunk(&mut payload, in_chunk, &mut out);
            start_chunk(&mut payload);
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        end_chunk(&mut payload, in_chunk, &mut out);
    }
    frame_into(
        &mut out,
        &cbor(&SnapEnd {
            records: n,
            keys: keys.len() as u64,
            removed: floors.len() as u64,
        }),
    );
    out
}

/// Decodes a removal-floor chunk; returns its count.
fn get_floor_chunk(p: &[u8], on_floor: &mut impl FnMut(Uuid, u32)) -> Result<u64, String> {
    let mut rd = Cursor::new(p, "removal floor truncated inside its chunk");
    rd.take(1)?;
    let count = u32::from_be_bytes(rd.arr()?);
    if rd.remaining() != count as usize * 20 {
        return Err(format!(
            "floor chunk claims {count} floors in {} bytes",
            p.len()
        ));
    }
    let mut floors = Vec::with_capacity(count as usize);
    for _ in 0..count {
        floors.push((Uuid(rd.arr()?), u32::from_be_bytes(rd.arr()?)));
    }
    floors.into_iter().for_each(|(u, f)| on_floor(u, f));
    Ok(u64::from(count))
}

/// Decodes a key chunk; returns its count.
fn get_key_chunk(p: &[u8], on_key: &mut impl FnMut(Uuid, KeyState)) -> Result<u64, String> {
    let mut rd = Cursor::new(p, "record truncated inside its chunk");
    rd.take(1)?;
    let count = u32::from_be_bytes(rd.arr()?);
    // Each entry takes at least 50 bytes: a larger count is damage, not a reason to allocate.
    if count as usize > p.len() / 50 {
        return Err(format!(
            "key chunk claims {count} keys in {} bytes",
            p.len()
        ));
    }
    let mut keys = Vec::with_capacity(count as usize);
    for i in 0..count {
        let k = (|| {
            let uuid = Uuid(rd.arr()?);
            Ok((uuid, super::keys::get_key_state(&mut rd)?))
        })()
        .map_err(|e: String| format!("key {i} of the chunk: {e}"))?;
        keys.push(k);
    }
    if rd.remaining() != 0 {
        return Err(format!(
            "{} bytes after the chunk's last key",
            rd.remaining()
        ));
    }
    keys.into_iter().for_each(|(u, k)| on_key(u, k));
    Ok(u64::from(count))
}

/// Bits of a version-2 record's flag byte.
mod rflag {
    pub const HB: u8 = 1 << 0;
    pub const PUSH: u8 = 1 << 1;
    pub const NOTIFY: u8 = 1 << 2;
    pub const PAYLOAD: u8 = 1 << 3;
    pub const V4: u8 = 1 << 4;
    pub const V6: u8 = 1 << 5;
}

/// One record, version 2: uuid, flags u8, last_active u64 ms, [last_heartbeat u64],
/// [last_push u64], bits u64, [IPv4 4 + port 2 | IPv6 16 + port 2 + flowinfo 4 + scope 4],
/// [payload length u16 + payload]. Bracketed fields are present when their flag is set.
fn put_record(out: &mut Vec<u8>, r: &RecordState) {
    use std::net::SocketAddr;
    let mut f = 0u8;
    if r.last_heartbeat.is_some() {
        f |= rflag::HB;
    }
    if r.last_push.is_some() {
        f |= rflag::PUSH;
    }
    if r.notify {
        f |= rflag::NOTIFY;
    }
    if r.payload.is_some() {
        f |= rflag::PAYLOAD;
    }
    match r.addr {
        Some(SocketAddr::V4(_)) => f |= rflag::V4,
        Some(SocketAddr::V6(_)) => f |= rflag::V6,
        None => {}
    }
    out.extend_from_slice(&r.uuid.0);
    out.push(f);
    out.extend_from_slice(&r.last_active.0.to_be_bytes());
    if let Some(t) = r.last_heartbeat {
        out.extend_from_slice(&t.0.to_be_bytes());
    }
    if let Some(t) = r.last_push {
        out.extend_from_slice(&t.0.to_be_bytes());
    }
    out.extend_from_slice(&r.bits.to_be_bytes());
    match r.addr {
        Some(SocketAddr::V4(a)) => {
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.flowinfo().to_be_bytes());
            out.extend_from_slice(&a.scope_id().to_be_bytes());
        }
        None => {}
    }
    if let Some(p) = &r.payload {
        out.extend_from_slice(&p.len_u16().to_be_bytes());
        out.extend_from_slice(p);
    }
}

/// Decodes a version-2 chunk; returns its record count.
fn get_chunk(p: &[u8], on_record: &mut impl FnMut(RecordState)) -> Result<u64, String> {
    use ddpush_proto::{Time, Uuid};
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
    let mut rd = Cursor::new(p, "record truncated inside its chunk");
    if rd.take(1)?[0] != CHUNK_TAG {
        return Err("not a record chunk".into());
    }
    let count = u32::from_be_bytes(rd.arr()?);
    // Decoded whole before any record is handed out, so a reader never sees half a chunk.
    let mut recs = Vec::with_capacity((count as usize).min(CHUNK));
    for i in 0..count {
        let rec = (|| {
            let uuid = Uuid(rd.arr()?);
            let f = rd.take(1)?[0];
            if f & !0x3F != 0 || f & (rflag::V4 | rflag::V6) == (rflag::V4 | rflag::V6) {
                return Err(format!("bad record flags {f:#04x}"));
            }
            let last_active = Time(rd.u64()?);
            let last_heartbeat = if f & rflag::HB != 0 {
                Some(Time(rd.u64()?))
            } else {
                None
            };
            let last_push = if f & rflag::PUSH != 0 {
                Some(Time(rd.u64()?))
            } else {
                None
            };
            let bits = rd.u64()?;
            let addr = if f & rflag::V4 != 0 {
                let ip: [u8; 4] = rd.arr()?;
                let port = u16::from_be_bytes(rd.arr()?);
                Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
            } else if f & rflag::V6 != 0 {
                let ip: [u8; 16] = rd.arr()?;
                let port = u16::from_be_bytes(rd.arr()?);
                let flow = u32::from_be_bytes(rd.arr()?);
                let scope = u32::from_be_bytes(rd.arr()?);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip.into(),
                    port,
                    flow,
                    scope,
                )))
            } else {
                None
            };
            let payload = if f & rflag::PAYLOAD != 0 {
                let len = usize::from(u16::from_be_bytes(rd.arr()?));
                Some(Content::copy_from_slice(rd.take(len)?).map_err(|e| e.to_string())?)
            } else {
                None
            };
            Ok(RecordState {
                uuid,
                last_heartbeat,
                last_active,
                last_push,
                addr,
                notify: f & rflag::NOTIFY != 0,
                bits,
                payload,
            })
        })()
        .map_err(|e: String| format!("record {i} of the chunk: {e}"))?;
        recs.push(rec);
    }
    if rd.remaining() != 0 {
        return Err(format!(
            "{} bytes after the chunk's last record",
            rd.remaining()
        ));
    }
    recs.into_iter().for_each(on_record);
    Ok(u64::from(count))
}
