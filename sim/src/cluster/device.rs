//! Devices behind an L4 load balancer, running the core's [`DeviceSession`] (the SDK's
//! behaviour, PROTOCOL.md 4.8: heartbeat every 50 s counted from the last packet sent, every
//! message acked at once on the socket or connection it came on, a heartbeat at once on every
//! new socket or connection). These adapters only move bytes and time.
//!
//! * A UDP device ([`run`]): each packet the session sends goes to the node the load balancer
//!   picks at that moment ([`World::route`]), so a device whose node stopped answering its
//!   health check re-targets another node at its next packet.
//! * A TCP device ([`run_tcp`]): one long-lived connection to 9966, which the load balancer
//!   pins to the node it picks when the connection opens. It ends when the node dies (its
//!   socket closes: the device reads EOF) or when the load balancer resets the flows of a node
//!   that failed its health check (a frozen node closes nothing); the session then asks for a
//!   new connection after its retry delay, and the load balancer picks a node that is up.
//!
//! The network's faults on the device side ([`super::world::DeviceFaults`]: lost datagrams,
//! lost acks, new sockets) are applied here, outside the session: a lost datagram is never
//! handed to it, a lost ack was sent (it restarts the heartbeat interval) but never arrives, and
//! a new socket is a new link for the session (its heartbeat goes out at once, from a new
//! source port).

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::session::{DeviceConfig, DeviceEvent, DeviceSession};
use ddpush_proto::{DeviceMsg, Time};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpStream, UdpSocket};

use super::world::{DeviceFaults, Rx, World};
use crate::server::DEVICE_PORT;
use crate::world::now_ms;

fn now() -> Time {
    Time::from_millis(now_ms())
}

fn sleep_until_ms(t: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms())))
}

/// The session of device `idx` and its fault RNG (its own stream, seeded from the faults' seed).
fn session(w: &World, idx: usize, app_id: u8) -> (DeviceSession, SmallRng) {
    let cfg = DeviceConfig {
        app_id,
        ..DeviceConfig::new(w.uuids[idx])
    };
    let rng = SmallRng::seed_from_u64(w.faults.seed ^ (idx as u64).wrapping_mul(0x9E37_79B9));
    (DeviceSession::new(cfg), rng)
}

/// When the session next needs the clock (its heartbeat or link retry), at the latest `end`.
fn wake_at(session: &DeviceSession, end: u64) -> u64 {
    session.poll_timeout().map_or(end, Time::as_millis).min(end)
}

/// Whether a fault of probability `p` strikes now. Draws only while faults are on, so a run
/// without faults draws nothing.
fn strikes(faults: &DeviceFaults, rng: &mut SmallRng, p: f64) -> bool {
    let t = now_ms();
    p > 0.0 && t >= faults.from && t < faults.until && rng.random_bool(p)
}

struct Dev {
    w: Rc<World>,
    idx: usize,
    session: DeviceSession,
    sock: UdpSocket,
    /// The node the last packet went to.
    routed: usize,
    faults: DeviceFaults,
    rng: SmallRng,
}

impl Dev {
    fn fault(&mut self, p: f64) -> bool {
        strikes(&self.faults, &mut self.rng, p)
    }

    /// Sends what the session queued, each packet to the node the load balancer picks now.
    async fn flush(&mut self) {
        while let Some(t) = self.session.poll_transmit(now()) {
            let msg = t.packet.msg;
            if msg != DeviceMsg::Heartbeat && self.fault(self.faults.ack_loss) {
                self.w.fault_counts.borrow_mut().lost_acks += 1;
                continue;
            }
            let Some(n) = self.w.route(self.idx) else {
                continue;
            };
            self.routed = n;
            if msg == DeviceMsg::Heartbeat {
                self.w.devices[self.idx]
                    .borrow_mut()
                    .heartbeats
                    .push((now_ms(), n));
            }
            let to: SocketAddr = self.w.node_addrs.borrow()[n];
            let _ = self.sock.send_to(t.bytes(), to).await;
        }
    }

    /// A new socket (new source port): a new link for the session.
    async fn new_socket(&mut self) -> std::io::Result<()> {
        self.sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        self.session.handle_connected(now());
        Ok(())
    }
}

/// Runs device `idx` from `start` (ms) to `end` (ms).
pub async fn run(w: Rc<World>, idx: usize, app_id: u8, start: u64, end: u64) -> turmoil::Result {
    sleep_until_ms(start).await;
    let (session, rng) = session(&w, idx, app_id);
    let mut d = Dev {
        session,
        sock: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?,
        routed: usize::MAX,
        rng,
        faults: w.faults,
        w,
        idx,
    };
    // The session asks for its first link at once.
    while d.session.poll_event().is_some() {}
    d.session.handle_connected(now());
    d.flush().await;
    let mut buf = vec![0u8; 1024];
    loop {
        let wake = wake_at(&d.session, end);
        let mut got: Option<(Vec<u8>, Option<usize>, usize)> = None;
        tokio::select! {
            biased;
            r = d.sock.recv_from(&mut buf) => {
                match r {
                    Ok((n, src)) => {
                        if d.fault(d.faults.down_loss) {
                            d.w.fault_counts.borrow_mut().lost_down += 1;
                            continue;
                        }
                        let from = d.w.node_addrs.borrow().iter().position(|a| a.ip() == src.ip());
                        got = Some((buf[..n].to_vec(), from, d.routed));
                        d.session.handle_datagram(now(), &buf[..n]);
                    }
                    Err(_) => d.session.handle_link_error(now()),
                }
            }
            _ = sleep_until_ms(wake) => {
                if now_ms() >= end {
                    return Ok(());
                }
                let heartbeat_due = d
                    .session
                    .poll_timeout()
                    .is_some_and(|t| t.as_millis() <= now_ms());
                if heartbeat_due && d.session.is_connected() && d.fault(d.faults.rebind) {
                    // The app restarts or the NAT rebinds: what is on its way to the old
                    // socket is lost, the new one heartbeats at once.
                    d.w.fault_counts.borrow_mut().rebinds += 1;
                    d.new_socket().await?;
                } else {
                    d.session.handle_timeout(now());
                }
            }
        }
        // The acks of what arrived go out first, then the app sees it.
        d.flush().await;
        let mut connect = false;
        while let Some(e) = d.session.poll_event() {
            match e {
                DeviceEvent::Message(p) => {
                    if let Some((bytes, from, routed)) = got.take() {
                        d.w.devices[d.idx].borrow_mut().rx.push(Rx {
                            at: now_ms(),
                            from,
                            bytes,
                            msg: p.msg,
                            routed,
                        });
                    }
                }
                DeviceEvent::Connect => connect = true,
                _ => {}
            }
        }
        if connect {
            // The SDK makes a new socket after an error.
            d.new_socket().await?;
            d.flush().await;
        }
    }
}

/// How often a TCP device's connection looks at the load balancer's health view (the load
/// balancer resets the flows of a node that failed its check within this much).
const LB_RESET_CHECK_MS: u64 = 500;
/// Connection attempts give up after this long (a node that is down answers nothing).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A TCP device's state between connections.
struct TcpDev {
    w: Rc<World>,
    idx: usize,
    session: DeviceSession,
    faults: DeviceFaults,
    rng: SmallRng,
}

/// One connection, pinned to one node.
struct Conn {
    s: TcpStream,
    node: usize,
    /// Bytes of a downstream packet not yet whole.
    partial: Vec<u8>,
}

impl TcpDev {
    fn fault(&mut self, p: f64) -> bool {
        strikes(&self.faults, &mut self.rng, p)
    }

    /// A new connection through the load balancer; the session's heartbeat goes out at once.
    async fn connect(&mut self) -> Option<Conn> {
        let node = self.w.route(self.idx)?;
        let to = SocketAddr::new(self.w.node_addrs.borrow()[node].ip(), DEVICE_PORT);
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
            .await
            .ok()?
            .ok()?;
        self.w.fault_counts.borrow_mut().tcp_connects += 1;
        self.session.handle_connected(now());
        let mut c = Conn {
            s,
            node,
            partial: Vec::new(),
        };
        self.flush(&mut c).await.then_some(c)
    }

    /// Writes what the session queued; `false` if the connection broke.
    async fn flush(&mut self, c: &mut Conn) -> bool {
        while let Some(t) = self.session.poll_transmit(now()) {
            if t.packet.msg == DeviceMsg::Heartbeat {
                self.w.devices[self.idx]
                    .borrow_mut()
                    .heartbeats
                    .push((now_ms(), c.node));
            }
            if c.s.write_all(t.bytes()).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Bytes from the connection: each whole downstream packet (delimited here by hand from
    /// its PROTOCOL.md 3 header, `01 appId cmd len(2) content`) goes to the session on its own,
    /// its ack out, then the app sees it, logged with exactly the bytes that carried it.
    async fn receive(&mut self, c: &mut Conn, bytes: &[u8]) -> bool {
        c.partial.extend_from_slice(bytes);
        loop {
            if c.partial.len() < 5 {
                return true;
            }
            let len = 5 + usize::from(u16::from_be_bytes([c.partial[3], c.partial[4]]));
            if c.partial.len() < len {
                return true;
            }
            let frame: Vec<u8> = c.partial.drain(..len).collect();
            self.session.handle_stream(now(), &frame);
            if !self.flush(c).await {
                return false;
            }
            let mut frame = Some(frame);
            while let Some(e) = self.session.poll_event() {
                if let (DeviceEvent::Message(p), Some(bytes)) = (e, frame.take()) {
                    self.w.devices[self.idx].borrow_mut().rx.push(Rx {
                        at: now_ms(),
                        from: Some(c.node),
                        bytes,
                        msg: p.msg,
                        routed: c.node,
                    });
                }
            }
        }
    }
}

/// Runs TCP device `idx` from `start` (ms) to `end` (ms).
pub async fn run_tcp(
    w: Rc<World>,
    idx: usize,
    app_id: u8,
    start: u64,
    end: u64,
) -> turmoil::Result {
    sleep_until_ms(start).await;
    let (session, rng) = session(&w, idx, app_id);
    let mut d = TcpDev {
        session,
        rng,
        faults: w.faults,
        w,
        idx,
    };
    let mut buf = vec![0u8; 2048];
    'link: while now_ms() < end {
        // Wait until the session asks for a link (at once at start, after its retry delay
        // after a failure).
        let mut wanted = false;
        while let Some(e) = d.session.poll_event() {
            wanted |= matches!(e, DeviceEvent::Connect);
        }
        if !wanted && d.session.poll_timeout().is_some() {
            let t = wake_at(&d.session, end);
            sleep_until_ms(t).await;
            d.session.handle_timeout(now());
            continue;
        }
        let Some(mut c) = d.connect().await else {
            d.session.handle_link_error(now());
            continue;
        };
        loop {
            let wake = wake_at(&d.session, end).min(now_ms() + LB_RESET_CHECK_MS);
            tokio::select! {
                biased;
                r = c.s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        // The node closed the connection or died.
                        d.session.handle_link_error(now());
                        continue 'link;
                    }
                    Ok(n) => {
                        let got = buf[..n].to_vec();
                        if !d.receive(&mut c, &got).await {
                            d.session.handle_link_error(now());
                            continue 'link;
                        }
                    }
                },
                _ = sleep_until_ms(wake) => {
                    if now_ms() >= end {
                        return Ok(());
                    }
                    if !d.w.lb_up.borrow()[c.node] {
                        // The load balancer resets the flows of a node that failed its check.
                        d.session.handle_link_error(now());
                        continue 'link;
                    }
                    let heartbeat_due = d
                        .session
                        .poll_timeout()
                        .is_some_and(|t| t.as_millis() <= now_ms());
                    if heartbeat_due && d.fault(d.faults.rebind) {
                        // The app restarts: a new connection at once; what was on its way to
                        // the old one is lost.
                        d.w.fault_counts.borrow_mut().rebinds += 1;
                        drop(c);
                        match d.connect().await {
                            Some(n) => c = n,
                            None => {
                                d.session.handle_link_error(now());
                                continue 'link;
                            }
                        }
                        continue;
                    }
                    d.session.handle_timeout(now());
                    if !d.flush(&mut c).await {
                        d.session.handle_link_error(now());
                        continue 'link;
                    }
                }
            }
        }
    }
    Ok(())
}
