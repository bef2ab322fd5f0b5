//! One turn's output through the core's [`ddpush_proto::Driver`]: commit the turn's changes
//! (fsync under `--fsync always`), and only then release held admin answers, transmits, closes
//! and events. The driver, not this file, decides whether a push was accepted: a failed write
//! turns every push of the turn into `0xFF` / HTTP 503 before anything leaves.

use std::sync::atomic::Ordering;
use std::time::Instant;

use ddpush_proto::{Change, Commit, Event};
use tracing::{debug, error, info, warn};

use crate::admin;

use super::super::state::snapshot_now;
use super::super::ServerError;
use super::Loop;
use crate::persist::Fsync;

impl Loop {
    /// Ends the turn through the core's driver: commit the changes (the commit's outcome
    /// decides every push of the turn), then release admin answers, transmits, closes, events.
    pub(super) fn flush(&mut self) {
        let t = Instant::now();
        let always = self.cfg.fsync == Fsync::Always;
        let (store, acked) = (&mut self.store, &mut self.acked);
        let outcome = self.driver.commit(&mut self.node, |changes| {
            for c in changes {
                if let Change::Cleared { uuid, .. } = c {
                    acked.push(*uuid);
                }
            }
            store.commit(changes, always)
        });
        let written = !matches!(outcome, Commit::Failed { .. });
        match outcome {
            Commit::Nothing => {}
            Commit::Written { recovered } => {
                self.metrics.journal_writes.fetch_add(1, Ordering::Relaxed);
                if always {
                    self.metrics.fsync_done(t.elapsed());
                }
                if recovered {
                    info!("storage recovered: journal writes succeed again; pushes are accepted");
                }
            }
            Commit::Failed {
                error,
                first,
                refused,
            } => {
                self.metrics
                    .storage_failed_writes
                    .fetch_add(1, Ordering::Relaxed);
                if first {
                    error!(error = %error, refused, "storage degraded: a journal write failed; pushes are refused (0xFF / HTTP 503) until a write succeeds");
                }
            }
        }
        self.metrics.journal_state(!self.driver.storage_ok());
        let now = self.clock.now();
        for uuid in self.acked.drain(..) {
            if let Some(t) = self.node.record(&uuid).and_then(|r| r.last_push) {
                self.metrics.push_acked(now.since(t));
            }
        }
        let replies: Vec<_> = std::iter::from_fn(|| self.driver.poll_reply()).collect();
        for (tx, ans) in self.admin_out.drain(..) {
            let resp = match ans {
                admin::Answer::Now(r) => r,
                admin::Answer::AfterCommit(held) => held.finish(&replies),
                admin::Answer::AfterWrite(held) => held.finish(written),
            };
            let _ = tx.try_send(resp);
        }
        self.sockets.output(&mut self.node);
        while let Some(e) = self.node.poll_event() {
            log_event(&e);
        }
    }

    /// Flushes the last turn and writes the final snapshot.
    pub(in crate::server) fn shutdown(mut self) -> Result<(), ServerError> {
        self.flush();
        let t = Instant::now();
        let size = snapshot_now(&self.node, &mut self.store, &self.clock)?;
        let s = self.node.stats();
        info!(
            clients = s.clients,
            online = s.online,
            pushes_accepted = s.pushes_accepted,
            heartbeats = s.heartbeats,
            resends = s.resends,
            acks = s.acks,
            snapshot_bytes = size,
            snapshot_ms = t.elapsed().as_millis() as u64,
            "ddpushd stopped"
        );
        Ok(())
    }
}

fn log_event(e: &Event) {
    match e {
        Event::Limited { limit } => warn!(limit = limit.label(), "abuse limit hit (first time)"),
        Event::CapacityReached => warn!("max-clients reached: new uuids are refused"),
        Event::Closed { conn, reason } => debug!(conn, ?reason, "connection closed"),
        other => tracing::trace!(?other),
    }
}
