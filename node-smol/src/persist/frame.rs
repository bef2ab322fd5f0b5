//! Frames: `u32 length, u32 CRC32 of the payload, payload`, the unit every file is made of.
//!
//! A last frame that runs past the end of its file, or fails its CRC where the file ends, is a
//! write torn by a crash (or by a failed write the server could not roll back before it died):
//! [`Tail::Torn`], unless whole frames follow inside the length it claims (then the length is
//! damaged), or is all zeros to the end (space allocated before a power loss). Anything else
//! that does not check out is damage, reported with its offset.

use serde::{Deserialize, Serialize};

/// Frames larger than this are corruption, not data: no allocation follows a bad length.
pub const MAX_FRAME: usize = 64 << 20;

/// Bytes of a frame's length and CRC fields.
pub(crate) const FRAME_HEAD: usize = 8;

/// Outcome of reading a frame sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// The file ended on a frame boundary.
    Clean,
    /// The last frame, starting at this offset, was torn and dropped.
    Torn(u64),
}

/// Parses frames from `buf[start..]`, calling `f` with each payload and its offset.
pub(crate) fn frames(
    buf: &[u8],
    start: usize,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<Tail, (u64, String)> {
    let mut off = start;
    while off < buf.len() {
        let rest = &buf[off..];
        if rest.len() < 8 {
            return Ok(Tail::Torn(off as u64));
        }
        // Nothing but zeros to the end: a file grown before its data reached the disk (a
        // power loss on a filesystem that extends the size first). We never write an empty
        // frame, so this is never data.
        if rest.iter().all(|&b| b == 0) {
            return Ok(Tail::Torn(off as u64));
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_FRAME {
            return Err((
                off as u64,
                format!("frame length {len} exceeds {MAX_FRAME}"),
            ));
        }
        let Some(payload) = rest.get(8..8 + len) else {
            return Ok(Tail::Torn(off as u64));
        };
        if crc32fast::hash(payload) != crc {
            if off + 8 + len == buf.len() {
                return Ok(Tail::Torn(off as u64));
            }
            return Err((off as u64, "checksum mismatch".into()));
        }
        f(off as u64, payload).map_err(|e| (off as u64, e))?;
        off += 8 + len;
    }
    Ok(Tail::Clean)
}

/// Appends one frame holding `payload`.
pub(crate) fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// CBOR of one of our own values (snapshot header and end frames).
pub(crate) fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut b = Vec::new();
    // Serializing our own in-memory types into a Vec cannot fail.
    ciborium::into_writer(v, &mut b).expect("CBOR encoding into memory");
    b
}

/// Decodes a CBOR frame payload.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(p: &[u8]) -> Result<T, String> {
    ciborium::from_reader(p).map_err(|e| format!("CBOR: {e}"))
}

/// A cursor over one frame's payload for the hand-encoded formats (journal turns, snapshot
/// chunks, key states); a read past the end is an error naming what was cut short, never a
/// panic.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
    truncated: &'static str,
}

impl<'a> Cursor<'a> {
    /// `truncated` is the error a read past the end returns ("change truncated inside its
    /// frame").
    pub(crate) fn new(payload: &'a [u8], truncated: &'static str) -> Self {
        Cursor {
            rest: payload,
            truncated,
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(self.truncated.into());
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    pub(crate) fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.arr()?))
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }
}
