//! Pushers (app servers on port 9999) and the devices that receive and ack their pushes.
//!
//! Each push is a 0x20 whose payload carries its sequence number, the target device and the
//! send time, so the receiving side can attribute a delivery (downstream packets carry no
//! uuid), ack it with the right uuid as the SDK does, drop duplicates and time it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddpush_proto::session::{ack_for, PushConfig, PushOutcome, PushSession};
use ddpush_proto::{Content, DevicePacket, DownMsg, DownPacket, PushMsg, PushRequest, Time};
use serde_json::{json, Value};

use crate::devices::{heartbeat, uuid_of, Fleet, HB_LEN};
use crate::net::{self, Receiver, BATCH};

/// Payload layout: seq u64, device u64, send time u64 (ns since the run's epoch).
const PAYLOAD_LEN: usize = 24;
/// A reply this late counts as an error.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One push run.
pub struct PushRun<'a> {
    /// For the progress line.
    pub label: &'a str,
    /// Push address.
    pub push: SocketAddr,
    /// Devices `0..clients` receive the pushes (registered and online).
    pub clients: u64,
    /// Connections.
    pub conns: usize,
    /// Requests in flight per connection (1: wait for every reply, as the Java Pusher does).
    pub window: usize,
    /// How long to push.
    pub duration: Duration,
}

/// Latency percentiles in microseconds.
pub fn percentiles(mut v: Vec<u32>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_unstable();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    json!({
        "count": v.len(),
        "p50_us": p(0.50),
        "p90_us": p(0.90),
        "p99_us": p(0.99),
        "p999_us": p(0.999),
        "max_us": v[v.len() - 1],
    })
}

struct Shared {
    epoch: Instant,
    seq: AtomicU64,
    stop: AtomicBool,
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    errors: AtomicU64,
}

/// One app server: requests pipelined through the core's `PushSession` (the same reply
/// matching as the `ddpush` client) on one connection; a failed connection ends it and counts
/// as an error (the run measures the server, not reconnects).
fn pusher(sh: &Shared, addr: SocketAddr, clients: u64, window: usize, until: Instant) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        sh.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
    let window = window.max(1);
    let mut session = PushSession::new(PushConfig {
        window,
        reply_timeout: REPLY_TIMEOUT,
        ..PushConfig::default()
    });
    let now = || Time::from_millis(sh.epoch.elapsed().as_millis() as u64);
    session.handle_connected(now());
    let mut out = Vec::with_capacity(window * 64);
    let mut replies = vec![0u8; window];
    loop {
        let more = Instant::now() < until;
        out.clear();
        while more && session.unanswered() < window {
            let seq = sh.seq.fetch_add(1, Ordering::Relaxed);
            let dev = seq % clients;
            let t = sh.epoch.elapsed().as_nanos() as u64;
            let mut p = Vec::with_capacity(PAYLOAD_LEN);
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&dev.to_be_bytes());
            p.extend_from_slice(&t.to_be_bytes());
            session.push(PushRequest {
                app_id: 1,
                uuid: uuid_of(dev),
                msg: PushMsg::Payload(Content::new(p).expect("24 bytes")),
            });
        }
        let _ = session.poll_transmit(now(), &mut out);
        if !out.is_empty() && s.write_all(&out).is_err() {
            sh.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let inflight = session.in_flight();
        if inflight == 0 {
            return;
        }
        let n = match s.read(&mut replies[..inflight]) {
            Ok(0) | Err(_) => {
                sh.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(n) => n,
        };
        let bad = session.handle_replies(now(), &replies[..n]).is_err();
        while let Some((_, o)) = session.poll_outcome() {
            match o {
                PushOutcome::Accepted => sh.accepted.fetch_add(1, Ordering::Relaxed),
                PushOutcome::Rejected => sh.rejected.fetch_add(1, Ordering::Relaxed),
                _ => sh.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        if bad {
            sh.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

#[derive(Default)]
struct Delivered {
    seen: Vec<u64>,
    unique: u64,
    dups: u64,
    acks: u64,
    other: u64,
    lat_us: Vec<u32>,
}

impl Delivered {
    fn mark(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.seen.len() {
            self.seen.resize(w + 1024, 0);
        }
        let fresh = self.seen[w] & (1 << b) == 0;
        self.seen[w] |= 1 << b;
        fresh
    }
}

/// The device side: reads deliveries on every socket, acks them, keeps the devices online.
fn receiver(fleet: &Fleet, sh: &Shared, clients: u64, done: &AtomicBool) -> Delivered {
    let mut d = Delivered::default();
    let mut rx = Receiver::default();
    let mut acks: Vec<Vec<u8>> = vec![Vec::new(); fleet.socks.len()];
    let s_n = fleet.socks.len() as u64;
    let mut last_keepalive = Instant::now();
    while !done.load(Ordering::Relaxed) {
        if last_keepalive.elapsed() > Duration::from_secs(20) {
            // The online window is 60 s: heartbeat every device again well before it ends.
            last_keepalive = Instant::now();
            let mut buf = Vec::new();
            for (s, sock) in fleet.socks.iter().enumerate() {
                let mut i = s as u64;
                while i < clients {
                    buf.clear();
                    let mut k = 0;
                    while k < BATCH && i < clients {
                        heartbeat(i, &mut buf);
                        i += s_n;
                        k += 1;
                    }
                    let mut off = 0;
                    while off < k {
                        let n = net::send_many(sock, &buf[off * HB_LEN..], HB_LEN, k - off);
                        if n == 0 {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        off += n;
                    }
                }
            }
        }
        let mut any = false;
        for (s, sock) in fleet.socks.iter().enumerate() {
            let n = rx.recv(sock);
            if n == 0 {
                continue;
            }
            any = true;
            let now = sh.epoch.elapsed().as_nanos() as u64;
            for i in 0..n {
                let pkt = DownPacket::decode(rx.get(i));
                let ack = pkt.as_ref().ok().and_then(|p| ack_for(&p.msg));
                match (pkt, ack) {
                    (
                        Ok(DownPacket {
                            msg: DownMsg::Payload(p),
                            ..
                        }),
                        Some(ack),
                    ) if p.len() == PAYLOAD_LEN => {
                        let f =
                            |k: usize| u64::from_be_bytes(p[k * 8..k * 8 + 8].try_into().unwrap());
                        let (seq, dev, t) = (f(0), f(1), f(2));
                        if d.mark(seq) {
                            d.unique += 1;
                            d.lat_us
                                .push((now.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
                        } else {
                            d.dups += 1;
                        }
                        // Ack at once, before "the app" sees it, with the SDK's ack rule.
                        DevicePacket {
                            app_id: 1,
                            uuid: uuid_of(dev),
                            msg: ack,
                        }
                        .encode(&mut acks[s]);
                    }
                    _ => d.other += 1,
                }
            }
            let a = &mut acks[s];
            let mut off = 0;
            let total = a.len() / HB_LEN;
            while off < total {
                let n = net::send_many(sock, &a[off * HB_LEN..], HB_LEN, total - off);
                if n == 0 {
                    break; // lost acks only cause re-sends, which count as duplicates
                }
                off += n;
            }
            d.acks += off as u64;
            a.clear();
        }
        if !any {
            net::wait_readable(&fleet.socks, Duration::from_millis(2));
        }
    }
    d
}

/// Runs pushers against online devices and returns every figure as JSON.
pub fn run(fleet: &Fleet, r: &PushRun<'_>) -> Value {
    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        accepted: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let until = start + r.duration;
    let (delivered, secs) = std::thread::scope(|sc| {
        let rx = sc.spawn(|| receiver(fleet, &sh, r.clients, &done));
        let pushers: Vec<_> = (0..r.conns)
            .map(|_| {
                let sh = sh.clone();
                let (addr, clients, window) = (r.push, r.clients, r.window);
                sc.spawn(move || pusher(&sh, addr, clients, window, until))
            })
            .collect();
        let mut last = 0;
        while pushers.iter().any(|p| !p.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            let e = start.elapsed();
            if e.as_millis() / 1000 != last {
                last = e.as_millis() / 1000;
                eprintln!(
                    "[{}] t={:.1}s accepted={} rate={:.0}/s",
                    r.label,
                    e.as_secs_f64(),
                    sh.accepted.load(Ordering::Relaxed),
                    sh.accepted.load(Ordering::Relaxed) as f64 / e.as_secs_f64()
                );
            }
        }
        let secs = start.elapsed().as_secs_f64();
        for p in pushers {
            let _ = p.join();
        }
        sh.stop.store(true, Ordering::Relaxed);
        // Let the last deliveries land before counting losses.
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, Ordering::Relaxed);
        (rx.join().unwrap_or_default(), secs)
    });
    let accepted = sh.accepted.load(Ordering::Relaxed);
    json!({
        "conns": r.conns,
        "window": r.window,
        "clients": r.clients,
        "secs": secs,
        "accepted": accepted,
        "rejected": sh.rejected.load(Ordering::Relaxed),
        "failed": sh.failed.load(Ordering::Relaxed),
        "conn_errors": sh.errors.load(Ordering::Relaxed),
        "pushes_per_s": accepted as f64 / secs.max(1e-9),
        "delivered": delivered.unique,
        "duplicates": delivered.dups,
        "acks_sent": delivered.acks,
        "other_packets": delivered.other,
        "lost": accepted.saturating_sub(delivered.unique),
        "latency": percentiles(delivered.lat_us),
    })
}
