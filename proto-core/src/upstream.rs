//! Reader and writer for upstream DDPush's `nodeStatus.dat` (PROTOCOL.md section 5), for
//! migration. The format has no header, count or checksum, so the reader checks every field it
//! can (hex uuid, 0/1 flag, payload length within the file) and reports the byte offset of the
//! first record it cannot read; a truncated tail is an error, never guessed.

use crate::codec::{Content, Uuid};
use crate::state::RecordState;
use crate::time::Time;

/// Fixed part of one record.
pub const RECORD_FIXED_LEN: usize = 77;

/// Why a `nodeStatus.dat` could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The file ends inside a record.
    #[error("truncated record at byte offset {offset}: {need} bytes needed, {have} left")]
    Truncated {
        /// Offset of the record.
        offset: usize,
        /// Bytes the record needs.
        need: usize,
        /// Bytes left in the file.
        have: usize,
    },
    /// A field holds a value the format does not allow.
    #[error("malformed record at byte offset {offset}: {what}")]
    Malformed {
        /// Offset of the record.
        offset: usize,
        /// Which field.
        what: &'static str,
    },
}

/// Reads every record. Upstream times are ms since the Unix epoch, like the server's clock.
pub fn read_node_status(buf: &[u8]) -> Result<Vec<RecordState>, UpstreamError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let (rec, used) = read_one(&buf[off..], off)?;
        out.push(rec);
        off += used;
    }
    Ok(out)
}

fn read_one(b: &[u8], offset: usize) -> Result<(RecordState, usize), UpstreamError> {
    if b.len() < RECORD_FIXED_LEN {
        return Err(UpstreamError::Truncated {
            offset,
            need: RECORD_FIXED_LEN,
            have: b.len(),
        });
    }
    let malformed = |what| UpstreamError::Malformed { offset, what };
    let hex = std::str::from_utf8(&b[..32]).map_err(|_| malformed("uuid is not ASCII hex"))?;
    let uuid = Uuid::from_hex(hex).ok_or_else(|| malformed("uuid is not ASCII hex"))?;
    let i64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        i64::from_be_bytes(a)
    };
    let time = |v: i64| (v >= 0).then(|| Time::from_millis(v as u64));
    let last_hb = i64_at(32);
    let notify = match b[40] {
        0 => false,
        1 => true,
        _ => return Err(malformed("0x10 flag is neither 0 nor 1")),
    };
    let t10 = i64_at(41);
    let bits = i64_at(49) as u64;
    let t11 = i64_at(57);
    let len = i32::from_be_bytes([b[65], b[66], b[67], b[68]]);
    let t20 = i64_at(69);
    if len < 0 {
        return Err(malformed("negative payload length"));
    }
    let len = len as usize;
    if len > Content::MAX {
        return Err(malformed("payload longer than 65535 bytes"));
    }
    let total = RECORD_FIXED_LEN + len;
    if b.len() < total {
        return Err(UpstreamError::Truncated {
            offset,
            need: total,
            have: b.len(),
        });
    }
    let payload = match len {
        0 => None,
        _ => Some(
            Content::copy_from_slice(&b[RECORD_FIXED_LEN..total])
                .map_err(|_| malformed("payload longer than 65535 bytes"))?,
        ),
    };
    let pushes = [
        notify.then_some(t10),
        (bits != 0).then_some(t11),
        payload.as_ref().map(|_| t20),
    ];
    let last_push = pushes.into_iter().flatten().filter_map(time).max();
    let last_heartbeat = time(last_hb);
    Ok((
        RecordState {
            uuid,
            last_heartbeat,
            last_active: last_heartbeat.or(last_push).unwrap_or(Time::ZERO),
            last_push,
            addr: None,
            notify,
            bits,
            payload,
        },
        total,
    ))
}

/// Writes records in upstream's format (for tests, fixtures and a way back).
pub fn write_node_status(records: &[RecordState], out: &mut Vec<u8>) {
    let ms = |t: Option<Time>| t.map_or(-1i64, |t| t.as_millis() as i64);
    for r in records {
        out.extend_from_slice(r.uuid.to_hex().as_bytes());
        out.extend_from_slice(&ms(r.last_heartbeat).to_be_bytes());
        out.push(u8::from(r.notify));
        out.extend_from_slice(&ms(r.last_push.filter(|_| r.notify)).to_be_bytes());
        out.extend_from_slice(&r.bits.to_be_bytes());
        out.extend_from_slice(&ms(r.last_push.filter(|_| r.bits != 0)).to_be_bytes());
        let p: &[u8] = r.payload.as_ref().map_or(&[], |p| p.as_ref());
        out.extend_from_slice(&(p.len() as i32).to_be_bytes());
        out.extend_from_slice(&ms(r.last_push.filter(|_| !p.is_empty())).to_be_bytes());
        out.extend_from_slice(p);
    }
}
