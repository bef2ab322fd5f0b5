//! `ddpushd check` and `ddpushd recover`: what is in a data directory, and salvaging a damaged
//! one.
//!
//! `check` reads every file and says, per file, how many whole frames it holds, and where and
//! why it stops if it does not end cleanly. `recover` rewrites each damaged file with every
//! whole frame before its first damage (a snapshot also gets a new end frame), after keeping
//! the original under `<name>.damaged-<unix seconds>`: nothing is ever deleted. Torn last frames
//! are left alone: start-up drops them by itself.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::journal::{self, End, HEADER_LEN};
use super::snapshot::{scan_snapshot, truncated_snapshot};
use super::{io_err, journal_gens, journal_name, lock_dir, scan_journal, PersistError, SNAPSHOT};

/// Which kind of file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `snapshot.cbor`.
    Snapshot,
    /// `journal-<gen>.log`.
    Journal,
}

/// What `check` found in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// Snapshot or journal.
    pub kind: FileKind,
    /// Format version (0 if the header is unreadable).
    pub version: u32,
    /// Whole frames before the end or the damage.
    pub frames: u64,
    /// Records (snapshot) or changes (journal) in them.
    pub items: u64,
    /// Offset just past the last whole frame.
    pub good_len: u64,
    /// File size.
    pub len: u64,
    /// How it ends.
    pub end: End,
}

impl FileReport {
    /// Whether start-up refuses this file.
    pub fn damaged(&self) -> bool {
        matches!(self.end, End::Damaged { .. })
    }
}

impl fmt::Display for FileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = match self.kind {
            FileKind::Snapshot => "records",
            FileKind::Journal => "changes",
        };
        write!(
            f,
            "{}: version {}, {} whole frames ({} {items}), {} bytes: ",
            self.path.display(),
            self.version,
            self.frames,
            self.items,
            self.len
        )?;
        match &self.end {
            End::Clean => write!(f, "ok"),
            End::Torn(o) => write!(
                f,
                "ok, torn last frame at byte offset {o} ({} bytes): a write cut short by a crash \
                 or a failed write; start-up drops it",
                self.len - o
            ),
            End::Damaged { offset, what } => write!(
                f,
                "DAMAGED at byte offset {offset}: {what}; {}",
                meaning(self.kind, *offset, self.len)
            ),
        }
    }
}

/// What damage at `offset` means for the data, in the operator's terms.
fn meaning(kind: FileKind, offset: u64, len: u64) -> String {
    let after = len.saturating_sub(offset);
    match kind {
        FileKind::Journal if offset < HEADER_LEN as u64 => {
            "the header is unreadable, so no change in this file can be trusted; `ddpushd recover` \
             sets the whole file aside"
                .into()
        }
        FileKind::Journal => format!(
            "changes before it are intact; the {after} bytes from there on cannot be read \
             (`ddpushd recover` keeps the frames before it and sets the rest aside)"
        ),
        FileKind::Snapshot => format!(
            "records in whole chunks before it are intact; the {after} bytes from there on \
             cannot be read (`ddpushd recover` keeps the chunks before it)"
        ),
    }
}

fn is_dir(dir: &Path) -> Result<(), PersistError> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(PersistError::Unusable(format!(
        "data directory {} does not exist or is not a directory",
        dir.display()
    )))
}

/// Reads every snapshot and journal file of `dir`. Read-only; safe while a server runs (a
/// journal being appended may show a torn last frame).
pub fn check(dir: &Path) -> Result<Vec<FileReport>, PersistError> {
    is_dir(dir)?;
    let mut out = Vec::new();
    let snap = dir.join(SNAPSHOT);
    if snap.exists() {
        let buf = fs::read(&snap).map_err(io_err(&snap))?;
        let s = scan_snapshot(&buf, |_| {});
        out.push(FileReport {
            path: snap,
            kind: FileKind::Snapshot,
            version: s.version,
            frames: s.frames,
            items: s.records,
            good_len: s.good_len,
            len: buf.len() as u64,
            end: s.end,
        });
    }
    for g in journal_gens(dir)? {
        let path = dir.join(journal_name(g));
        let buf = fs::read(&path).map_err(io_err(&path))?;
        let s = scan_journal(&buf, |_| {});
        out.push(FileReport {
            path,
            kind: FileKind::Journal,
            version: s.version,
            frames: s.frames,
            items: s.changes,
            good_len: s.good_len,
            len: buf.len() as u64,
            end: s.end,
        });
    }
    Ok(out)
}

/// What `recover` did to one damaged file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The file, now holding only what was kept.
    pub path: PathBuf,
    /// Where the whole original now is.
    pub aside: PathBuf,
    /// Frames kept.
    pub frames: u64,
    /// Records or changes in them.
    pub items: u64,
    /// Bytes of the original past what was kept.
    pub set_aside: u64,
    /// False if nothing could be kept (the file was removed from its place).
    pub replaced: bool,
}

impl fmt::Display for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.replaced {
            write!(
                f,
                "{}: kept {} whole frames ({} items), set aside {} bytes; the original is {}",
                self.path.display(),
                self.frames,
                self.items,
                self.set_aside,
                self.aside.display()
            )
        } else {
            write!(
                f,
                "{}: nothing readable, set aside all {} bytes; the original is {}",
                self.path.display(),
                self.set_aside,
                self.aside.display()
            )
        }
    }
}

fn aside_name(path: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut n = 0;
    loop {
        let suffix = if n == 0 {
            format!(".damaged-{secs}")
        } else {
            format!(".damaged-{secs}-{n}")
        };
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if !p.exists() {
            return p;
        }
        n += 1;
    }
}

/// Keeps `path` whole under a new name (a hard link, so the original bytes never move), then
/// atomically replaces `path` with `kept` (or removes it if `None`).
fn set_aside(dir: &Path, path: &Path, kept: Option<&[u8]>) -> Result<PathBuf, PersistError> {
    let aside = aside_name(path);
    fs::hard_link(path, &aside).map_err(io_err(&aside))?;
    match kept {
        Some(bytes) => {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".recover-tmp");
            let tmp = PathBuf::from(tmp);
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            std::io::Write::write_all(&mut &f, bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, path).map_err(io_err(path))?;
        }
        None => fs::remove_file(path).map_err(io_err(path))?,
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(aside)
}

/// Rewrites every damaged file of `dir` with what precedes its damage; see the module docs.
/// Takes the data directory's lock: refuses while a server runs on it.
pub fn recover(dir: &Path) -> Result<Vec<Recovered>, PersistError> {
    is_dir(dir)?;
    // Locked before reading, so what is checked is what is rewritten.
    let _lock = lock_dir(dir)?;
    let reports = check(dir)?;
    let mut out = Vec::new();
    for r in reports.iter().filter(|r| r.damaged()) {
        let buf = fs::read(&r.path).map_err(io_err(&r.path))?;
        let kept: Option<Vec<u8>> = match r.kind {
            FileKind::Journal if r.version == 0 => {
                // Unreadable header: an empty journal of the same generation takes its place.
                let gen = r
                    .path
                    .file_name()
                    .and_then(|n| super::parse_journal_name(&n.to_string_lossy()))
                    .unwrap_or(0);
                Some(journal::header(gen).to_vec())
            }
            FileKind::Journal => Some(buf[..r.good_len as usize].to_vec()),
            FileKind::Snapshot => {
                let s = scan_snapshot(&buf, |_| {});
                s.header
                    .map(|_| truncated_snapshot(&buf, s.good_len, s.records, s.keys, s.removed))
            }
        };
        let replaced = kept.is_some();
        let frames = match r.kind {
            // The header frame is kept; a new end frame is added.
            FileKind::Snapshot if replaced => r.frames + 1,
            _ if replaced => r.frames,
            _ => 0,
        };
        let aside = set_aside(dir, &r.path, kept.as_deref())?;
        out.push(Recovered {
            path: r.path.clone(),
            aside,
            frames,
            items: if replaced { r.items } else { 0 },
            set_aside: if replaced {
                r.len - r.good_len.min(r.len)
            } else {
                r.len
            },
            replaced,
        });
    }
    Ok(out)
}
