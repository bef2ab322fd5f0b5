//! Incremental framing for the TCP streams (port 9966 device streams, port 9999 push streams).
//!
//! DDPush has no framing beyond the 16-bit length in each header, so a frame is only known to be
//! complete once its header has been read. The decoder copies at most one frame into a buffer
//! whose size is fixed when the connection opens (`21 + max_content`), so a peer can never make
//! it grow. "Need more bytes" is a value ([`Decoded::NeedMore`]), like httparse's `Partial`;
//! a frame that cannot be delimited within the bound is an error that ends the connection.

use crate::codec::{UpHeader, DEVICE_MAX_CONTENT, UP_HEADER_LEN};

/// A delimited upstream frame: a header and exactly the content it announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The parsed header (not yet validated for its port).
    pub header: UpHeader,
    /// The content, `header.len` bytes.
    pub content: &'a [u8],
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
}

impl StreamDecoder {
    /// A decoder for device streams on port 9966 (content at most 8 bytes).
    pub fn device() -> Self {
        Self::new(DEVICE_MAX_CONTENT as u16)
    }

    /// A decoder whose frames may carry at most `max_content` bytes (push streams use the
    /// configured maximum payload).
    pub fn new(max_content: u16) -> Self {
        StreamDecoder {
            buf: Vec::with_capacity(UP_HEADER_LEN + usize::from(max_content)),
            max_content,
            consumed: false,
            failed: None,
        }
    }

    /// The most bytes this decoder will ever hold.
    pub fn bound(&self) -> usize {
        UP_HEADER_LEN + usize::from(self.max_content)
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
        let total = UP_HEADER_LEN + usize::from(header.len);
        let take = (total - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.buf.len() < total {
            return Ok(Decoded::NeedMore);
        }
        self.consumed = true;
        Ok(Decoded::Frame(Frame {
            header,
            content: &self.buf[UP_HEADER_LEN..total],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
