//! Wire codecs for every DDPush v1 packet (PROTOCOL.md sections 2 and 3).
//!
//! Decoding is strict: a packet is accepted only when it is exactly what the contract describes,
//! because upstream's laxness on TCP (section 8.3) let malformed acks clear state. Encoding is the
//! exact inverse of decoding, which the golden-vector and property tests hold us to.
//!
//! Encoders cannot write wrong bytes: every variable-length content is a [`Content`], which
//! refuses more than the 65,535 bytes a 16-bit length field can announce when it is made, so
//! an encoder never has to truncate a length (which would break TCP framing) or a payload.
//! The one length rule of a 0x20 payload (1 to `max_content` bytes, 500 by default) is
//! [`check_payload_len`], used by the node and by the clients.

use std::fmt;

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Serialize};

use crate::counters::counter_key;

/// The only protocol version DDPush v1 speaks.
pub const VERSION: u8 = 0x01;
/// Size of the upstream header (device -> server and app server -> server).
pub const UP_HEADER_LEN: usize = 21;
/// Size of the downstream header (server -> device).
pub const DOWN_HEADER_LEN: usize = 5;
/// Largest content a device packet may carry (the 0x11 ack's mask).
pub const DEVICE_MAX_CONTENT: usize = 8;
/// Largest valid device packet, in bytes.
pub const DEVICE_MAX_PACKET: usize = UP_HEADER_LEN + DEVICE_MAX_CONTENT;
/// Upstream's default and our default limit on a 0x20 payload.
pub const DEFAULT_MAX_CONTENT: u16 = 500;

/// Why a 0x20 payload breaks the length rule of [`check_payload_len`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadLenError {
    /// No bytes: the server answers `0x01`.
    #[error("empty payload (the protocol needs 1 byte or more)")]
    Empty,
    /// More than the maximum: the server closes the push connection at the header.
    #[error("payload of {len} bytes is over the maximum of {max}")]
    TooLong {
        /// The payload's length.
        len: usize,
        /// The maximum in force.
        max: u16,
    },
}

/// The length rule of a 0x20 payload (PROTOCOL.md 2.2): 1 to `max` bytes, where `max` is the
/// server's `max_content` ([`DEFAULT_MAX_CONTENT`] unless configured).
///
/// ```
/// use ddpush_proto::codec::{check_payload_len, PayloadLenError, DEFAULT_MAX_CONTENT};
///
/// assert_eq!(check_payload_len(500, DEFAULT_MAX_CONTENT), Ok(()));
/// assert_eq!(check_payload_len(0, DEFAULT_MAX_CONTENT), Err(PayloadLenError::Empty));
/// assert_eq!(
///     check_payload_len(501, DEFAULT_MAX_CONTENT),
///     Err(PayloadLenError::TooLong { len: 501, max: 500 })
/// );
/// ```
pub fn check_payload_len(len: usize, max: u16) -> Result<(), PayloadLenError> {
    if len == 0 {
        Err(PayloadLenError::Empty)
    } else if len > usize::from(max) {
        Err(PayloadLenError::TooLong { len, max })
    } else {
        Ok(())
    }
}

/// Content longer than a 16-bit length field can announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("content of {0} bytes does not fit a 16-bit length field (at most 65535)")]
pub struct ContentTooLong(pub usize);

/// The content of a 0x20 packet: at most [`Content::MAX`] bytes, checked when it is made, so
/// every encoder writes a length field that matches the bytes that follow.
///
/// It is a [`Bytes`] underneath (a re-send shares the stored buffer; [`Content::bytes`]) and
/// dereferences to the byte slice.
/// Whether a server accepts it is the separate rule of [`check_payload_len`]: an empty or an
/// over-long (but encodable) payload is valid on the wire and gets its answer from the server.
///
/// ```
/// use ddpush_proto::Content;
///
/// let c = Content::try_from("hello").unwrap();
/// assert_eq!(&c[..], b"hello");
/// assert!(Content::new(vec![0u8; 65_535]).is_ok());
/// assert!(Content::new(vec![0u8; 65_536]).is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Content(Bytes);

impl Content {
    /// The most a 16-bit length field can announce.
    pub const MAX: usize = u16::MAX as usize;

    /// Takes `b` if it fits a length field.
    pub fn new(b: impl Into<Bytes>) -> Result<Self, ContentTooLong> {
        let b = b.into();
        if b.len() > Self::MAX {
            return Err(ContentTooLong(b.len()));
        }
        Ok(Content(b))
    }

    /// Copies `b` if it fits a length field.
    pub fn copy_from_slice(b: &[u8]) -> Result<Self, ContentTooLong> {
        if b.len() > Self::MAX {
            return Err(ContentTooLong(b.len()));
        }
        Ok(Content(Bytes::copy_from_slice(b)))
    }

    /// A literal. Fails to compile when used in a `const` with more than [`Content::MAX`]
    /// bytes; meant for literals in code, never for data from outside.
    pub const fn from_static(b: &'static [u8]) -> Self {
        assert!(b.len() <= Self::MAX, "content does not fit a 16-bit length");
        Content(Bytes::from_static(b))
    }

    /// The length as the 16-bit field encodes it (exact, never truncated).
    pub fn len_u16(&self) -> u16 {
        // The constructors keep the length at or below u16::MAX.
        u16::try_from(self.0.len()).unwrap_or(u16::MAX)
    }

    /// The underlying buffer.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Gives up the wrapper.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl std::ops::Deref for Content {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Content {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::borrow::Borrow<[u8]> for Content {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq<Bytes> for Content {
    fn eq(&self, other: &Bytes) -> bool {
        self.0 == *other
    }
}

impl PartialEq<[u8]> for Content {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

impl PartialEq<&[u8]> for Content {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0 == *other
    }
}

impl TryFrom<Bytes> for Content {
    type Error = ContentTooLong;
    fn try_from(b: Bytes) -> Result<Self, ContentTooLong> {
        Content::new(b)
    }
}

impl TryFrom<Vec<u8>> for Content {
    type Error = ContentTooLong;
    fn try_from(b: Vec<u8>) -> Result<Self, ContentTooLong> {
        Content::new(b)
    }
}

impl TryFrom<&[u8]> for Content {
    type Error = ContentTooLong;
    fn try_from(b: &[u8]) -> Result<Self, ContentTooLong> {
        Content::copy_from_slice(b)
    }
}

impl TryFrom<String> for Content {
    type Error = ContentTooLong;
    fn try_from(s: String) -> Result<Self, ContentTooLong> {
        Content::new(s.into_bytes())
    }
}

impl TryFrom<&str> for Content {
    type Error = ContentTooLong;
    fn try_from(s: &str) -> Result<Self, ContentTooLong> {
        Content::copy_from_slice(s.as_bytes())
    }
}

/// Stored as the plain bytes (the same encoding `Bytes` has), and checked when read back, so
/// a damaged file cannot make an unencodable payload.
impl Serialize for Content {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = Bytes::deserialize(d)?;
        Content::new(b).map_err(serde::de::Error::custom)
    }
}

/// Command byte values shared by both directions.
pub mod cmd {
    /// Heartbeat (device -> server) or heartbeat reply (server -> device).
    pub const HEARTBEAT: u8 = 0x00;
    /// "You have news": a bare flag.
    pub const NOTIFY: u8 = 0x10;
    /// Category bits (u64).
    pub const BITS: u8 = 0x11;
    /// Custom payload.
    pub const PAYLOAD: u8 = 0x20;
}

/// A client identity: 16 opaque bytes (the SDKs use MD5 of the user name).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// Parses 32 hex digits (either case), the form used in logs, the CLI and upstream's files.
    pub fn from_hex(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Uuid(out))
    }

    /// The uuid the DDPush SDKs use for a user name: MD5 of its UTF-8 bytes.
    pub fn from_user(name: &str) -> Self {
        use md5::{Digest, Md5};
        Uuid(Md5::digest(name.as_bytes()).into())
    }

    /// Lowercase hex, as upstream writes it.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The three kinds of message a client can have pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// 0x10: a bare flag.
    Notify,
    /// 0x11: category bits.
    Bits,
    /// 0x20: custom payload.
    Payload,
}

// `Kind::ALL` is also the order in which a heartbeat re-sends pending items.
counter_key!(Kind {
    Notify,
    Bits,
    Payload
});

impl Kind {
    /// The command byte of this kind.
    pub fn cmd(self) -> u8 {
        match self {
            Kind::Notify => cmd::NOTIFY,
            Kind::Bits => cmd::BITS,
            Kind::Payload => cmd::PAYLOAD,
        }
    }
}

/// The fields of a 21-byte upstream header, before any per-port validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpHeader {
    /// Protocol version (must be 1 to be valid).
    pub version: u8,
    /// Opaque application id.
    pub app_id: u8,
    /// Command byte.
    pub cmd: u8,
    /// Client identity.
    pub uuid: Uuid,
    /// Announced content length.
    pub len: u16,
}

impl UpHeader {
    /// Reads a header from the first 21 bytes of `buf`; `None` if fewer are present.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let h = buf.get(..UP_HEADER_LEN)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&h[3..19]);
        Some(UpHeader {
            version: h[0],
            app_id: h[1],
            cmd: h[2],
            uuid: Uuid(uuid),
            len: u16::from_be_bytes([h[19], h[20]]),
        })
    }

    fn write<B: BufMut>(&self, out: &mut B) {
        out.put_u8(self.version);
        out.put_u8(self.app_id);
        out.put_u8(self.cmd);
        out.put_slice(&self.uuid.0);
        out.put_u16(self.len);
    }
}

/// Why a device packet was refused. Each is dropped and counted, never answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidPacket {
    /// Fewer than 21 bytes, or fewer than the header announces.
    #[error("packet shorter than its header says")]
    Short,
    /// More bytes than the header announces.
    #[error("trailing bytes after the announced content")]
    Trailing,
    /// Version byte is not 1.
    #[error("unsupported protocol version")]
    Version,
    /// Command byte not valid on this port (includes upstream's no-op 0xFF "reset").
    #[error("unknown command")]
    Command,
    /// Content length is not the one the command requires.
    #[error("content length does not match the command")]
    Length,
}

counter_key!(InvalidPacket {
    Short,
    Trailing,
    Version,
    Command,
    Length
});

impl InvalidPacket {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            InvalidPacket::Short => "short",
            InvalidPacket::Trailing => "trailing",
            InvalidPacket::Version => "version",
            InvalidPacket::Command => "command",
            InvalidPacket::Length => "length",
        }
    }
}

/// What a device says to the server (port 9966).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceMsg {
    /// Cmd 0x00.
    Heartbeat,
    /// Ack of a 0x10 message.
    AckNotify,
    /// Ack of a 0x11 message, carrying the acknowledged bits.
    AckBits(u64),
    /// Ack of a 0x20 message.
    AckPayload,
}

/// A validated device packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePacket {
    /// Opaque application id, echoed in heartbeat answers.
    pub app_id: u8,
    /// Client identity.
    pub uuid: Uuid,
    /// What the device said.
    pub msg: DeviceMsg,
}

impl DevicePacket {
    /// Decodes one whole datagram: exactly `21 + N` bytes with the N its command requires.
    pub fn decode(buf: &[u8]) -> Result<Self, InvalidPacket> {
        let h = UpHeader::parse(buf).ok_or(InvalidPacket::Short)?;
        let total = UP_HEADER_LEN + usize::from(h.len);
        if buf.len() < total {
            return Err(InvalidPacket::Short);
        }
        if buf.len() > total {
            return Err(InvalidPacket::Trailing);
        }
        Self::from_parts(&h, &buf[UP_HEADER_LEN..])
    }

    /// Validates a header and its content, as delimited by UDP or by the TCP stream decoder.
    pub fn from_parts(h: &UpHeader, content: &[u8]) -> Result<Self, InvalidPacket> {
        if h.version != VERSION {
            return Err(InvalidPacket::Version);
        }
        let msg = match (h.cmd, content.len()) {
            (cmd::HEARTBEAT, 0) => DeviceMsg::Heartbeat,
            (cmd::NOTIFY, 0) => DeviceMsg::AckNotify,
            (cmd::PAYLOAD, 0) => DeviceMsg::AckPayload,
            (cmd::BITS, 8) => DeviceMsg::AckBits(be_u64(content)),
            (cmd::HEARTBEAT | cmd::NOTIFY | cmd::BITS | cmd::PAYLOAD, _) => {
                return Err(InvalidPacket::Length)
            }
            _ => return Err(InvalidPacket::Command),
        };
        Ok(DevicePacket {
            app_id: h.app_id,
            uuid: h.uuid,
            msg,
        })
    }

    /// Encodes the packet as a device SDK would send it.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        let (c, len) = match self.msg {
            DeviceMsg::Heartbeat => (cmd::HEARTBEAT, 0),
            DeviceMsg::AckNotify => (cmd::NOTIFY, 0),
            DeviceMsg::AckPayload => (cmd::PAYLOAD, 0),
            DeviceMsg::AckBits(_) => (cmd::BITS, 8),
        };
        UpHeader {
            version: VERSION,
            app_id: self.app_id,
            cmd: c,
            uuid: self.uuid,
            len,
        }
        .write(out);
        if let DeviceMsg::AckBits(m) = self.msg {
            out.put_u64(m);
        }
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        match self.msg {
            DeviceMsg::AckBits(_) => UP_HEADER_LEN + 8,
            _ => UP_HEADER_LEN,
        }
    }
}

/// Content the caller has checked against [`Content::MAX`].
fn content_of(b: &[u8]) -> Content {
    debug_assert!(b.len() <= Content::MAX);
    Content(Bytes::copy_from_slice(b))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The body of a message sent to a device (section 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownMsg {
    /// 0x00: heartbeat reply (only under a reply policy).
    HeartbeatReply,
    /// 0x10: you have news.
    Notify,
    /// 0x11: the whole pending mask.
    Bits(u64),
    /// 0x20: the pending payload (shares the stored buffer).
    Payload(Content),
}

/// A server -> device packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownPacket {
    /// 0 for an immediate push, else the appId of the heartbeat being answered.
    pub app_id: u8,
    /// The message.
    pub msg: DownMsg,
}

impl DownMsg {
    /// The command byte, the length and the content: everything of a downstream packet after
    /// its version byte and appId, the same in a v1 packet and a sealed v2 one (PROTOCOL.md 9.4).
    pub(crate) fn encode_body<B: BufMut>(&self, out: &mut B) {
        match self {
            DownMsg::HeartbeatReply => {
                out.put_u8(cmd::HEARTBEAT);
                out.put_u16(0);
            }
            DownMsg::Notify => {
                out.put_u8(cmd::NOTIFY);
                out.put_u16(0);
            }
            DownMsg::Bits(m) => {
                out.put_u8(cmd::BITS);
                out.put_u16(8);
                out.put_u64(*m);
            }
            DownMsg::Payload(p) => {
                out.put_u8(cmd::PAYLOAD);
                out.put_u16(p.len_u16());
                out.put_slice(p);
            }
        }
    }
}

impl DownPacket {
    /// Encodes the 5-byte header and content.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u8(VERSION);
        out.put_u8(self.app_id);
        self.msg.encode_body(out);
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        DOWN_HEADER_LEN
            + match &self.msg {
                DownMsg::HeartbeatReply | DownMsg::Notify => 0,
                DownMsg::Bits(_) => 8,
                DownMsg::Payload(p) => p.len(),
            }
    }

    /// Encodes into a fresh vector (tests, tools; the hot path encodes into reused buffers).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }

    /// Decodes one whole downstream packet, as a device SDK does. Used by clients and tests.
    pub fn decode(buf: &[u8]) -> Result<Self, InvalidPacket> {
        let h = buf.get(..DOWN_HEADER_LEN).ok_or(InvalidPacket::Short)?;
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        let total = DOWN_HEADER_LEN + len;
        if buf.len() < total {
            return Err(InvalidPacket::Short);
        }
        if buf.len() > total {
            return Err(InvalidPacket::Trailing);
        }
        if h[0] != VERSION {
            return Err(InvalidPacket::Version);
        }
        let content = &buf[DOWN_HEADER_LEN..];
        let msg = match (h[2], len) {
            (cmd::HEARTBEAT, 0) => DownMsg::HeartbeatReply,
            (cmd::NOTIFY, 0) => DownMsg::Notify,
            (cmd::BITS, 8) => DownMsg::Bits(be_u64(content)),
            (cmd::PAYLOAD, 1..=Content::MAX) => DownMsg::Payload(content_of(content)),
            (cmd::HEARTBEAT | cmd::NOTIFY | cmd::BITS | cmd::PAYLOAD, _) => {
                return Err(InvalidPacket::Length)
            }
            _ => return Err(InvalidPacket::Command),
        };
        Ok(DownPacket { app_id: h[1], msg })
    }
}

/// The one-byte answer to a push request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PushReply {
    /// `0x00`: stored and, if the client is online, sent.
    Accepted,
    /// `0x01`: malformed request, or no room for a new client.
    Rejected,
    /// `0xFF`: accepted but could not be made durable.
    Failed,
}

impl PushReply {
    /// The wire byte.
    pub fn byte(self) -> u8 {
        match self {
            PushReply::Accepted => 0x00,
            PushReply::Rejected => 0x01,
            PushReply::Failed => 0xFF,
        }
    }

    /// Reads a reply byte; `None` for bytes the contract does not define.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x00 => Some(PushReply::Accepted),
            0x01 => Some(PushReply::Rejected),
            0xFF => Some(PushReply::Failed),
            _ => None,
        }
    }
}

/// What an app server asks the server to store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushMsg {
    /// 0x10: set the flag.
    Notify,
    /// 0x11: OR these bits into the pending mask.
    Bits(u64),
    /// 0x20: replace the pending payload.
    Payload(Content),
}

impl PushMsg {
    /// The kind of message.
    pub fn kind(&self) -> Kind {
        match self {
            PushMsg::Notify => Kind::Notify,
            PushMsg::Bits(_) => Kind::Bits,
            PushMsg::Payload(_) => Kind::Payload,
        }
    }
}

/// Why a push request got `0x01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum PushReject {
    /// Version byte is not 1.
    #[error("unsupported protocol version")]
    Version,
    /// Command not in {0x10, 0x11, 0x20}.
    #[error("unknown push command")]
    Command,
    /// N wrong for the command.
    #[error("content length does not match the command")]
    Length,
    /// The uuid is new and the node already holds its maximum number of clients.
    #[error("client capacity reached")]
    Capacity,
}

counter_key!(PushReject {
    Version,
    Command,
    Length,
    Capacity
});

impl PushReject {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            PushReject::Version => "version",
            PushReject::Command => "command",
            PushReject::Length => "length",
            PushReject::Capacity => "capacity",
        }
    }
}

/// A validated push request (port 9999).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRequest {
    /// Opaque application id (not used for routing).
    pub app_id: u8,
    /// Target client.
    pub uuid: Uuid,
    /// What to store.
    pub msg: PushMsg,
}

impl PushRequest {
    /// Validates a delimited request. The caller has already enforced N <= max content, which
    /// is a framing rule (the connection closes), not a reply.
    pub fn from_parts(h: &UpHeader, content: &[u8]) -> Result<Self, PushReject> {
        if h.version != VERSION {
            return Err(PushReject::Version);
        }
        let msg = match (h.cmd, content.len()) {
            (cmd::NOTIFY, 0) => PushMsg::Notify,
            (cmd::BITS, 8) => PushMsg::Bits(be_u64(content)),
            (cmd::PAYLOAD, 1..=Content::MAX) => PushMsg::Payload(content_of(content)),
            (cmd::NOTIFY | cmd::BITS | cmd::PAYLOAD, _) => return Err(PushReject::Length),
            _ => return Err(PushReject::Command),
        };
        Ok(PushRequest {
            app_id: h.app_id,
            uuid: h.uuid,
            msg,
        })
    }

    /// Decodes one whole request (exactly `21 + N` bytes). Tools use this; the server goes
    /// through the stream decoder.
    pub fn decode(buf: &[u8]) -> Result<Self, PushDecodeError> {
        let h = UpHeader::parse(buf).ok_or(PushDecodeError::Short)?;
        let total = UP_HEADER_LEN + usize::from(h.len);
        if buf.len() < total {
            return Err(PushDecodeError::Short);
        }
        if buf.len() > total {
            return Err(PushDecodeError::Trailing);
        }
        Self::from_parts(&h, &buf[UP_HEADER_LEN..]).map_err(PushDecodeError::Reject)
    }

    /// Encodes the request as the Java `Pusher` does.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        let (c, len) = match &self.msg {
            PushMsg::Notify => (cmd::NOTIFY, 0),
            PushMsg::Bits(_) => (cmd::BITS, 8),
            PushMsg::Payload(p) => (cmd::PAYLOAD, p.len_u16()),
        };
        UpHeader {
            version: VERSION,
            app_id: self.app_id,
            cmd: c,
            uuid: self.uuid,
            len,
        }
        .write(out);
        match &self.msg {
            PushMsg::Notify => {}
            PushMsg::Bits(m) => out.put_u64(*m),
            PushMsg::Payload(p) => out.put_slice(p),
        }
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        UP_HEADER_LEN
            + match &self.msg {
                PushMsg::Notify => 0,
                PushMsg::Bits(_) => 8,
                PushMsg::Payload(p) => p.len(),
            }
    }

    /// Encodes into a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

/// Why a whole-buffer push decode failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushDecodeError {
    /// Fewer bytes than the header announces.
    #[error("request shorter than its header says")]
    Short,
    /// More bytes than the header announces.
    #[error("trailing bytes after the request")]
    Trailing,
    /// A delimited request the server answers with `0x01`.
    #[error("rejected: {0}")]
    Reject(PushReject),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_hex_round_trip_and_rejects_bad_digits() {
        let u = Uuid::from_hex("2e72361924ef37a6166e0b228d1cbbb0").unwrap();
        assert_eq!(u.to_hex(), "2e72361924ef37a6166e0b228d1cbbb0");
        assert_eq!(Uuid::from_hex("2E72361924EF37A6166E0B228D1CBBB0"), Some(u));
        assert_eq!(Uuid::from_hex("2e72361924ef37a6166e0b228d1cbbbg"), None);
        assert_eq!(Uuid::from_hex("2e72"), None);
    }

    #[test]
    fn user_uuid_is_md5_of_the_name() {
        // PROTOCOL.md section 7: uuid = MD5("user100001").
        assert_eq!(
            Uuid::from_user("user100001").to_hex(),
            "2e72361924ef37a6166e0b228d1cbbb0"
        );
    }

    #[test]
    fn reset_command_is_invalid() {
        let mut p = vec![1, 1, 0xFF];
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&[0, 0]);
        assert_eq!(DevicePacket::decode(&p), Err(InvalidPacket::Command));
    }

    #[test]
    fn device_length_rules() {
        let base = |c: u8, n: u16, extra: usize| {
            let mut p = vec![1, 1, c];
            p.extend_from_slice(&[7; 16]);
            p.extend_from_slice(&n.to_be_bytes());
            p.extend(std::iter::repeat_n(0u8, extra));
            p
        };
        assert_eq!(
            DevicePacket::decode(&base(0, 1, 1)),
            Err(InvalidPacket::Length)
        );
        assert_eq!(
            DevicePacket::decode(&base(0x11, 4, 4)),
            Err(InvalidPacket::Length)
        );
        assert_eq!(
            DevicePacket::decode(&base(0x20, 5, 5)),
            Err(InvalidPacket::Length)
        );
        assert_eq!(
            DevicePacket::decode(&base(0, 0, 1)),
            Err(InvalidPacket::Trailing)
        );
        assert_eq!(
            DevicePacket::decode(&base(0x11, 8, 7)),
            Err(InvalidPacket::Short)
        );
        assert_eq!(DevicePacket::decode(&[1, 1, 0]), Err(InvalidPacket::Short));
        let mut v2 = base(0, 0, 0);
        v2[0] = 2;
        assert_eq!(DevicePacket::decode(&v2), Err(InvalidPacket::Version));
    }
}
