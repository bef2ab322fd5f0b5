//! A device client that behaves like the DDPush device SDKs (PROTOCOL.md 4.8).
//!
//! The SDK's rules are the core's [`DeviceSession`]: a heartbeat at once on every new socket
//! or connection and then whenever `interval` has passed since the last packet sent (acks
//! included), an ack of every 0x10/0x11/0x20 before it is handed over (a 0x11 ack echoes the 8
//! bytes received), and a new socket (UDP, so the source port changes) or connection (TCP)
//! `retry_delay` after an error. A background thread only moves bytes and time between it and
//! the socket. The owner reads what happened with [`Device::recv`] or [`Device::recv_event`],
//! which makes it easy to use in tests.
//!
//! With a key ([`DeviceBuilder::key`]) the device is a signed device (PROTOCOL.md 9): the
//! session seals every heartbeat and ack with the core's signed codec, stamped with the
//! system clock, and accepts only sealed answers under its key. The thread supplies the wall
//! clock and a random first nonce; no byte is encoded here.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ddpush_proto::config::HEARTBEAT_INTERVAL;
use ddpush_proto::session::RETRY_DELAY;
use ddpush_proto::session::{
    DeviceConfig, DeviceEvent as SessionEvent, DeviceSession, DeviceSigning,
};
use ddpush_proto::signed::{DeviceKey, SignedDrop};
use ddpush_proto::{DeviceMsg, DownPacket, InvalidPacket, Time, Uuid};

/// How long the worker waits at most before looking at its stop flag again.
const TICK: Duration = Duration::from_millis(50);

/// How a device talks to the server on port 9966.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    /// Datagrams (the SDK's recommended transport).
    #[default]
    Udp,
    /// One long-lived TCP connection.
    Tcp,
}

/// Something that happened to a [`Device`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// A message from the server; 0x10/0x11/0x20 have already been acked.
    Message(DownPacket),
    /// A new socket (UDP) or connection (TCP) is ready; the address is the local one.
    Connected(SocketAddr),
    /// A heartbeat went out.
    HeartbeatSent,
    /// A datagram or frame the codec refused (dropped).
    Invalid(InvalidPacket),
    /// Signed devices: a packet that is not a fresh sealed answer under the device's key
    /// (dropped, not acked).
    Refused(SignedDrop),
    /// Signed devices: a v1 packet (dropped, not acked).
    Unsigned,
    /// A socket error or a closed connection; a new one follows after the retry delay.
    Error(String),
}

/// Settings for a [`Device`]; made by [`Device::builder`].
#[derive(Clone, Debug)]
pub struct DeviceBuilder {
    server: SocketAddr,
    uuid: Uuid,
    app_id: u8,
    transport: Transport,
    interval: Duration,
    retry_delay: Duration,
    key: Option<(u8, DeviceKey)>,
    server_ahead: Option<Duration>,
}

impl DeviceBuilder {
    /// Makes this a signed device (PROTOCOL.md 9) with the key the app server provisioned
    /// for its uuid (`PUT /clients/{uuid}/key`): it sends and accepts only version 2.
    pub fn key(mut self, key_id: u8, key: DeviceKey) -> Self {
        self.key = Some((key_id, key));
        self
    }

    /// Signed devices: how far ahead of this device's clock the server's may be (default
    /// 60 s, the replay window; at most that). A signed device hears nothing for about this
    /// long after it starts: it cannot know which sealed answers it accepted before a restart,
    /// and refuses every one stamped up to its start plus this bound (PROTOCOL.md 9.4). Set it
    /// to the skew this device's clock really has.
    pub fn server_ahead(mut self, d: Duration) -> Self {
        self.server_ahead = Some(d);
        self
    }

    /// The appId byte of heartbeats and acks. Default 1.
    pub fn app_id(mut self, app_id: u8) -> Self {
        self.app_id = app_id;
        self
    }

    /// Use TCP instead of UDP.
    pub fn tcp(self) -> Self {
        self.transport(Transport::Tcp)
    }

    /// Choose the transport. Default UDP.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Heartbeat interval, counted from the last packet sent. Default 50 s, as the SDK.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Wait after a socket error before a new socket or connection. Default 1 s, as the SDK.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Starts the device's thread. It keeps retrying until the [`Device`] is dropped, so this
    /// fails only if the thread cannot be spawned.
    pub fn start(self) -> io::Result<Device> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            cfg: self.clone(),
            tx,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("ddpush-device-{}", self.uuid))
            .spawn(move || worker.run())?;
        Ok(Device {
            uuid: self.uuid,
            transport: self.transport,
            rx,
            shared,
            thread: Some(thread),
        })
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    kick: AtomicBool,
    heartbeats: AtomicU64,
    acks: AtomicU64,
}

/// A running device client. Dropping it stops its thread.
///
/// ```no_run
/// use std::time::Duration;
/// use ddpush_client::{Device, DownMsg, Uuid};
///
/// let device = Device::builder("127.0.0.1:9966".parse().unwrap(), Uuid::from_user("alice"))
///     .tcp()
///     .interval(Duration::from_secs(30))
///     .start()?;
/// while let Some(p) = device.recv(Duration::from_secs(60)) {
///     match p.msg {
///         DownMsg::Payload(text) => println!("payload {:?}", text),
///         other => println!("{other:?}"),
///     }
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Device {
    uuid: Uuid,
    transport: Transport,
    rx: Receiver<DeviceEvent>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("uuid", &self.uuid)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Settings for a device with uuid `uuid` talking to `server` (port 9966).
    pub fn builder(server: SocketAddr, uuid: Uuid) -> DeviceBuilder {
        DeviceBuilder {
            server,
            uuid,
            app_id: 1,
            transport: Transport::Udp,
            interval: HEARTBEAT_INTERVAL,
            retry_delay: RETRY_DELAY,
            key: None,
            server_ahead: None,
        }
    }

    /// This device's uuid.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The next message (already acked), waiting at most `timeout`. Other events that arrive
    /// meanwhile are discarded; use [`recv_event`](Self::recv_event) to see them.
    pub fn recv(&self, timeout: Duration) -> Option<DownPacket> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_event(left)? {
                DeviceEvent::Message(p) => return Some(p),
                _ => continue,
            }
        }
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_event(&self, timeout: Duration) -> Option<DeviceEvent> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits until the device has a socket or connection (a [`DeviceEvent::Connected`]).
    /// Events before it are discarded, so call this before expecting messages.
    pub fn wait_connected(&self, timeout: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let DeviceEvent::Connected(a) = self.recv_event(left)? {
                return Some(a);
            }
        }
    }

    /// Sends a heartbeat as soon as possible instead of waiting for the interval (tests use
    /// it to make the server re-send what is pending).
    pub fn heartbeat_now(&self) {
        self.shared.kick.store(true, Ordering::Release);
    }

    /// Heartbeats sent so far.
    pub fn heartbeats_sent(&self) -> u64 {
        self.shared.heartbeats.load(Ordering::Acquire)
    }

    /// Acks sent so far.
    pub fn acks_sent(&self) -> u64 {
        self.shared.acks.load(Ordering::Acquire)
    }

    /// Stops the device and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The socket of one link.
enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Link {
    fn open(transport: Transport, server: SocketAddr) -> io::Result<Link> {
        match transport {
            Transport::Udp => {
                let local: SocketAddr = if server.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(local)?;
                s.connect(server)?;
                Ok(Link::Udp(s))
            }
            Transport::Tcp => {
                let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(Duration::from_secs(10)))?;
                Ok(Link::Tcp(s))
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Link::Udp(s) => s.local_addr(),
            Link::Tcp(s) => s.local_addr(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Link::Udp(s) => s.send(bytes).map(drop),
            Link::Tcp(s) => s.write_all(bytes),
        }
    }

    /// Waits up to `wait` for bytes and hands them to the session.
    fn recv_into(
        &mut self,
        wait: Duration,
        buf: &mut [u8],
        s: &mut DeviceSession,
        now: impl Fn() -> Time,
    ) -> io::Result<()> {
        let wait = Some(wait.max(Duration::from_millis(1)));
        let r = match self {
            Link::Udp(sock) => sock.set_read_timeout(wait).and_then(|()| sock.recv(buf)),
            Link::Tcp(sock) => sock.set_read_timeout(wait).and_then(|()| sock.read(buf)),
        };
        // Sealed answers are checked against the clock of their arrival.
        s.handle_wall_clock(unix_now());
        let n = match r {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        match self {
            Link::Udp(_) => s.handle_datagram(now(), &buf[..n]),
            Link::Tcp(_) => {
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the server",
                    ));
                }
                s.handle_stream(now(), &buf[..n]);
            }
        }
        Ok(())
    }
}

/// The I/O around a [`DeviceSession`], which holds every SDK rule.
struct Worker {
    cfg: DeviceBuilder,
    tx: Sender<DeviceEvent>,
    shared: Arc<Shared>,
}

impl Worker {
    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    fn emit(&self, e: DeviceEvent) {
        // The receiver lives in the Device, which stops us before it goes away.
        let _ = self.tx.send(e);
    }

    fn run(self) {
        let epoch = Instant::now();
        let now =
            || Time::from_millis(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX));
        let mut s = DeviceSession::new(DeviceConfig {
            uuid: self.cfg.uuid,
            app_id: self.cfg.app_id,
            heartbeat_interval: self.cfg.interval,
            retry_delay: self.cfg.retry_delay,
            signing: self.cfg.key.clone().map(|(id, key)| {
                let sg = DeviceSigning::new(id, key, random_u32());
                match self.cfg.server_ahead {
                    Some(d) => sg.with_server_ahead(d),
                    None => sg,
                }
            }),
        });
        let mut link: Option<Link> = None;
        let mut buf = vec![0u8; 65_536];
        while !self.stopped() {
            if self.shared.kick.swap(false, Ordering::AcqRel) {
                s.heartbeat_now();
            }
            s.handle_wall_clock(unix_now());
            s.handle_timeout(now());
            // Transmits first: the acks of what just arrived go out before the app sees it.
            while let Some(p) = s.poll_transmit(now()) {
                let Some(l) = link.as_mut() else { break };
                match l.send(p.bytes()) {
                    Ok(()) if p.packet.msg == DeviceMsg::Heartbeat => {
                        self.shared.heartbeats.fetch_add(1, Ordering::AcqRel);
                        self.emit(DeviceEvent::HeartbeatSent);
                    }
                    Ok(()) => {
                        self.shared.acks.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => {
                        self.emit(DeviceEvent::Error(e.to_string()));
                        link = None;
                        s.handle_link_error(now());
                    }
                }
            }
            while let Some(e) = s.poll_event() {
                match e {
                    SessionEvent::Connect => {
                        match Link::open(self.cfg.transport, self.cfg.server) {
                            Ok(l) => {
                                if let Ok(a) = l.local_addr() {
                                    self.emit(DeviceEvent::Connected(a));
                                }
                                link = Some(l);
                                s.handle_connected(now());
                            }
                            Err(e) => {
                                self.emit(DeviceEvent::Error(format!("cannot open socket: {e}")));
                                s.handle_link_error(now());
                            }
                        }
                    }
                    SessionEvent::Message(p) => self.emit(DeviceEvent::Message(p)),
                    SessionEvent::Invalid(e) => self.emit(DeviceEvent::Invalid(e)),
                    SessionEvent::Refused(d) => self.emit(DeviceEvent::Refused(d)),
                    SessionEvent::Unsigned => self.emit(DeviceEvent::Unsigned),
                    _ => {}
                }
            }
            // The wait stays short so a stop or a kick is seen promptly.
            let t = now();
            let wait = s.poll_timeout().map_or(TICK, |d| d.since(t)).min(TICK);
            if wait.is_zero() {
                continue;
            }
            match link.as_mut() {
                Some(l) => {
                    if let Err(e) = l.recv_into(wait, &mut buf, &mut s, now) {
                        self.emit(DeviceEvent::Error(e.to_string()));
                        link = None;
                        s.handle_link_error(now());
                    }
                }
                None => std::thread::sleep(wait),
            }
        }
    }
}

/// The system clock in Unix seconds (a clock before 1970 reads as 0, which the server's
/// window refuses: a signed device needs a set clock, within 60 s of the server's).
fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// A random first nonce, so a restarted device does not repeat its last run's `(ts, nonce)`
/// pairs: std's per-process random hash keys, mixed with the clock (no RNG crate needed for
/// one number; it need not be secret, only unlikely to repeat).
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}
