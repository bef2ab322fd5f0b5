//! What an I/O result means for the core's [`PushSession`], the same for the blocking and the
//! async pusher. The pipeline's rules (reply matching, what a closed connection means, which
//! requests are sent again) are the session's; this module only classifies I/O results and
//! feeds a slice of requests into the session as its window frees.

use std::io;
use std::time::{Duration, Instant};

use ddpush_proto::session::{PushConfig, PushSession};
use ddpush_proto::{PushRequest, Time};

use crate::pusher::{is_closed, is_timeout, PushError, PushOutcome, PusherConfig};

/// What one read on the push connection means for the pipeline.
pub(crate) enum ReadStep {
    /// Read again.
    More,
    /// Replies consumed; go back to sending.
    Done,
    /// The server closed the connection.
    Closed,
}

/// What a write error means: `Ok(true)` the connection is closed (replies already sent are
/// still read), otherwise the error to report.
pub(crate) fn on_write_error(e: io::Error) -> Result<bool, PushError> {
    if is_closed(&e) {
        Ok(true)
    } else if is_timeout(&e) {
        Err(PushError::Timeout)
    } else {
        Err(PushError::Io(e))
    }
}

/// The session settings for a pusher's settings: `io_timeout` bounds each wait for a reply.
pub(crate) fn session_config(cfg: &PusherConfig) -> PushConfig {
    PushConfig {
        window: cfg.window.max(1),
        reply_timeout: cfg.io_timeout,
        ..PushConfig::default()
    }
}

/// One `push_many` call: a session, the requests not yet handed to it, and a clock.
pub(crate) struct Batch<'a> {
    pub(crate) session: PushSession,
    reqs: &'a [PushRequest],
    next: usize,
    epoch: Instant,
}

impl<'a> Batch<'a> {
    pub(crate) fn new(reqs: &'a [PushRequest], cfg: &PusherConfig, connected: bool) -> Self {
        let mut b = Batch {
            session: PushSession::new(session_config(cfg)),
            reqs,
            next: 0,
            epoch: Instant::now(),
        };
        if connected {
            // A kept connection has nothing in flight between calls: as good as a new one.
            b.session.handle_connected(b.now());
        }
        b
    }

    pub(crate) fn now(&self) -> Time {
        Time::from_millis(u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether every request has its verdict.
    pub(crate) fn done(&self) -> bool {
        self.next == self.reqs.len() && self.session.unanswered() == 0
    }

    /// Hands the session as many requests as its window can take, and encodes what goes out
    /// into `out` (cleared first). Request ids are indices into the slice.
    pub(crate) fn fill(&mut self, out: &mut Vec<u8>) {
        let window = self.session.config().window;
        while self.next < self.reqs.len() && self.session.unanswered() < window {
            self.session.push(self.reqs[self.next].clone());
            self.next += 1;
        }
        out.clear();
        let now = self.now();
        let _ = self.session.poll_transmit(now, out);
    }

    /// How long the next read may wait for a reply.
    pub(crate) fn read_wait(&self) -> Duration {
        let now = self.now();
        self.session
            .poll_timeout()
            .map_or(self.session.config().reply_timeout, |d| d.since(now))
            .max(Duration::from_millis(1))
    }

    /// Applies one read result. After a failed write (`closed`), replies already on the way
    /// are read until the close.
    pub(crate) fn on_read(
        &mut self,
        r: io::Result<usize>,
        rbuf: &[u8],
        closed: bool,
        on_result: &mut impl FnMut(usize, PushOutcome),
    ) -> Result<ReadStep, PushError> {
        let now = self.now();
        let step = match r {
            Ok(0) => ReadStep::Closed,
            Ok(n) => {
                self.session
                    .handle_replies(now, &rbuf[..n])
                    .map_err(|e| PushError::BadReply(e.byte()))?;
                if closed {
                    ReadStep::More
                } else {
                    ReadStep::Done
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadStep::More,
            Err(e) if is_closed(&e) => ReadStep::Closed,
            Err(e) if is_timeout(&e) => {
                if self.session.handle_timeout(now) {
                    return Err(PushError::Timeout);
                }
                ReadStep::More
            }
            Err(e) => return Err(PushError::Io(e)),
        };
        self.drain(on_result);
        Ok(step)
    }

    /// The connection ended.
    pub(crate) fn on_close(&mut self, on_result: &mut impl FnMut(usize, PushOutcome)) {
        let now = self.now();
        self.session.handle_closed(now);
        self.drain(on_result);
    }

    /// A new connection is up.
    pub(crate) fn on_connected(&mut self) {
        let now = self.now();
        self.session.handle_connected(now);
    }

    fn drain(&mut self, on_result: &mut impl FnMut(usize, PushOutcome)) {
        while let Some((id, o)) = self.session.poll_outcome() {
            // Ids are 0, 1, 2... in push order, and requests are pushed in slice order.
            on_result(usize::try_from(id.0).unwrap_or(usize::MAX), o);
        }
    }
}
