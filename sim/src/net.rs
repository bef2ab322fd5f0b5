//! A NAT in front of each UDP device host, and the datagram faults turmoil lacks.
//!
//! Devices on host `udpH` send to `natH:9966`. The NAT gives each device socket a mapping of its
//! own (a socket on the NAT host, so its own port), forwards the device's datagrams to the
//! server from it and the server's answers back. The server sees `natH:<mapping port>` as the
//! device's address, as it would behind a real NAT. Faults:
//!
//! * **Rebinds**: a mapping with no outbound datagram for the NAT's idle timeout expires; the
//!   device's next datagram gets a new mapping (a new port), and datagrams to the old one are
//!   dropped. Timeouts are drawn per NAT, some shorter than the 50 s heartbeat (a rebind on
//!   every heartbeat), some longer (never).
//! * **Duplication**: a datagram is forwarded twice, back to back. The NAT to server link has a
//!   fixed latency, so uplink copies arrive together, as copies on one path do; downlink
//!   copies cross the device link, whose latency varies per datagram, and may arrive apart.
//! * **Reordering**: on top of turmoil's per-datagram latency (5-150 ms, which already
//!   reorders), a datagram is now and then held back for up to `hold_max` ms.
//!
//! Everything is drawn from `SmallRng`s seeded from the scenario seed, so a run stays a pure
//! function of its seed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use turmoil::net::UdpSocket;

use crate::server::DEVICE_PORT;
use crate::world::{now_ms, Shared};

/// The faults of one NAT.
#[derive(Clone, Debug)]
pub struct NatPlan {
    /// Seed of its RNGs.
    pub seed: u64,
    /// A mapping expires after this long without an outbound datagram (ms).
    pub idle_timeout: u64,
    /// Probability that a datagram is forwarded twice.
    pub dup: f64,
    /// Probability that a datagram is held back, and the longest hold (ms).
    pub hold: f64,
    /// Longest hold (ms).
    pub hold_max: u64,
}

/// What the NATs did, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    /// Mappings replaced after their idle timeout.
    pub rebinds: u64,
    /// Datagrams forwarded twice.
    pub duplicated: u64,
    /// Datagrams held back.
    pub held: u64,
}

struct Mapping {
    sock: Rc<UdpSocket>,
    reader: tokio::task::JoinHandle<()>,
    /// Time of the last outbound datagram (ms), shared with the reader.
    last_out: Rc<Cell<u64>>,
}

/// Forwards `data` from `sock` to `to`, applying duplication and holds.
async fn forward(
    sh: &Rc<Shared>,
    plan: &NatPlan,
    rng: &mut SmallRng,
    sock: Rc<UdpSocket>,
    data: Vec<u8>,
    to: SocketAddr,
) {
    let clean = sh.faults.borrow().loss_off;
    let copies = if !clean && plan.dup > 0.0 && rng.random_bool(plan.dup) {
        sh.net.borrow_mut().duplicated += 1;
        2
    } else {
        1
    };
    let hold = (!clean && plan.hold > 0.0 && rng.random_bool(plan.hold))
        .then(|| rng.random_range(1..=plan.hold_max.max(1)));
    if hold.is_some() {
        sh.net.borrow_mut().held += 1;
    }
    match hold {
        Some(ms) => {
            tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                for _ in 0..copies {
                    let _ = sock.send_to(&data, to).await;
                }
            });
        }
        None => {
            for _ in 0..copies {
                let _ = sock.send_to(&data, to).await;
            }
        }
    }
}

/// The NAT host's software (a turmoil host: it runs until the simulation ends).
pub async fn run(sh: Rc<Shared>, plan: NatPlan, server: SocketAddr) -> turmoil::Result {
    let front = Rc::new(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, DEVICE_PORT)).await?);
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    let mut maps: BTreeMap<SocketAddr, Mapping> = BTreeMap::new();
    let mut made = 0u64;
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, device) = front.recv_from(&mut buf).await?;
        let now = now_ms();
        if maps
            .get(&device)
            .is_some_and(|m| now >= m.last_out.get() + plan.idle_timeout)
        {
            if let Some(m) = maps.remove(&device) {
                m.reader.abort();
                sh.net.borrow_mut().rebinds += 1;
            }
        }
        let sock = match maps.get(&device) {
            Some(m) => {
                m.last_out.set(now);
                m.sock.clone()
            }
            None => {
                let sock = Rc::new(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?);
                made += 1;
                let last_out = Rc::new(Cell::new(now));
                let reader = {
                    let (sock, front, sh, plan) =
                        (sock.clone(), front.clone(), sh.clone(), plan.clone());
                    let last_out = last_out.clone();
                    let mut rng =
                        SmallRng::seed_from_u64(plan.seed ^ made.wrapping_mul(0x9e37_79b9));
                    tokio::task::spawn_local(async move {
                        let mut buf = vec![0u8; 2048];
                        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                            // An expired mapping forwards nothing (it is only replaced at the
                            // device's next datagram).
                            let live = now_ms() < last_out.get() + plan.idle_timeout;
                            if from == server && live {
                                let data = buf[..n].to_vec();
                                forward(&sh, &plan, &mut rng, front.clone(), data, device).await;
                            }
                        }
                    })
                };
                let m = Mapping {
                    sock: sock.clone(),
                    reader,
                    last_out,
                };
                maps.insert(device, m);
                sock
            }
        };
        forward(&sh, &plan, &mut rng, sock, buf[..n].to_vec(), server).await;
    }
}
