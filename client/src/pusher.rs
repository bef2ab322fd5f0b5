//! The blocking app-server client for port 9999, on `std::net`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use ddpush_proto::{Content, ContentTooLong, PushMsg, PushRequest, Uuid};

use crate::pipeline::{on_write_error, Batch, ReadStep};

/// The server's verdict on one push request (the core's session type).
pub use ddpush_proto::session::PushOutcome;

/// Why a push could not get a verdict at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The address did not resolve to anything.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// No connection could be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: String,
        /// The last error.
        source: io::Error,
    },
    /// No reply (or no progress writing) within the I/O timeout. The connection is dropped;
    /// requests in flight may or may not have been stored.
    #[error("timed out waiting for the server")]
    Timeout,
    /// The server sent a byte that is not a reply the protocol defines.
    #[error("unexpected reply byte 0x{0:02x}")]
    BadReply(u8),
    /// A payload no length field can announce (over 65,535 bytes); nothing was sent.
    #[error(transparent)]
    ContentTooLong(#[from] ContentTooLong),
    /// Any other I/O error.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Settings shared by [`Pusher`] and [`AsyncPusher`](crate::AsyncPusher).
#[derive(Clone, Debug)]
pub struct PusherConfig {
    /// Limit on establishing a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Limit on each wait for the server (a write making progress, a reply arriving).
    /// Default 10 s.
    pub io_timeout: Duration,
    /// Most requests sent and not yet answered on the connection. Default 256.
    pub window: usize,
}

impl Default for PusherConfig {
    fn default() -> Self {
        PusherConfig {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            window: 256,
        }
    }
}

/// Convenience constructors for [`PushRequest`] (import the trait to use them). The appId is
/// 1, as the Java `Pusher` sends; set the field to change it.
///
/// A payload is refused here only when no 16-bit length field can announce it (over 65,535
/// bytes): such a request has no correct encoding. One over the server's maximum (500 bytes
/// by default) can be made and sent; the server decides, by closing the connection.
///
/// ```
/// use ddpush_client::{Content, PushMsg, PushRequest, PushRequestExt, Uuid};
///
/// let alice = Uuid::from_user("alice");
/// assert_eq!(PushRequest::notify(alice).msg, PushMsg::Notify);
/// assert_eq!(PushRequest::bits(alice, 5).msg, PushMsg::Bits(5));
/// let hi = PushRequest::text(alice, "hi")?;
/// assert_eq!(hi.msg, PushMsg::Payload(Content::from_static(b"hi")));
/// assert_eq!(hi.to_vec().len(), 21 + 2);
/// assert!(PushRequest::payload(alice, vec![0u8; 65_536]).is_err());
/// # Ok::<(), ddpush_client::ContentTooLong>(())
/// ```
pub trait PushRequestExt: Sized {
    /// A 0x10 "you have news" push.
    fn notify(uuid: Uuid) -> Self;
    /// A 0x11 push of category bits.
    fn bits(uuid: Uuid, bits: u64) -> Self;
    /// A 0x20 push of UTF-8 text.
    fn text(uuid: Uuid, text: &str) -> Result<Self, ContentTooLong>;
    /// A 0x20 push of arbitrary bytes.
    fn payload(uuid: Uuid, data: impl Into<Bytes>) -> Result<Self, ContentTooLong>;
}

impl PushRequestExt for PushRequest {
    fn notify(uuid: Uuid) -> Self {
        PushRequest {
            app_id: 1,
            uuid,
            msg: PushMsg::Notify,
        }
    }
    fn bits(uuid: Uuid, bits: u64) -> Self {
        PushRequest {
            app_id: 1,
            uuid,
            msg: PushMsg::Bits(bits),
        }
    }
    fn text(uuid: Uuid, text: &str) -> Result<Self, ContentTooLong> {
        Self::payload(uuid, Bytes::copy_from_slice(text.as_bytes()))
    }
    fn payload(uuid: Uuid, data: impl Into<Bytes>) -> Result<Self, ContentTooLong> {
        Ok(PushRequest {
            app_id: 1,
            uuid,
            msg: PushMsg::Payload(Content::new(data)?),
        })
    }
}

/// A blocking pusher: one reused TCP connection to the push port, pipelined requests.
///
/// The connection is opened on first use and kept; a connection the server has closed
/// meanwhile (idle timeout, restart) is noticed before the next push and replaced. The
/// pipeline's rules are the core's [`PushSession`](ddpush_proto::session::PushSession): when a
/// connection ends with requests unanswered, they are sent again in order on a new one,
/// except the one the server refused by closing (a payload over its maximum, or one at the
/// head of two connections that both ended without answering it), which is reported
/// [`PushOutcome::Closed`]. Nothing is ever reported accepted without a `0x00` read.
///
/// ```no_run
/// use ddpush_client::{Pusher, PushRequest, PushRequestExt, Uuid};
///
/// let mut pusher = Pusher::new("127.0.0.1:9999");
/// let reqs = (0..1000)
///     .map(|i| PushRequest::text(Uuid::from_user(&format!("user{i}")), "hello"))
///     .collect::<Result<Vec<_>, _>>()?;
/// let outcomes = pusher.push_many(&reqs)?;
/// let accepted = outcomes.iter().filter(|o| o.is_accepted()).count();
/// println!("{accepted} of {} accepted", reqs.len());
/// # Ok::<(), ddpush_client::PushError>(())
/// ```
#[derive(Debug)]
pub struct Pusher {
    addr: String,
    config: PusherConfig,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Pusher {
    /// A pusher for `addr` (`host:port`) with default settings. Nothing is connected yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Self::with_config(addr, PusherConfig::default())
    }

    /// A pusher with explicit settings.
    pub fn with_config(addr: impl Into<String>, config: PusherConfig) -> Self {
        Pusher {
            addr: addr.into(),
            config,
            conn: None,
            buf: Vec::new(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &PusherConfig {
        &self.config
    }

    /// Whether a connection is currently open (it may still turn out closed by the peer).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Closes the connection, if any; the next push opens a new one.
    pub fn close(&mut self) {
        self.conn = None;
    }

    /// Sends one request and waits for its verdict.
    ///
    /// A server that closes the connection without answering, again when the request is sent
    /// a second time, gives [`PushOutcome::Closed`], not success:
    ///
    /// ```
    /// use std::io::Read;
    /// use ddpush_client::{PushOutcome, PushRequest, PushRequestExt, Pusher, Uuid};
    ///
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let addr = listener.local_addr()?.to_string();
    /// let server = std::thread::spawn(move || {
    ///     for _ in 0..2 {
    ///         let (mut conn, _) = listener.accept().unwrap();
    ///         let mut header = [0u8; 21];
    ///         conn.read_exact(&mut header).unwrap(); // then close without a reply byte
    ///     }
    /// });
    /// let mut pusher = Pusher::new(addr);
    /// let outcome = pusher.push(&PushRequest::notify(Uuid::from_user("alice")))?;
    /// assert_eq!(outcome, PushOutcome::Closed);
    /// server.join().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn push(&mut self, req: &PushRequest) -> Result<PushOutcome, PushError> {
        let mut outcome = PushOutcome::Closed;
        self.push_many_with(std::slice::from_ref(req), |_, o| outcome = o)?;
        Ok(outcome)
    }

    /// Sends every request, pipelined, and returns their verdicts in order.
    pub fn push_many(&mut self, reqs: &[PushRequest]) -> Result<Vec<PushOutcome>, PushError> {
        let mut out = vec![PushOutcome::Closed; reqs.len()];
        self.push_many_with(reqs, |i, o| out[i] = o)?;
        Ok(out)
    }

    /// Sends every request, pipelined, calling `on_result(index, outcome)` as each verdict
    /// arrives (in order). On an error, the requests not yet reported have no verdict.
    pub fn push_many_with(
        &mut self,
        reqs: &[PushRequest],
        mut on_result: impl FnMut(usize, PushOutcome),
    ) -> Result<(), PushError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.run(reqs, &mut buf, &mut on_result);
        self.buf = buf;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn run(
        &mut self,
        reqs: &[PushRequest],
        buf: &mut Vec<u8>,
        on_result: &mut impl FnMut(usize, PushOutcome),
    ) -> Result<(), PushError> {
        self.drop_if_stale();
        let mut batch = Batch::new(reqs, &self.config, self.conn.is_some());
        let mut rbuf = [0u8; 4096];
        while !batch.done() {
            if self.conn.is_none() {
                self.conn = Some(self.connect()?);
                batch.on_connected();
            }
            let conn = self.conn.as_mut().expect("connected above");
            batch.fill(buf);
            let mut closed = false;
            if !buf.is_empty() {
                if let Err(e) = conn.write_all(buf) {
                    closed = on_write_error(e)?;
                }
            }
            // After a failed write, replies already received are still read before the close
            // is accounted for.
            loop {
                let want = batch.session.in_flight().min(rbuf.len());
                if want == 0 {
                    break;
                }
                conn.set_read_timeout(Some(batch.read_wait()))?;
                let r = conn.read(&mut rbuf[..want]);
                match batch.on_read(r, &rbuf, closed, on_result)? {
                    ReadStep::More => {}
                    ReadStep::Done => break,
                    ReadStep::Closed => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                self.conn = None;
                batch.on_close(on_result);
            }
        }
        Ok(())
    }

    /// Drops a kept connection that the server has closed (or that has unexpected bytes).
    fn drop_if_stale(&mut self) {
        let Some(conn) = &self.conn else { return };
        let alive = conn.set_nonblocking(true).is_ok()
            && matches!(conn.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            && conn.set_nonblocking(false).is_ok();
        if !alive {
            self.conn = None;
        }
    }

    fn connect(&self) -> Result<TcpStream, PushError> {
        let addrs = resolve(&self.addr)?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.config.connect_timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(self.config.io_timeout))?;
                    s.set_write_timeout(Some(self.config.io_timeout))?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(PushError::Connect {
            addr: self.addr.clone(),
            source: last.unwrap_or_else(|| io::Error::other("no address")),
        })
    }
}

pub(crate) fn resolve(addr: &str) -> Result<Vec<SocketAddr>, PushError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|_| PushError::Resolve(addr.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(PushError::Resolve(addr.to_string()));
    }
    Ok(addrs)
}

pub(crate) fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
