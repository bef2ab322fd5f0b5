//! The journal format (`journal-<gen>.log`), versioned by hand.
//!
//! `DDPUSHJN` + u32 version + u64 generation, then one frame per loop turn holding that turn's
//! changes.
//!
//! * Version 2 (written): a frame is `u32 count` then each change as a tag byte and fixed
//!   big-endian fields ([`put_change`]). Nothing in it depends on Rust names, so renaming a
//!   variant of the core's `Change` cannot break a journal on disk.
//! * Version 1 (read only): a frame was a CBOR array of the core's serde-derived `Change`.
//!
//! Golden files under `node-smol/tests/data/` pin the bytes of both versions.

use ddpush_proto::{Change, Content, Kind, PushMsg, Time, Uuid};

use super::frame::{decode, frames, Cursor, Tail};
use super::PersistError;

pub(crate) const JOURNAL_MAGIC: &[u8; 8] = b"DDPUSHJN";
/// Version 1: CBOR frames (read only).
const JOURNAL_V1: u32 = 1;
/// Version 2: explicit binary frames, written by this release.
pub(crate) const JOURNAL_VERSION: u32 = 2;
/// Magic, version, generation.
pub(crate) const HEADER_LEN: usize = 20;

/// Tags of a version-2 change.
mod tag {
    pub const CREATED: u8 = 1;
    pub const PUSHED_NOTIFY: u8 = 2;
    pub const PUSHED_BITS: u8 = 3;
    pub const PUSHED_PAYLOAD: u8 = 4;
    pub const CLEARED: u8 = 5;
    pub const REMOVED: u8 = 6;
    /// Signed devices (PROTOCOL.md 9): a uuid's whole key state, and its removal. A reader
    /// from before them stops at these tags with "unknown change tag", never guesses.
    pub const KEYED: u8 = 7;
    pub const UNKEYED: u8 = 8;
}

/// The header of a new journal of generation `gen`.
pub(crate) fn header(gen: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_be_bytes());
    h[12..].copy_from_slice(&gen.to_be_bytes());
    h
}

/// Encodes one turn's changes as a version-2 frame payload into `out` (cleared first).
pub fn encode_turn(out: &mut Vec<u8>, changes: &[Change]) {
    out.clear();
    // A turn holds at most a few thousand changes (one per input of the turn).
    out.extend_from_slice(&(changes.len() as u32).to_be_bytes());
    for c in changes {
        put_change(out, c);
    }
}

fn kind_byte(k: Kind) -> u8 {
    k.cmd()
}

/// One version-2 change: tag u8, uuid [16], then per tag: `Created` at u64 ms; `Pushed` at u64
/// ms and (bits u64 | payload length u16 + payload); `Cleared` kind (the command byte 0x10,
/// 0x11 or 0x20) + bits u64; `Removed` nothing; `Keyed` the key state of [`super::keys`];
/// `Unkeyed` nothing.
fn put_change(out: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Created { uuid, at } => {
            out.push(tag::CREATED);
            out.extend_from_slice(&uuid.0);
            out.extend_from_slice(&at.0.to_be_bytes());
        }
        Change::Pushed { uuid, at, msg } => {
            out.push(match msg {
                PushMsg::Notify => tag::PUSHED_NOTIFY,
                PushMsg::Bits(_) => tag::PUSHED_BITS,
                PushMsg::Payload(_) => tag::PUSHED_PAYLOAD,
            });
            out.extend_from_slice(&uuid.0);
            out.extend_from_slice(&at.0.to_be_bytes());
            match msg {
                PushMsg::Notify => {}
                PushMsg::Bits(b) => out.extend_from_slice(&b.to_be_bytes()),
                PushMsg::Payload(p) => {
                    out.extend_from_slice(&p.len_u16().to_be_bytes());
                    out.extend_from_slice(p);
                }
            }
        }
        Change::Cleared { uuid, kind, bits } => {
            out.push(tag::CLEARED);
            out.extend_from_slice(&uuid.0);
            out.push(kind_byte(*kind));
            out.extend_from_slice(&bits.to_be_bytes());
        }
        Change::Removed { uuid } => {
            out.push(tag::REMOVED);
            out.extend_from_slice(&uuid.0);
        }
        Change::Keyed { uuid, keys } => {
            out.push(tag::KEYED);
            out.extend_from_slice(&uuid.0);
            super::keys::put_key_state(out, keys);
        }
        Change::Unkeyed { uuid } => {
            out.push(tag::UNKEYED);
            out.extend_from_slice(&uuid.0);
        }
    }
}

/// Decodes a version-2 frame payload; every change is decoded before any is handed out.
fn get_turn(p: &[u8], on_change: &mut impl FnMut(Change)) -> Result<(), String> {
    let mut rd = Cursor::new(p, "change truncated inside its frame");
    let count = u32::from_be_bytes(rd.arr()?);
    // Each change takes at least 17 bytes: a count larger than that is damage, not a reason
    // to allocate.
    if count as usize > p.len() / 17 {
        return Err(format!("frame claims {count} changes in {} bytes", p.len()));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let c = (|| {
            let t = rd.take(1)?[0];
            let uuid = Uuid(rd.arr()?);
            Ok(match t {
                tag::CREATED => Change::Created {
                    uuid,
                    at: Time(rd.u64()?),
                },
                tag::PUSHED_NOTIFY | tag::PUSHED_BITS | tag::PUSHED_PAYLOAD => {
                    let at = Time(rd.u64()?);
                    let msg = match t {
                        tag::PUSHED_NOTIFY => PushMsg::Notify,
                        tag::PUSHED_BITS => PushMsg::Bits(rd.u64()?),
                        _ => {
                            let len = usize::from(u16::from_be_bytes(rd.arr()?));
                            // A u16 length cannot exceed what Content holds.
                            PushMsg::Payload(
                                Content::copy_from_slice(rd.take(len)?)
                                    .map_err(|e| e.to_string())?,
                            )
                        }
                    };
                    Change::Pushed { uuid, at, msg }
                }
                tag::CLEARED => {
                    let k = rd.take(1)?[0];
                    let kind = Kind::ALL
                        .into_iter()
                        .find(|x| x.cmd() == k)
                        .ok_or_else(|| format!("unknown message kind {k:#04x}"))?;
                    Change::Cleared {
                        uuid,
                        kind,
                        bits: rd.u64()?,
                    }
                }
                tag::REMOVED => Change::Removed { uuid },
                tag::KEYED => Change::Keyed {
                    uuid,
                    keys: super::keys::get_key_state(&mut rd)?,
                },
                tag::UNKEYED => Change::Unkeyed { uuid },
                other => return Err(format!("unknown change tag {other}")),
            })
        })()
        .map_err(|e: String| format!("change {i} of the frame: {e}"))?;
        out.push(c);
    }
    if rd.remaining() != 0 {
        return Err(format!(
            "{} bytes after the frame's last change",
            rd.remaining()
        ));
    }
    out.into_iter().for_each(on_change);
    Ok(())
}

/// What [`scan_journal`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalScan {
    /// Format version (0 when the header itself was torn).
    pub version: u32,
    /// Generation from the header.
    pub gen: u64,
    /// Whole frames read before the end or the damage.
    pub frames: u64,
    /// Changes in them.
    pub changes: u64,
    /// Byte offset just past the last whole frame (the header's end if none).
    pub good_len: u64,
    /// How the file ended.
    pub end: End,
}

/// How a file ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// On a frame boundary.
    Clean,
    /// In a torn last frame starting at this offset (dropped at start).
    Torn(u64),
    /// Damage at this offset: start-up refuses the file.
    Damaged {
        /// Where.
        offset: u64,
        /// What.
        what: String,
    },
}

/// Reads a journal frame by frame, handing out the changes of every whole frame before the
/// end or the first damage. Never fails: damage is reported in [`JournalScan::end`].
pub fn scan_journal(buf: &[u8], mut on_change: impl FnMut(Change)) -> JournalScan {
    let mut scan = JournalScan {
        version: 0,
        gen: 0,
        frames: 0,
        changes: 0,
        good_len: 0,
        end: End::Clean,
    };
    let damaged = |offset: u64, what: String| End::Damaged { offset, what };
    if buf.len() < HEADER_LEN || &buf[..8] != JOURNAL_MAGIC {
        // A crash right after creating the file can leave a short header: nothing was in it.
        scan.end = if buf.len() < HEADER_LEN && JOURNAL_MAGIC.starts_with(&buf[..buf.len().min(8)])
        {
            End::Torn(0)
        } else {
            damaged(0, "not a ddpushd journal (bad magic)".into())
        };
        return scan;
    }
    let v = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if v != JOURNAL_V1 && v != JOURNAL_VERSION {
        scan.end = damaged(8, format!("unsupported journal version {v}"));
        return scan;
    }
    scan.version = v;
    let mut g = [0u8; 8];
    g.copy_from_slice(&buf[12..20]);
    scan.gen = u64::from_be_bytes(g);
    scan.good_len = HEADER_LEN as u64;
    let (mut n_frames, mut n_changes, mut good) = (0u64, 0u64, HEADER_LEN as u64);
    let r = frames(buf, HEADER_LEN, |off, p| {
        let mut n = 0u64;
        let mut count = |c: Change| {
            n += 1;
            on_change(c)
        };
        if v == JOURNAL_V1 {
            let changes: Vec<Change> = decode(p)?;
            changes.into_iter().for_each(&mut count);
        } else {
            get_turn(p, &mut count)?;
        }
        n_frames += 1;
        n_changes += n;
        good = off + (super::frame::FRAME_HEAD + p.len()) as u64;
        Ok(())
    });
    scan.frames = n_frames;
    scan.changes = n_changes;
    scan.good_len = good;
    scan.end = match r {
        Ok(Tail::Clean) => End::Clean,
        Ok(Tail::Torn(o)) => End::Torn(o),
        Err((o, w)) => damaged(o, w),
    };
    scan
}

/// Reads a journal's changes. Returns its generation and how it ended; damage is an error
/// naming the file and offset.
pub fn read_journal(
    name: &str,
    buf: &[u8],
    on_change: impl FnMut(Change),
) -> Result<(u64, Tail), PersistError> {
    let s = scan_journal(buf, on_change);
    match s.end {
        End::Clean => Ok((s.gen, Tail::Clean)),
        End::Torn(o) => Ok((s.gen, Tail::Torn(o))),
        End::Damaged { offset, what } => Err(PersistError::Corrupt {
            file: name.to_string(),
            offset,
            what,
        }),
    }
}
