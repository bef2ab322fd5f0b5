//! An attacker who knows every uuid and sees every signed device's packets (issue 18).
//!
//! It taps the server's link ([`tap`], called by the server adapter for every datagram and
//! device-port TCP read it gets, before the core sees it): every version-2 packet is copied,
//! as a wiretap next to the server would. From its own host it then
//!
//! * replays each captured datagram, once at once, and some again later inside the 60 s
//!   window and after it;
//! * replays captured TCP reads on a TCP connection of its own to port 9966;
//! * sends forgeries made from captured packets (a tag bit flipped; the timestamp moved to
//!   now, which the tag no longer covers);
//! * heartbeats every uuid in v1 every 10 s (what an attacker does to a v1 uuid) and sends v1
//!   acks of every kind for them every 30 s.
//!
//! Everything it receives is classified. For a signed-only uuid it may get only bare v1
//! `0x10`s; a `0x11`, a `0x20`, a heartbeat reply or any sealed packet would mean it read
//! content or moved the device's address (the scenario also checks the recorded addresses).
//!
//! It also copies every sealed answer leaving the server over UDP ([`tap_down`]). When a
//! device restarts (the scenario tells it, as a wiretap would see the device fall silent and
//! come back), it waits for the device's first signed packet from its new address and injects
//! every answer captured for the device's old addresses in the 70 s before the restart to the
//! new one, with the server's source address (the NATs pass only the server's datagrams), at
//! once and four times more within the window. A restarted device has no memory of the pairs
//! it accepted; its start floor must refuse all of them (PROTOCOL.md 9.4). It is told of
//! restarts rather than guessing them from new addresses because a NAT rebind also gives a new
//! address, and there a captured answer the device lost on the way is a late first delivery,
//! not a replay.
//!
//! What it cannot do here: drop the device's own packet and deliver the copy first. That is
//! what a NAT rebind looks like, and it would move the address (docs/SECURITY.md).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::signed;
use ddpush_proto::{DeviceMsg, DevicePacket, DownMsg, DownPacket, DownStreamDecoder, Uuid};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpStream, UdpSocket};

use crate::world::{now_ms, Shared};

/// Packets copied off the server's link, waiting for the attacker.
#[derive(Default)]
pub struct Capture {
    /// The tap is on (only in scenarios with an attacker), and the attacker's own address,
    /// whose packets it does not copy.
    pub on: Option<IpAddr>,
    /// Captured datagrams.
    pub udp: Vec<Vec<u8>>,
    /// Captured device-port TCP reads.
    pub tcp: Vec<Vec<u8>>,
    /// Every address each uuid's signed datagrams came from, and when first (ms).
    pub addrs: BTreeMap<Uuid, BTreeMap<SocketAddr, u64>>,
    /// Sealed UDP answers seen leaving the server: (ms, destination, bytes).
    pub down: Vec<(u64, SocketAddr, Vec<u8>)>,
    /// Device restarts the scenario tells the attacker of: (uuid, ms).
    pub restarts: Vec<(Uuid, u64)>,
    /// Datagrams for the server host to send with its own source address.
    pub inject: Vec<(SocketAddr, Vec<u8>)>,
    /// Every captured answer injected to a restarted device (the devices look theirs up).
    pub injected: BTreeSet<Vec<u8>>,
}

/// What the attacker did and got.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttackStats {
    /// Captured signed packets replayed over UDP (every copy counted).
    pub replayed: u64,
    /// Captured TCP reads replayed on its own connection.
    pub tcp_replayed: u64,
    /// Forgeries made from captured packets.
    pub forged: u64,
    /// v1 heartbeats for the uuids.
    pub v1_heartbeats: u64,
    /// v1 acks for the uuids.
    pub v1_acks: u64,
    /// Bare v1 `0x10`s received (allowed: "you have news").
    pub got_notify: u64,
    /// v1 `0x11` masks received (must stay 0).
    pub got_bits: u64,
    /// v1 `0x20` payloads received (must stay 0).
    pub got_payload: u64,
    /// v1 heartbeat replies received (must stay 0: a reply means a heartbeat was recorded).
    pub got_reply: u64,
    /// Sealed packets received (must stay 0: they go only to a device's verified address).
    pub got_sealed: u64,
    /// Anything else received.
    pub got_other: u64,
    /// Times a signed-only uuid's recorded address was found to be the attacker's (set by the
    /// scenario's checks; must stay 0).
    pub moved: u64,
    /// Restarted devices it found at their new address.
    pub restarts_found: u64,
    /// Captured answers injected to restarted devices (every copy counted).
    pub injected: u64,
}

/// The attacker's plan.
#[derive(Clone, Debug)]
pub struct AttackPlan {
    /// Seed of its RNG.
    pub seed: u64,
    /// When it starts and stops (ms).
    pub start: u64,
    /// When it stops (ms).
    pub end: u64,
    /// Every uuid it knows.
    pub uuids: Vec<Uuid>,
}

/// Copies a packet from `from` off the server's link (called by the server adapter). Only
/// version-2 packets of others are kept: the attacker already knows how to make v1 ones, and
/// its own replays are not news to it.
pub fn tap(sh: &Shared, from: SocketAddr, tcp: bool, bytes: &[u8]) {
    let mut c = sh.capture.borrow_mut();
    let wanted = c.on.is_some_and(|me| me != from.ip());
    if wanted && bytes.first() == Some(&signed::VERSION) {
        if tcp {
            c.tcp.push(bytes.to_vec());
        } else {
            c.udp.push(bytes.to_vec());
            if let Ok(f) = signed::SignedFrame::parse(bytes) {
                let at = now_ms();
                c.addrs
                    .entry(f.packet.uuid)
                    .or_default()
                    .entry(from)
                    .or_insert(at);
            }
        }
    }
}

/// Copies a sealed answer the server sends to `to` over UDP (called by the server adapter).
pub fn tap_down(sh: &Shared, to: SocketAddr, bytes: &[u8]) {
    let mut c = sh.capture.borrow_mut();
    if c.on.is_some() && bytes.first() == Some(&signed::VERSION) {
        c.down.push((now_ms(), to, bytes.to_vec()));
    }
}

/// How far back before a restart captured answers are replayed to the restarted device (ms):
/// more than the device's window, so some are too old for it anyway.
const CAPTURED_BEFORE: u64 = 70_000;
/// When each captured answer is injected again after the device is found (ms).
const INJECT_AT: [u64; 5] = [0, 1_000, 5_000, 20_000, 45_000];
/// A restarted device not found at a new address within this long is given up (ms).
const FIND_FOR: u64 = 120_000;

/// A restarted device the attacker waits to see at a new address.
struct Restarted {
    uuid: Uuid,
    at: u64,
    old: BTreeSet<SocketAddr>,
    captured: Vec<Vec<u8>>,
}

/// Takes the restarts the scenario told of, looks for their new addresses, and schedules the
/// injections of their captured answers into `later`.
fn find_restarted(
    sh: &Shared,
    waiting: &mut Vec<Restarted>,
    later: &mut BTreeMap<u64, Vec<(SocketAddr, Vec<u8>)>>,
) {
    let now = now_ms();
    let mut c = sh.capture.borrow_mut();
    c.down
        .retain(|(at, _, _)| *at + CAPTURED_BEFORE + FIND_FOR >= now);
    for (uuid, at) in std::mem::take(&mut c.restarts) {
        // Its addresses before the restart (its new one may be seen already).
        let old: BTreeSet<SocketAddr> = (c.addrs.get(&uuid).into_iter().flatten())
            .filter(|(_, first)| **first <= at)
            .map(|(a, _)| *a)
            .collect();
        let captured = (c.down.iter())
            .filter(|(t, to, _)| *t + CAPTURED_BEFORE >= at && *t <= at && old.contains(to))
            .map(|(_, _, b)| b.clone())
            .collect();
        waiting.push(Restarted {
            uuid,
            at,
            old,
            captured,
        });
    }
    let mut found = 0;
    waiting.retain(|r| {
        let new = c.addrs.get(&r.uuid).and_then(|a| {
            (a.iter().filter(|(a, _)| !r.old.contains(a)))
                .max_by_key(|(_, first)| **first)
                .map(|(a, _)| *a)
        });
        match new {
            Some(to) => {
                found += 1;
                for d in &INJECT_AT {
                    let copies = r.captured.iter().map(|b| (to, b.clone()));
                    later.entry(now + d).or_default().extend(copies);
                }
                false
            }
            None => now < r.at + FIND_FOR,
        }
    });
    drop(c);
    sh.attack.borrow_mut().restarts_found += found;
}

fn classify(st: &mut AttackStats, bytes: &[u8]) {
    if bytes.first() == Some(&signed::VERSION) {
        st.got_sealed += 1;
        return;
    }
    match DownPacket::decode(bytes).map(|p| p.msg) {
        Ok(DownMsg::Notify) => st.got_notify += 1,
        Ok(DownMsg::Bits(_)) => st.got_bits += 1,
        Ok(DownMsg::Payload(_)) => st.got_payload += 1,
        Ok(DownMsg::HeartbeatReply) => st.got_reply += 1,
        Err(_) => st.got_other += 1,
    }
}

/// A forgery from a captured packet: a flipped tag bit, or a fresh timestamp under the old tag.
fn forge(rng: &mut SmallRng, captured: &[u8]) -> Vec<u8> {
    let mut f = captured.to_vec();
    let n = f.len();
    if rng.random_bool(0.5) {
        let bit = rng.random_range(0..signed::TAG_LEN * 8);
        f[n - signed::TAG_LEN + bit / 8] ^= 1 << (bit % 8);
    } else {
        // ts sits 4 + 4 + 16 bytes from the end, after the key id.
        let at = n - signed::TAG_LEN - 8;
        let ts = u32::try_from(now_ms() / 1000).unwrap_or(u32::MAX);
        f[at..at + 4].copy_from_slice(&ts.to_be_bytes());
    }
    f
}

const TICK: u64 = 250;
const V1_EVERY: u64 = 10_000;
const ACKS_EVERY: u64 = 30_000;

/// The attacker host: runs from `plan.start` to `plan.end`.
pub async fn run(
    sh: Rc<Shared>,
    plan: AttackPlan,
    server_udp: SocketAddr,
    server_tcp: SocketAddr,
) -> turmoil::Result {
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    tokio::time::sleep(Duration::from_millis(plan.start.saturating_sub(now_ms()))).await;
    let sock = Rc::new(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?);
    {
        // Everything that comes back to its UDP socket.
        let (sock, sh) = (sock.clone(), sh.clone());
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = sock.recv_from(&mut buf).await {
                classify(&mut sh.attack.borrow_mut(), &buf[..n]);
            }
        });
    }
    // Replays due later: time (ms) -> datagrams.
    let mut later: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    // Restarted devices not yet found, and injections due: time (ms) -> (to, answer).
    let mut waiting = Vec::new();
    let mut inject: BTreeMap<u64, Vec<(SocketAddr, Vec<u8>)>> = BTreeMap::new();
    let mut tcp: Option<turmoil::net::tcp::OwnedWriteHalf> = None;
    let mut next_v1 = now_ms();
    let mut next_acks = now_ms() + ACKS_EVERY / 2;
    let mut buf = Vec::new();
    while now_ms() < plan.end {
        let now = now_ms();
        let (udp, tcp_reads) = {
            let mut c = sh.capture.borrow_mut();
            (std::mem::take(&mut c.udp), std::mem::take(&mut c.tcp))
        };
        for d in udp {
            let _ = sock.send_to(&d, server_udp).await;
            sh.attack.borrow_mut().replayed += 1;
            if rng.random_bool(0.3) {
                let at = now + rng.random_range(5_000..55_000);
                later.entry(at).or_default().push(d.clone());
            }
            if rng.random_bool(0.1) {
                let at = now + rng.random_range(62_000..120_000);
                later.entry(at).or_default().push(d.clone());
            }
            if rng.random_bool(0.1) {
                let f = forge(&mut rng, &d);
                let _ = sock.send_to(&f, server_udp).await;
                sh.attack.borrow_mut().forged += 1;
            }
        }
        find_restarted(&sh, &mut waiting, &mut inject);
        while let Some(e) = inject.first_entry() {
            if *e.key() > now {
                break;
            }
            let due = e.remove();
            sh.attack.borrow_mut().injected += due.len() as u64;
            let mut c = sh.capture.borrow_mut();
            for (to, b) in due {
                c.injected.insert(b.clone());
                c.inject.push((to, b));
            }
            drop(c);
            sh.inject_wake.notify_one();
        }
        while let Some(e) = later.first_entry() {
            if *e.key() > now {
                break;
            }
            for d in e.remove() {
                let _ = sock.send_to(&d, server_udp).await;
                sh.attack.borrow_mut().replayed += 1;
            }
        }
        if !tcp_reads.is_empty() {
            if tcp.is_none() {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(server_tcp))
                        .await
                {
                    let (mut rd, wr) = s.into_split();
                    let sh = sh.clone();
                    tokio::task::spawn_local(async move {
                        let mut dec = DownStreamDecoder::new();
                        let mut b = vec![0u8; 4096];
                        while let Ok(n) = rd.read(&mut b).await {
                            if n == 0 {
                                break;
                            }
                            dec.extend(&b[..n]);
                            while let Some(p) = dec.next_raw() {
                                classify(&mut sh.attack.borrow_mut(), &p);
                            }
                        }
                    });
                    tcp = Some(wr);
                }
            }
            if let Some(w) = tcp.as_mut() {
                for r in &tcp_reads {
                    if w.write_all(r).await.is_err() {
                        // The server closed it (a replayed read that split a frame, or idle):
                        // a new connection next time.
                        tcp = None;
                        break;
                    }
                    sh.attack.borrow_mut().tcp_replayed += 1;
                }
            }
        }
        if now >= next_v1 {
            next_v1 = now + V1_EVERY;
            for u in &plan.uuids {
                buf.clear();
                DevicePacket {
                    app_id: rng.random_range(1..=3),
                    uuid: *u,
                    msg: DeviceMsg::Heartbeat,
                }
                .encode(&mut buf);
                let _ = sock.send_to(&buf, server_udp).await;
                sh.attack.borrow_mut().v1_heartbeats += 1;
            }
        }
        if now >= next_acks {
            next_acks = now + ACKS_EVERY;
            for u in &plan.uuids {
                for msg in [
                    DeviceMsg::AckNotify,
                    DeviceMsg::AckBits(u64::MAX),
                    DeviceMsg::AckPayload,
                ] {
                    buf.clear();
                    DevicePacket {
                        app_id: 1,
                        uuid: *u,
                        msg,
                    }
                    .encode(&mut buf);
                    let _ = sock.send_to(&buf, server_udp).await;
                    sh.attack.borrow_mut().v1_acks += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(TICK)).await;
    }
    Ok(())
}
