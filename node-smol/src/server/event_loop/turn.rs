//! One turn's output, in the order that makes acceptance honest: journal the turn's changes
//! (fsync under `--fsync always`), then release held admin answers, then transmits, closes
//! and events. A `0x00` reply never leaves before the write that makes its push survive a crash.

use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_channel::TrySendError;
use ddpush_proto::{Change, Dest, Event, Payload, PushReply, Transmit};
use tracing::{debug, error, info, warn};

use super::super::state::snapshot_now;
use super::super::udp::MMSG;
use super::super::ServerError;
use super::Loop;
use crate::persist::Fsync;

impl Loop {
    /// Journals the turn's changes, then sends its transmits, closes and events.
    pub(super) fn flush(&mut self) {
        while let Some(c) = self.node.poll_change() {
            self.changes.push(c);
        }
        if !self.changes.is_empty() {
            let t = Instant::now();
            let mut ok = self.store.append(&self.changes).is_ok();
            if ok && self.cfg.fsync == Fsync::Always {
                ok = self.store.sync().is_ok();
                self.metrics.fsync_done(t.elapsed());
            }
            self.metrics.journal_writes.fetch_add(1, Ordering::Relaxed);
            if !ok && !self.journal_failed {
                error!("journal write failed: accepted pushes are answered 0xFF until it recovers");
            }
            self.journal_failed = !ok;
            self.metrics.journal_state(!ok);
            let now = self.clock.now();
            for c in &self.changes {
                if let Change::Cleared { uuid, .. } = c {
                    if let Some(t) = self.node.record(uuid).and_then(|r| r.last_push) {
                        self.metrics.push_acked(now.since(t));
                    }
                }
            }
            self.changes.clear();
        }
        for (tx, resp) in self.admin_out.drain(..) {
            let _ = tx.try_send(resp);
        }
        while let Some(t) = self.node.poll_transmit() {
            self.send(t);
        }
        self.send_udp();
        for (conn, bytes) in self.tcp_out.drain() {
            if let Some(h) = self.conns.get(&conn) {
                match h.tx.try_send(bytes) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        // A peer that does not read its replies: drop it rather than buffer
                        // without bound or stall anyone else.
                        self.metrics.stalled_closed.fetch_add(1, Ordering::Relaxed);
                        let _ = h.stream.get_ref().shutdown(Shutdown::Both);
                    }
                    Err(TrySendError::Closed(_)) => {}
                }
            }
        }
        while let Some(conn) = self.node.poll_close() {
            // Dropping the sender lets the writer flush what is queued, then shut down.
            self.conns.remove(&conn);
        }
        while let Some(e) = self.node.poll_event() {
            log_event(&e);
        }
    }

    fn send(&mut self, t: Transmit) {
        match t.dest {
            Dest::Udp(a) => {
                // Queued for one `sendmmsg` at the end of the turn's transmits.
                let b = &mut self.udp_batch;
                t.encode(&mut b.tx);
                b.tx_dest.push((socket2::SockAddr::from(a), b.tx.len()));
                if b.tx_dest.len() >= MMSG {
                    self.send_udp();
                }
            }
            Dest::Tcp(c) => {
                let out = self.tcp_out.entry(c).or_default();
                match t.payload {
                    Payload::Reply(PushReply::Accepted) if self.journal_failed => {
                        out.push(PushReply::Failed.byte())
                    }
                    _ => t.encode(out),
                }
            }
        }
    }

    /// Sends the queued datagrams. UDP is lossy by contract: one the kernel refuses stays
    /// pending and goes out again on the next heartbeat.
    fn send_udp(&mut self) {
        use std::os::fd::AsRawFd;
        let failed = self.udp_batch.flush(self.udp.get_ref().as_raw_fd());
        if failed > 0 {
            self.metrics
                .udp_send_errors
                .fetch_add(failed, Ordering::Relaxed);
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
