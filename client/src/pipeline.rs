//! The pipelining logic shared by the blocking and the async pusher, without any I/O.
//!
//! Requests go out in order, at most `window` unanswered at a time; reply bytes come back in
//! the same order (PROTOCOL.md 2.2), so the n-th reply byte answers the n-th request sent on
//! the connection. When the connection closes with requests in flight, the oldest one is
//! reported [`PushOutcome::Closed`] (it is the one the server stopped at, for example a
//! payload over its maximum) and the ones after it are sent again on a new connection.

use std::io;

use ddpush_proto::PushRequest;

use crate::pusher::{is_closed, is_timeout, PushError, PushOutcome};

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

pub(crate) struct Pipeline<'a> {
    reqs: &'a [PushRequest],
    window: usize,
    /// Index of the next request to encode.
    next_send: usize,
    /// Index of the oldest request without an outcome.
    next_reply: usize,
}

impl<'a> Pipeline<'a> {
    pub(crate) fn new(reqs: &'a [PushRequest], window: usize) -> Self {
        Pipeline {
            reqs,
            window: window.max(1),
            next_send: 0,
            next_reply: 0,
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.next_reply == self.reqs.len()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.next_send - self.next_reply
    }

    /// Encodes the requests the window has room for into `out` (cleared first).
    pub(crate) fn fill(&mut self, out: &mut Vec<u8>) {
        out.clear();
        while self.next_send < self.reqs.len() && self.in_flight() < self.window {
            self.reqs[self.next_send].encode(out);
            self.next_send += 1;
        }
    }

    /// Consumes reply bytes, reporting one outcome per byte.
    pub(crate) fn on_replies(
        &mut self,
        bytes: &[u8],
        on_result: &mut impl FnMut(usize, PushOutcome),
    ) -> Result<(), PushError> {
        for &b in bytes {
            if self.in_flight() == 0 {
                return Err(PushError::BadReply(b));
            }
            let outcome = PushOutcome::from_byte(b).ok_or(PushError::BadReply(b))?;
            on_result(self.next_reply, outcome);
            self.next_reply += 1;
        }
        Ok(())
    }

    /// Applies one read result, the same way for the blocking and the async pusher. After a
    /// failed write (`closed`), replies already on the way are read until the close.
    pub(crate) fn on_read(
        &mut self,
        r: io::Result<usize>,
        rbuf: &[u8],
        closed: bool,
        on_result: &mut impl FnMut(usize, PushOutcome),
    ) -> Result<ReadStep, PushError> {
        match r {
            Ok(0) => Ok(ReadStep::Closed),
            Ok(n) => {
                self.on_replies(&rbuf[..n], on_result)?;
                Ok(if closed {
                    ReadStep::More
                } else {
                    ReadStep::Done
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(ReadStep::More),
            Err(e) if is_closed(&e) => Ok(ReadStep::Closed),
            Err(e) if is_timeout(&e) => Err(PushError::Timeout),
            Err(e) => Err(PushError::Io(e)),
        }
    }

    /// The connection closed: the oldest request in flight gets `Closed`, later ones will be
    /// sent again by the next [`fill`](Self::fill).
    pub(crate) fn on_close(&mut self, on_result: &mut impl FnMut(usize, PushOutcome)) {
        if self.in_flight() == 0 {
            return;
        }
        on_result(self.next_reply, PushOutcome::Closed);
        self.next_reply += 1;
        self.next_send = self.next_reply;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PushRequestExt;
    use ddpush_proto::Uuid;

    #[test]
    fn window_replies_and_close_resends_the_rest() {
        let u = Uuid([1; 16]);
        let reqs: Vec<_> = (0..5).map(|i| PushRequest::bits(u, i)).collect();
        let mut p = Pipeline::new(&reqs, 3);
        let mut out = Vec::new();
        let mut got = Vec::new();
        let mut rec = |i: usize, o: PushOutcome| got.push((i, o));
        p.fill(&mut out);
        assert_eq!(out.len(), 3 * 29);
        p.on_replies(&[0x00, 0x01], &mut rec).unwrap();
        p.fill(&mut out);
        assert_eq!(out.len(), 2 * 29, "two slots freed");
        p.on_close(&mut rec);
        // Request 2 was the oldest unanswered: closed. 3 and 4 go out again.
        p.fill(&mut out);
        assert_eq!(out.len(), 2 * 29);
        p.on_replies(&[0x00, 0xFF], &mut rec).unwrap();
        assert!(p.done());
        assert!(p.on_replies(&[0], &mut rec).is_err(), "unsolicited byte");
        assert_eq!(
            got,
            vec![
                (0, PushOutcome::Accepted),
                (1, PushOutcome::Rejected),
                (2, PushOutcome::Closed),
                (3, PushOutcome::Accepted),
                (4, PushOutcome::Failed),
            ]
        );
    }
}
