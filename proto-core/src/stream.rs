//! Incremental framing for the TCP streams (port 9966 device streams, port 9999 push streams).
//!
//! DDPush has no framing beyond the 16-bit length in each header, so a frame is only known to be
//! complete once its header has been read. The decoder copies at most one frame into a buffer
//! whose size is fixed when the connection opens (`21 + max_content`), so a peer can never make
//! it grow. "Need more bytes" is a value ([`Decoded::NeedMore`]), like httparse's `Partial`;
//! a frame that cannot be delimited within the bound is an error that ends the connection.

use crate::codec::{
    DownPacket, InvalidPacket, UpHeader, DEVICE_MAX_CONTENT, DOWN_HEADER_LEN, UP_HEADER_LEN,
};
use crate::signed::{self, TRAILER_LEN};

/// A delimited upstream frame: a header and exactly the content it announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The parsed header (not yet validated for its port).
    pub header: UpHeader,
    /// The content, `header.len` bytes.
    pub content: &'a [u8],
    /// The whole frame as received: header, content and, for a signed device frame
    /// (version 2, PROTOCOL.md 9.3), its 25-byte trailer.
    pub raw: &'a [u8],
}

/// Outcome of one decode step.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame.
    Frame(Frame<'a>),
    /// The input ran out before a frame was complete; feed more bytes.
    NeedMore,
}

/// The stream cannot be delimited any further: the adapter must close the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame announces {len} content bytes, more than the {max} allowed on this port")]
pub struct FramingError {
    /// The announced content length.
    pub len: u16,
    /// The limit for this stream.
    pub max: u16,
}

/// Incremental decoder for one TCP connection.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    max_content: u16,
    /// The previous call returned a frame borrowed from `buf`; discard it on the next call.
    consumed: bool,
    failed: Option<FramingError>,
    /// Device streams: a version-2 frame carries the signed trailer after its content.
    signed: bool,
}

impl StreamDecoder {
    /// A decoder for device streams on port 9966 (content at most 8 bytes).
    pub fn device() -> Self {
        let mut d = Self::new(DEVICE_MAX_CONTENT as u16);
        d.signed = true;
        d.buf.reserve_exact(TRAILER_LEN);
        d
    }

    /// A decoder whose frames may carry at most `max_content` bytes (push streams use the
    /// configured maximum payload).
    pub fn new(max_content: u16) -> Self {
        StreamDecoder {
            buf: Vec::with_capacity(UP_HEADER_LEN + usize::from(max_content)),
            max_content,
            consumed: false,
            failed: None,
            signed: false,
        }
    }

    /// The most bytes this decoder will ever hold.
    pub fn bound(&self) -> usize {
        UP_HEADER_LEN + usize::from(self.max_content) + if self.signed { TRAILER_LEN } else { 0 }
    }

    /// Bytes currently buffered (a partial frame).
    pub fn buffered(&self) -> usize {
        if self.consumed {
            0
        } else {
            self.buf.len()
        }
    }

    /// Takes bytes from the front of `input` until one frame is complete or `input` is empty.
    ///
    /// Call in a loop until it returns [`Decoded::NeedMore`]; every frame in the input is
    /// returned, in order, whatever the split of the stream into reads. After an error the
    /// decoder stays failed and returns the same error.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Decoded<'_>, FramingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.consumed {
            self.buf.clear();
            self.consumed = false;
        }
        if self.buf.len() < UP_HEADER_LEN {
            let take = (UP_HEADER_LEN - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.buf.len() < UP_HEADER_LEN {
                return Ok(Decoded::NeedMore);
            }
        }
        let Some(header) = UpHeader::parse(&self.buf) else {
            return Ok(Decoded::NeedMore);
        };
        if header.len > self.max_content {
            let e = FramingError {
                len: header.len,
                max: self.max_content,
            };
            self.failed = Some(e);
            self.buf.clear();
            return Err(e);
        }
        let trailer = if self.signed && header.version == signed::VERSION {
            TRAILER_LEN
        } else {
            0
        };
        let total = UP_HEADER_LEN + usize::from(header.len) + trailer;
        let take = (total - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.buf.len() < total {
            return Ok(Decoded::NeedMore);
        }
        self.consumed = true;
        Ok(Decoded::Frame(Frame {
            header,
            content: &self.buf[UP_HEADER_LEN..total - trailer],
            raw: &self.buf[..total],
        }))
    }
}

/// The other direction: packets a device receives on its TCP stream (5-byte header, u16 length
/// at offset 3). The server never reads these; devices, the simulator, the CLI and the load
/// generator all do, so it lives here rather than in each of them.
/// Incremental decoder for the bytes a device receives on TCP.
///
/// ```
/// use ddpush_proto::{Content, DownMsg, DownStreamDecoder};
///
/// // Three packets back to back, as the server answers a heartbeat (PROTOCOL.md 7),
/// // arriving split at arbitrary places.
/// let stream = hex("0101100000010111000800000000000000050101200005") ;
/// let mut dec = DownStreamDecoder::new();
/// let mut got = Vec::new();
/// for chunk in stream.chunks(4) {
///     dec.extend(chunk);
///     while let Some(p) = dec.next_packet() {
///         got.push(p.unwrap());
///     }
/// }
/// dec.extend(b"hello");
/// got.push(dec.next_packet().unwrap().unwrap());
/// assert_eq!(got[1].msg, DownMsg::Bits(5));
/// assert_eq!(got[2].msg, DownMsg::Payload(Content::from_static(b"hello")));
/// # fn hex(s: &str) -> Vec<u8> {
/// #     (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
/// # }
/// ```
#[derive(Debug, Default, Clone)]
pub struct DownStreamDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl DownStreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered that do not yet form a whole packet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole packet, decoded; `None` when more bytes are needed.
    ///
    /// A delimited packet the codec refuses (wrong version, unknown command, wrong length for
    /// its command) is returned as an error and skipped; the stream stays in sync because the
    /// header's length field still delimits it.
    pub fn next_packet(&mut self) -> Option<Result<DownPacket, InvalidPacket>> {
        let rest = &self.buf[self.start..];
        let total = down_frame_len(rest)?;
        let packet = rest.get(..total)?;
        let decoded = DownPacket::decode(packet);
        self.consume(total);
        Some(decoded)
    }

    /// The next whole packet's bytes, undecoded; `None` when more bytes are needed. Signed
    /// devices read their stream with this and open each packet with
    /// [`SealedDown::open`](crate::signed::SealedDown::open).
    pub fn next_raw(&mut self) -> Option<Vec<u8>> {
        let rest = &self.buf[self.start..];
        let total = down_frame_len(rest)?;
        let packet = rest.get(..total)?.to_vec();
        self.consume(total);
        Some(packet)
    }

    fn consume(&mut self, total: usize) {
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// The length of the downstream packet at the front of `rest`, once its header is there: the
/// 5-byte header and N, plus the 25-byte trailer for a signed packet (PROTOCOL.md 9.4).
fn down_frame_len(rest: &[u8]) -> Option<usize> {
    let header = rest.get(..DOWN_HEADER_LEN)?;
    let total = DOWN_HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]]));
    Some(if header[0] == signed::VERSION {
        total + TRAILER_LEN
    } else {
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Content, DownMsg};

    fn frame(cmd: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![1, 9, cmd];
        v.extend_from_slice(&[0xAB; 16]);
        v.extend_from_slice(&(content.len() as u16).to_be_bytes());
        v.extend_from_slice(content);
        v
    }

    fn collect(dec: &mut StreamDecoder, mut input: &[u8]) -> Result<Vec<Vec<u8>>, FramingError> {
        let mut out = Vec::new();
        loop {
            match dec.decode(&mut input)? {
                Decoded::Frame(f) => out.push(f.content.to_vec()),
                Decoded::NeedMore => return Ok(out),
            }
        }
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let mut stream = frame(0, &[]);
        stream.extend(frame(0x11, &[0, 0, 0, 0, 0, 0, 0, 5]));
        stream.extend(frame(0x20, &[]));
        let mut whole = StreamDecoder::device();
        let a = collect(&mut whole, &stream).unwrap();
        let mut split = StreamDecoder::device();
        let mut b = Vec::new();
        for byte in &stream {
            b.extend(collect(&mut split, std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        assert_eq!(a[1], vec![0, 0, 0, 0, 0, 0, 0, 5]);
    }

    #[test]
    fn oversized_device_frame_fails_and_stays_failed() {
        let mut dec = StreamDecoder::device();
        let f = frame(0x20, &[0; 9]);
        let e = collect(&mut dec, &f).unwrap_err();
        assert_eq!(e, FramingError { len: 9, max: 8 });
        assert_eq!(collect(&mut dec, &frame(0, &[])), Err(e));
    }

    #[test]
    fn push_limit_applies_at_the_header() {
        let mut dec = StreamDecoder::new(500);
        let mut h = frame(0x20, &[]);
        h[19..21].copy_from_slice(&501u16.to_be_bytes());
        assert!(collect(&mut dec, &h).is_err());
        let mut ok = StreamDecoder::new(500);
        let f = frame(0x20, &[b'a'; 500]);
        assert_eq!(collect(&mut ok, &f).unwrap()[0].len(), 500);
        assert!(ok.buffered() <= ok.bound());
    }

    #[test]
    fn downstream_byte_at_a_time_and_invalid_packets_skipped() {
        let mut stream = DownPacket {
            app_id: 1,
            msg: DownMsg::Notify,
        }
        .to_vec();
        // Unknown command 0x30 with 2 content bytes: delimited, refused, skipped.
        stream.extend_from_slice(&[1, 1, 0x30, 0, 2, 9, 9]);
        stream.extend(
            DownPacket {
                app_id: 1,
                msg: DownMsg::Payload(Content::from_static(b"hi")),
            }
            .to_vec(),
        );
        let mut dec = DownStreamDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            dec.extend(std::slice::from_ref(b));
            while let Some(p) = dec.next_packet() {
                got.push(p);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap().msg, DownMsg::Notify);
        assert!(got[1].is_err());
        assert_eq!(
            got[2].as_ref().unwrap().msg,
            DownMsg::Payload(Content::from_static(b"hi"))
        );
        assert_eq!(dec.buffered(), 0);
    }
}
