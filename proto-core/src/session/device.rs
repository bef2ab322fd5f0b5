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
//! # Signed devices (PROTOCOL.md 9)
//!
//! Given a [`DeviceSigning`] key, the session speaks only version 2: every heartbeat and ack
//! goes out sealed by [`signed::encode_device`] (the server's own codec) with the device's
//! wall clock as timestamp and a counter as nonce, and every packet from the server must be
//! a sealed answer that [`SealedDown::open`] accepts under the device's key, stamped within
//! `window` of the device's clock and not seen before ([`ReplayWindow`], the server's replay
//! memory). Anything else is dropped without an ack, reported as [`DeviceEvent::Refused`] or
//! [`DeviceEvent::Unsigned`]: a forged or replayed `0x20` must not make the device send a
//! valid signed ack, which would clear the real pending item it never got.
//!
//! The replay memory is lost when the device restarts, so a session refuses every answer
//! stamped up to its first wall clock plus [`DeviceSigning::server_ahead`] (no answer it
//! accepted in an earlier life was stamped later), and heartbeats again once that floor is
//! passed (PROTOCOL.md 9.4).
//!
//! The core reads no clock: the adapter gives the wall clock with
//! [`handle_wall_clock`](DeviceSession::handle_wall_clock) (the client from `SystemTime`, the
//! simulator from simulated time) and picks the first nonce (from its RNG), so that a
//! restarted device does not repeat the `(ts, nonce)` pairs of its previous run.
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

use crate::codec::{self, DeviceMsg, DevicePacket, DownMsg, DownPacket, InvalidPacket, Uuid};
use crate::config::{HEARTBEAT_INTERVAL, REPLAY_WINDOW};
use crate::signed::codec::SIGNED_DEVICE_MAX;
use crate::signed::{self, DeviceKey, ReplayWindow, Seal, SealedDown, SignedDrop};
use crate::stream::DownStreamDecoder;
use crate::time::{secs32, Time};

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

/// A signed device's key (PROTOCOL.md 9.1): the key id and the 32 bytes the app server
/// provisioned with `PUT /clients/{uuid}/key` and gave its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSigning {
    /// The key id, as provisioned.
    pub key_id: u8,
    /// The key (its `Debug` never shows it).
    pub key: DeviceKey,
    /// The nonce of the first packet; each packet after it takes the next value. A counter
    /// keeps the pairs `(ts, nonce)` increasing, which the server's 8-pair replay memory needs
    /// from a device sending more than 8 packets within its window; the adapter draws the start
    /// at random so that a restarted device does not reuse its last run's pairs.
    pub first_nonce: u32,
    /// How far a sealed answer's timestamp may be from the device's clock
    /// ([`REPLAY_WINDOW`], the server's default, 60 s).
    pub window: Duration,
    /// How far ahead of the device's clock a sealed answer may be stamped (default: `window`;
    /// never more). It is also what a device start costs: the session does not know which
    /// answers it accepted before it (re)started, and every one of them was stamped at most
    /// this far ahead of the device's clock then, so after its first wall clock S it refuses
    /// every answer stamped at or before S plus this bound (PROTOCOL.md 9.4). A device whose
    /// clock is on time hears nothing for that long after it starts; set it to the skew the
    /// devices' clocks really have (network time: a few seconds).
    pub server_ahead: Duration,
}

impl DeviceSigning {
    /// A key with the default window; `first_nonce` should come from the adapter's RNG.
    pub fn new(key_id: u8, key: DeviceKey, first_nonce: u32) -> Self {
        DeviceSigning {
            key_id,
            key,
            first_nonce,
            window: REPLAY_WINDOW,
            server_ahead: REPLAY_WINDOW,
        }
    }

    /// The same key with `server_ahead` set (capped at the window).
    pub fn with_server_ahead(self, server_ahead: Duration) -> Self {
        DeviceSigning {
            server_ahead: server_ahead.min(self.window),
            ..self
        }
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
    /// `Some`: a signed device (PROTOCOL.md 9), which sends and accepts only version 2.
    pub signing: Option<DeviceSigning>,
}

impl DeviceConfig {
    /// The SDK's defaults for `uuid`: appId 1, 50 s interval, 1 s retry.
    pub fn new(uuid: Uuid) -> Self {
        DeviceConfig {
            uuid,
            app_id: 1,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            retry_delay: RETRY_DELAY,
            signing: None,
        }
    }

    /// The same device, signed with `signing`.
    pub fn signed(self, signing: DeviceSigning) -> Self {
        DeviceConfig {
            signing: Some(signing),
            ..self
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
    /// Signed devices: a version-2 packet that is not a fresh sealed answer under the
    /// device's key (wrong tag, unknown key id, outside the window, replayed, malformed);
    /// dropped, not acked.
    Refused(SignedDrop),
    /// Signed devices: a v1 packet, which no server sends a signed device (a forgery, or the
    /// key was removed on the server); dropped, not acked.
    Unsigned,
}

/// One packet to send: what it carries and its bytes on the wire (v1, or sealed for a signed
/// device), encoded by the core's codecs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTransmit {
    /// The packet as v1 would carry it.
    pub packet: DevicePacket,
    /// The seal of a signed device's packet.
    pub seal: Option<Seal>,
    buf: [u8; SIGNED_DEVICE_MAX],
    len: u8,
}

impl DeviceTransmit {
    /// The bytes to send (one datagram, or one frame on the TCP stream).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
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
    /// Signed devices: the wall clock (Unix seconds) the adapter last gave.
    wall: Option<u32>,
    /// Signed devices: the next nonce.
    nonce: u32,
    /// Signed devices: the `(ts, nonce)` pairs of sealed answers already accepted.
    seen: ReplayWindow,
    /// Signed devices: answers stamped at or before this second are refused (the first wall
    /// clock plus `server_ahead`; `None` before the first wall clock).
    start_floor: Option<u32>,
    /// Signed devices: a heartbeat is due at this time because an answer was refused under
    /// the start floor (its resend, stamped after the floor, is then asked for at once).
    floor_heartbeat: Option<Time>,
}

impl DeviceSession {
    /// A session that asks for its first link at once.
    pub fn new(cfg: DeviceConfig) -> Self {
        let nonce = cfg.signing.as_ref().map_or(0, |s| s.first_nonce);
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
            wall: None,
            nonce,
            seen: ReplayWindow::new(),
            start_floor: None,
            floor_heartbeat: None,
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

    /// The device's wall clock, in seconds since the Unix epoch. A signed device stamps what
    /// it sends with the latest value given and checks sealed answers against it, so its
    /// adapter calls this before feeding inputs and draining transmits (a v1 device ignores
    /// it). It may differ from the server's clock by up to the window.
    ///
    /// The first value a signed session gets is its start: answers stamped up to it plus
    /// [`DeviceSigning::server_ahead`] are refused from then on.
    pub fn handle_wall_clock(&mut self, unix_s: u32) {
        self.wall = Some(unix_s);
        if self.start_floor.is_none() {
            if let Some(sg) = &self.cfg.signing {
                self.start_floor = Some(unix_s.saturating_add(secs32(sg.server_ahead)));
            }
        }
    }

    /// One UDP datagram from the server.
    pub fn handle_datagram(&mut self, now: Time, datagram: &[u8]) {
        self.advance(now);
        if self.link != Link::Up {
            return;
        }
        self.receive(datagram);
    }

    /// Bytes from the TCP connection, in any split; every whole packet is handled in order.
    pub fn handle_stream(&mut self, now: Time, bytes: &[u8]) {
        self.advance(now);
        if self.link != Link::Up {
            return;
        }
        self.stream.extend(bytes);
        while let Some(p) = self.stream.next_raw() {
            self.receive(&p);
        }
    }

    /// Fires the timers that are due: the heartbeat, or the request for a new link.
    pub fn handle_timeout(&mut self, now: Time) {
        self.advance(now);
        match self.link {
            Link::Up => {
                let floor_passed = self.floor_heartbeat.is_some_and(|t| now >= t);
                let due = self
                    .last_sent
                    .is_none_or(|t| now >= t + self.cfg.heartbeat_interval);
                if floor_passed {
                    self.floor_heartbeat = None;
                }
                if due || floor_passed {
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
    ///
    /// A signed device's packet is sealed with the latest wall clock given and the next nonce.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Time) -> Option<DeviceTransmit> {
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
        let packet = DevicePacket {
            app_id: self.cfg.app_id,
            uuid: self.cfg.uuid,
            msg,
        };
        let mut buf = [0u8; SIGNED_DEVICE_MAX];
        let (seal, len) = match &self.cfg.signing {
            None => {
                packet.encode(&mut &mut buf[..]);
                (None, packet.encoded_len())
            }
            Some(sg) => {
                debug_assert!(
                    self.wall.is_some(),
                    "a signed session sends only after handle_wall_clock"
                );
                let seal = Seal {
                    key_id: sg.key_id,
                    ts: self.wall.unwrap_or(0),
                    nonce: self.nonce,
                };
                self.nonce = self.nonce.wrapping_add(1);
                signed::encode_device(&packet, seal, &sg.key, &mut &mut buf[..]);
                (Some(seal), signed::device_len(msg))
            }
        };
        Some(DeviceTransmit {
            packet,
            seal,
            buf,
            // At most SIGNED_DEVICE_MAX (54) bytes.
            len: len as u8,
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
            Link::Up => {
                let hb = self
                    .last_sent
                    .map_or(self.now, |t| t + self.cfg.heartbeat_interval);
                Some(self.floor_heartbeat.map_or(hb, |f| f.min(hb)))
            }
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

    /// One whole packet from the server: decoded (v1), or opened and checked for freshness
    /// (signed), then acked and handed over; or dropped and reported.
    fn receive(&mut self, bytes: &[u8]) {
        let opened = match &self.cfg.signing {
            None => DownPacket::decode(bytes).map_err(DeviceEvent::Invalid),
            Some(sg) => self.open_sealed(sg.clone(), bytes),
        };
        match opened {
            Ok(p) => {
                if let Some(ack) = ack_for(&p.msg) {
                    self.out.push_back(ack);
                }
                self.events.push_back(DeviceEvent::Message(p));
            }
            Err(e) => self.events.push_back(e),
        }
    }

    /// A signed device's check of a server packet (PROTOCOL.md 9.4): sealed under its key,
    /// stamped within its window of the device's clock, a pair not accepted before.
    fn open_sealed(&mut self, sg: DeviceSigning, bytes: &[u8]) -> Result<DownPacket, DeviceEvent> {
        if bytes.first() == Some(&codec::VERSION) {
            return Err(DeviceEvent::Unsigned);
        }
        let sealed = SealedDown::open(bytes, |id| (id == sg.key_id).then(|| sg.key.clone()))
            .map_err(DeviceEvent::Refused)?;
        let now_s = self.wall.unwrap_or(0);
        let window = secs32(sg.window);
        let ts = sealed.seal.ts;
        let ahead = secs32(sg.server_ahead).min(window);
        if ts < now_s.saturating_sub(window) || ts > now_s.saturating_add(ahead) {
            return Err(DeviceEvent::Refused(SignedDrop::Expired));
        }
        // Stamped at or before the start floor: it may be an answer this device accepted
        // before it restarted, replayed (PROTOCOL.md 9.4). The server re-sends what is
        // pending on every heartbeat, so one goes out as soon as the floor is passed.
        if let Some(floor) = self.start_floor.filter(|&f| ts <= f) {
            let wait = Duration::from_secs(u64::from(floor.saturating_sub(now_s)) + 1);
            let at = self.now + wait;
            self.floor_heartbeat = Some(self.floor_heartbeat.map_or(at, |t| t.min(at)));
            return Err(DeviceEvent::Refused(SignedDrop::Replayed));
        }
        self.seen
            .check(now_s, window, ts, sealed.seal.nonce)
            .map_err(|_| DeviceEvent::Refused(SignedDrop::Replayed))?;
        Ok(sealed.packet)
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
                assert_eq!((p.packet.uuid, p.packet.app_id), (U, 1));
                let mut v1 = Vec::new();
                p.packet.encode(&mut v1);
                assert_eq!(p.bytes(), v1, "v1 bytes from the v1 codec");
                p.packet.msg
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

    mod signed_device {
        use super::*;
        use crate::signed::{Keyring, Verified};

        /// PROTOCOL.md 9.6 / signed-vectors.json: key id 1, key 00..1f, uuid of section 7.
        const VU: &str = "2e72361924ef37a6166e0b228d1cbbb0";
        const TS: u32 = 0x6955_b900;

        fn key() -> DeviceKey {
            DeviceKey::new(std::array::from_fn(|i| i as u8))
        }

        fn hex(s: &str) -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        }

        fn vectors() -> serde_json::Value {
            let text = include_str!("../../tests/data/signed-vectors.json");
            serde_json::from_str(text).unwrap()
        }

        fn vector(dir: &str, name: &str) -> Vec<u8> {
            let v = vectors();
            let item = v[dir]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == name)
                .unwrap_or_else(|| panic!("no vector {dir}/{name}"))
                .clone();
            hex(item["hex"].as_str().unwrap())
        }

        fn session(first_nonce: u32) -> DeviceSession {
            let cfg = DeviceConfig::new(Uuid::from_hex(VU).unwrap()).signed(DeviceSigning::new(
                1,
                key(),
                first_nonce,
            ));
            let mut s = DeviceSession::new(cfg);
            assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
            // Started more than its start floor (60 s) before the vectors' time.
            s.handle_wall_clock(TS - 61);
            s.handle_wall_clock(TS);
            s.handle_connected(t(0));
            s
        }

        fn sealed(msg: DownMsg, ts: u32, nonce: u32) -> Vec<u8> {
            SealedDown::new(
                DownPacket { app_id: 1, msg },
                Seal {
                    key_id: 1,
                    ts,
                    nonce,
                },
                &key(),
            )
            .to_vec()
        }

        #[test]
        fn a_restarted_device_refuses_what_it_may_have_accepted_before_it() {
            // Before the restart: a sealed 0x20 stamped TS, accepted and acked.
            let mut before = session(1);
            let _ = bytes_sent(&mut before, t(0));
            let captured = vector("server_to_device", "0x20_hello");
            before.handle_datagram(t(1), &captured);
            assert_eq!(bytes_sent(&mut before, t(1)).len(), 1, "acked once");
            // The device restarts 5 s later; an attacker replays the captured packet (inside
            // the window, a pair the new life has not seen): refused, not acked. (A long
            // heartbeat interval, so that the floor's heartbeat is the next one.)
            let cfg = DeviceConfig {
                heartbeat_interval: Duration::from_secs(300),
                ..DeviceConfig::new(Uuid::from_hex(VU).unwrap())
            }
            .signed(DeviceSigning::new(1, key(), 1_000));
            let mut s = DeviceSession::new(cfg);
            assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
            s.handle_wall_clock(TS + 5);
            s.handle_connected(t(10));
            let _ = bytes_sent(&mut s, t(10));
            s.handle_datagram(t(10), &captured);
            assert!(bytes_sent(&mut s, t(10)).is_empty(), "a replay was acked");
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Replayed))
            );
            // Everything stamped up to the start plus the server-ahead bound (60 s) is refused
            // the same way, since the device accepted packets up to that far ahead of its clock
            // before; a heartbeat is asked for as soon as the floor is passed, so what is
            // pending comes again, stamped after it.
            s.handle_datagram(t(10), &sealed(DownMsg::Notify, TS + 65, 1));
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Replayed))
            );
            let passed = t(10) + Duration::from_secs(61);
            assert_eq!(s.poll_timeout(), Some(passed));
            s.handle_wall_clock(TS + 66);
            s.handle_timeout(passed);
            assert_eq!(bytes_sent(&mut s, passed).len(), 1, "the floor heartbeat");
            s.handle_datagram(passed, &sealed(DownMsg::Notify, TS + 66, 2));
            assert!(matches!(s.poll_event(), Some(DeviceEvent::Message(_))));
            assert_eq!(bytes_sent(&mut s, passed).len(), 1, "acked");
            // With a tighter bound the floor is lower, and answers stamped further ahead of
            // the device's clock than the bound are stale.
            let cfg = DeviceConfig::new(Uuid::from_hex(VU).unwrap()).signed(
                DeviceSigning::new(1, key(), 2_000).with_server_ahead(Duration::from_secs(2)),
            );
            let mut s = DeviceSession::new(cfg);
            let _ = s.poll_event();
            s.handle_wall_clock(TS + 5);
            s.handle_connected(t(0));
            let _ = bytes_sent(&mut s, t(0));
            s.handle_datagram(t(0), &captured);
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Replayed))
            );
            s.handle_datagram(t(0), &sealed(DownMsg::Notify, TS + 8, 3));
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Expired))
            );
            s.handle_datagram(t(0), &sealed(DownMsg::Notify, TS + 7, 4));
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Replayed))
            );
            s.handle_wall_clock(TS + 6);
            s.handle_datagram(t(1), &sealed(DownMsg::Notify, TS + 8, 5));
            assert!(matches!(s.poll_event(), Some(DeviceEvent::Message(_))));
        }

        fn bytes_sent(s: &mut DeviceSession, now: Time) -> Vec<Vec<u8>> {
            std::iter::from_fn(|| s.poll_transmit(now))
                .map(|p| p.bytes().to_vec())
                .collect()
        }

        #[test]
        fn heartbeat_and_acks_are_the_golden_vectors() {
            let mut s = session(1);
            assert_eq!(
                bytes_sent(&mut s, t(0)),
                vec![vector("device_to_server", "heartbeat")]
            );
            // The server's sealed 0x10, 0x11 mask 5 and 0x20 "hello", each acked with the next
            // nonce: exactly the vectors' acks.
            for (down, ack) in [
                ("0x10", "ack_0x10"),
                ("0x11_mask_5", "ack_0x11_mask_5"),
                ("0x20_hello", "ack_0x20"),
            ] {
                s.handle_datagram(t(5), &vector("server_to_device", down));
                assert_eq!(
                    bytes_sent(&mut s, t(5)),
                    vec![vector("device_to_server", ack)],
                    "{down}"
                );
                assert!(matches!(s.poll_event(), Some(DeviceEvent::Message(_))));
            }
            // A sealed heartbeat reply is accepted and not acked.
            s.handle_datagram(t(6), &vector("server_to_device", "heartbeat_reply"));
            assert!(bytes_sent(&mut s, t(6)).is_empty());
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Message(DownPacket {
                    app_id: 1,
                    msg: DownMsg::HeartbeatReply
                }))
            );
        }

        #[test]
        fn the_servers_keyring_accepts_what_the_session_sends() {
            let u = Uuid::from_hex(VU).unwrap();
            let mut ring = Keyring::new(REPLAY_WINDOW, 7);
            ring.update(u, 1, key(), Time::ZERO).unwrap();
            let mut s = session(u32::MAX - 1);
            s.handle_wall_clock(TS + 30); // 30 s ahead of the server: within the window
            let server_now = Time::from_secs(u64::from(TS));
            for i in 0..20u64 {
                s.heartbeat_now();
                for b in bytes_sent(&mut s, t(i)) {
                    let v = ring.verify(server_now, &b);
                    assert!(
                        matches!(v, Ok(Verified { key_id: 1, .. })),
                        "packet {i}: {v:?}"
                    );
                    // Sent once, accepted once.
                    assert_eq!(ring.verify(server_now, &b), Err(SignedDrop::Replayed));
                }
            }
        }

        #[test]
        fn forged_stale_replayed_and_unsigned_packets_are_dropped_unacked() {
            let mut s = session(1);
            let _ = bytes_sent(&mut s, t(0));
            let good = vector("server_to_device", "0x20_hello");
            let mut flipped = good.clone();
            *flipped.last_mut().unwrap() ^= 1;
            let other_key = SealedDown::new(
                DownPacket {
                    app_id: 1,
                    msg: DownMsg::Payload(Content::from_static(b"forged")),
                },
                Seal {
                    key_id: 1,
                    ts: TS,
                    nonce: 9,
                },
                &DeviceKey::new([7; 32]),
            )
            .to_vec();
            let mut key9 = good.clone();
            key9[5 + 5] = 9;
            let v1 = DownPacket {
                app_id: 1,
                msg: DownMsg::Payload(Content::from_static(b"hello")),
            }
            .to_vec();
            for (bytes, want) in [
                (flipped, DeviceEvent::Refused(SignedDrop::Tag)),
                (other_key, DeviceEvent::Refused(SignedDrop::Tag)),
                (key9, DeviceEvent::Refused(SignedDrop::UnknownKey)),
                (
                    good[..good.len() - 1].to_vec(),
                    DeviceEvent::Refused(SignedDrop::Length),
                ),
                (v1, DeviceEvent::Unsigned),
            ] {
                s.handle_datagram(t(1), &bytes);
                assert!(bytes_sent(&mut s, t(1)).is_empty(), "{want:?} acked");
                assert_eq!(s.poll_event(), Some(want));
            }
            // Fresh: accepted and acked once; the same bytes again are a replay.
            s.handle_datagram(t(2), &good);
            assert_eq!(bytes_sent(&mut s, t(2)).len(), 1);
            assert!(matches!(s.poll_event(), Some(DeviceEvent::Message(_))));
            s.handle_datagram(t(3), &good);
            assert!(bytes_sent(&mut s, t(3)).is_empty());
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Replayed))
            );
            // A sealed answer stamped 61 s from the device's clock is stale; 60 s is not.
            let at = |ts: u32, nonce: u32| {
                SealedDown::new(
                    DownPacket {
                        app_id: 1,
                        msg: DownMsg::Notify,
                    },
                    Seal {
                        key_id: 1,
                        ts,
                        nonce,
                    },
                    &key(),
                )
                .to_vec()
            };
            s.handle_wall_clock(TS + 100);
            s.handle_datagram(t(4), &at(TS + 39, 1));
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Expired))
            );
            s.handle_datagram(t(4), &at(TS + 161, 2));
            assert_eq!(
                s.poll_event(),
                Some(DeviceEvent::Refused(SignedDrop::Expired))
            );
            s.handle_datagram(t(4), &at(TS + 160, 3));
            assert!(matches!(s.poll_event(), Some(DeviceEvent::Message(_))));
            assert_eq!(bytes_sent(&mut s, t(4)).len(), 1);
        }

        #[test]
        fn sealed_frames_split_anywhere_on_tcp_are_opened_in_order() {
            let mut s = session(1);
            let _ = bytes_sent(&mut s, t(0));
            let mut stream = Vec::new();
            for name in ["0x10", "0x11_mask_5", "0x20_hello", "heartbeat_reply"] {
                stream.extend(vector("server_to_device", name));
            }
            for b in stream.chunks(1) {
                s.handle_stream(t(1), b);
            }
            assert_eq!(bytes_sent(&mut s, t(1)).len(), 3);
            let msgs: Vec<_> = std::iter::from_fn(|| s.poll_event())
                .map(|e| match e {
                    DeviceEvent::Message(p) => p.msg,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                msgs,
                vec![
                    DownMsg::Notify,
                    DownMsg::Bits(5),
                    DownMsg::Payload(Content::from_static(b"hello")),
                    DownMsg::HeartbeatReply
                ]
            );
        }

        #[test]
        fn a_v1_session_drops_sealed_packets() {
            let mut s = up(t(0));
            let _ = sent(&mut s, t(0));
            s.handle_datagram(t(1), &vector("server_to_device", "0x20_hello"));
            assert!(sent(&mut s, t(1)).is_empty());
            assert!(matches!(s.poll_event(), Some(DeviceEvent::Invalid(_))));
        }
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
                        match p.packet.msg {
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
                            other => prop_assert!(false, "{other:?}"),
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
