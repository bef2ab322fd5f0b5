//! Oracles shared by the fuzz targets.
//!
//! Each oracle is an independent, deliberately naive reading of PROTOCOL.md, written without
//! looking at how `ddpush-proto` does it, so a target can compare the core against the contract
//! rather than against itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Upstream header size (device -> server, app server -> server).
pub const UP: usize = 21;

/// What the contract says a device datagram is (PROTOCOL.md 2.1): `(app_id, uuid, cmd, mask)`.
pub fn contract_device(buf: &[u8]) -> Option<(u8, [u8; 16], u8, Option<u64>)> {
    if buf.len() < UP || buf[0] != 1 {
        return None;
    }
    let n = u16::from_be_bytes([buf[19], buf[20]]) as usize;
    if buf.len() != UP + n {
        return None;
    }
    let need = match buf[2] {
        0x00 | 0x10 | 0x20 => 0,
        0x11 => 8,
        _ => return None,
    };
    if n != need {
        return None;
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&buf[3..19]);
    let mask = (n == 8).then(|| u64::from_be_bytes(buf[21..29].try_into().unwrap()));
    Some((buf[1], uuid, buf[2], mask))
}

/// The reply byte the contract requires for a delimited push request (PROTOCOL.md 2.2), given
/// its 21-byte header and content length; `None` means "no reply, connection closed"
/// (N > `max_content`). Capacity refusals (`0x01` for a well-formed request) are the node's
/// business and are checked by the callers that know the client count.
pub fn contract_reply(header: &[u8], max_content: u16) -> Option<u8> {
    let n = u16::from_be_bytes([header[19], header[20]]);
    if n > max_content {
        return None;
    }
    if header[0] != 1 {
        return Some(0x01);
    }
    let ok = match header[2] {
        0x10 => n == 0,
        0x11 => n == 8,
        0x20 => n >= 1,
        _ => false,
    };
    Some(if ok { 0x00 } else { 0x01 })
}

/// A naive TCP framer: whole stream in, frames (header + content) out, or the point where the
/// stream cannot be delimited. `Err(frames)` = frames before a header announcing N > max.
pub fn contract_frames(stream: &[u8], max_content: u16) -> Result<Vec<Vec<u8>>, Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut rest = stream;
    while rest.len() >= UP {
        let n = u16::from_be_bytes([rest[19], rest[20]]);
        if n > max_content {
            return Err(out);
        }
        let total = UP + n as usize;
        if rest.len() < total {
            break;
        }
        out.push(rest[..total].to_vec());
        rest = &rest[total..];
    }
    Ok(out)
}

/// Cuts `data` into pieces at positions chosen by `seed` bytes (each byte is a piece length,
/// 0 meaning "an empty read"), the remainder forming the last piece.
pub fn split<'a>(data: &'a [u8], seed: &[u8]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut rest = data;
    for &s in seed {
        let n = usize::from(s).min(rest.len());
        pieces.push(&rest[..n]);
        rest = &rest[n..];
        if rest.is_empty() {
            break;
        }
    }
    pieces.push(rest);
    pieces
}

/// A global allocator that remembers the largest single allocation and the peak of live bytes,
/// so persistence targets can assert that corrupt input never causes an allocation out of
/// proportion to its size. Install with `#[global_allocator]` in a target.
pub struct TrackingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        note_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn note_alloc(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK_LIVE.fetch_max(live, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

/// Allocation figures since the last [`alloc_reset`]: (largest single allocation, peak live
/// bytes above the live bytes at reset).
pub fn alloc_stats() -> (usize, usize) {
    (
        LARGEST.load(Ordering::Relaxed),
        PEAK_LIVE
            .load(Ordering::Relaxed)
            .saturating_sub(BASE.load(Ordering::Relaxed)),
    )
}

static BASE: AtomicUsize = AtomicUsize::new(0);

/// Starts a new measurement.
pub fn alloc_reset() {
    let live = LIVE.load(Ordering::Relaxed);
    BASE.store(live, Ordering::Relaxed);
    PEAK_LIVE.store(live, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
}

/// Runs `read` and asserts that it stayed within `budget` bytes, both for its largest single
/// allocation and for its peak live bytes: the readers' "no unbounded allocation" invariant.
pub fn within_budget<T>(input_len: usize, budget: usize, read: impl FnOnce() -> T) -> T {
    alloc_reset();
    let out = read();
    let (largest, peak) = alloc_stats();
    assert!(
        largest <= budget && peak <= budget,
        "reading {input_len} bytes allocated {largest} at once, {peak} in all (budget {budget})"
    );
    out
}

/// The allocation budget for decoding `input_len` bytes of a persistence file: a constant
/// factor of the input plus a fixed allowance. Anything above it is "unbounded" in the sense of
/// the task: driven by a length field rather than by the bytes actually present.
pub fn alloc_budget(input_len: usize) -> usize {
    64 * 1024 + 16 * input_len
}

/// Arbitrary-derived persisted state, for the snapshot and journal targets: structured input
/// that the server's writer turns into a valid file, which the target then damages.
pub mod persisted {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use arbitrary::Arbitrary;
    use bytes::Bytes;
    use ddpush_proto::{Change, Kind, PushMsg, RecordState, Time, Uuid};

    /// A client record.
    #[derive(Arbitrary, Debug)]
    pub struct Rec {
        uuid: [u8; 16],
        last_heartbeat: Option<u64>,
        last_active: u64,
        last_push: Option<u64>,
        addr: Option<(bool, [u8; 16], u16)>,
        notify: bool,
        bits: u64,
        payload: Option<Vec<u8>>,
    }

    impl Rec {
        /// The record as the node exports it.
        pub fn state(&self) -> RecordState {
            RecordState {
                uuid: Uuid(self.uuid),
                last_heartbeat: self.last_heartbeat.map(Time),
                last_active: Time(self.last_active),
                last_push: self.last_push.map(Time),
                addr: self.addr.map(|(v6, ip, port)| {
                    if v6 {
                        SocketAddr::new(Ipv6Addr::from(ip).into(), port)
                    } else {
                        SocketAddr::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into(), port)
                    }
                }),
                notify: self.notify,
                bits: self.bits,
                payload: self.payload.clone().map(Bytes::from),
            }
        }
    }

    /// A journaled change.
    #[derive(Arbitrary, Debug)]
    pub enum Chg {
        /// `Change::Created`.
        Created([u8; 16], u64),
        /// `Change::Pushed` of a 0x10.
        Notify([u8; 16], u64),
        /// `Change::Pushed` of a 0x11.
        Bits([u8; 16], u64, u64),
        /// `Change::Pushed` of a 0x20.
        Payload([u8; 16], u64, Vec<u8>),
        /// `Change::Cleared`.
        Cleared([u8; 16], u8, u64),
        /// `Change::Removed`.
        Removed([u8; 16]),
    }

    impl Chg {
        /// The change as the node emits it.
        pub fn change(&self) -> Change {
            match self {
                Chg::Created(u, at) => Change::Created {
                    uuid: Uuid(*u),
                    at: Time(*at),
                },
                Chg::Notify(u, at) => Change::Pushed {
                    uuid: Uuid(*u),
                    at: Time(*at),
                    msg: PushMsg::Notify,
                },
                Chg::Bits(u, at, b) => Change::Pushed {
                    uuid: Uuid(*u),
                    at: Time(*at),
                    msg: PushMsg::Bits(*b),
                },
                Chg::Payload(u, at, p) => Change::Pushed {
                    uuid: Uuid(*u),
                    at: Time(*at),
                    msg: PushMsg::Payload(Bytes::from(p.clone())),
                },
                Chg::Cleared(u, k, b) => Change::Cleared {
                    uuid: Uuid(*u),
                    kind: [Kind::Notify, Kind::Bits, Kind::Payload][usize::from(k % 3)],
                    bits: *b,
                },
                Chg::Removed(u) => Change::Removed { uuid: Uuid(*u) },
            }
        }
    }

    /// Damage to apply to a valid file.
    #[derive(Arbitrary, Debug)]
    pub struct Damage {
        /// (position, xor) byte flips; positions wrap around the file length.
        pub flips: Vec<(u32, u8)>,
        /// Cut the file to this length (modulo length + 1), if set.
        pub truncate: Option<u32>,
        /// Recompute every frame's CRC after the flips, so damage reaches the CBOR decoder.
        pub fix_crc: bool,
    }

    impl Damage {
        /// Applies the damage to a file whose frames start at `start`.
        pub fn apply(&self, file: &mut Vec<u8>, start: usize) {
            if file.is_empty() {
                return;
            }
            for &(pos, x) in &self.flips {
                let n = file.len();
                file[pos as usize % n] ^= x;
            }
            if let Some(t) = self.truncate {
                let n = file.len();
                file.truncate(t as usize % (n + 1));
            }
            if self.fix_crc {
                let mut off = start;
                while off + 8 <= file.len() {
                    let len = u32::from_be_bytes(file[off..off + 4].try_into().unwrap()) as usize;
                    let Some(end) = off.checked_add(8 + len).filter(|&e| e <= file.len()) else {
                        break;
                    };
                    let crc = crc32fast::hash(&file[off + 8..end]);
                    file[off + 4..off + 8].copy_from_slice(&crc.to_be_bytes());
                    off = end;
                }
            }
        }
    }

    /// Appends one `u32 length, u32 CRC32, payload` frame.
    pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// A journal file as the server writes it: magic, version 1, generation, one frame per
    /// turn holding that turn's changes as a CBOR array.
    pub fn journal(gen: u64, turns: &[Vec<ddpush_proto::Change>]) -> Vec<u8> {
        let mut out = b"DDPUSHJN".to_vec();
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&gen.to_be_bytes());
        for t in turns {
            let mut p = Vec::new();
            ciborium::into_writer(t, &mut p).expect("CBOR into memory");
            frame(&mut out, &p);
        }
        out
    }
}

/// The budget for the server's CBOR files. serde pre-allocates a sequence from its declared
/// length, but "cautiously": at most 1 MiB per sequence, and our schema nests at most three
/// sequences (a chunk of records or a turn of changes, each holding a payload). So a length
/// field can cost a constant, never an amount that grows with it.
pub fn alloc_budget_cbor(input_len: usize) -> usize {
    4 * 1024 * 1024 + 16 * input_len
}
