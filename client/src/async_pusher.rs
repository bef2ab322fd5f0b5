//! The async app-server client for port 9999, on smol (`async-io`).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpStream};

use async_io::{Async, Timer};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};

use ddpush_proto::PushRequest;

use crate::pipeline::{on_write_error, Batch, ReadStep};
use crate::pusher::{resolve, PushError, PushOutcome, PusherConfig};

/// The async twin of [`Pusher`](crate::Pusher), with the same semantics: one reused
/// connection, pipelining, timeouts, reconnect, and [`PushOutcome::Closed`] (never
/// `Accepted`) for a request whose reply did not come.
///
/// ```no_run
/// use ddpush_client::{AsyncPusher, PushRequest, PushRequestExt, Uuid};
///
/// smol::block_on(async {
///     let mut pusher = AsyncPusher::new("127.0.0.1:9999");
///     let outcome = pusher.push(&PushRequest::bits(Uuid::from_user("alice"), 5)).await?;
///     println!("{outcome}");
///     Ok::<(), ddpush_client::PushError>(())
/// })?;
/// # Ok::<(), ddpush_client::PushError>(())
/// ```
#[derive(Debug)]
pub struct AsyncPusher {
    addr: String,
    config: PusherConfig,
    conn: Option<Async<TcpStream>>,
    buf: Vec<u8>,
}

impl AsyncPusher {
    /// A pusher for `addr` (`host:port`) with default settings. Nothing is connected yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Self::with_config(addr, PusherConfig::default())
    }

    /// A pusher with explicit settings.
    pub fn with_config(addr: impl Into<String>, config: PusherConfig) -> Self {
        AsyncPusher {
            addr: addr.into(),
            config,
            conn: None,
            buf: Vec::new(),
        }
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
    pub async fn push(&mut self, req: &PushRequest) -> Result<PushOutcome, PushError> {
        let mut outcome = PushOutcome::Closed;
        self.push_many_with(std::slice::from_ref(req), |_, o| outcome = o)
            .await?;
        Ok(outcome)
    }

    /// Sends every request, pipelined, and returns their verdicts in order.
    pub async fn push_many(&mut self, reqs: &[PushRequest]) -> Result<Vec<PushOutcome>, PushError> {
        let mut out = vec![PushOutcome::Closed; reqs.len()];
        self.push_many_with(reqs, |i, o| out[i] = o).await?;
        Ok(out)
    }

    /// Sends every request, pipelined, calling `on_result(index, outcome)` as each verdict
    /// arrives (in order).
    pub async fn push_many_with(
        &mut self,
        reqs: &[PushRequest],
        mut on_result: impl FnMut(usize, PushOutcome),
    ) -> Result<(), PushError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.run(reqs, &mut buf, &mut on_result).await;
        self.buf = buf;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn run(
        &mut self,
        reqs: &[PushRequest],
        buf: &mut Vec<u8>,
        on_result: &mut impl FnMut(usize, PushOutcome),
    ) -> Result<(), PushError> {
        self.drop_if_stale();
        let io_timeout = self.config.io_timeout;
        let mut batch = Batch::new(reqs, &self.config, self.conn.is_some());
        let mut rbuf = [0u8; 4096];
        while !batch.done() {
            if self.conn.is_none() {
                self.conn = Some(self.connect().await?);
                batch.on_connected();
            }
            let conn = self.conn.as_mut().expect("connected above");
            batch.fill(buf);
            let mut closed = false;
            if !buf.is_empty() {
                if let Err(e) = timed(io_timeout, conn.write_all(buf)).await {
                    closed = on_write_error(e)?;
                }
            }
            loop {
                let want = batch.session.in_flight().min(rbuf.len());
                if want == 0 {
                    break;
                }
                let r = timed(batch.read_wait(), conn.read(&mut rbuf[..want])).await;
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

    fn drop_if_stale(&mut self) {
        let Some(conn) = &self.conn else { return };
        // `Async` keeps the socket non-blocking, so a live idle connection says WouldBlock.
        let alive = matches!(conn.get_ref().peek(&mut [0u8; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        if !alive {
            self.conn = None;
        }
    }

    async fn connect(&self) -> Result<Async<TcpStream>, PushError> {
        let addrs: Vec<SocketAddr> = {
            let addr = self.addr.clone();
            // Name resolution blocks; keep it off the executor's thread.
            blocking_resolve(addr).await?
        };
        let mut last = None;
        for a in addrs {
            match timed(self.config.connect_timeout, Async::<TcpStream>::connect(a)).await {
                Ok(s) => {
                    s.get_ref().set_nodelay(true)?;
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

async fn blocking_resolve(addr: String) -> Result<Vec<SocketAddr>, PushError> {
    // A literal address needs no lookup; only names go to a thread.
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    smol::unblock(move || resolve(&addr)).await
}

/// Runs `fut` for at most `limit`; a timeout is an `io::ErrorKind::TimedOut` error.
async fn timed<T>(
    limit: std::time::Duration,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    future::or(fut, async {
        Timer::after(limit).await;
        Err(io::Error::from(io::ErrorKind::TimedOut))
    })
    .await
}
