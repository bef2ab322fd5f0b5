//! A UDP device SDK behind an L4 load balancer: heartbeat every 50 s counted from the last
//! packet sent, every message acked at once (0x11 echoes the mask). Each packet goes to the
//! node the load balancer picks at that moment ([`World::route`]), so a device whose node
//! stopped answering its health check re-targets another node at its next packet.

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::config::HEARTBEAT_INTERVAL as HEARTBEAT;
use ddpush_proto::session::ack_for;
use ddpush_proto::{DeviceMsg, DevicePacket, DownPacket};
use tokio::time::sleep;
use turmoil::net::UdpSocket;

use super::world::{Rx, World};
use crate::world::now_ms;

/// Runs device `idx` from `start` (ms) to `end` (ms).
pub async fn run(w: Rc<World>, idx: usize, app_id: u8, start: u64, end: u64) -> turmoil::Result {
    sleep(Duration::from_millis(start.saturating_sub(now_ms()))).await;
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let uuid = w.uuids[idx];
    let packet = |msg| {
        let mut v = Vec::new();
        DevicePacket { app_id, uuid, msg }.encode(&mut v);
        v
    };
    let mut buf = vec![0u8; 1024];
    let mut routed = usize::MAX;
    loop {
        // A heartbeat at start and whenever the interval since the last packet passed.
        let sent = now_ms();
        if let Some(n) = w.route(idx) {
            routed = n;
            w.devices[idx].borrow_mut().heartbeats.push((sent, n));
            let to = w.node_addrs.borrow()[n];
            let _ = sock.send_to(&packet(DeviceMsg::Heartbeat), to).await;
        }
        let mut wake = sent + HEARTBEAT.as_millis() as u64;
        loop {
            let now = now_ms();
            if now >= end {
                return Ok(());
            }
            if now >= wake {
                break;
            }
            tokio::select! {
                biased;
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, src)) = r else { continue };
                    let Ok(p) = DownPacket::decode(&buf[..n]) else { continue };
                    let ack = ack_for(&p.msg);
                    let from = w.node_addrs.borrow().iter().position(|a| a.ip() == src.ip());
                    w.devices[idx].borrow_mut().rx.push(Rx {
                        at: now_ms(),
                        from,
                        bytes: buf[..n].to_vec(),
                        msg: p.msg,
                        routed,
                    });
                    if let Some(ack) = ack {
                        // The SDK counts its interval from the last packet sent.
                        wake = now_ms() + HEARTBEAT.as_millis() as u64;
                        if let Some(n) = w.route(idx) {
                            routed = n;
                            let to: SocketAddr = w.node_addrs.borrow()[n];
                            let _ = sock.send_to(&packet(ack), to).await;
                        }
                    }
                }
                _ = sleep(Duration::from_millis(wake.min(end).saturating_sub(now))) => {}
            }
        }
    }
}
