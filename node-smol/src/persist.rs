//! Crash-safe state in the data directory: a CBOR snapshot plus change journals.
//!
//! Files (all integers big-endian):
//!
//! * `snapshot.cbor`: `DDPUSHSN` + u32 version, then frames: a [`SnapHeader`], chunks of
//!   [`RecordState`]s, a [`SnapEnd`]. Written to `snapshot.tmp`, fsynced, renamed: a snapshot
//!   is whole or absent, so any damage in it is corruption, never a torn write.
//! * `journal-<gen>.log`: `DDPUSHJN` + u32 version + u64 gen, then one frame per loop turn
//!   holding that turn's [`Change`]s. A snapshot of generation `g` contains everything in
//!   journals older than `g`; start-up loads the snapshot and replays journals `>= g` in order.
//!
//! A frame is `u32 length, u32 CRC32 of the payload, payload`. A last frame that runs past the
//! end of its file or fails its CRC where the file ends is a write torn by a crash: it is
//! dropped with a warning (its turn's replies were never sent). Anything else that does not
//! check out stops the start with the file name and byte offset.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ddpush_proto::{Change, Content, RecordState};
use serde::{Deserialize, Serialize};

const SNAP_MAGIC: &[u8; 8] = b"DDPUSHSN";
const JOURNAL_MAGIC: &[u8; 8] = b"DDPUSHJN";
const FORMAT_VERSION: u32 = 1;
/// Snapshot version 2: record chunks in a fixed binary layout ([`put_record`]) instead of CBOR,
/// so a million records encode and decode in tens of milliseconds. Version 1 is still read.
const SNAP_VERSION: u32 = 2;
/// First byte of a version-2 record chunk (CBOR major type 0, so never taken for the end map).
const CHUNK_TAG: u8 = 0x02;
/// Frames larger than this are corruption, not data: no allocation follows a bad length.
pub const MAX_FRAME: usize = 64 << 20;
/// Records per snapshot frame.
const CHUNK: usize = 4096;
const SNAPSHOT: &str = "snapshot.cbor";
const SNAPSHOT_TMP: &str = "snapshot.tmp";

/// First frame of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapHeader {
    /// Journals older than this generation are contained in the snapshot.
    pub gen: u64,
    /// Wall-clock ms when it was taken.
    pub taken_ms: u64,
}

/// Last frame of a snapshot: its presence and count prove the file is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapEnd {
    /// Records written before it.
    pub records: u64,
}

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file is damaged: the server must not start on it.
    #[error("{file}: corrupt at byte offset {offset}: {what}")]
    Corrupt {
        /// The file.
        file: String,
        /// Byte offset of the bad frame or field.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// An I/O error on a file.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        source: io::Error,
    },
    /// Another process holds the data directory.
    #[error("{0}: data directory is locked by another ddpushd")]
    Locked(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        file: path.display().to_string(),
        source,
    }
}

/// Outcome of reading a frame sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// The file ended on a frame boundary.
    Clean,
    /// The last frame, starting at this offset, was torn and dropped.
    Torn(u64),
}

/// Parses frames from `buf[start..]`, calling `f` with each payload and its offset.
fn frames(
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

fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut b = Vec::new();
    // Serializing our own in-memory types into a Vec cannot fail.
    ciborium::into_writer(v, &mut b).expect("CBOR encoding into memory");
    b
}

fn decode<T: for<'de> Deserialize<'de>>(p: &[u8]) -> Result<T, String> {
    ciborium::from_reader(p).map_err(|e| format!("CBOR: {e}"))
}

/// Reads a whole snapshot, handing each record to `on_record`. `name` labels errors.
pub fn read_snapshot(
    name: &str,
    buf: &[u8],
    mut on_record: impl FnMut(RecordState),
) -> Result<SnapHeader, PersistError> {
    let corrupt = |offset: u64, what: String| PersistError::Corrupt {
        file: name.to_string(),
        offset,
        what,
    };
    if buf.len() < 12 || &buf[..8] != SNAP_MAGIC {
        return Err(corrupt(0, "not a ddpushd snapshot (bad magic)".into()));
    }
    let v = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if v != FORMAT_VERSION && v != SNAP_VERSION {
        return Err(corrupt(8, format!("unsupported snapshot version {v}")));
    }
    let mut header: Option<SnapHeader> = None;
    let mut seen = 0u64;
    let mut ended = false;
    let tail = frames(buf, 12, |_, p| {
        if ended {
            return Err("data after the end frame".into());
        }
        if header.is_none() {
            header = Some(decode(p)?);
            return Ok(());
        }
        // A chunk is a CBOR array and the end frame a map: the first byte tells them apart,
        // so neither decode is attempted twice on real data.
        if p.first().is_some_and(|b| b >> 5 == 5) {
            let e: SnapEnd = decode(p)?;
            if e.records != seen {
                return Err(format!("end frame says {} records, read {seen}", e.records));
            }
            ended = true;
        } else if v == SNAP_VERSION {
            seen += get_chunk(p, &mut on_record)?;
        } else {
            let chunk: Vec<RecordState> = decode(p)?;
            seen += chunk.len() as u64;
            chunk.into_iter().for_each(&mut on_record);
        }
        Ok(())
    })
    .map_err(|(o, w)| corrupt(o, w))?;
    if let Tail::Torn(o) = tail {
        return Err(corrupt(o, "truncated frame".into()));
    }
    match header {
        Some(h) if ended => Ok(h),
        _ => Err(corrupt(
            buf.len() as u64,
            "snapshot is incomplete (no end frame)".into(),
        )),
    }
}

/// Encodes a snapshot of `records` (an iterator, so a million records need not be collected
/// first). The count goes in the end frame, so the header can be written before it is known.
pub fn encode_snapshot(
    gen: u64,
    taken_ms: u64,
    records: impl Iterator<Item = RecordState>,
) -> Vec<u8> {
    let (lower, _) = records.size_hint();
    let mut out = Vec::with_capacity(64 + lower * 56);
    out.extend_from_slice(SNAP_MAGIC);
    out.extend_from_slice(&SNAP_VERSION.to_be_bytes());
    frame_into(&mut out, &cbor(&SnapHeader { gen, taken_ms }));
    let mut n = 0u64;
    let mut in_chunk = 0u32;
    let mut payload = Vec::with_capacity(CHUNK * 64);
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
    frame_into(&mut out, &cbor(&SnapEnd { records: n }));
    out
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

/// A cursor over a version-2 chunk; every read names what was cut short.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("record truncated inside its chunk".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
}

/// Decodes a version-2 chunk; returns its record count.
fn get_chunk(p: &[u8], on_record: &mut impl FnMut(RecordState)) -> Result<u64, String> {
    use ddpush_proto::{Time, Uuid};
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
    let mut rd = Rd(p);
    if rd.take(1)?[0] != CHUNK_TAG {
        return Err("not a record chunk".into());
    }
    let count = u32::from_be_bytes(rd.arr()?);
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
        on_record(rec);
    }
    if !rd.0.is_empty() {
        return Err(format!(
            "{} bytes after the chunk's last record",
            rd.0.len()
        ));
    }
    Ok(u64::from(count))
}

/// Reads a journal's changes. Returns its generation and how it ended.
pub fn read_journal(
    name: &str,
    buf: &[u8],
    mut on_change: impl FnMut(Change),
) -> Result<(u64, Tail), PersistError> {
    let corrupt = |offset: u64, what: String| PersistError::Corrupt {
        file: name.to_string(),
        offset,
        what,
    };
    if buf.len() < 20 || &buf[..8] != JOURNAL_MAGIC {
        // A crash right after creating the file can leave a short header: nothing was in it.
        if buf.len() < 20 && JOURNAL_MAGIC.starts_with(&buf[..buf.len().min(8)]) {
            return Ok((0, Tail::Torn(0)));
        }
        return Err(corrupt(0, "not a ddpushd journal (bad magic)".into()));
    }
    let v = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if v != FORMAT_VERSION {
        return Err(corrupt(8, format!("unsupported journal version {v}")));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&buf[12..20]);
    let gen = u64::from_be_bytes(g);
    let tail = frames(buf, 20, |_, p| {
        let changes: Vec<Change> = decode(p)?;
        changes.into_iter().for_each(&mut on_change);
        Ok(())
    })
    .map_err(|(o, w)| corrupt(o, w))?;
    Ok((gen, tail))
}

/// When the journal is forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Before the replies of every turn: survives power loss.
    Always,
    /// Every second: survives a process crash; a power loss may lose the last second.
    Interval,
    /// Never: the OS writes back when it likes.
    Never,
}

/// What start-up found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Records in the snapshot.
    pub snapshot_records: u64,
    /// Changes replayed from journals.
    pub replayed: u64,
    /// Torn tails dropped (file, offset).
    pub torn: Vec<(String, u64)>,
}

/// The data directory: lock, snapshot, journals.
pub struct Store {
    dir: PathBuf,
    _lock: File,
    journal: File,
    gen: u64,
    /// Journals not yet covered by a durable snapshot.
    live_journals: Vec<u64>,
    buf: Vec<u8>,
    payload: Vec<u8>,
    /// Bytes written since the last fsync.
    pub unsynced: bool,
}

fn journal_name(gen: u64) -> String {
    format!("journal-{gen:016x}.log")
}

fn parse_journal_name(n: &str) -> Option<u64> {
    let hex = n.strip_prefix("journal-")?.strip_suffix(".log")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

impl Store {
    /// Opens (creating if needed) the data directory, loads its state through `on_record`
    /// and `on_change`, and starts a fresh journal for this run.
    pub fn open(
        dir: &Path,
        mut on_record: impl FnMut(RecordState),
        mut on_change: impl FnMut(Change),
    ) -> Result<(Store, LoadReport), PersistError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("ddpushd.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(PersistError::Locked(dir.display().to_string()))
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let mut report = LoadReport::default();
        let snap_path = dir.join(SNAPSHOT);
        let snap_gen = match fs::read(&snap_path) {
            Ok(bytes) => {
                let name = snap_path.display().to_string();
                let h = read_snapshot(&name, &bytes, |r| {
                    report.snapshot_records += 1;
                    on_record(r)
                })?;
                h.gen
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&snap_path)(e)),
        };
        let mut gens: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| parse_journal_name(&e.file_name().to_string_lossy()))
            .collect();
        gens.sort_unstable();
        let mut live = Vec::new();
        for g in &gens {
            let path = dir.join(journal_name(*g));
            if *g < snap_gen {
                // Left over from a crash between a snapshot's rename and this cleanup.
                let _ = fs::remove_file(&path);
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let name = path.display().to_string();
            let (_, tail) = read_journal(&name, &bytes, |c| {
                report.replayed += 1;
                on_change(c)
            })?;
            if let Tail::Torn(o) = tail {
                report.torn.push((name, o));
            }
            live.push(*g);
        }
        let gen = gens.last().copied().unwrap_or(0).max(snap_gen) + 1;
        let journal = create_journal(dir, gen)?;
        live.push(gen);
        Ok((
            Store {
                dir: dir.to_path_buf(),
                _lock: lock,
                journal,
                gen,
                live_journals: live,
                buf: Vec::new(),
                payload: Vec::new(),
                unsynced: false,
            },
            report,
        ))
    }

    /// Appends one turn's changes as one frame (one `write`). Survives `kill -9` once this
    /// returns; call [`Store::sync`] for power loss.
    pub fn append(&mut self, changes: &[Change]) -> Result<(), PersistError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.payload.clear();
        ciborium::into_writer(changes, &mut self.payload).expect("CBOR encoding into memory");
        self.buf.clear();
        frame_into(&mut self.buf, &self.payload);
        let path = self.dir.join(journal_name(self.gen));
        self.journal.write_all(&self.buf).map_err(io_err(&path))?;
        self.unsynced = true;
        Ok(())
    }

    /// Forces the journal to stable storage.
    pub fn sync(&mut self) -> Result<(), PersistError> {
        if self.unsynced {
            let path = self.dir.join(journal_name(self.gen));
            self.journal.sync_data().map_err(io_err(&path))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Starts a new journal and returns the generation a snapshot taken now must carry.
    /// Changes appended from now on go to the new journal.
    pub fn rotate(&mut self) -> Result<u64, PersistError> {
        self.sync()?;
        let gen = self.gen + 1;
        self.journal = create_journal(&self.dir, gen)?;
        self.gen = gen;
        self.live_journals.push(gen);
        Ok(gen)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Called once a snapshot of generation `gen` is durable: deletes the journals it covers.
    pub fn snapshot_done(&mut self, gen: u64) {
        let dir = self.dir.clone();
        self.live_journals.retain(|g| {
            if *g < gen {
                let _ = fs::remove_file(dir.join(journal_name(*g)));
                false
            } else {
                true
            }
        });
    }
}

fn create_journal(dir: &Path, gen: u64) -> Result<File, PersistError> {
    let path = dir.join(journal_name(gen));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(JOURNAL_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    h.extend_from_slice(&gen.to_be_bytes());
    f.write_all(&h).map_err(io_err(&path))?;
    f.sync_all().map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes snapshot bytes atomically: temp file, fsync, rename, fsync the directory.
/// Blocking; the server runs it on a thread.
pub fn write_snapshot_file(dir: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let dst = dir.join(SNAPSHOT);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpush_proto::{Kind, PushMsg, Time, Uuid};

    fn rec(i: u8) -> RecordState {
        RecordState {
            uuid: Uuid([i; 16]),
            last_heartbeat: Some(Time::from_secs(1000 + u64::from(i))),
            last_active: Time::from_secs(1000 + u64::from(i)),
            last_push: None,
            addr: Some("10.0.0.1:4000".parse().unwrap()),
            notify: i.is_multiple_of(2),
            bits: u64::from(i),
            payload: i
                .is_multiple_of(3)
                .then(|| Content::new(vec![i; 10]).unwrap()),
        }
    }

    #[test]
    fn snapshot_round_trip_and_corruption_is_refused_with_offset() {
        let recs: Vec<_> = (0..10).map(rec).collect();
        let bytes = encode_snapshot(3, 42, recs.clone().into_iter());
        let mut back = Vec::new();
        let h = read_snapshot("s", &bytes, |r| back.push(r)).unwrap();
        assert_eq!(h.gen, 3);
        assert_eq!(back, recs);
        let mut bad = bytes.clone();
        let mid = bytes.len() / 2;
        bad[mid] ^= 0xFF;
        let e = read_snapshot("s", &bad, |_| {}).unwrap_err().to_string();
        assert!(e.contains("corrupt at byte offset"), "{e}");
        let cut = &bytes[..bytes.len() - 3];
        assert!(read_snapshot("s", cut, |_| {}).is_err());
    }

    #[test]
    fn snapshot_v2_keeps_every_field_and_v1_is_still_read() {
        let mut recs: Vec<_> = (0..7).map(rec).collect();
        // No scope id: CBOR (version 1) does not keep it; version 2 does.
        recs[1].addr = Some("[2001:db8::1]:9966".parse().unwrap());
        recs[2].addr = None;
        recs[3].last_heartbeat = None;
        recs[4].last_push = Some(Time::from_millis(123_456));
        recs[5].payload = Some(Content::new(vec![7u8; 500]).unwrap());
        let bytes = encode_snapshot(9, 1, recs.clone().into_iter());
        let mut back = Vec::new();
        read_snapshot("s", &bytes, |r| back.push(r)).unwrap();
        assert_eq!(back, recs);

        // A version-1 (CBOR) snapshot, as earlier releases wrote it.
        let mut v1 = Vec::new();
        v1.extend_from_slice(SNAP_MAGIC);
        v1.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        frame_into(
            &mut v1,
            &cbor(&SnapHeader {
                gen: 9,
                taken_ms: 1,
            }),
        );
        frame_into(&mut v1, &cbor(&recs));
        frame_into(&mut v1, &cbor(&SnapEnd { records: 7 }));
        let mut back = Vec::new();
        assert_eq!(read_snapshot("s", &v1, |r| back.push(r)).unwrap().gen, 9);
        assert_eq!(back, recs);
    }

    #[test]
    fn journal_torn_tail_is_dropped_but_middle_damage_is_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = Store::open(dir.path(), |_| {}, |_| {}).unwrap();
        let c = |i: u8| Change::Pushed {
            uuid: Uuid([i; 16]),
            at: Time::from_secs(1),
            msg: PushMsg::Bits(u64::from(i)),
        };
        st.append(&[c(1)]).unwrap();
        st.append(&[c(2), c(3)]).unwrap();
        st.append(&[Change::Cleared {
            uuid: Uuid([1; 16]),
            kind: Kind::Bits,
            bits: 1,
        }])
        .unwrap();
        let path = dir.path().join(journal_name(st.gen));
        drop(st);
        let full = fs::read(&path).unwrap();
        let mut got = Vec::new();
        let (_, tail) = read_journal("j", &full, |c| got.push(c)).unwrap();
        assert_eq!((got.len(), tail), (4, Tail::Clean));

        let torn = &full[..full.len() - 2];
        let mut got = Vec::new();
        let (_, tail) = read_journal("j", torn, |c| got.push(c)).unwrap();
        assert_eq!(got.len(), 3);
        assert!(matches!(tail, Tail::Torn(_)));

        let mut bad = full.clone();
        bad[20 + 9] ^= 0x55; // inside the first frame's payload
        let e = read_journal("j", &bad, |_| {}).unwrap_err().to_string();
        assert!(e.contains("offset 20"), "{e}");
    }

    #[test]
    fn reopen_replays_and_snapshot_retires_old_journals() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut st, _) = Store::open(dir.path(), |_| {}, |_| {}).unwrap();
            st.append(&[Change::Removed {
                uuid: Uuid([9; 16]),
            }])
            .unwrap();
        }
        let mut n = 0;
        let (mut st, rep) = Store::open(dir.path(), |_| {}, |_| n += 1).unwrap();
        assert_eq!((n, rep.replayed), (1, 1));
        let g = st.rotate().unwrap();
        let bytes = encode_snapshot(g, 0, std::iter::once(rec(1)));
        write_snapshot_file(dir.path(), &bytes).unwrap();
        st.snapshot_done(g);
        drop(st);
        let mut recs = 0;
        let mut changes = 0;
        let (_st, rep) = Store::open(dir.path(), |_| recs += 1, |_| changes += 1).unwrap();
        assert_eq!((recs, changes, rep.snapshot_records), (1, 0, 1));
    }

    #[test]
    fn second_open_of_a_locked_dir_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, _) = Store::open(dir.path(), |_| {}, |_| {}).unwrap();
        match Store::open(dir.path(), |_| {}, |_| {}) {
            Err(PersistError::Locked(_)) => {}
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
    }
}
