//! Framing of downstream packets (server -> device) on a device's TCP stream.
//!
//! The core's [`StreamDecoder`](ddpush_proto::StreamDecoder) delimits upstream frames only
//! (21-byte header, length at offset 19): that is all the server reads. A device reading TCP
//! needs the other direction: a 5-byte header with the u16 length at offset 3 (PROTOCOL.md 3
//! and 4.7). This decoder only delimits; each whole packet is then decoded by the core's
//! [`DownPacket::decode`], so there is still one codec. It would sit naturally next to
//! `StreamDecoder` in the core (proposed in the client's report).

use ddpush_proto::codec::DOWN_HEADER_LEN;
use ddpush_proto::{DownPacket, InvalidPacket};

/// Incremental decoder for the bytes a device receives on TCP.
///
/// ```
/// use ddpush_client::{DownMsg, DownPacket, DownStreamDecoder};
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
/// assert_eq!(got[2].msg, DownMsg::Payload("hello".into()));
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
        let header = rest.get(..DOWN_HEADER_LEN)?;
        let total = DOWN_HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]]));
        let packet = rest.get(..total)?;
        let decoded = DownPacket::decode(packet);
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Some(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpush_proto::DownMsg;

    #[test]
    fn byte_at_a_time_and_invalid_packets_skipped() {
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
                msg: DownMsg::Payload("hi".into()),
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
        assert_eq!(got[2].as_ref().unwrap().msg, DownMsg::Payload("hi".into()));
        assert_eq!(dec.buffered(), 0);
    }
}
