//! Simulated device SDKs (PROTOCOL.md 4.8): heartbeat every 50 s counting from the last packet
//! sent, ack every message at once (0x11 acks echo the mask), a new socket and port after an
//! error or an away period, TCP reconnect 1 s after a failure. All bytes go through the
//! core's codecs.

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::{DeviceMsg, DevicePacket, DownMsg, DownPacket, DownStreamDecoder};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpStream, UdpSocket};

use crate::world::{now_ms, Away, Rx, Shared};

/// The SDK's heartbeat interval.
pub const HEARTBEAT: Duration = Duration::from_secs(50);
/// The SDK's reconnect delay.
pub const RETRY: Duration = Duration::from_secs(1);

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
}

fn sleep_until_ms(t: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms())))
}

struct Dev {
    sh: Rc<Shared>,
    plan: Plan,
    rng: SmallRng,
    last_sent: u64,
}

impl Dev {
    fn new(sh: Rc<Shared>, plan: Plan) -> Self {
        let rng = SmallRng::seed_from_u64(plan.seed);
        Dev {
            sh,
            plan,
            rng,
            last_sent: 0,
        }
    }

    fn lost(&mut self) -> bool {
        self.plan.loss > 0.0
            && !self.sh.faults.borrow().loss_off
            && self.rng.random_bool(self.plan.loss)
    }

    fn packet(&self, msg: DeviceMsg) -> Vec<u8> {
        let p = DevicePacket {
            app_id: self.plan.app_id,
            uuid: self.sh.devices[self.plan.idx].borrow().uuid,
            msg,
        };
        let mut v = Vec::with_capacity(p.encoded_len());
        p.encode(&mut v);
        v
    }

    /// Logs an accepted downstream packet and returns the ack the SDK sends at once.
    fn receive(&mut self, p: DownPacket) -> Option<DeviceMsg> {
        let at = now_ms();
        let ack = match &p.msg {
            DownMsg::HeartbeatReply => None,
            DownMsg::Notify => Some(DeviceMsg::AckNotify),
            DownMsg::Bits(m) => Some(DeviceMsg::AckBits(*m)),
            DownMsg::Payload(_) => Some(DeviceMsg::AckPayload),
        };
        let mut t = p.to_vec();
        t.extend_from_slice(&(self.plan.idx as u64).to_be_bytes());
        self.sh.trace.borrow_mut().add(b'r', at, &t);
        self.sh.devices[self.plan.idx]
            .borrow_mut()
            .rx
            .push(Rx { at, msg: p.msg });
        ack
    }

    fn note_heartbeat(&mut self) {
        let at = now_ms();
        self.last_sent = at;
        self.sh.devices[self.plan.idx]
            .borrow_mut()
            .heartbeats
            .push(at);
    }

    fn next_away(&self) -> Option<(u64, u64)> {
        let now = now_ms();
        self.plan
            .away
            .iter()
            .copied()
            .find(|(from, _)| *from >= now)
    }
}

/// A UDP device, from `plan.start` to `plan.end`.
pub async fn udp(sh: Rc<Shared>, plan: Plan, server: SocketAddr) -> turmoil::Result {
    let end = plan.end;
    let mut d = Dev::new(sh, plan);
    sleep_until_ms(d.plan.start).await;
    let mut sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let mut buf = vec![0u8; 1024];
    let mut hb = d.packet(DeviceMsg::Heartbeat);
    d.note_heartbeat();
    if !d.lost() {
        let _ = sock.send_to(&hb, server).await;
    }
    loop {
        let next_hb = d.last_sent + HEARTBEAT.as_millis() as u64;
        let away = d.next_away();
        let wake = next_hb.min(away.map_or(u64::MAX, |a| a.0)).min(end);
        tokio::select! {
            biased;
            r = sock.recv_from(&mut buf) => {
                let n = match r {
                    Ok((n, _)) => n,
                    Err(_) => {
                        // The SDK makes a new socket after an error.
                        tokio::time::sleep(RETRY).await;
                        sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
                        d.sh.devices[d.plan.idx].borrow_mut().resets += 1;
                        continue;
                    }
                };
                if d.lost() {
                    continue;
                }
                let Ok(p) = DownPacket::decode(&buf[..n]) else { continue };
                if let Some(ack) = d.receive(p) {
                    d.last_sent = now_ms();
                    if !d.lost() {
                        let _ = sock.send_to(&d.packet(ack), server).await;
                    }
                }
            }
            _ = sleep_until_ms(wake) => {
                let now = now_ms();
                if now >= end {
                    return Ok(());
                }
                if let Some((from, until)) = away.filter(|a| a.0 <= now) {
                    // Silent: whatever arrives is counted, not acked. Then a new socket.
                    let last_sent = d.last_sent;
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
                    sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
                    {
                        let mut log = d.sh.devices[d.plan.idx].borrow_mut();
                        log.resets += 1;
                        log.away.push(Away { last_sent, from, back: now_ms() });
                    }
                }
                hb = d.packet(DeviceMsg::Heartbeat);
                d.note_heartbeat();
                if !d.lost() {
                    let _ = sock.send_to(&hb, server).await;
                }
            }
        }
    }
}

/// A TCP device: one long-lived stream to 9966, heartbeat at once after each connect.
pub async fn tcp(sh: Rc<Shared>, plan: Plan, server: SocketAddr) -> turmoil::Result {
    let end = plan.end;
    let mut d = Dev::new(sh, plan);
    sleep_until_ms(d.plan.start).await;
    // A pending away record: (last packet sent, lost at).
    let mut lost_at: Option<(u64, u64)> = None;
    let mut first = true;
    'connect: while now_ms() < end {
        if !first {
            tokio::time::sleep(RETRY).await;
        }
        first = false;
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(server)).await
        else {
            continue;
        };
        let hb = d.packet(DeviceMsg::Heartbeat);
        d.note_heartbeat();
        if s.write_all(&hb).await.is_err() {
            continue;
        }
        {
            let mut log = d.sh.devices[d.plan.idx].borrow_mut();
            log.resets += 1;
            if let Some((last_sent, from)) = lost_at.take() {
                log.away.push(Away {
                    last_sent,
                    from,
                    back: d.last_sent,
                });
            }
        }
        let mut dec = DownStreamDecoder::new();
        let mut buf = vec![0u8; 2048];
        loop {
            let next_hb = d.last_sent + HEARTBEAT.as_millis() as u64;
            let away = d.next_away();
            let wake = next_hb.min(away.map_or(u64::MAX, |a| a.0)).min(end);
            tokio::select! {
                biased;
                r = s.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => {
                            lost_at = Some((d.last_sent, now_ms()));
                            continue 'connect;
                        }
                        Ok(n) => n,
                    };
                    dec.extend(&buf[..n]);
                    while let Some(p) = dec.next_packet() {
                        let Ok(p) = p else { continue };
                        if let Some(ack) = d.receive(p) {
                            d.last_sent = now_ms();
                            if s.write_all(&d.packet(ack)).await.is_err() {
                                lost_at = Some((d.last_sent, now_ms()));
                                continue 'connect;
                            }
                        }
                    }
                }
                _ = sleep_until_ms(wake) => {
                    let now = now_ms();
                    if now >= end {
                        return Ok(());
                    }
                    if let Some((from, until)) = away.filter(|a| a.0 <= now) {
                        // The network goes away: the connection is dropped, and comes back later.
                        lost_at = Some((d.last_sent, from));
                        drop(s);
                        sleep_until_ms(until.saturating_sub(RETRY.as_millis() as u64)).await;
                        continue 'connect;
                    }
                    let hb = d.packet(DeviceMsg::Heartbeat);
                    d.note_heartbeat();
                    if s.write_all(&hb).await.is_err() {
                        lost_at = Some((d.last_sent, now_ms()));
                        continue 'connect;
                    }
                }
            }
        }
    }
    Ok(())
}
