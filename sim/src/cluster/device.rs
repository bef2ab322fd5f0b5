//! A UDP device behind an L4 load balancer, running the core's [`DeviceSession`] (the SDK's
//! behaviour, PROTOCOL.md 4.8: heartbeat every 50 s counted from the last packet sent, every
//! message acked at once, a heartbeat at once on every new socket). This adapter only moves
//! datagrams and time: each packet the session sends goes to the node the load balancer picks
//! at that moment ([`World::route`]), so a device whose node stopped answering its health check
//! re-targets another node at its next packet.
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
use turmoil::net::UdpSocket;

use super::world::{DeviceFaults, Rx, World};
use crate::world::now_ms;

fn now() -> Time {
    Time::from_millis(now_ms())
}

fn sleep_until_ms(t: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms())))
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
    /// Whether a fault of probability `p` strikes now. Draws only while faults are on, so a
    /// run without faults draws nothing.
    fn fault(&mut self, p: f64) -> bool {
        let t = now_ms();
        p > 0.0 && t >= self.faults.from && t < self.faults.until && self.rng.random_bool(p)
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
    let faults = w.faults;
    let cfg = DeviceConfig {
        app_id,
        ..DeviceConfig::new(w.uuids[idx])
    };
    let mut d = Dev {
        session: DeviceSession::new(cfg),
        sock: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?,
        routed: usize::MAX,
        rng: SmallRng::seed_from_u64(faults.seed ^ (idx as u64).wrapping_mul(0x9E37_79B9)),
        faults,
        w,
        idx,
    };
    // The session asks for its first link at once.
    while d.session.poll_event().is_some() {}
    d.session.handle_connected(now());
    d.flush().await;
    let mut buf = vec![0u8; 1024];
    loop {
        let wake = d
            .session
            .poll_timeout()
            .map_or(end, Time::as_millis)
            .min(end);
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
