//! Simulated device SDKs: the core's [`DeviceSession`] (PROTOCOL.md 4.8: heartbeat every 50 s
//! counting from the last packet sent, ack of every message at once on the socket it came on,
//! 0x11 acks echoing the mask, a new socket or connection 1 s after an error) behind a turmoil
//! socket. This adapter adds only what the scenario injects: steady loss, and away periods
//! (silent on UDP, then a new socket; disconnected on TCP). All bytes go through the core's
//! codecs.
//!
//! A signed device (a [`Plan`] with a key) runs the same session with its key: the session
//! seals what it sends and accepts only fresh sealed answers. Its wall clock is simulated time
//! plus a fixed skew of its own (clocks that drift within the replay window must work), and
//! its first nonce comes from its seeded RNG.
//!
//! A UDP device with a [`Plan::restart`] restarts once, a while after its first payload: it
//! falls silent, then runs a new session (no memory of what it accepted, a new first nonce)
//! on a new socket, as the Rust `Device` does after a process restart. Captured answers the
//! attacker injects to it afterwards are counted as refused or accepted.

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::session::{DeviceConfig, DeviceEvent, DeviceSession, DeviceSigning};
use ddpush_proto::signed::DeviceKey;
use ddpush_proto::{DeviceMsg, DownMsg, DownPacket, Time};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpStream, UdpSocket};

use crate::world::{now_ms, Away, Rx, Shared};

/// What one device will do, fixed by the scenario seed.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Index into the shared logs.
    pub idx: usize,
    /// appId in its packets.
    pub app_id: u8,
    /// TCP instead of UDP.
    pub tcp: bool,
    /// Steady random loss applied by the device to what it sends and receives.
    pub loss: f64,
    /// When it starts (ms).
    pub start: u64,
    /// Periods `(from, until)` in ms it is unreachable: silent on UDP, disconnected on TCP.
    pub away: Vec<(u64, u64)>,
    /// When it stops (ms).
    pub end: u64,
    /// Seed of its own RNG (loss decisions).
    pub seed: u64,
    /// A signed device's key id and key (provisioned on the server before it starts).
    pub key: Option<(u8, DeviceKey)>,
    /// Its wall clock minus the server's, in seconds (signed devices stamp packets with it).
    pub skew_s: i64,
    /// UDP only: restart once, this many ms after its first 0x20 payload, silent for the
    /// second value (ms) before the new session starts.
    pub restart: Option<(u64, u64)>,
}

fn sleep_until_ms(t: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms())))
}

fn now() -> Time {
    Time(now_ms())
}

struct Dev {
    sh: Rc<Shared>,
    plan: Plan,
    rng: SmallRng,
    session: DeviceSession,
    /// 0, then 1 after its restart.
    life: u64,
    /// When it restarts (set by its first payload).
    restart_at: Option<u64>,
    /// The datagram being handled is one the attacker injected after a restart.
    injected_in: bool,
}

impl Dev {
    /// Life `life` of the device: the first one draws from the plan's seed as it always did,
    /// a restarted one from a seed of its own (a new first nonce).
    fn new(sh: Rc<Shared>, plan: Plan, life: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(plan.seed ^ life.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut cfg = DeviceConfig {
            app_id: plan.app_id,
            ..DeviceConfig::new(sh.devices[plan.idx].borrow().uuid)
        };
        if let Some((id, key)) = plan.key.clone() {
            cfg = cfg.signed(DeviceSigning::new(id, key, rng.random()));
        }
        let session = DeviceSession::new(cfg);
        Dev {
            sh,
            plan,
            rng,
            session,
            life,
            restart_at: None,
            injected_in: false,
        }
    }

    fn lost(&mut self) -> bool {
        self.plan.loss > 0.0
            && !self.sh.faults.borrow().loss_off
            && self.rng.random_bool(self.plan.loss)
    }

    /// Gives the session the device's wall clock: the server's clock (sim seconds) plus the
    /// device's skew.
    fn clock(&mut self) {
        let secs = (now_ms() / 1000) as i64 + self.plan.skew_s;
        self.session
            .handle_wall_clock(u32::try_from(secs.max(0)).unwrap_or(u32::MAX));
    }

    fn datagram(&mut self, bytes: &[u8]) {
        self.clock();
        self.session.handle_datagram(now(), bytes);
    }

    fn stream(&mut self, bytes: &[u8]) {
        self.clock();
        self.session.handle_stream(now(), bytes);
    }

    /// The session's next packet, logged; `None` when nothing is queued.
    fn next_transmit(&mut self) -> Option<(DeviceMsg, Vec<u8>)> {
        self.clock();
        let p = self.session.poll_transmit(now())?;
        if p.packet.msg == DeviceMsg::Heartbeat {
            self.sh.devices[self.plan.idx]
                .borrow_mut()
                .heartbeats
                .push(now_ms());
        }
        Some((p.packet.msg, p.bytes().to_vec()))
    }

    /// Logs an accepted downstream packet (its ack is already sent or lost).
    fn log_rx(&mut self, p: DownPacket) {
        let at = now_ms();
        if self.life == 0 && self.restart_at.is_none() && matches!(p.msg, DownMsg::Payload(_)) {
            self.restart_at = self.plan.restart.map(|(after, _)| at + after);
        }
        if self.injected_in {
            let mut log = self.sh.devices[self.plan.idx].borrow_mut();
            log.replays_accepted += 1;
            if matches!(p.msg, DownMsg::Payload(_)) {
                log.replayed_payloads += 1;
            }
        }
        let mut t = p.to_vec();
        t.extend_from_slice(&(self.plan.idx as u64).to_be_bytes());
        self.sh.trace.borrow_mut().add(b'r', at, &t);
        self.sh.devices[self.plan.idx]
            .borrow_mut()
            .rx
            .push(Rx { at, msg: p.msg });
    }

    /// Drains the session's events; `true` if it asks for a new link.
    fn events(&mut self) -> bool {
        let mut connect = false;
        while let Some(e) = self.session.poll_event() {
            match e {
                DeviceEvent::Message(p) => self.log_rx(p),
                DeviceEvent::Connect => connect = true,
                // Forged, stale or replayed (a NAT's duplicate of a sealed answer, too).
                DeviceEvent::Refused(_) | DeviceEvent::Unsigned => {
                    let mut log = self.sh.devices[self.plan.idx].borrow_mut();
                    log.refused += 1;
                    if self.injected_in {
                        log.replays_refused += 1;
                    }
                }
                _ => {}
            }
        }
        self.injected_in = false;
        connect
    }

    fn last_sent(&self) -> u64 {
        self.session.last_sent().map_or(0, Time::as_millis)
    }

    fn next_away(&self) -> Option<(u64, u64)> {
        let now = now_ms();
        self.plan
            .away
            .iter()
            .copied()
            .find(|(from, _)| *from >= now)
    }

    fn wake(&self, end: u64) -> (u64, Option<(u64, u64)>) {
        let away = self.next_away();
        let t = self
            .session
            .poll_timeout()
            .map_or(u64::MAX, Time::as_millis)
            .min(away.map_or(u64::MAX, |a| a.0))
            .min(self.restart_at.unwrap_or(u64::MAX))
            .min(end);
        (t, away)
    }

    /// Restarts the device: silent for the plan's time, then a new session (the next life)
    /// on a new socket; the attacker is told.
    async fn restart(self, server: SocketAddr) -> std::io::Result<(Dev, UdpSocket)> {
        let down = self.plan.restart.map_or(0, |(_, down)| down);
        sleep_until_ms(now_ms() + down).await;
        let mut d = Dev::new(self.sh, self.plan, self.life + 1);
        let _ = d.events(); // the new session's first Connect
        let sock = bind().await?;
        {
            let mut log = d.sh.devices[d.plan.idx].borrow_mut();
            log.restarts.push(now_ms());
            let uuid = log.uuid;
            d.sh.capture.borrow_mut().restarts.push((uuid, now_ms()));
        }
        d.session.handle_connected(now());
        udp_flush(&mut d, &sock, server).await;
        Ok((d, sock))
    }
}

async fn bind() -> std::io::Result<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await
}

/// Sends what the session has queued on the UDP socket, each packet subject to loss.
async fn udp_flush(d: &mut Dev, sock: &UdpSocket, server: SocketAddr) {
    while let Some((_, bytes)) = d.next_transmit() {
        if !d.lost() {
            let _ = sock.send_to(&bytes, server).await;
        }
    }
}

/// A UDP device, from `plan.start` to `plan.end`.
pub async fn udp(sh: Rc<Shared>, plan: Plan, server: SocketAddr) -> turmoil::Result {
    let end = plan.end;
    let mut d = Dev::new(sh, plan, 0);
    sleep_until_ms(d.plan.start).await;
    let _ = d.events(); // the first Connect
    let mut sock = bind().await?;
    d.session.handle_connected(now());
    udp_flush(&mut d, &sock, server).await;
    let mut buf = vec![0u8; 1024];
    loop {
        let (wake, away) = d.wake(end);
        tokio::select! {
            biased;
            r = sock.recv_from(&mut buf) => {
                match r {
                    Ok((n, _)) => {
                        if d.lost() {
                            continue;
                        }
                        d.injected_in =
                            d.life > 0 && d.sh.capture.borrow().injected.contains(&buf[..n]);
                        d.datagram(&buf[..n]);
                    }
                    Err(_) => d.session.handle_link_error(now()),
                }
            }
            _ = sleep_until_ms(wake) => {
                let now_t = now_ms();
                if now_t >= end {
                    return Ok(());
                }
                if d.restart_at.is_some_and(|t| t <= now_t) {
                    (d, sock) = d.restart(server).await?;
                    continue;
                }
                if let Some((from, until)) = away.filter(|a| a.0 <= now_t) {
                    // Silent: whatever arrives is counted, not acked. Then a new socket.
                    let last_sent = d.last_sent();
                    while now_ms() < until {
                        tokio::select! {
                            biased;
                            r = sock.recv_from(&mut buf) => {
                                if r.is_ok() {
                                    d.sh.devices[d.plan.idx].borrow_mut().rx_away.push(now_ms());
                                }
                            }
                            _ = sleep_until_ms(until) => {}
                        }
                    }
                    sock = bind().await?;
                    {
                        let mut log = d.sh.devices[d.plan.idx].borrow_mut();
                        log.resets += 1;
                        log.away.push(Away { last_sent, from, back: now_ms() });
                    }
                    d.session.handle_connected(now());
                } else {
                    d.session.handle_timeout(now());
                }
            }
        }
        udp_flush(&mut d, &sock, server).await;
        if d.events() {
            // The SDK makes a new socket after an error.
            sock = bind().await?;
            d.sh.devices[d.plan.idx].borrow_mut().resets += 1;
            d.session.handle_connected(now());
            udp_flush(&mut d, &sock, server).await;
        }
    }
}

/// Sends what the session has queued on the TCP stream; `false` if the write failed.
async fn tcp_flush(d: &mut Dev, s: &mut TcpStream) -> bool {
    while let Some((_, bytes)) = d.next_transmit() {
        if s.write_all(&bytes).await.is_err() {
            return false;
        }
    }
    true
}

/// A TCP device: one long-lived stream to 9966, heartbeat at once after each connect.
pub async fn tcp(sh: Rc<Shared>, plan: Plan, server: SocketAddr) -> turmoil::Result {
    let end = plan.end;
    let mut d = Dev::new(sh, plan, 0);
    sleep_until_ms(d.plan.start).await;
    // A pending away record: (last packet sent, lost at).
    let mut lost_at: Option<(u64, u64)> = None;
    'connect: while now_ms() < end {
        // Wait for the session to ask for a link (at once at start, 1 s after a failure).
        while !d.events() {
            let t = d
                .session
                .poll_timeout()
                .map_or(end, Time::as_millis)
                .min(end);
            sleep_until_ms(t).await;
            if now_ms() >= end {
                return Ok(());
            }
            d.session.handle_timeout(now());
        }
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(server)).await
        else {
            d.session.handle_link_error(now());
            continue;
        };
        d.session.handle_connected(now());
        if !tcp_flush(&mut d, &mut s).await {
            d.session.handle_link_error(now());
            continue;
        }
        {
            let mut log = d.sh.devices[d.plan.idx].borrow_mut();
            log.resets += 1;
            if let Some((last_sent, from)) = lost_at.take() {
                log.away.push(Away {
                    last_sent,
                    from,
                    back: d.last_sent(),
                });
            }
        }
        let mut buf = vec![0u8; 2048];
        loop {
            let (wake, away) = d.wake(end);
            tokio::select! {
                biased;
                r = s.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => {
                            lost_at = Some((d.last_sent(), now_ms()));
                            d.session.handle_link_error(now());
                            continue 'connect;
                        }
                        Ok(n) => n,
                    };
                    d.stream(&buf[..n]);
                }
                _ = sleep_until_ms(wake) => {
                    let now_t = now_ms();
                    if now_t >= end {
                        return Ok(());
                    }
                    if let Some((from, until)) = away.filter(|a| a.0 <= now_t) {
                        // The network goes away: the connection is dropped, and comes back
                        // later (the session's retry delay ends at `until`).
                        lost_at = Some((d.last_sent(), from));
                        drop(s);
                        let retry = d.session.config().retry_delay.as_millis() as u64;
                        sleep_until_ms(until.saturating_sub(retry)).await;
                        d.session.handle_link_error(now());
                        continue 'connect;
                    }
                    d.session.handle_timeout(now());
                }
            }
            if !tcp_flush(&mut d, &mut s).await {
                lost_at = Some((d.last_sent(), now_ms()));
                d.session.handle_link_error(now());
                continue 'connect;
            }
            // Messages are handed over after their acks went out.
            let _ = d.events();
        }
    }
    Ok(())
}
