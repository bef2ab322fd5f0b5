//! A device client that behaves like the DDPush device SDKs (PROTOCOL.md 4.8).
//!
//! A background thread owns the socket: it sends a heartbeat at once and then whenever
//! `interval` has passed since the last packet it sent (acks included), acks every
//! 0x10/0x11/0x20 message before handing it over (a 0x11 ack echoes the 8 bytes received),
//! and after a socket error opens a new socket (UDP, so the source port changes) or a new
//! connection (TCP) after `retry_delay`. The owner reads what happened with
//! [`Device::recv`] or [`Device::recv_event`], which makes it easy to use in tests.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddpush_proto::{DeviceMsg, DevicePacket, DownMsg, DownPacket, InvalidPacket, Uuid};

use ddpush_proto::DownStreamDecoder;

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
}

impl DeviceBuilder {
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
            interval: Duration::from_secs(50),
            retry_delay: Duration::from_secs(1),
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

/// The socket of one attempt.
enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream, DownStreamDecoder),
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
                Ok(Link::Tcp(s, DownStreamDecoder::new()))
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Link::Udp(s) => s.local_addr(),
            Link::Tcp(s, _) => s.local_addr(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Link::Udp(s) => s.send(bytes).map(drop),
            Link::Tcp(s, _) => s.write_all(bytes),
        }
    }

    /// Waits up to `wait` for bytes and decodes every whole packet into `out`.
    fn poll(
        &mut self,
        wait: Duration,
        buf: &mut [u8],
        out: &mut Vec<Result<DownPacket, InvalidPacket>>,
    ) -> io::Result<()> {
        let wait = Some(wait.max(Duration::from_millis(1)));
        let r = match self {
            Link::Udp(s) => s.set_read_timeout(wait).and_then(|()| s.recv(buf)),
            Link::Tcp(s, _) => s.set_read_timeout(wait).and_then(|()| s.read(buf)),
        };
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
            Link::Udp(_) => out.push(DownPacket::decode(&buf[..n])),
            Link::Tcp(_, dec) => {
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the server",
                    ));
                }
                dec.extend(&buf[..n]);
                while let Some(p) = dec.next_packet() {
                    out.push(p);
                }
            }
        }
        Ok(())
    }
}

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

    fn packet(&self, msg: DeviceMsg) -> Vec<u8> {
        let p = DevicePacket {
            app_id: self.cfg.app_id,
            uuid: self.cfg.uuid,
            msg,
        };
        let mut v = Vec::with_capacity(p.encoded_len());
        p.encode(&mut v);
        v
    }

    fn run(self) {
        let mut buf = vec![0u8; 65_536];
        let mut packets = Vec::new();
        while !self.stopped() {
            match Link::open(self.cfg.transport, self.cfg.server) {
                Ok(mut link) => {
                    if let Ok(a) = link.local_addr() {
                        self.emit(DeviceEvent::Connected(a));
                    }
                    if let Err(e) = self.session(&mut link, &mut buf, &mut packets) {
                        self.emit(DeviceEvent::Error(e.to_string()));
                    }
                }
                Err(e) => self.emit(DeviceEvent::Error(format!("cannot open socket: {e}"))),
            }
            // The SDK waits before a new socket; the wait stays responsive to stop.
            let until = Instant::now() + self.cfg.retry_delay;
            while !self.stopped() && Instant::now() < until {
                std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
            }
        }
    }

    /// Runs one socket until an error (returned) or a stop (Ok).
    fn session(
        &self,
        link: &mut Link,
        buf: &mut [u8],
        packets: &mut Vec<Result<DownPacket, InvalidPacket>>,
    ) -> io::Result<()> {
        let heartbeat = self.packet(DeviceMsg::Heartbeat);
        let mut last_sent: Option<Instant> = None;
        loop {
            if self.stopped() {
                return Ok(());
            }
            let now = Instant::now();
            let kicked = self.shared.kick.swap(false, Ordering::AcqRel);
            if kicked || last_sent.is_none_or(|t| now >= t + self.cfg.interval) {
                link.send(&heartbeat)?;
                last_sent = Some(now);
                self.shared.heartbeats.fetch_add(1, Ordering::AcqRel);
                self.emit(DeviceEvent::HeartbeatSent);
            }
            let next = last_sent.map_or(now, |t| t + self.cfg.interval);
            let wait = next.saturating_duration_since(Instant::now()).min(TICK);
            packets.clear();
            link.poll(wait, buf, packets)?;
            let mut failed = None;
            for p in packets.drain(..) {
                let p = match p {
                    Ok(p) => p,
                    Err(e) => {
                        self.emit(DeviceEvent::Invalid(e));
                        continue;
                    }
                };
                let ack = match &p.msg {
                    DownMsg::Notify => Some(DeviceMsg::AckNotify),
                    DownMsg::Bits(m) => Some(DeviceMsg::AckBits(*m)),
                    DownMsg::Payload(_) => Some(DeviceMsg::AckPayload),
                    DownMsg::HeartbeatReply => None,
                };
                // Ack first, as the SDK does; if the ack cannot go out the message is still
                // handed over (the server re-sends it until acked: at least once).
                if let (Some(ack), None) = (ack, &failed) {
                    match link.send(&self.packet(ack)) {
                        Ok(()) => {
                            last_sent = Some(Instant::now());
                            self.shared.acks.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => failed = Some(e),
                    }
                }
                self.emit(DeviceEvent::Message(p));
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
}
