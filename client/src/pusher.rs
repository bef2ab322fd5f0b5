//! The blocking app-server client for port 9999, on `std::net`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use ddpush_proto::{Content, ContentTooLong, PushMsg, PushReply, PushRequest, Uuid};

use crate::pipeline::{on_write_error, Pipeline, ReadStep};

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
    /// The connection closed before the reply: the request may not have been stored. The
    /// server does this to a payload larger than its maximum (500 bytes by default).
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
/// meanwhile (idle timeout, restart) is noticed before the next push and replaced. A request
/// whose reply never came is reported [`PushOutcome::Closed`], never retried and never
/// reported accepted. In [`push_many`](Self::push_many) the requests after it are sent again
/// on a new connection, since the server stops reading at the one it refused.
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
    /// A server that closes the connection without answering gives
    /// [`PushOutcome::Closed`], not success:
    ///
    /// ```
    /// use std::io::Read;
    /// use ddpush_client::{PushOutcome, PushRequest, PushRequestExt, Pusher, Uuid};
    ///
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let addr = listener.local_addr()?.to_string();
    /// let server = std::thread::spawn(move || {
    ///     let (mut conn, _) = listener.accept().unwrap();
    ///     let mut header = [0u8; 21];
    ///     conn.read_exact(&mut header).unwrap(); // then close without a reply byte
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
        let mut pipe = Pipeline::new(reqs, self.config.window);
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.run(&mut pipe, &mut buf, &mut on_result);
        self.buf = buf;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn run(
        &mut self,
        pipe: &mut Pipeline<'_>,
        buf: &mut Vec<u8>,
        on_result: &mut impl FnMut(usize, PushOutcome),
    ) -> Result<(), PushError> {
        self.drop_if_stale();
        let mut rbuf = [0u8; 4096];
        while !pipe.done() {
            if self.conn.is_none() {
                self.conn = Some(self.connect()?);
            }
            let conn = self.conn.as_mut().expect("connected above");
            pipe.fill(buf);
            let mut closed = false;
            if !buf.is_empty() {
                if let Err(e) = conn.write_all(buf) {
                    closed = on_write_error(e)?;
                }
            }
            // After a failed write, replies already received are still read before the close
            // is accounted for.
            loop {
                let want = pipe.in_flight().min(rbuf.len());
                if want == 0 {
                    break;
                }
                let r = conn.read(&mut rbuf[..want]);
                match pipe.on_read(r, &rbuf, closed, on_result)? {
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
                pipe.on_close(on_result);
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
