//! TCP connections (device port 9966 and push port 9999), driven by readiness from the loop,
//! for a node of either kind ([`SocketCore`]).
//!
//! An open connection is a small [`Conn`] in one map: the registered socket, a waker that names
//! it, and nothing else while it is idle: no task, no channel, no read buffer, no write queue,
//! no timer (idle timeouts are the core's). When the reactor reports it readable, its waker
//! puts its id on the ready list and the loop reads it into one buffer shared by every
//! connection, handing the bytes straight to the core. Replies and deliveries are written at
//! once; only what the kernel does not take is kept, in a queue that exists while a write is
//! pending and is bounded: a peer that stops reading is closed (the stall rule).
//!
//! One accept task per listener hands new sockets to the loop ([`Msg::Open`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_channel::Sender;
use async_io::{Async, Timer};
use ddpush_proto::{ConnId, Port, Time};
use futures_lite::AsyncWrite;
use tracing::{debug, warn};

use super::sockets::SocketCore;
use super::Msg;
use crate::metrics::SocketStats;
use crate::settings::Cidr;

/// Reads per connection per wake-up before the others get a turn; a connection that still
/// has data goes back on the ready list.
const READS_PER_WAKE: usize = 4;
/// Bytes the kernel has not taken that one connection may hold before it counts as stalled
/// and is closed. A device's downstream traffic is a few packets per heartbeat; a pusher's is
/// one byte per request.
pub(super) const WRITE_LIMIT: usize = 16 * 1024;
/// How long a connection closed with bytes still unsent may take to drain them.
const LINGER: Duration = Duration::from_secs(10);

/// The ready list: ids of connections whose socket the reactor reported ready.
#[derive(Default)]
struct Ready {
    ids: Mutex<Vec<ConnId>>,
    /// The loop's waker while it waits.
    waker: Mutex<Option<Waker>>,
}

/// The waker of one connection: puts its id on the ready list (once until serviced).
struct ConnWake {
    id: ConnId,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.push(self.id);
        }
    }
}

impl Ready {
    fn push(&self, id: ConnId) {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
        let w = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Bytes the kernel has not taken yet; exists only while a write is pending.
struct Pending {
    bytes: Vec<u8>,
    /// Set when the connection was closed with these bytes still queued.
    linger_until: Option<Instant>,
}

/// One open connection.
struct Conn {
    stream: Async<TcpStream>,
    wake: Arc<ConnWake>,
    out: Option<Box<Pending>>,
    /// Closed by the core or by the peer: shut down once `out` is written.
    closing: bool,
}

/// Every open connection, and the ready list the reactor fills.
pub(super) struct Conns {
    map: HashMap<ConnId, Conn>,
    ready: Arc<Ready>,
    /// Taken from `ready` for one turn (kept to reuse its allocation).
    batch: Vec<ConnId>,
    /// The buffer every connection is read into (one for all of them); its size is the
    /// most one read hands to the core.
    buf: Box<[u8]>,
    /// Closed by their peer in this turn: shut down after the turn's writes.
    peer_closed: Vec<ConnId>,
    /// Closed connections still draining their queue, checked against `LINGER`.
    lingering: Vec<ConnId>,
}

impl Conns {
    /// No connections yet; reads of at most `read_buf` bytes.
    pub(super) fn new(read_buf: usize) -> Self {
        Conns {
            map: HashMap::new(),
            ready: Arc::new(Ready::default()),
            batch: Vec::new(),
            buf: vec![0u8; read_buf].into_boxed_slice(),
            peer_closed: Vec::new(),
            lingering: Vec::new(),
        }
    }

    /// Takes an accepted connection; its first read is attempted in this turn.
    pub(super) fn insert(&mut self, id: ConnId, stream: Async<TcpStream>) {
        let wake = Arc::new(ConnWake {
            id,
            queued: AtomicBool::new(true),
            ready: self.ready.clone(),
        });
        self.map.insert(
            id,
            Conn {
                stream,
                wake,
                out: None,
                closing: false,
            },
        );
        self.batch.push(id);
    }

    /// Ready when a connection needs service (for the loop's race).
    pub(super) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let has = |r: &Ready| {
            !r.ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        };
        if !self.batch.is_empty() || has(&self.ready) {
            return Poll::Ready(());
        }
        *self
            .ready
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
        // A wake-up between the check and the registration must not be missed.
        if has(&self.ready) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Services every ready connection: writes what is pending, reads what arrived into the
    /// core (`handle_tcp_data`, `handle_tcp_close`) while `more` (asked before each read)
    /// allows. A connection not read because `more` said stop stays on the list for the next
    /// service. Returns how many were serviced.
    pub(super) fn service<C: SocketCore>(
        &mut self,
        node: &mut C,
        now: Time,
        mut more: impl FnMut(&mut C) -> bool,
    ) -> usize {
        self.batch.append(
            &mut self
                .ready
                .ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let batch = std::mem::take(&mut self.batch);
        let mut again = Vec::new();
        let mut serviced = 0;
        for (i, &id) in batch.iter().enumerate() {
            if !more(node) {
                // Held back: these stay queued (their flags are still set) for the next
                // service, their data waiting in the kernel (TCP flow control).
                again.extend_from_slice(&batch[i..]);
                break;
            }
            serviced += 1;
            let Some(c) = self.map.get_mut(&id) else {
                continue;
            };
            // Cleared before polling, so a wake-up during the poll queues it again.
            c.wake.queued.store(false, Ordering::Release);
            let waker = Waker::from(c.wake.clone());
            let mut cx = Context::from_waker(&waker);
            let mut gone = drive_out(&c.stream, &mut c.out, &mut cx).is_err();
            if c.closing {
                if gone || c.out.is_none() {
                    self.remove(id);
                }
                continue;
            }
            let mut reads = 0;
            while !gone {
                if reads == READS_PER_WAKE || (reads > 0 && !more(node)) {
                    c.wake.queued.store(true, Ordering::Release);
                    again.push(id);
                    break;
                }
                match c.stream.get_ref().read(&mut self.buf) {
                    Ok(0) => gone = true,
                    Ok(n) => {
                        reads += 1;
                        node.handle_tcp_data(now, id, &self.buf[..n]);
                        // A short read drained the socket (almost always: devices send 21..29
                        // bytes at a time): re-arm instead of reading again only to hear
                        // "would block". The first poll reports the wake-up that brought us
                        // here; the second registers the waker (and reports data that came
                        // in between, if any).
                        if n < self.buf.len()
                            && !(c.stream.poll_readable(&mut cx).is_ready()
                                && c.stream.poll_readable(&mut cx).is_ready())
                        {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if c.stream.poll_readable(&mut cx).is_pending() {
                            break;
                        }
                    }
                    Err(_) => gone = true,
                }
            }
            if gone {
                // The replies to what it sent last are written in this turn's flush; the
                // connection is shut down after that (`finish_closed`).
                node.handle_tcp_close(now, id);
                c.closing = true;
                self.peer_closed.push(id);
            }
        }
        self.batch = batch;
        self.batch.clear();
        self.batch.append(&mut again);
        serviced
    }

    /// Writes `bytes` to `id` now; what the kernel does not take is queued. Returns false if
    /// the connection is stalled (it would queue more than [`WRITE_LIMIT`]): it is then shut
    /// down, and the core hears of it when the loop next services it. Never calls the core:
    /// this runs while a turn's output is sent.
    pub(super) fn send(&mut self, id: ConnId, bytes: &[u8]) -> bool {
        let Some(c) = self.map.get_mut(&id) else {
            return true;
        };
        if let Some(p) = &mut c.out {
            if p.bytes.len() + bytes.len() > WRITE_LIMIT {
                self.broken(id);
                return false;
            }
            p.bytes.extend_from_slice(bytes);
            return true;
        }
        let mut off = 0;
        while off < bytes.len() {
            match c.stream.get_ref().write(&bytes[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.broken(id);
                    return true;
                }
            }
        }
        if off < bytes.len() {
            if bytes.len() - off > WRITE_LIMIT {
                self.broken(id);
                return false;
            }
            c.out = Some(Box::new(Pending {
                bytes: bytes[off..].to_vec(),
                linger_until: None,
            }));
            // Registers interest in writability: the waker queues the connection.
            let waker = Waker::from(c.wake.clone());
            if drive_out(&c.stream, &mut c.out, &mut Context::from_waker(&waker)).is_err() {
                self.broken(id);
            }
        }
        true
    }

    /// The core closed `id`: shut it down once what is queued for it is written.
    pub(super) fn close(&mut self, id: ConnId) {
        if let Some(c) = self.map.get_mut(&id) {
            c.closing = true;
            self.finish(id);
        }
    }

    /// After a turn's writes: the connections their peer closed in this turn are shut down.
    pub(super) fn finish_closed(&mut self) {
        for id in std::mem::take(&mut self.peer_closed) {
            self.finish(id);
        }
    }

    /// Shuts down a closing connection with nothing left to write; one with bytes still
    /// queued lingers until they are written or [`LINGER`] passes.
    fn finish(&mut self, id: ConnId) {
        let Some(c) = self.map.get_mut(&id) else {
            return;
        };
        match &mut c.out {
            None => self.remove(id),
            Some(p) if p.linger_until.is_none() => {
                p.linger_until = Some(Instant::now() + LINGER);
                self.lingering.push(id);
            }
            Some(_) => {}
        }
    }

    /// Drops the connections that lingered past [`LINGER`] with bytes still unsent.
    pub(super) fn expire_lingering(&mut self) {
        let now = Instant::now();
        for id in std::mem::take(&mut self.lingering) {
            match self.map.get(&id).and_then(|c| c.out.as_ref()) {
                Some(p) if p.linger_until.is_some_and(|t| t > now) => self.lingering.push(id),
                Some(_) => self.remove(id),
                None => {}
            }
        }
    }

    /// A write failed or the peer stalled: shut the socket down and drop what was queued. The
    /// next service reads end-of-stream and tells the core (`handle_tcp_close`).
    fn broken(&mut self, id: ConnId) {
        if let Some(c) = self.map.get_mut(&id) {
            c.out = None;
            let _ = c.stream.get_ref().shutdown(Shutdown::Both);
            if !c.wake.queued.swap(true, Ordering::AcqRel) {
                self.batch.push(id);
            }
        }
    }

    fn remove(&mut self, id: ConnId) {
        if let Some(c) = self.map.remove(&id) {
            let _ = c.stream.get_ref().shutdown(Shutdown::Both);
        }
    }
}

/// Writes the pending queue until it is empty or the socket would block (then `cx`'s waker is
/// registered for writability). `Err` means the peer is gone.
fn drive_out(
    stream: &Async<TcpStream>,
    out: &mut Option<Box<Pending>>,
    cx: &mut Context<'_>,
) -> Result<(), ()> {
    while let Some(p) = out {
        match Pin::new(&mut &*stream).poll_write(cx, &p.bytes) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
            Poll::Ready(Ok(n)) => {
                p.bytes.drain(..n);
                if p.bytes.is_empty() {
                    *out = None;
                }
            }
            Poll::Pending => return Ok(()),
        }
    }
    Ok(())
}

/// Accepts connections on one listener and hands them to the loop.
pub(super) async fn accept_loop(
    l: Async<TcpListener>,
    port: Port,
    tx: Sender<Msg>,
    next_id: Arc<AtomicU64>,
    push_allow: Vec<Cidr>,
    stats: Arc<SocketStats>,
) {
    loop {
        let (stream, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        if port == Port::Push
            && !push_allow.is_empty()
            && !push_allow.iter().any(|c| c.contains(peer.ip()))
        {
            SocketStats::bump(&stats.push_denied);
            debug!(%peer, "push connection from outside --push-allow closed");
            continue;
        }
        let _ = stream.get_ref().set_nodelay(true);
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        if tx
            .send(Msg::Open {
                conn,
                port,
                peer,
                stream,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpush_proto::Transmit;
    use std::net::SocketAddr;

    /// A core that only records what the connection layer hands it.
    #[derive(Default)]
    struct Recorder {
        data: Vec<u8>,
        closed: bool,
    }

    impl SocketCore for Recorder {
        fn handle_udp(&mut self, _: Time, _: SocketAddr, _: &[u8]) {}
        fn handle_tcp_open(&mut self, _: Time, _: ConnId, _: Port, _: SocketAddr) -> bool {
            true
        }
        fn handle_tcp_data(&mut self, _: Time, _: ConnId, data: &[u8]) {
            self.data.extend_from_slice(data);
        }
        fn handle_tcp_close(&mut self, _: Time, _: ConnId) {
            self.closed = true;
        }
        fn poll_transmit(&mut self) -> Option<Transmit> {
            None
        }
        fn poll_close(&mut self) -> Option<ConnId> {
            None
        }
    }

    /// A connected pair: our end registered with the reactor, the peer's plain.
    fn pair() -> (Async<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (ours, _) = l.accept().expect("accept");
        (Async::new(ours).expect("async"), peer)
    }

    /// Services until `done` or a second passes (the reactor reports readiness shortly).
    fn service_until(
        conns: &mut Conns,
        core: &mut Recorder,
        mut more: impl FnMut(&mut Recorder) -> bool,
        done: impl Fn(&Recorder) -> bool,
    ) {
        let t = Instant::now();
        while !done(core) && t.elapsed() < Duration::from_secs(1) {
            smol::block_on(async {
                let _ = futures_lite::future::poll_once(std::future::poll_fn(|cx| {
                    conns.poll_ready(cx)
                }))
                .await;
            });
            conns.service(core, Time(0), &mut more);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_held_back_connection_keeps_its_bytes_until_input_is_allowed_again() {
        let (ours, mut peer) = pair();
        let mut conns = Conns::new(4096);
        conns.insert(1, ours);
        let sent: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        peer.write_all(&sent).expect("write");
        std::thread::sleep(Duration::from_millis(50));
        let mut core = Recorder::default();
        // Held back: nothing is read, however often it is serviced.
        for _ in 0..3 {
            assert_eq!(conns.service(&mut core, Time(0), |_| false), 0);
        }
        assert!(core.data.is_empty());
        // One read allowed: at most one buffer's worth reaches the core.
        let mut asked = 0;
        conns.service(&mut core, Time(0), |_| {
            asked += 1;
            asked == 1
        });
        assert_eq!(core.data.len(), 4096, "one read of the 4 KiB buffer");
        // Allowed again: the rest arrives, in order, and then the close.
        drop(peer);
        service_until(&mut conns, &mut core, |_| true, |c| c.closed);
        assert_eq!(core.data, sent);
        assert!(core.closed);
    }
}
