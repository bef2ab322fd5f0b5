//! The few file operations the store performs, behind a trait so tests can make them fail.
//!
//! [`OsDisk`] is the real thing. [`FailingDisk`] wraps it for fault-injection tests of the real
//! server loop: it fails the N-th write, or every write while "full", each time after writing
//! only half of the bytes, which is what a disk filling up mid-write does; or it makes every
//! sync slow, so each `--fsync always` turn takes as long as on a struggling disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A file the store writes: a journal or a snapshot being written.
pub trait DiskFile: Send {
    /// Writes all of `buf` at the current position (or fails, possibly after a part of it).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Forces written data to stable storage.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes and continues writing there.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// Where the store's files are created.
pub trait Disk: Send + Sync {
    /// Creates (or empties) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Renames a file over another, atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's files.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsDisk;

struct OsFile(File);

impl DiskFile for OsFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)?;
        self.0.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

impl Disk for OsDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        Ok(Box::new(OsFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// The fault plan a [`FailingDisk`] follows; shared with the test that steers it.
#[derive(Debug, Default)]
pub struct Faults {
    /// Writes attempted so far (every `write_all`, journal and snapshot alike).
    pub writes: AtomicU64,
    /// The write number (1-based, counting from the start) that fails once; 0 for none.
    pub fail_write: AtomicU64,
    /// While set, every write and sync fails, as on a full disk.
    pub full: AtomicBool,
    /// While set, every sync fails and writes succeed: a filesystem that takes the bytes but
    /// cannot write them back (thin provisioning, a failing device).
    pub sync_fails: AtomicBool,
    /// Every sync takes this many milliseconds more (it still succeeds): a slow device, as a
    /// loaded or nearly full disk is under `--fsync always`.
    pub sync_delay_ms: AtomicU64,
    /// Writes that failed.
    pub failed: AtomicU64,
}

impl Faults {
    /// Fails the `n`-th write from now (1 = the next one).
    pub fn fail_nth_from_now(&self, n: u64) {
        let done = self.writes.load(Ordering::SeqCst);
        self.fail_write.store(done + n, Ordering::SeqCst);
    }

    /// Makes the disk full (every write fails) or gives the space back.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// Makes every sync take `ms` milliseconds more (0: as fast as the real disk).
    pub fn set_sync_delay_ms(&self, ms: u64) {
        self.sync_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes every sync fail (writes still succeed), or work again.
    pub fn set_sync_fails(&self, fails: bool) {
        self.sync_fails.store(fails, Ordering::SeqCst);
    }
}

/// An [`OsDisk`] that fails writes as its [`Faults`] say (for tests).
#[derive(Clone, Debug, Default)]
pub struct FailingDisk {
    /// The plan; clone the `Arc` to steer it from a test.
    pub faults: Arc<Faults>,
}

struct FailingFile {
    inner: OsFile,
    faults: Arc<Faults>,
}

fn enospc() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "No space left on device (injected)",
    )
}

impl DiskFile for FailingFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let n = self.faults.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = self.faults.full.load(Ordering::SeqCst)
            || n == self.faults.fail_write.load(Ordering::SeqCst);
        if fail {
            self.faults.failed.fetch_add(1, Ordering::SeqCst);
            // Half of it lands, as when the disk fills mid-write.
            self.inner.write_all(&buf[..buf.len() / 2])?;
            return Err(enospc());
        }
        self.inner.write_all(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        let delay = self.faults.sync_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        if self.faults.full.load(Ordering::SeqCst) {
            return Err(enospc());
        }
        if self.faults.sync_fails.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "Input/output error (injected fsync failure)",
            ));
        }
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

impl Disk for FailingDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        Ok(Box::new(FailingFile {
            inner: OsFile(f),
            faults: self.faults.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        OsDisk.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsDisk.sync_dir(dir)
    }
}
