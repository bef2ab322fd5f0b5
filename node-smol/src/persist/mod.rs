//! Crash-safe state in the data directory: a snapshot plus change journals.
//!
//! Files (all integers big-endian; formats in [`snapshot`] and [`journal`], frames in [`frame`]):
//!
//! * `snapshot.cbor`: every record. Written to `snapshot.tmp`, fsynced, renamed: a snapshot
//!   is whole or absent, so any damage in it is corruption, never a torn write.
//! * `journal-<gen>.log`: one frame per loop turn holding that turn's [`Change`]s. A snapshot
//!   of generation `g` contains everything in journals older than `g`; start-up loads the
//!   snapshot and replays journals `>= g` in order.
//!
//! # Failed writes
//! A journal write that fails, or lands only in part, is rolled back: the file is cut back to
//! its last whole frame before anything else is appended ([`Store::commit`]), so a journal is
//! always whole frames plus at most one torn frame at the very end (left only by a crash
//! before the cut). A failed snapshot leaves the previous snapshot and every journal since in
//! place, removes its temporary file, and is retried by the server.
//!
//! # Damage
//! A torn last frame is dropped at start with a warning (its turn's replies were never sent).
//! Anything else stops the start with the file name and byte offset, and names the tools:
//! `ddpushd check` reports every file ([`check`]), `ddpushd recover` keeps every whole frame
//! before the damage and moves the damaged file aside.

pub mod check;
pub mod disk;
pub mod frame;
pub mod journal;
mod keys;
pub mod snapshot;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ddpush_proto::{Change, Recovery};
use serde::{Deserialize, Serialize};

pub use disk::{Disk, DiskFile, FailingDisk, Faults, OsDisk};
pub use frame::{Tail, MAX_FRAME};
pub use journal::{read_journal, scan_journal};
pub use snapshot::{
    encode_snapshot, encode_snapshot_keys, encode_snapshot_signed, read_snapshot,
    read_snapshot_keys, read_snapshot_signed, SnapEnd, SnapHeader,
};

pub(crate) const SNAPSHOT: &str = "snapshot.cbor";
pub(crate) const SNAPSHOT_TMP: &str = "snapshot.tmp";
const LOCK: &str = "ddpushd.lock";

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file is damaged: the server must not start on it.
    #[error(
        "{file}: corrupt at byte offset {offset}: {what} (run `ddpushd check` for a report of \
         every file, `ddpushd recover` to keep every whole frame before the damage and move the \
         damaged file aside)"
    )]
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
    /// The data directory cannot be used as it is; nothing was touched.
    #[error("{0}")]
    Unusable(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        file: path.display().to_string(),
        source,
    }
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
    /// This run's journal could not be created for want of space: the state was read, and the
    /// store retries the journal before every append (see [`out_of_space`]).
    pub journal_error: Option<PersistError>,
    /// Bytes of a `snapshot.tmp` left by a run that died while writing a snapshot, removed.
    pub stale_tmp: Option<u64>,
}

/// Takes the data directory's lock (`ddpushd.lock`, an advisory lock held for the life of the
/// returned file): one ddpushd, or one `ddpushd recover`, per directory at a time.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, PersistError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .map_err(|e| unusable(dir, &e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(PersistError::Locked(dir.display().to_string())),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&dir.join(LOCK))(e)),
    }
}

/// The data directory: lock, snapshot, journals.
pub struct Store {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    _lock: File,
    /// `None` until this run's journal could be created (a start on a full disk).
    journal: Option<Box<dyn DiskFile>>,
    gen: u64,
    /// Bytes of whole frames (header included) in the current journal.
    len: u64,
    /// A failed write may have left bytes past `len`: cut them before the next append.
    dirty: bool,
    /// Journals not yet covered by a durable snapshot.
    live_journals: Vec<u64>,
    buf: Vec<u8>,
    payload: Vec<u8>,
    /// Bytes written since the last fsync.
    pub unsynced: bool,
    /// The last fsync failed: appends wait for one that succeeds (see [`Store::commit`]).
    sync_failed: bool,
}

/// Bytes of a [`Store::probe_write`]: about one turn's frame of a few 0x20 pushes.
const PROBE_LEN: usize = 4096;

pub(crate) fn journal_name(gen: u64) -> String {
    format!("journal-{gen:016x}.log")
}

pub(crate) fn parse_journal_name(n: &str) -> Option<u64> {
    let hex = n.strip_prefix("journal-")?.strip_suffix(".log")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// The data directory's journal generations, sorted.
pub(crate) fn journal_gens(dir: &Path) -> Result<Vec<u64>, PersistError> {
    let mut gens: Vec<u64> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_journal_name(&e.file_name().to_string_lossy()))
        .collect();
    gens.sort_unstable();
    Ok(gens)
}

/// Refuses, in one line and before touching anything, a data directory that cannot work:
/// not a directory, owned by another user, on a read-only filesystem, not writable, or with a
/// directory where one of our files should be.
pub fn preflight(dir: &Path) -> Result<(), PersistError> {
    let d = dir.display();
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        // Created by `Store::open`; its parent's problems surface there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PersistError::Unusable(format!("data directory {d}: {e}"))),
    };
    if !meta.is_dir() {
        return Err(PersistError::Unusable(format!(
            "data directory {d} is not a directory"
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(PersistError::Unusable(format!(
                "data directory {d} is owned by uid {}, not by this user (uid {me}): run ddpushd \
                 as the directory's owner or chown it",
                meta.uid()
            )));
        }
    }
    let mut names = vec![
        SNAPSHOT.to_string(),
        SNAPSHOT_TMP.to_string(),
        LOCK.to_string(),
    ];
    names.extend(journal_gens(dir)?.into_iter().map(journal_name));
    for n in names {
        let p = dir.join(&n);
        let Ok(m) = fs::metadata(&p) else { continue };
        if m.is_dir() {
            return Err(PersistError::Unusable(format!(
                "{} is a directory where ddpushd keeps a file: move it away",
                p.display()
            )));
        }
        // A directory first used by another user (often `sudo ddpushd` once) keeps files
        // this user may not be able to replace or delete later: say so now, not mid-run.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me {
                return Err(PersistError::Unusable(format!(
                    "{} is owned by uid {}, not by this user (uid {me}): chown the data \
                     directory and its files to the user that runs ddpushd",
                    p.display(),
                    m.uid()
                )));
            }
        }
    }
    if meta.permissions().readonly() {
        return Err(PersistError::Unusable(format!(
            "data directory {d} is not writable (read-only permissions)"
        )));
    }
    Ok(())
}

/// Whether a write failed only for want of space: a full filesystem, a quota, a file-size
/// limit. Such a failure at start-up does not stop the server: it starts on the state it read,
/// degraded (pushes refused, devices served from memory) until space comes back, since
/// refusing to start would turn a full disk into an outage of every device. Anything else
/// (a read-only filesystem, permissions) refuses to start.
pub fn out_of_space(e: &PersistError) -> bool {
    let PersistError::Io { source, .. } = e else {
        return false;
    };
    matches!(
        source.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

/// One line for an error met while first writing to the data directory.
fn unusable(dir: &Path, e: &io::Error) -> PersistError {
    let d = dir.display();
    PersistError::Unusable(match e.kind() {
        io::ErrorKind::ReadOnlyFilesystem => {
            format!("data directory {d} is on a read-only filesystem")
        }
        io::ErrorKind::PermissionDenied => {
            format!("data directory {d} is not writable by this user: {e}")
        }
        _ => format!("data directory {d}: {e}"),
    })
}

impl Store {
    /// Opens (creating if needed) the data directory on the real disk; see [`Store::open_on`].
    pub fn open(dir: &Path, rec: &mut Recovery) -> Result<(Store, LoadReport), PersistError> {
        Self::open_on(dir, Arc::new(OsDisk), rec)
    }

    /// Opens (creating if needed) the data directory, loads its snapshot and journals into
    /// `rec`, and starts a fresh journal for this run. Writes go through `disk`.
    pub fn open_on(
        dir: &Path,
        disk: Arc<dyn Disk>,
        rec: &mut Recovery,
    ) -> Result<(Store, LoadReport), PersistError> {
        preflight(dir)?;
        fs::create_dir_all(dir).map_err(|e| unusable(dir, &e))?;
        let lock = lock_dir(dir)?;
        let mut report = LoadReport::default();
        // A snapshot being written when the last run died: never read, and on a full disk
        // its bytes are the space this run's journal needs.
        let tmp = dir.join(SNAPSHOT_TMP);
        if let Ok(m) = fs::symlink_metadata(&tmp) {
            if m.is_file() && fs::remove_file(&tmp).is_ok() {
                report.stale_tmp = Some(m.len());
            }
        }
        let snap_path = dir.join(SNAPSHOT);
        let snap_gen = match fs::read(&snap_path) {
            Ok(bytes) => {
                let name = snap_path.display().to_string();
                let (mut keys, mut floors) = (Vec::new(), Vec::new());
                let h = read_snapshot_signed(
                    &name,
                    &bytes,
                    |r| {
                        report.snapshot_records += 1;
                        rec.record(r)
                    },
                    |u, k| keys.push((u, k)),
                    |u, f| floors.push((u, f)),
                )?;
                for (u, k) in keys {
                    rec.key(u, k);
                }
                for (u, f) in floors {
                    rec.removal_floor(u, f);
                }
                h.gen
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&snap_path)(e)),
        };
        let gens = journal_gens(dir)?;
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
                rec.change(&c)
            })?;
            if let Tail::Torn(o) = tail {
                report.torn.push((name, o));
            }
            live.push(*g);
        }
        let gen = gens.last().copied().unwrap_or(0).max(snap_gen) + 1;
        let journal = match create_journal(disk.as_ref(), dir, gen) {
            Ok(j) => {
                live.push(gen);
                Some(j)
            }
            Err(e) if out_of_space(&e) => {
                report.journal_error = Some(e);
                None
            }
            Err(PersistError::Io { source, .. }) => return Err(unusable(dir, &source)),
            Err(other) => return Err(other),
        };
        Ok((
            Store {
                dir: dir.to_path_buf(),
                disk,
                _lock: lock,
                journal,
                gen,
                len: journal::HEADER_LEN as u64,
                dirty: false,
                live_journals: live,
                buf: Vec::new(),
                payload: Vec::new(),
                unsynced: false,
                sync_failed: false,
            },
            report,
        ))
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(journal_name(self.gen))
    }

    /// Whether this run's journal exists (it does not after a start on a full disk, until
    /// the first append that finds space).
    pub fn journal_open(&self) -> bool {
        self.journal.is_some()
    }

    /// This run's journal, created first if a start on a full disk could not.
    fn journal(&mut self) -> Result<&mut Box<dyn DiskFile>, PersistError> {
        match &mut self.journal {
            Some(j) => Ok(j),
            slot @ None => {
                let j = create_journal(self.disk.as_ref(), &self.dir, self.gen)?;
                self.live_journals.push(self.gen);
                self.len = journal::HEADER_LEN as u64;
                self.dirty = false;
                Ok(slot.insert(j))
            }
        }
    }

    /// Cuts what a failed write left past the last whole frame.
    fn roll_back(&mut self) -> Result<(), PersistError> {
        if self.dirty {
            let path = self.journal_path();
            let len = self.len;
            self.journal()?.truncate(len).map_err(io_err(&path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Appends one turn's changes as one frame (one write), and forces it to stable storage if
    /// `sync`. Survives `kill -9` once this returns `Ok`. On an error nothing of the frame
    /// stays: the file is cut back to its last whole frame now, or, if that fails too, before
    /// the next append (which fails until it succeeds).
    ///
    /// After a failed fsync (the periodic one of `--fsync interval`), every append first
    /// retries the fsync and fails if it fails: bytes the filesystem took but could not write
    /// back are no base for accepting more.
    pub fn commit(&mut self, changes: &[Change], sync: bool) -> Result<(), PersistError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.roll_back()?;
        if self.sync_failed {
            self.sync()?;
        }
        journal::encode_turn(&mut self.payload, changes);
        self.buf.clear();
        frame::frame_into(&mut self.buf, &self.payload);
        let path = self.journal_path();
        // Taken out for the write: `journal()` borrows all of `self`.
        let buf = std::mem::take(&mut self.buf);
        let r = self.journal().and_then(|j| {
            let mut r = j.write_all(&buf);
            if r.is_ok() && sync {
                r = j.sync();
            }
            r.map_err(io_err(&path))
        });
        self.buf = buf;
        if let Err(e) = r {
            // A journal that could not even be created has nothing to cut back.
            self.dirty = self.journal.is_some();
            let _ = self.roll_back();
            return Err(e);
        }
        self.unsynced = !sync;
        self.len += self.buf.len() as u64;
        Ok(())
    }

    /// Whether an append to the journal succeeds now, appending nothing: writes [`PROBE_LEN`]
    /// bytes at the journal's end as a frame whose length runs past them (what a crash in
    /// the middle of an append leaves, dropped at start as a torn last frame), forces them
    /// to stable storage, and cuts them off again (before the next append, if the cut fails).
    /// While degraded the loop calls this once a second, so the server finds out by itself
    /// that space is back, with no push or ack needed to try.
    pub fn probe_write(&mut self) -> Result<(), PersistError> {
        self.roll_back()?;
        let path = self.journal_path();
        let mut probe = [0u8; PROBE_LEN];
        probe[..4].copy_from_slice(&(2 * PROBE_LEN as u32).to_be_bytes());
        let j = self.journal()?;
        let r = j
            .write_all(&probe)
            .and_then(|()| j.sync())
            .map_err(io_err(&path));
        self.dirty = true;
        if r.is_ok() {
            // The fsync covered every byte before the probe too.
            self.unsynced = false;
            self.sync_failed = false;
        }
        let cut = self.roll_back();
        r.and(cut)
    }

    /// Forces the journal to stable storage. Until one succeeds after a failure, appends
    /// fail too ([`Store::commit`]).
    pub fn sync(&mut self) -> Result<(), PersistError> {
        if self.unsynced {
            let path = self.journal_path();
            let r = self.journal()?.sync().map_err(io_err(&path));
            self.sync_failed = r.is_err();
            r?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Starts a new journal and returns the generation a snapshot taken now must carry.
    /// Changes appended from now on go to the new journal. An empty journal is kept as it is
    /// (so retries of a failing snapshot do not pile up empty files).
    pub fn rotate(&mut self) -> Result<u64, PersistError> {
        self.roll_back()?;
        // Also the case of a journal not created yet: a snapshot of `gen` covers every older
        // journal, and this run's journal `gen` is created by the next append.
        if self.len == journal::HEADER_LEN as u64 {
            return Ok(self.gen);
        }
        self.sync()?;
        let gen = self.gen + 1;
        self.journal = Some(create_journal(self.disk.as_ref(), &self.dir, gen)?);
        self.gen = gen;
        self.len = journal::HEADER_LEN as u64;
        self.live_journals.push(gen);
        Ok(gen)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The disk writes go through (for snapshots written off the loop).
    pub fn disk(&self) -> Arc<dyn Disk> {
        self.disk.clone()
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

/// Creates journal `gen` with its header, durably. A file left half-made is removed.
fn create_journal(
    disk: &dyn Disk,
    dir: &Path,
    gen: u64,
) -> Result<Box<dyn DiskFile>, PersistError> {
    let path = dir.join(journal_name(gen));
    let made = (|| {
        let mut f = disk.create(&path)?;
        f.write_all(&journal::header(gen))?;
        f.sync()?;
        disk.sync_dir(dir)?;
        Ok(f)
    })();
    made.map_err(|e| {
        let _ = fs::remove_file(&path);
        io_err(&path)(e)
    })
}

/// Writes snapshot bytes atomically on the real disk; see [`write_snapshot_on`].
pub fn write_snapshot_file(dir: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    write_snapshot_on(&OsDisk, dir, bytes)
}

/// Writes snapshot bytes atomically: temp file, fsync, rename, fsync the directory. On
/// failure the temporary file is removed and the previous snapshot is untouched. Blocking;
/// the server runs it on a thread.
pub fn write_snapshot_on(disk: &dyn Disk, dir: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let dst = dir.join(SNAPSHOT);
    let r = (|| {
        let mut f = disk.create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync().map_err(io_err(&tmp))?;
        drop(f);
        disk.rename(&tmp, &dst).map_err(io_err(&dst))
    })();
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    disk.sync_dir(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod tests;
