//! Simulated devices: many uuids share a few UDP sockets (the server keys on the uuid, not the
//! address). Heartbeats are encoded with the core's `DevicePacket::encode` and replies read with
//! `DownPacket::decode`: there is no second wire implementation here.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ddpush_proto::{DeviceMsg, DevicePacket, DownMsg, DownPacket, Uuid};
use serde_json::{json, Value};

use crate::net::{self, Receiver, BATCH};

/// Size of a heartbeat on the wire.
pub const HB_LEN: usize = 21;

/// Added to every device index (`ddpush-bench push --first N`), so that runs at the same time
/// (one per cluster node) use disjoint uuids.
pub static FIRST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The uuid of simulated device `i`: cheap to make, distinct, and recognisable in logs.
pub fn uuid_of(i: u64) -> Uuid {
    let i = i + FIRST.load(std::sync::atomic::Ordering::Relaxed);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(b"ddpbench");
    b[8..].copy_from_slice(&i.to_be_bytes());
    Uuid(b)
}

/// Device `i`'s heartbeat, encoded by the core.
pub fn heartbeat(i: u64, out: &mut Vec<u8>) {
    DevicePacket {
        app_id: 1,
        uuid: uuid_of(i),
        msg: DeviceMsg::Heartbeat,
    }
    .encode(out);
}

/// UDP sockets shared by the simulated devices: device `i` uses socket `i % sockets`.
pub struct Fleet {
    /// The sockets, connected to the target.
    pub socks: Vec<UdpSocket>,
}

impl Fleet {
    /// `n` sockets connected to `target`.
    pub fn new(target: SocketAddr, n: usize) -> std::io::Result<Fleet> {
        let socks = (0..n.max(1))
            .map(|_| net::connected_socket(target))
            .collect::<Result<_, _>>()?;
        Ok(Fleet { socks })
    }
}

/// How a heartbeat run paces itself.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Closed loop: at most this many heartbeats unanswered per socket. Measures the rate a
    /// server sustains with a bounded queue (no backlog grows).
    Window(usize),
    /// Open loop at this many heartbeats per second (0: as fast as the generator can).
    Rate(f64),
}

/// One heartbeat run.
pub struct Drive<'a> {
    /// For the progress line.
    pub label: &'a str,
    /// Devices `range.0 .. range.1`.
    pub range: (u64, u64),
    /// Send each device's heartbeat once, then wait for the replies (registration).
    pub once: bool,
    /// Stop after this long (also bounds a `once` run).
    pub duration: Duration,
    /// Pacing.
    pub pace: Pace,
    /// Signed devices (PROTOCOL.md 9): heartbeats signed by this, sealed answers expected.
    pub signer: Option<&'a crate::signed::Signer>,
}

/// What a heartbeat run saw.
#[derive(Debug, Default, Clone)]
pub struct DriveResult {
    /// Heartbeats the kernel accepted.
    pub sent: u64,
    /// Valid heartbeat replies received.
    pub answered: u64,
    /// Other valid packets received (pending items re-sent).
    pub other: u64,
    /// Datagrams `DownPacket::decode` refused.
    pub invalid: u64,
    /// Seconds from first send to the end.
    pub secs: f64,
}

impl DriveResult {
    /// As JSON.
    pub fn json(&self) -> Value {
        json!({
            "sent": self.sent,
            "answered": self.answered,
            "other": self.other,
            "invalid": self.invalid,
            "secs": self.secs,
            "sent_per_s": self.sent as f64 / self.secs.max(1e-9),
            "answered_per_s": self.answered as f64 / self.secs.max(1e-9),
            "loss": if self.sent == 0 { 0.0 } else { 1.0 - self.answered as f64 / self.sent as f64 },
        })
    }
}

/// Runs heartbeats per `d`, calling `sample` about every 250 ms (for RSS readings).
pub fn drive(fleet: &Fleet, d: &Drive<'_>, sample: &mut dyn FnMut()) -> DriveResult {
    let s_n = fleet.socks.len() as u64;
    let (lo, hi) = d.range;
    let count = hi.saturating_sub(lo);
    let mut next: Vec<u64> = (0..s_n).map(|s| lo + s).collect();
    let mut exhausted = vec![false; fleet.socks.len()];
    let mut outstanding = vec![0usize; fleet.socks.len()];
    let mut last_reply = vec![Instant::now(); fleet.socks.len()];
    let hb_len = match d.signer {
        Some(_) => crate::signed::SIGNED_HB_LEN,
        None => HB_LEN,
    };
    let mut buf = Vec::with_capacity(BATCH * hb_len);
    let mut rx = Receiver::default();
    let mut r = DriveResult::default();
    let start = Instant::now();
    let mut last_sample = start;
    let mut last_progress = start;
    let mut drained_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        if elapsed >= d.duration {
            break;
        }
        if now - last_sample >= Duration::from_millis(250) {
            last_sample = now;
            sample();
        }
        if now - last_progress >= Duration::from_secs(1) {
            last_progress = now;
            eprintln!(
                "[{}] t={:.1}s sent={} answered={} rate={:.0}/s",
                d.label,
                elapsed.as_secs_f64(),
                r.sent,
                r.answered,
                r.answered as f64 / elapsed.as_secs_f64()
            );
        }
        let mut progressed = false;
        let mut allowed_total = match d.pace {
            Pace::Rate(rate) if rate > 0.0 => {
                ((rate * elapsed.as_secs_f64()) as u64).saturating_sub(r.sent) as usize
            }
            _ => usize::MAX,
        };
        for (s, sock) in fleet.socks.iter().enumerate() {
            // Replies first, so the window reopens.
            loop {
                let n = rx.recv(sock);
                if n == 0 {
                    break;
                }
                progressed = true;
                last_reply[s] = now;
                for i in 0..n {
                    if d.signer.is_some() {
                        if crate::signed::Signer::is_reply(rx.get(i)) {
                            r.answered += 1;
                            outstanding[s] = outstanding[s].saturating_sub(1);
                        } else {
                            r.other += 1;
                        }
                        continue;
                    }
                    match DownPacket::decode(rx.get(i)) {
                        Ok(DownPacket {
                            msg: DownMsg::HeartbeatReply,
                            ..
                        }) => {
                            r.answered += 1;
                            outstanding[s] = outstanding[s].saturating_sub(1);
                        }
                        Ok(_) => r.other += 1,
                        Err(_) => r.invalid += 1,
                    }
                }
                if n < BATCH {
                    break;
                }
            }
            if exhausted[s] {
                continue;
            }
            let mut want = match d.pace {
                Pace::Window(w) => {
                    // A reply lost on loopback (buffer overflow) would shut the window for
                    // good: after 50 ms of silence, count the outstanding ones as lost.
                    if outstanding[s] > 0 && now - last_reply[s] > Duration::from_millis(50) {
                        outstanding[s] = 0;
                        last_reply[s] = now;
                    }
                    w.saturating_sub(outstanding[s])
                }
                Pace::Rate(_) => allowed_total.min(BATCH * 4),
            };
            while want > 0 {
                buf.clear();
                let mut k = 0;
                while k < want.min(BATCH) {
                    if next[s] >= hi {
                        if d.once {
                            exhausted[s] = true;
                            break;
                        }
                        next[s] = lo + s as u64;
                        if next[s] >= hi {
                            exhausted[s] = true;
                            break;
                        }
                    }
                    match d.signer {
                        Some(sg) => sg.heartbeat(next[s], &mut buf),
                        None => heartbeat(next[s], &mut buf),
                    }
                    next[s] += s_n;
                    k += 1;
                }
                if k == 0 {
                    break;
                }
                let sent = net::send_many(sock, &buf, hb_len, k);
                if sent < k {
                    // Kernel buffer full: rewind the devices not sent and move on.
                    let back = (k - sent) as u64 * s_n;
                    next[s] = next[s].saturating_sub(back).max(lo + s as u64);
                    exhausted[s] = false;
                }
                r.sent += sent as u64;
                outstanding[s] += sent;
                allowed_total = allowed_total.saturating_sub(sent);
                want -= sent;
                if sent > 0 {
                    progressed = true;
                }
                if sent < k {
                    break;
                }
            }
        }
        if d.once && exhausted.iter().all(|&e| e) {
            // Everything sent: wait until every reply is in or none came for 500 ms.
            let done = r.answered >= count || (r.answered + r.other) >= count;
            let t = *drained_at.get_or_insert(now);
            let quiet = last_reply.iter().max().copied().unwrap_or(t);
            if done || now - quiet.max(t) > Duration::from_millis(500) {
                break;
            }
        }
        if !progressed {
            match d.pace {
                Pace::Rate(rate) if rate > 0.0 && allowed_total == 0 => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                _ => net::wait_readable(&fleet.socks, Duration::from_millis(5)),
            }
        }
    }
    r.secs = start.elapsed().as_secs_f64();
    r
}

/// Registers devices `lo..hi` (one heartbeat each, replies awaited).
pub fn register(fleet: &Fleet, label: &str, lo: u64, hi: u64) -> DriveResult {
    drive(
        fleet,
        &Drive {
            label,
            range: (lo, hi),
            once: true,
            duration: Duration::from_secs(120),
            pace: Pace::Window(256),
            signer: None,
        },
        &mut || {},
    )
}

/// Waits until the UDP port answers a heartbeat; returns when it did, or `None` on timeout.
pub fn wait_answer(target: SocketAddr, timeout: Duration) -> Option<Instant> {
    let sock = net::connected_socket(target).ok()?;
    let mut buf = Vec::new();
    heartbeat(u64::MAX, &mut buf);
    let mut rx = Receiver::default();
    let t = Instant::now();
    while t.elapsed() < timeout {
        let _ = sock.send(&buf);
        let until = Instant::now() + Duration::from_millis(2);
        while Instant::now() < until {
            if rx.recv(&sock) > 0 {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    None
}
