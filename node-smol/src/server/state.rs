//! State loading: the data directory into a fresh [`Node`], upstream imports, snapshots.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use ddpush_proto::{upstream, Node, Recovery};
use tracing::{error, info, warn};

use super::clock::Clock;
use super::ServerError;
use crate::persist::{self, Disk, OsDisk, PersistError, Store};
use crate::settings::ServerConfig;

/// Loads the data directory into a fresh node through the core's [`Recovery`].
pub(crate) fn load(
    cfg: &ServerConfig,
    clock: &Clock,
    disk: Arc<dyn Disk>,
) -> Result<(Node, Store), ServerError> {
    let mut rec = Recovery::new(cfg.core.clone(), clock.now())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let t0 = Instant::now();
    let (store, report) = Store::open_on(&cfg.data_dir, disk, &mut rec)?;
    for (file, off) in &report.torn {
        warn!(
            file,
            offset = off,
            "dropped a torn last record left by a crash or a failed write"
        );
    }
    if let Some(bytes) = report.stale_tmp {
        warn!(
            bytes,
            "removed snapshot.tmp, a snapshot left half-written by a crash (never read)"
        );
    }
    if let Some(e) = &report.journal_error {
        error!(error = %e, "storage degraded at start: no space for this run's journal; the state was loaded, devices are served, pushes are refused (0xFF / HTTP 503) until a write succeeds");
    }
    let node = rec.finish();
    info!(
        snapshot_records = report.snapshot_records,
        replayed = report.replayed,
        clients = node.len(),
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "state loaded"
    );
    Ok((node, store))
}

/// `ddpushd import-ddpush FILE`: merges an upstream `nodeStatus.dat` into the data directory.
pub fn import(cfg: &ServerConfig, file: &std::path::Path) -> Result<usize, ServerError> {
    let clock = Clock::new();
    let bytes = std::fs::read(file)?;
    let records = upstream::read_node_status(&bytes).map_err(|source| ServerError::Import {
        file: file.display().to_string(),
        source,
    })?;
    let (mut node, mut store) = load(cfg, &clock, Arc::new(OsDisk))?;
    let n = records.len();
    let now = clock.now();
    for r in records {
        node.restore(now, r);
    }
    snapshot_now(&node, &mut store, &clock)?;
    Ok(n)
}

pub(super) fn snapshot_now(
    node: &Node,
    store: &mut Store,
    clock: &Clock,
) -> Result<usize, PersistError> {
    let gen = store.rotate()?;
    let bytes = persist::encode_snapshot_signed(
        gen,
        clock.now().0,
        &node.key_states(),
        &node.removal_floors(),
        node.records(),
    );
    persist::write_snapshot_on(store.disk().as_ref(), store.dir(), &bytes)?;
    store.snapshot_done(gen);
    Ok(bytes.len())
}
