//! An app server's push pipeline on port 9999 (PROTOCOL.md 2.2), over one connection at a
//! time.
//!
//! # The rules
//!
//! - Requests go out in order, at most `window` unanswered on the connection. The server
//!   answers every request with one byte, in order, so the n-th reply byte answers the n-th
//!   request sent on that connection. A byte the protocol does not define, or one with nothing
//!   in flight, is a [`ReplyError`]: the connection cannot be trusted any more.
//! - Only a read reply byte is a verdict. When the connection ends (closed, failed, or a
//!   reply later than `reply_timeout`) the requests sent on it and not answered have an
//!   unknown fate: the server may have stored some of them. Every one of them is sent again,
//!   in the original order, on the next connection. That is safe for all three kinds: 0x10
//!   and 0x11 are idempotent, and 0x20 re-sent in order still ends at the last one ("last one
//!   wins"). Reporting one as lost instead would leave the caller a choice between losing it
//!   and re-sending it after newer ones, which breaks last-one-wins.
//! - Except the request the server refused by closing: the server closes a push connection
//!   only at a request whose payload is over its maximum, right after that request's header,
//!   having answered every earlier one, so that request is the oldest unanswered. It is
//!   reported [`PushOutcome::Closed`] and not re-sent when its payload is over `max_content`
//!   (the server's maximum, 500 by default; [`check_payload_len`]), or when it has been the
//!   oldest unanswered request on `max_attempts` connections that all ended without answering
//!   it (a server configured below `max_content`, or one that keeps failing at it).
//!
//! Before this module the `ddpush` client reported the oldest unanswered request `Closed` on
//! every close (so a crash or network failure could lose a push the caller could no longer
//! re-send in order), while the simulator's app server re-sent everything (so an over-long
//! payload was re-sent forever). The rule above keeps what was right in each.
//!
//! # Driving it
//!
//! 1. [`PushSession::new`], then [`push`](PushSession::push) requests (they get
//!    [`RequestId`]s in push order).
//! 2. When [`wants_connection`](PushSession::wants_connection), connect and call
//!    [`handle_connected`](PushSession::handle_connected).
//! 3. Write what [`poll_transmit`](PushSession::poll_transmit) encodes; feed reply bytes to
//!    [`handle_replies`](PushSession::handle_replies); a connection that ends is
//!    [`handle_closed`](PushSession::handle_closed); when the deadline from
//!    [`poll_timeout`](PushSession::poll_timeout) passes, call
//!    [`handle_timeout`](PushSession::handle_timeout), which says when to drop the
//!    connection.
//! 4. Drain verdicts with [`poll_outcome`](PushSession::poll_outcome); they come in
//!    [`RequestId`] order.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::codec::DEFAULT_MAX_CONTENT;
use crate::codec::{check_payload_len, PayloadLenError, PushMsg, PushReply, PushRequest};
use crate::time::Time;

/// The server's verdict on one push request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PushOutcome {
    /// Reply `0x00`: stored, and sent if the client is online.
    Accepted,
    /// Reply `0x01`: malformed request, or the server has no room for a new client.
    Rejected,
    /// Reply `0xFF`: the server could not store the request.
    Failed,
    /// No reply will come: the server closed the connection at this request (its payload is
    /// over the server's maximum, 500 bytes by default). It may not have been stored.
    Closed,
}

impl PushOutcome {
    /// Reads a reply byte; `None` for bytes the protocol does not define.
    pub fn from_byte(b: u8) -> Option<Self> {
        PushReply::from_byte(b).map(|r| match r {
            PushReply::Accepted => PushOutcome::Accepted,
            PushReply::Rejected => PushOutcome::Rejected,
            PushReply::Failed => PushOutcome::Failed,
        })
    }

    /// Whether the server stored the request.
    pub fn is_accepted(self) -> bool {
        self == PushOutcome::Accepted
    }

    /// A short lowercase word for logs and the CLI.
    pub fn label(self) -> &'static str {
        match self {
            PushOutcome::Accepted => "accepted",
            PushOutcome::Rejected => "rejected",
            PushOutcome::Failed => "failed",
            PushOutcome::Closed => "closed",
        }
    }
}

impl fmt::Display for PushOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A reply byte that cannot be matched to a request; the connection must be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not `0x00`, `0x01` or `0xFF`.
    #[error("unexpected reply byte 0x{0:02x}")]
    Undefined(u8),
    /// A reply with no request in flight.
    #[error("reply byte 0x{0:02x} with no request in flight")]
    Unsolicited(u8),
}

impl ReplyError {
    /// The offending byte.
    pub fn byte(self) -> u8 {
        match self {
            ReplyError::Undefined(b) | ReplyError::Unsolicited(b) => b,
        }
    }
}

/// Names a request pushed into a [`PushSession`]: 0, 1, 2... in push order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Settings of a [`PushSession`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushConfig {
    /// Most requests sent and not yet answered on the connection (at least 1).
    pub window: usize,
    /// A reply (or the first one, after a send to an idle connection) later than this ends
    /// the connection.
    pub reply_timeout: Duration,
    /// The server's largest 0x20 payload ([`DEFAULT_MAX_CONTENT`] unless configured): it
    /// closes the connection at a longer one.
    pub max_content: u16,
    /// Connections a request may be the oldest unanswered one on before it is given up as
    /// [`PushOutcome::Closed`] (at least 1; `u32::MAX` re-sends until answered).
    pub max_attempts: u32,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            window: 256,
            reply_timeout: Duration::from_secs(10),
            max_content: DEFAULT_MAX_CONTENT,
            max_attempts: 2,
        }
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    req: PushRequest,
    /// Connections that ended while this was the oldest unanswered request.
    strikes: u32,
}

/// An app server's push pipeline; see the [module docs](self) for the rules.
#[derive(Debug)]
pub struct PushSession {
    cfg: PushConfig,
    /// Unanswered requests in push order; the first `sent` went out on this connection.
    queue: VecDeque<Entry>,
    sent: usize,
    connected: bool,
    /// Since when a reply has been awaited (the last reply, or the send that ended idleness).
    waiting_since: Option<Time>,
    next_id: u64,
    outcomes: VecDeque<(RequestId, PushOutcome)>,
}

impl PushSession {
    /// An empty session, not connected.
    pub fn new(cfg: PushConfig) -> Self {
        PushSession {
            cfg,
            queue: VecDeque::new(),
            sent: 0,
            connected: false,
            waiting_since: None,
            next_id: 0,
            outcomes: VecDeque::new(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &PushConfig {
        &self.cfg
    }

    /// Queues a request; it goes out when the window has room.
    pub fn push(&mut self, req: PushRequest) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back(Entry {
            id,
            req,
            strikes: 0,
        });
        RequestId(id)
    }

    /// A new connection is up; every unanswered request will be sent on it.
    pub fn handle_connected(&mut self, now: Time) {
        self.connected = true;
        self.sent = 0;
        self.waiting_since = None;
        let _ = now;
    }

    /// Appends to `out` the requests the window has room for; returns how many. Nothing
    /// without a connection.
    pub fn poll_transmit(&mut self, now: Time, out: &mut Vec<u8>) -> usize {
        if !self.connected {
            return 0;
        }
        let room = self.cfg.window.max(1).saturating_sub(self.sent);
        let n = room.min(self.queue.len() - self.sent);
        if n > 0 && self.sent == 0 {
            self.waiting_since = Some(now);
        }
        for e in self.queue.range(self.sent..self.sent + n) {
            e.req.encode(out);
        }
        self.sent += n;
        n
    }

    /// Reply bytes read from the connection, each the verdict on the oldest request in
    /// flight. On an error the bytes before the bad one are applied and the connection must
    /// be dropped ([`handle_closed`](Self::handle_closed)).
    pub fn handle_replies(&mut self, now: Time, bytes: &[u8]) -> Result<(), ReplyError> {
        for &b in bytes {
            if self.sent == 0 {
                return Err(ReplyError::Unsolicited(b));
            }
            let outcome = PushOutcome::from_byte(b).ok_or(ReplyError::Undefined(b))?;
            self.answer(outcome);
            self.sent -= 1;
            self.waiting_since = Some(now);
        }
        Ok(())
    }

    /// The connection ended: the requests in flight are sent again on the next one, except
    /// the one the server refused by closing (see the module docs).
    pub fn handle_closed(&mut self, now: Time) {
        let _ = now;
        if !self.connected {
            return;
        }
        self.connected = false;
        self.waiting_since = None;
        let in_flight = std::mem::take(&mut self.sent);
        if in_flight == 0 {
            return;
        }
        let Some(head) = self.queue.front_mut() else {
            return;
        };
        head.strikes = head.strikes.saturating_add(1);
        let refused = matches!(&head.req.msg, PushMsg::Payload(p)
            if matches!(check_payload_len(p.len(), self.cfg.max_content),
                Err(PayloadLenError::TooLong { .. })));
        if refused || head.strikes >= self.cfg.max_attempts.max(1) {
            self.answer(PushOutcome::Closed);
        }
    }

    /// Checks the reply deadline. `true`: a reply is overdue, the session has given up on the
    /// connection (as [`handle_closed`](Self::handle_closed) does); drop it.
    #[must_use]
    pub fn handle_timeout(&mut self, now: Time) -> bool {
        match self.poll_timeout() {
            Some(d) if now >= d => {
                self.handle_closed(now);
                true
            }
            _ => false,
        }
    }

    /// When a reply becomes overdue, while requests are in flight.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        if !self.connected || self.sent == 0 {
            return None;
        }
        self.waiting_since.map(|t| t + self.cfg.reply_timeout)
    }

    /// The next verdict, in [`RequestId`] order.
    #[must_use]
    pub fn poll_outcome(&mut self) -> Option<(RequestId, PushOutcome)> {
        self.outcomes.pop_front()
    }

    /// Whether requests wait and no connection is up.
    pub fn wants_connection(&self) -> bool {
        !self.connected && !self.queue.is_empty()
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Requests sent on this connection and not answered.
    pub fn in_flight(&self) -> usize {
        self.sent
    }

    /// Requests pushed and not yet given a verdict (sent or not).
    pub fn unanswered(&self) -> usize {
        self.queue.len()
    }

    fn answer(&mut self, outcome: PushOutcome) {
        if let Some(e) = self.queue.pop_front() {
            self.outcomes.push_back((RequestId(e.id), outcome));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Content, Uuid, UP_HEADER_LEN};
    use proptest::prelude::*;

    const U: Uuid = Uuid([1; 16]);

    fn bits(b: u64) -> PushRequest {
        PushRequest {
            app_id: 1,
            uuid: U,
            msg: PushMsg::Bits(b),
        }
    }

    fn payload(n: usize) -> PushRequest {
        PushRequest {
            app_id: 1,
            uuid: U,
            msg: PushMsg::Payload(Content::new(vec![b'x'; n]).unwrap()),
        }
    }

    fn t(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    fn outcomes(s: &mut PushSession) -> Vec<(u64, PushOutcome)> {
        std::iter::from_fn(|| s.poll_outcome())
            .map(|(i, o)| (i.0, o))
            .collect()
    }

    fn cfg(window: usize) -> PushConfig {
        PushConfig {
            window,
            ..PushConfig::default()
        }
    }

    #[test]
    fn replies_answer_requests_in_order_within_the_window() {
        let mut s = PushSession::new(cfg(3));
        for i in 0..5 {
            assert_eq!(s.push(bits(i)), RequestId(i));
        }
        assert!(s.wants_connection());
        s.handle_connected(t(0));
        let mut out = Vec::new();
        assert_eq!(s.poll_transmit(t(0), &mut out), 3);
        assert_eq!(
            out,
            [bits(0), bits(1), bits(2)].map(|r| r.to_vec()).concat()
        );
        out.clear();
        assert_eq!(s.poll_transmit(t(0), &mut out), 0, "window full");
        s.handle_replies(t(1), &[0x00, 0x01]).unwrap();
        assert_eq!(s.poll_transmit(t(1), &mut out), 2, "two slots freed");
        s.handle_replies(t(2), &[0xFF, 0x00, 0x00]).unwrap();
        assert_eq!(
            outcomes(&mut s),
            vec![
                (0, PushOutcome::Accepted),
                (1, PushOutcome::Rejected),
                (2, PushOutcome::Failed),
                (3, PushOutcome::Accepted),
                (4, PushOutcome::Accepted),
            ]
        );
        assert_eq!(
            s.handle_replies(t(3), &[0]),
            Err(ReplyError::Unsolicited(0))
        );
        assert_eq!(s.unanswered(), 0);
    }

    #[test]
    fn an_undefined_reply_byte_is_an_error() {
        let mut s = PushSession::new(cfg(4));
        s.push(bits(1));
        s.push(bits(2));
        s.handle_connected(t(0));
        let _ = s.poll_transmit(t(0), &mut Vec::new());
        assert_eq!(
            s.handle_replies(t(1), &[0x00, 0x07]),
            Err(ReplyError::Undefined(7))
        );
        assert_eq!(outcomes(&mut s), vec![(0, PushOutcome::Accepted)]);
    }

    #[test]
    fn a_close_resends_every_unanswered_request_in_order() {
        let mut s = PushSession::new(cfg(8));
        for i in 0..4 {
            s.push(bits(i));
        }
        s.handle_connected(t(0));
        let _ = s.poll_transmit(t(0), &mut Vec::new());
        s.handle_replies(t(1), &[0x00]).unwrap();
        s.handle_closed(t(2));
        assert_eq!(outcomes(&mut s), vec![(0, PushOutcome::Accepted)]);
        assert!(s.wants_connection());
        s.handle_connected(t(3));
        let mut out = Vec::new();
        assert_eq!(s.poll_transmit(t(3), &mut out), 3);
        assert_eq!(
            out,
            [bits(1), bits(2), bits(3)].map(|r| r.to_vec()).concat()
        );
        s.handle_replies(t(4), &[0, 0, 0]).unwrap();
        assert_eq!(outcomes(&mut s).len(), 3);
    }

    #[test]
    fn the_payload_the_server_refused_by_closing_is_closed_not_resent() {
        let mut s = PushSession::new(cfg(8));
        s.push(bits(1));
        s.push(payload(501));
        s.push(bits(2));
        s.push(payload(0));
        s.handle_connected(t(0));
        let mut out = Vec::new();
        let _ = s.poll_transmit(t(0), &mut out);
        assert_eq!(out.len(), 29 + (UP_HEADER_LEN + 501) + 29 + UP_HEADER_LEN);
        s.handle_replies(t(1), &[0x00]).unwrap();
        s.handle_closed(t(1));
        s.handle_connected(t(2));
        out.clear();
        assert_eq!(s.poll_transmit(t(2), &mut out), 2, "the requests after it");
        assert_eq!(out, [bits(2), payload(0)].map(|r| r.to_vec()).concat());
        s.handle_replies(t(3), &[0x00, 0x01]).unwrap();
        assert_eq!(
            outcomes(&mut s),
            vec![
                (0, PushOutcome::Accepted),
                (1, PushOutcome::Closed),
                (2, PushOutcome::Accepted),
                (3, PushOutcome::Rejected),
            ]
        );
    }

    #[test]
    fn a_request_at_the_head_of_max_attempts_closes_is_given_up() {
        let mut s = PushSession::new(cfg(8));
        s.push(bits(1));
        s.push(bits(2));
        for k in 0..2 {
            assert_eq!(s.poll_outcome(), None, "attempt {k}");
            s.handle_connected(t(k));
            let _ = s.poll_transmit(t(k), &mut Vec::new());
            s.handle_closed(t(k));
        }
        assert_eq!(s.poll_outcome(), Some((RequestId(0), PushOutcome::Closed)));
        assert_eq!(s.unanswered(), 1, "the next one is sent again");
        // A close with nothing in flight strikes nobody.
        s.handle_connected(t(5));
        s.handle_closed(t(5));
        s.handle_connected(t(6));
        assert_eq!(s.poll_transmit(t(6), &mut Vec::new()), 1);
        s.handle_replies(t(7), &[0]).unwrap();
        assert_eq!(
            s.poll_outcome(),
            Some((RequestId(1), PushOutcome::Accepted))
        );
    }

    #[test]
    fn a_late_reply_ends_the_connection_and_the_requests_are_sent_again() {
        let mut s = PushSession::new(PushConfig {
            window: 4,
            reply_timeout: Duration::from_secs(5),
            max_attempts: u32::MAX,
            ..PushConfig::default()
        });
        assert_eq!(s.poll_timeout(), None);
        s.push(bits(1));
        s.push(bits(2));
        s.handle_connected(t(0));
        let _ = s.poll_transmit(t(100), &mut Vec::new());
        assert_eq!(s.poll_timeout(), Some(t(5_100)));
        s.handle_replies(t(3_000), &[0]).unwrap();
        assert_eq!(
            s.poll_timeout(),
            Some(t(8_000)),
            "counted from the last reply"
        );
        assert!(!s.handle_timeout(t(7_999)));
        assert!(s.handle_timeout(t(8_000)));
        assert!(!s.is_connected());
        assert_eq!(s.poll_timeout(), None);
        s.handle_connected(t(9_000));
        assert_eq!(s.poll_transmit(t(9_000), &mut Vec::new()), 1);
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Push(u8),
        Reply(u8),
        Close,
    }

    proptest! {
        /// Against a server that answers in order and may drop the connection anywhere, with
        /// unlimited attempts: every request ends with exactly one verdict, verdicts come in
        /// push order, each connection carries the unanswered requests in push order, and a
        /// verdict is only ever a reply byte the server sent for that request.
        #[test]
        fn every_request_gets_one_verdict_in_order(evs in proptest::collection::vec(
            prop_oneof![
                3 => (0u8..3).prop_map(Ev::Push),
                4 => prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8)].prop_map(Ev::Reply),
                1 => Just(Ev::Close),
            ], 1..80),
            window in 1usize..6,
        ) {
            let mut s = PushSession::new(PushConfig {
                window,
                max_attempts: u32::MAX,
                ..PushConfig::default()
            });
            let mut pushed = 0u64;
            // What the fake server has read on the current connection and not answered.
            let mut server_queue: VecDeque<Vec<u8>> = VecDeque::new();
            let mut verdicts: Vec<(u64, PushOutcome)> = Vec::new();
            let mut replied: Vec<(Vec<u8>, u8)> = Vec::new();
            let mut reqs: Vec<Vec<u8>> = Vec::new();
            let mut clock = 0u64;
            for ev in evs {
                clock += 1;
                let now = t(clock);
                if s.wants_connection() {
                    s.handle_connected(now);
                    server_queue.clear();
                }
                match ev {
                    Ev::Push(k) => {
                        let r = bits(u64::from(k) << 8 | pushed);
                        reqs.push(r.to_vec());
                        prop_assert_eq!(s.push(r), RequestId(pushed));
                        pushed += 1;
                    }
                    Ev::Reply(b) => {
                        if let Some(r) = server_queue.pop_front() {
                            replied.push((r, b));
                            s.handle_replies(now, &[b]).unwrap();
                        }
                    }
                    Ev::Close => {
                        s.handle_closed(now);
                        server_queue.clear();
                    }
                }
                if s.wants_connection() {
                    s.handle_connected(now);
                    server_queue.clear();
                }
                let mut out = Vec::new();
                let n = s.poll_transmit(now, &mut out);
                prop_assert_eq!(out.len(), n * 29);
                for c in out.chunks(29) {
                    server_queue.push_back(c.to_vec());
                }
                prop_assert!(s.in_flight() <= window);
                prop_assert_eq!(s.in_flight(), server_queue.len());
                verdicts.extend(std::iter::from_fn(|| s.poll_outcome()).map(|(i, o)| (i.0, o)));
            }
            // Drain: the server answers everything.
            for _ in 0..(4 * pushed + 4) {
                if s.wants_connection() {
                    s.handle_connected(t(clock));
                    server_queue.clear();
                }
                let mut out = Vec::new();
                let _ = s.poll_transmit(t(clock), &mut out);
                server_queue.extend(out.chunks(29).map(<[u8]>::to_vec));
                if let Some(r) = server_queue.pop_front() {
                    replied.push((r, 0));
                    s.handle_replies(t(clock), &[0]).unwrap();
                }
                verdicts.extend(std::iter::from_fn(|| s.poll_outcome()).map(|(i, o)| (i.0, o)));
            }
            prop_assert_eq!(s.unanswered(), 0);
            let ids: Vec<u64> = verdicts.iter().map(|v| v.0).collect();
            prop_assert_eq!(ids, (0..pushed).collect::<Vec<_>>());
            // Each verdict is the last byte the server sent for that request.
            for (id, o) in verdicts {
                let last = replied.iter().rev().find(|(r, _)| *r == reqs[id as usize]).map(|x| x.1);
                prop_assert_eq!(last.and_then(PushOutcome::from_byte), Some(o));
            }
        }
    }
}
