//! A device SDK's session (PROTOCOL.md 4.8), over one link at a time: a UDP socket or a TCP
//! connection to port 9966.
//!
//! The rules, as the real SDKs behave:
//! - A heartbeat goes out as soon as a link is up (at start and after every new socket or
//!   connection, so the server learns the new source port or connection at once), then
//!   whenever `heartbeat_interval` (50 s) has passed since the last packet sent, acks included.
//! - Every 0x10/0x11/0x20 received is acked at once, on the link it arrived on, before the app
//!   sees it ([`ack_for`]); a 0x11 ack echoes the 8 bytes received. A heartbeat reply is not
//!   acked.
//! - After a socket error or a closed connection, a new link is opened `retry_delay` (1 s)
//!   later; on UDP that is a new socket, so the source port changes.
//!
//! # Driving it
//!
//! 1. [`DeviceSession::new`]; it asks for a link at once with [`DeviceEvent::Connect`].
//! 2. On `Connect`, open a socket or connection and call [`handle_connected`], or
//!    [`handle_link_error`] if that failed.
//! 3. Feed what arrives: [`handle_datagram`] (UDP) or [`handle_stream`] (TCP bytes in any
//!    split); a failing or closed link is [`handle_link_error`]; when the deadline from
//!    [`poll_timeout`] passes, [`handle_timeout`].
//! 4. After each input, drain [`poll_transmit`] first (send each packet on the current link;
//!    the acks of what just arrived are there), then [`poll_event`].
//!
//! [`handle_connected`]: DeviceSession::handle_connected
//! [`handle_link_error`]: DeviceSession::handle_link_error
//! [`handle_datagram`]: DeviceSession::handle_datagram
//! [`handle_stream`]: DeviceSession::handle_stream
//! [`handle_timeout`]: DeviceSession::handle_timeout
//! [`poll_timeout`]: DeviceSession::poll_timeout
//! [`poll_transmit`]: DeviceSession::poll_transmit
//! [`poll_event`]: DeviceSession::poll_event

use std::collections::VecDeque;
use std::time::Duration;

use crate::codec::{DeviceMsg, DevicePacket, DownMsg, DownPacket, InvalidPacket, Uuid};
use crate::config::HEARTBEAT_INTERVAL;
use crate::stream::DownStreamDecoder;
use crate::time::Time;

/// The SDKs' wait before a new socket or connection after a failure.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The ack a device SDK sends for a message, at once: `None` for a heartbeat reply.
///
/// ```
/// use ddpush_proto::session::ack_for;
/// use ddpush_proto::{DeviceMsg, DownMsg};
///
/// assert_eq!(ack_for(&DownMsg::Bits(5)), Some(DeviceMsg::AckBits(5)));
/// assert_eq!(ack_for(&DownMsg::HeartbeatReply), None);
/// ```
pub fn ack_for(msg: &DownMsg) -> Option<DeviceMsg> {
    match msg {
        DownMsg::HeartbeatReply => None,
        DownMsg::Notify => Some(DeviceMsg::AckNotify),
        DownMsg::Bits(m) => Some(DeviceMsg::AckBits(*m)),
        DownMsg::Payload(_) => Some(DeviceMsg::AckPayload),
    }
}

/// Who the device is and its timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The device's uuid (the SDKs use MD5 of the user name, [`Uuid::from_user`]).
    pub uuid: Uuid,
    /// The appId byte of its heartbeats and acks.
    pub app_id: u8,
    /// Heartbeat interval, counted from the last packet sent ([`HEARTBEAT_INTERVAL`]).
    pub heartbeat_interval: Duration,
    /// Wait before a new link after a failure ([`RETRY_DELAY`]).
    pub retry_delay: Duration,
}

impl DeviceConfig {
    /// The SDK's defaults for `uuid`: appId 1, 50 s interval, 1 s retry.
    pub fn new(uuid: Uuid) -> Self {
        DeviceConfig {
            uuid,
            app_id: 1,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            retry_delay: RETRY_DELAY,
        }
    }
}

/// What the session tells its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// Open a new link now, then call [`DeviceSession::handle_connected`] (or
    /// [`DeviceSession::handle_link_error`] if it could not be opened).
    Connect,
    /// A message for the app. A 0x10/0x11/0x20 has already been queued for acking.
    Message(DownPacket),
    /// A datagram or frame the codec refused; dropped.
    Invalid(InvalidPacket),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// No link; a new one is asked for at this time (`None`: already asked for).
    Down(Option<Time>),
    Up,
}

/// A device SDK's session; see the [module docs](self) for the rules and the call order.
#[derive(Debug)]
pub struct DeviceSession {
    cfg: DeviceConfig,
    link: Link,
    /// The latest time an input gave.
    now: Time,
    /// When the last packet went out on any link (heartbeats and acks).
    last_sent: Option<Time>,
    out: VecDeque<DeviceMsg>,
    heartbeat_queued: bool,
    events: VecDeque<DeviceEvent>,
    stream: DownStreamDecoder,
    heartbeats: u64,
    acks: u64,
}

impl DeviceSession {
    /// A session that asks for its first link at once.
    pub fn new(cfg: DeviceConfig) -> Self {
        DeviceSession {
            cfg,
            link: Link::Down(None),
            now: Time::ZERO,
            last_sent: None,
            out: VecDeque::new(),
            heartbeat_queued: false,
            events: VecDeque::from([DeviceEvent::Connect]),
            stream: DownStreamDecoder::new(),
            heartbeats: 0,
            acks: 0,
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// A new link is up: the heartbeat for it is queued at once. Anything queued for an older
    /// link is dropped (an ack belongs to the link its message came on).
    pub fn handle_connected(&mut self, now: Time) {
        self.advance(now);
        self.reset_link();
        self.link = Link::Up;
        self.queue_heartbeat();
    }

    /// The link failed or the peer closed it: a new one is asked for after `retry_delay`.
    /// Packets not yet sent on it are dropped (the server re-sends what is not acked).
    pub fn handle_link_error(&mut self, now: Time) {
        self.advance(now);
        self.reset_link();
        self.link = Link::Down(Some(now + self.cfg.retry_delay));
    }

    /// One UDP datagram from the server.
    pub fn handle_datagram(&mut self, now: Time, datagram: &[u8]) {
        self.advance(now);
        if self.link != Link::Up {
            return;
        }
        let p = DownPacket::decode(datagram);
        self.receive(p);
    }

    /// Bytes from the TCP connection, in any split; every whole packet is handled in order.
    pub fn handle_stream(&mut self, now: Time, bytes: &[u8]) {
        self.advance(now);
        if self.link != Link::Up {
            return;
        }
        self.stream.extend(bytes);
        while let Some(p) = self.stream.next_packet() {
            self.receive(p);
        }
    }

    /// Fires the timers that are due: the heartbeat, or the request for a new link.
    pub fn handle_timeout(&mut self, now: Time) {
        self.advance(now);
        match self.link {
            Link::Up => {
                let due = self
                    .last_sent
                    .is_none_or(|t| now >= t + self.cfg.heartbeat_interval);
                if due {
                    self.queue_heartbeat();
                }
            }
            Link::Down(Some(at)) if now >= at => {
                self.link = Link::Down(None);
                self.events.push_back(DeviceEvent::Connect);
            }
            Link::Down(_) => {}
        }
    }

    /// Sends a heartbeat as soon as possible instead of at the interval (tests use it to make
    /// the server re-send what is pending). Ignored without a link.
    pub fn heartbeat_now(&mut self) {
        if self.link == Link::Up {
            self.queue_heartbeat();
        }
    }

    /// The next packet to send on the current link; taking it counts as sending it (the
    /// heartbeat interval restarts from `now`, even if the network then loses it).
    #[must_use]
    pub fn poll_transmit(&mut self, now: Time) -> Option<DevicePacket> {
        self.advance(now);
        let msg = self.out.pop_front()?;
        match msg {
            DeviceMsg::Heartbeat => {
                self.heartbeat_queued = false;
                self.heartbeats += 1;
            }
            _ => self.acks += 1,
        }
        self.last_sent = Some(self.now);
        Some(DevicePacket {
            app_id: self.cfg.app_id,
            uuid: self.cfg.uuid,
            msg,
        })
    }

    /// The next event, after the transmits it caused.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next: the latest input
    /// time while something is queued, else the heartbeat or the reconnect deadline.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        if !self.out.is_empty() || !self.events.is_empty() {
            return Some(self.now);
        }
        match self.link {
            Link::Up => Some(
                self.last_sent
                    .map_or(self.now, |t| t + self.cfg.heartbeat_interval),
            ),
            Link::Down(at) => at,
        }
    }

    /// Whether a link is up.
    pub fn is_connected(&self) -> bool {
        self.link == Link::Up
    }

    /// When the last packet was sent (heartbeat or ack), on any link.
    pub fn last_sent(&self) -> Option<Time> {
        self.last_sent
    }

    /// Heartbeats sent so far.
    pub fn heartbeats_sent(&self) -> u64 {
        self.heartbeats
    }

    /// Acks sent so far.
    pub fn acks_sent(&self) -> u64 {
        self.acks
    }

    fn advance(&mut self, now: Time) {
        self.now = self.now.max(now);
    }

    fn reset_link(&mut self) {
        self.out.clear();
        self.heartbeat_queued = false;
        self.stream = DownStreamDecoder::new();
    }

    fn queue_heartbeat(&mut self) {
        if !self.heartbeat_queued {
            self.heartbeat_queued = true;
            self.out.push_back(DeviceMsg::Heartbeat);
        }
    }

    fn receive(&mut self, p: Result<DownPacket, InvalidPacket>) {
        match p {
            Ok(p) => {
                if let Some(ack) = ack_for(&p.msg) {
                    self.out.push_back(ack);
                }
                self.events.push_back(DeviceEvent::Message(p));
            }
            Err(e) => self.events.push_back(DeviceEvent::Invalid(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Content;
    use proptest::prelude::*;

    const U: Uuid = Uuid([9; 16]);

    fn t(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    fn sent(s: &mut DeviceSession, now: Time) -> Vec<DeviceMsg> {
        std::iter::from_fn(|| s.poll_transmit(now))
            .map(|p| {
                assert_eq!((p.uuid, p.app_id), (U, 1));
                p.msg
            })
            .collect()
    }

    fn up(now: Time) -> DeviceSession {
        let mut s = DeviceSession::new(DeviceConfig::new(U));
        assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
        s.handle_connected(now);
        s
    }

    fn down(msg: DownMsg) -> Vec<u8> {
        DownPacket { app_id: 1, msg }.to_vec()
    }

    #[test]
    fn heartbeat_at_once_then_fifty_seconds_after_the_last_send() {
        let mut s = up(t(0));
        assert_eq!(sent(&mut s, t(0)), vec![DeviceMsg::Heartbeat]);
        assert_eq!(s.poll_timeout(), Some(t(50_000)));
        // An ack at 30 s restarts the interval: the SDK counts from the last packet sent.
        s.handle_datagram(t(30_000), &down(DownMsg::Notify));
        assert_eq!(sent(&mut s, t(30_000)), vec![DeviceMsg::AckNotify]);
        assert_eq!(s.poll_timeout(), Some(t(30_000)), "an event is waiting");
        assert!(matches!(s.poll_event(), Some(DeviceEvent::Message(_))));
        assert_eq!(s.poll_timeout(), Some(t(80_000)));
        s.handle_timeout(t(79_999));
        assert!(sent(&mut s, t(79_999)).is_empty());
        s.handle_timeout(t(80_000));
        assert_eq!(sent(&mut s, t(80_000)), vec![DeviceMsg::Heartbeat]);
        assert_eq!((s.heartbeats_sent(), s.acks_sent()), (2, 1));
    }

    #[test]
    fn every_message_is_acked_before_the_app_sees_it_and_bits_are_echoed() {
        let mut s = up(t(0));
        let _ = sent(&mut s, t(0));
        let hello = DownMsg::Payload(Content::from_static(b"hello"));
        let mut tcp = Vec::new();
        for m in [
            DownMsg::Notify,
            DownMsg::Bits(0x8000_0000_0000_0005),
            hello.clone(),
            DownMsg::HeartbeatReply,
        ] {
            tcp.extend(down(m));
        }
        // Three back-to-back packets split at every byte, as a TCP stream may deliver them.
        for b in tcp.chunks(1) {
            s.handle_stream(t(5), b);
        }
        assert_eq!(
            sent(&mut s, t(5)),
            vec![
                DeviceMsg::AckNotify,
                DeviceMsg::AckBits(0x8000_0000_0000_0005),
                DeviceMsg::AckPayload
            ]
        );
        let got: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
        let msgs: Vec<_> = got
            .into_iter()
            .map(|e| match e {
                DeviceEvent::Message(p) => p.msg,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            msgs,
            vec![
                DownMsg::Notify,
                DownMsg::Bits(0x8000_0000_0000_0005),
                hello,
                DownMsg::HeartbeatReply
            ]
        );
    }

    #[test]
    fn invalid_datagrams_are_reported_and_not_acked() {
        let mut s = up(t(0));
        let _ = sent(&mut s, t(0));
        s.handle_datagram(t(1), &[1, 0, 0x10, 0, 1, 9]);
        assert!(sent(&mut s, t(1)).is_empty());
        assert_eq!(
            s.poll_event(),
            Some(DeviceEvent::Invalid(InvalidPacket::Length))
        );
    }

    #[test]
    fn a_link_error_drops_unsent_acks_and_reconnects_after_a_second() {
        let mut s = up(t(0));
        let _ = sent(&mut s, t(0));
        s.handle_datagram(t(10), &down(DownMsg::Notify));
        s.handle_link_error(t(10));
        assert!(
            sent(&mut s, t(10)).is_empty(),
            "the ack belonged to the old socket"
        );
        assert_eq!(
            s.poll_event(),
            Some(DeviceEvent::Message(DownPacket {
                app_id: 1,
                msg: DownMsg::Notify
            }))
        );
        assert_eq!(s.poll_timeout(), Some(t(1_010)));
        s.handle_timeout(t(1_009));
        assert_eq!(s.poll_event(), None);
        // Data from the dead link is ignored.
        s.handle_datagram(t(1_009), &down(DownMsg::Bits(1)));
        assert_eq!(s.poll_event(), None);
        s.handle_timeout(t(1_010));
        assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
        assert_eq!(s.poll_timeout(), None, "waiting for the owner to open it");
        s.handle_connected(t(1_200));
        assert_eq!(sent(&mut s, t(1_200)), vec![DeviceMsg::Heartbeat]);
        assert!(s.is_connected());
    }

    #[test]
    fn heartbeat_now_queues_one_heartbeat() {
        let mut s = up(t(0));
        s.heartbeat_now();
        s.heartbeat_now();
        assert_eq!(sent(&mut s, t(0)), vec![DeviceMsg::Heartbeat]);
        s.heartbeat_now();
        assert_eq!(sent(&mut s, t(3)), vec![DeviceMsg::Heartbeat]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Wait(u64),
        Msg(u8, u64),
        Error,
        Kick,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..120_000).prop_map(Op::Wait),
            4 => (0u8..4, any::<u64>()).prop_map(|(k, b)| Op::Msg(k, b)),
            1 => Just(Op::Error),
            1 => Just(Op::Kick),
        ]
    }

    proptest! {
        /// Driven the way every adapter drives it, the session keeps the SDK's rules: while a
        /// link is up, no 50 s pass without a packet; each message gets exactly its ack, in
        /// order, before it is handed over; a failed link is replaced 1 s later, with a
        /// heartbeat at once.
        #[test]
        fn sdk_rules_hold_under_any_schedule(ops in proptest::collection::vec(op(), 1..60)) {
            let mut s = DeviceSession::new(DeviceConfig::new(U));
            let mut now = t(0);
            let mut last_send: Option<Time> = None;
            let mut down_since: Option<Time> = None;
            let mut expect_heartbeat = false;
            let mut acks_due: VecDeque<DeviceMsg> = VecDeque::new();
            let drive = |s: &mut DeviceSession, now: Time, acks_due: &mut VecDeque<DeviceMsg>,
                             last_send: &mut Option<Time>, down_since: &mut Option<Time>,
                             expect_heartbeat: &mut bool| -> Result<(), TestCaseError> {
                loop {
                    while let Some(p) = s.poll_transmit(now) {
                        match p.msg {
                            DeviceMsg::Heartbeat => *expect_heartbeat = false,
                            ack => prop_assert_eq!(Some(ack), acks_due.pop_front()),
                        }
                        *last_send = Some(now);
                    }
                    prop_assert!(!*expect_heartbeat, "a new link heartbeats at once");
                    let mut any = false;
                    while let Some(e) = s.poll_event() {
                        any = true;
                        match e {
                            DeviceEvent::Connect => {
                                if let Some(d) = down_since.take() {
                                    prop_assert!(now >= d + RETRY_DELAY);
                                }
                                s.handle_connected(now);
                                *expect_heartbeat = true;
                            }
                            DeviceEvent::Message(_) => {
                                prop_assert!(acks_due.is_empty(), "acked before handed over");
                            }
                            DeviceEvent::Invalid(e) => prop_assert!(false, "{e:?}"),
                        }
                    }
                    if !any {
                        return Ok(());
                    }
                }
            };
            drive(&mut s, now, &mut acks_due, &mut last_send, &mut down_since, &mut expect_heartbeat)?;
            for op in ops {
                match op {
                    Op::Wait(ms) => {
                        let until = now + Duration::from_millis(ms);
                        // Wake at every deadline on the way, as an adapter sleeping on
                        // poll_timeout does.
                        while let Some(d) = s.poll_timeout().filter(|&d| d <= until) {
                            now = now.max(d);
                            if s.is_connected() {
                                let last = last_send.expect("a link sends at once");
                                prop_assert!(now <= last + HEARTBEAT_INTERVAL);
                            }
                            s.handle_timeout(now);
                            drive(&mut s, now, &mut acks_due, &mut last_send, &mut down_since, &mut expect_heartbeat)?;
                            // A timer that fires makes progress: the next deadline is later.
                            prop_assert!(s.poll_timeout().is_none_or(|n| n > now), "timer stuck at {now:?}");
                        }
                        now = until;
                    }
                    Op::Msg(k, b) => {
                        let msg = match k {
                            0 => DownMsg::Notify,
                            1 => DownMsg::Bits(b),
                            2 => DownMsg::Payload(Content::from_static(b"x")),
                            _ => DownMsg::HeartbeatReply,
                        };
                        if s.is_connected() {
                            acks_due.extend(ack_for(&msg));
                        }
                        s.handle_datagram(now, &down(msg));
                    }
                    Op::Error => {
                        if s.is_connected() {
                            down_since = Some(now);
                        }
                        acks_due.clear();
                        s.handle_link_error(now);
                    }
                    Op::Kick => s.heartbeat_now(),
                }
                drive(&mut s, now, &mut acks_due, &mut last_send, &mut down_since, &mut expect_heartbeat)?;
                prop_assert!(acks_due.is_empty());
            }
        }
    }
}
