//! TCP devices at scale: many idle device connections on port 9966 (spread over several
//! loopback source addresses, 127.0.0.x, so ephemeral ports never run out), with the same
//! run's UDP figures next to them.
//!
//! One ddpushd with `--device-tcp true`. Connections are opened in steps (each sends one
//! heartbeat, then nothing); after each step the server's RSS is read once every connection is
//! open and registered (`ddpush_tcp_connections`, `ddpush_clients` from the admin endpoint).
//! Then, at the largest step: heartbeats/s over TCP (every connection heartbeats as fast as
//! the generator writes; the rate is the server's own `ddpush_heartbeats_total`), the same for
//! UDP devices on the same server, and push -> delivery latency over TCP and over UDP (16
//! one-at-a-time pushers, 4,096 hot devices of each kind). Device `i` on TCP has uuid
//! `uuid_of(TCP_BASE + i)`; UDP devices keep `uuid_of(i)`.
//!
//! The generator raises its own fd limit (the server inherits it); the server's defaults are
//! untouched. Every connection is one fd in each process, so where the hard limit cannot be
//! raised (a container without CAP_SYS_RESOURCE) the steps stop 1,000 below it and the output
//! says so (`clamped_by_fd_limit`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ddpush_proto::session::ack_for;
use ddpush_proto::{
    Content, DeviceMsg, DevicePacket, DownMsg, DownPacket, DownStreamDecoder, PushMsg, PushReply,
    PushRequest,
};
use serde_json::{json, Value};

use crate::devices::{self, uuid_of, Drive, Fleet, Pace};
use crate::proc::{self, Server};
use crate::push::{self, percentiles, PushRun};
use crate::Args;

/// TCP device `i` is `uuid_of(TCP_BASE + i)`, apart from the UDP devices.
const TCP_BASE: u64 = 1 << 40;
/// Push payload: seq u64, device u64, send time u64 (ns since the run's epoch).
const PAYLOAD_LEN: usize = 24;

/// Sizes of one TCP run.
pub struct TcpScale {
    /// Connection counts to measure at, ascending.
    pub steps: Vec<u64>,
    /// Loopback source addresses (127.0.0.1 ..= 127.0.0.S).
    pub sources: u8,
    /// Devices of each kind that receive pushes.
    pub hot: u64,
    /// Seconds per throughput or latency run.
    pub secs: f64,
    /// Idle push connections opened for the push-port memory figure.
    pub push_idle: u64,
}

impl TcpScale {
    /// The suite's sizes.
    pub fn new(smoke: bool) -> Self {
        if smoke {
            TcpScale {
                steps: vec![200, 400],
                sources: 2,
                hot: 64,
                secs: 0.5,
                push_idle: 100,
            }
        } else {
            TcpScale {
                steps: vec![10_000, 50_000, 100_000],
                sources: 16,
                hot: 4096,
                secs: 3.0,
                push_idle: 10_000,
            }
        }
    }
}

/// Raises this process's open-file limit to `want` (children inherit it). Returns the limit
/// in force afterwards.
fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read one plain struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < want {
            let max = r.rlim_max.max(want);
            let new = libc::rlimit {
                rlim_cur: want,
                rlim_max: max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                r = new;
            } else {
                // Not root: go as far as the hard limit.
                let new = libc::rlimit {
                    rlim_cur: r.rlim_max,
                    rlim_max: r.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                    r = new;
                }
            }
        }
    }
    r.rlim_cur
}

/// Kernel memory in use, machine-wide: slab (socket structs) and TCP buffer pages.
fn kernel_mem() -> Value {
    let slab = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    let tcp_pages = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("TCP:")).and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "mem")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
        });
    json!({ "slab_bytes": slab, "tcp_buffer_bytes": tcp_pages.map(|p| p * 4096) })
}

fn src_addr(i: u64, sources: u8) -> SocketAddr {
    let k = (i % u64::from(sources.max(1))) as u8;
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1 + k), 0))
}

/// One TCP connection from source `src` to `target`.
fn connect_from(src: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&src.into())?;
    s.connect(&target.into())?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    Ok(s)
}

fn hb(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(devices::HB_LEN);
    DevicePacket {
        app_id: 1,
        uuid: uuid_of(TCP_BASE + i),
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut v);
    v
}

fn gauge(admin: SocketAddr, name: &str) -> f64 {
    proc::metric(admin, name).unwrap_or(f64::NAN)
}

const DEVICE_CONNS: &str = "ddpush_tcp_connections{port=\"device\"}";
const PUSH_CONNS: &str = "ddpush_tcp_connections{port=\"push\"}";

/// Waits until `name` reaches `want` (or `limit` passes); returns the time it took.
fn wait_for(admin: SocketAddr, name: &str, want: f64, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if gauge(admin, name) >= want {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Opens connections `lo..hi`, each sending one heartbeat, on two threads.
fn open_devices(
    target: SocketAddr,
    lo: u64,
    hi: u64,
    sources: u8,
    errors: &AtomicU64,
) -> Vec<TcpStream> {
    let threads = 2;
    let mut out: Vec<TcpStream> = Vec::with_capacity((hi - lo) as usize);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move || {
                    let mut v = Vec::new();
                    let mut i = lo + t;
                    while i < hi {
                        match connect_from(src_addr(i, sources), target) {
                            Ok(mut s) => {
                                if s.write_all(&hb(i)).is_err() {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                                v.push((i, s));
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        i += threads;
                    }
                    v
                })
            })
            .collect();
        let mut all: Vec<(u64, TcpStream)> = hs
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        all.sort_by_key(|(i, _)| *i);
        out.extend(all.into_iter().map(|(_, s)| s));
    });
    out
}

/// Every connection heartbeats as fast as two writer threads go, for `secs`; the rate is
/// the server's own count.
fn tcp_heartbeats(admin: SocketAddr, pid: u32, conns: &[TcpStream], base: u64, secs: f64) -> Value {
    let hb0 = gauge(admin, "ddpush_heartbeats_total");
    let c0 = proc::cpu_secs(pid).unwrap_or(f64::NAN);
    let sent = AtomicU64::new(0);
    let t = Instant::now();
    let until = t + Duration::from_secs_f64(secs);
    let half = conns.len().div_ceil(2);
    std::thread::scope(|sc| {
        for (k, chunk) in conns.chunks(half.max(1)).enumerate() {
            let sent = &sent;
            sc.spawn(move || {
                let beats: Vec<Vec<u8>> = (0..chunk.len())
                    .map(|j| hb(base + (k * half + j) as u64))
                    .collect();
                let mut n = 0u64;
                'outer: loop {
                    for (mut s, b) in chunk.iter().zip(&beats) {
                        if Instant::now() >= until {
                            break 'outer;
                        }
                        if s.write_all(b).is_ok() {
                            n += 1;
                        }
                    }
                }
                sent.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    // Let the server finish what is in its sockets before it is counted.
    std::thread::sleep(Duration::from_millis(300));
    let hb1 = gauge(admin, "ddpush_heartbeats_total");
    let cpu = proc::cpu_secs(pid).unwrap_or(f64::NAN) - c0;
    let sent = sent.load(Ordering::Relaxed);
    json!({
        "secs": secs,
        "server_cpu_s": cpu,
        "server_cpu_us_per_heartbeat": cpu / (hb1 - hb0).max(1.0) * 1e6,
        "sent": sent,
        "sent_per_s": sent as f64 / secs.max(1e-9),
        "processed": hb1 - hb0,
        "processed_per_s": (hb1 - hb0) / secs.max(1e-9),
    })
}

/// UDP devices `0..n` heartbeating closed loop (policy always) on the same server; the
/// server's count is reported too.
fn udp_heartbeats(admin: SocketAddr, pid: u32, fleet: &Fleet, n: u64, secs: f64) -> Value {
    let hb0 = gauge(admin, "ddpush_heartbeats_total");
    let c0 = proc::cpu_secs(pid).unwrap_or(f64::NAN);
    let r = devices::drive(
        fleet,
        &Drive {
            label: "udp heartbeats (same server)",
            range: (0, n),
            once: false,
            duration: Duration::from_secs_f64(secs),
            pace: Pace::Window(256),
            signer: None,
        },
        &mut || {},
    );
    std::thread::sleep(Duration::from_millis(300));
    let hb1 = gauge(admin, "ddpush_heartbeats_total");
    let cpu = proc::cpu_secs(pid).unwrap_or(f64::NAN) - c0;
    json!({
        "run": r.json(),
        "server_cpu_s": cpu,
        "server_cpu_us_per_heartbeat": cpu / (hb1 - hb0).max(1.0) * 1e6,
        "processed": hb1 - hb0,
        "processed_per_s": (hb1 - hb0) / r.secs.max(1e-9),
    })
}

struct Deliveries {
    seen: Vec<u64>,
    unique: u64,
    dups: u64,
    other: u64,
    lat_us: Vec<u32>,
}

/// The device side over TCP: epoll over the hot connections, decode every frame, ack each
/// delivery at once on the same connection (as `TCPClientBase` does), time it.
fn tcp_receiver(hot: &[TcpStream], epoch: Instant, done: &AtomicBool) -> Deliveries {
    let mut d = Deliveries {
        seen: Vec::new(),
        unique: 0,
        dups: 0,
        other: 0,
        lat_us: Vec::new(),
    };
    // SAFETY: plain epoll calls on fds we own; `ev` outlives every call that writes it.
    let ep = unsafe { libc::epoll_create1(0) };
    if ep < 0 {
        return d;
    }
    for (i, s) in hot.iter().enumerate() {
        let _ = s.set_nonblocking(true);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: as above.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
    }
    let mut streams: Vec<DownStreamDecoder> = vec![DownStreamDecoder::new(); hot.len()];
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = [0u8; 16 * 1024];
    while !done.load(Ordering::Relaxed) {
        // SAFETY: `evs` has room for 256 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 256, 2) };
        for e in evs.iter().take(n.max(0) as usize) {
            let i = e.u64 as usize;
            let mut s = &hot[i];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => streams[i].extend(&buf[..k]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let now = epoch.elapsed().as_nanos() as u64;
            let mut acks = Vec::new();
            while let Some(pkt) = streams[i].next_packet() {
                let ack = pkt.as_ref().ok().and_then(|p| ack_for(&p.msg));
                match (pkt, ack) {
                    (
                        Ok(DownPacket {
                            msg: DownMsg::Payload(pl),
                            ..
                        }),
                        Some(ack),
                    ) if pl.len() == PAYLOAD_LEN => {
                        let f = |k: usize| {
                            let mut w = [0u8; 8];
                            w.copy_from_slice(&pl[k * 8..k * 8 + 8]);
                            u64::from_be_bytes(w)
                        };
                        let (seq, dev, t) = (f(0), f(1), f(2));
                        let (w, b) = ((seq / 64) as usize, seq % 64);
                        if w >= d.seen.len() {
                            d.seen.resize(w + 1024, 0);
                        }
                        if d.seen[w] & (1 << b) == 0 {
                            d.seen[w] |= 1 << b;
                            d.unique += 1;
                            d.lat_us
                                .push((now.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
                        } else {
                            d.dups += 1;
                        }
                        DevicePacket {
                            app_id: 1,
                            uuid: uuid_of(TCP_BASE + dev),
                            msg: ack,
                        }
                        .encode(&mut acks);
                    }
                    _ => d.other += 1,
                }
            }
            let mut w = &hot[i];
            let mut a = &acks[..];
            while !a.is_empty() {
                match w.write(a) {
                    Ok(k) => a = &a[k..],
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50))
                    }
                    Err(_) => break,
                }
            }
        }
    }
    // SAFETY: closing the epoll fd we created.
    unsafe { libc::close(ep) };
    d
}

/// 16 one-at-a-time pushers to the hot TCP devices, with the receiver above.
fn tcp_push_latency(push: SocketAddr, hot: &[TcpStream], conns: usize, secs: f64) -> Value {
    let epoch = Instant::now();
    let seq = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let until = epoch + Duration::from_secs_f64(secs);
    let n = hot.len() as u64;
    let (d, took) = std::thread::scope(|sc| {
        let rx = sc.spawn(|| tcp_receiver(hot, epoch, &done));
        let ps: Vec<_> = (0..conns)
            .map(|_| {
                sc.spawn(|| {
                    let Ok(mut s) = TcpStream::connect(push) else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut out = Vec::with_capacity(64);
                    while Instant::now() < until {
                        let q = seq.fetch_add(1, Ordering::Relaxed);
                        let dev = q % n;
                        let t = epoch.elapsed().as_nanos() as u64;
                        let mut p = Vec::with_capacity(PAYLOAD_LEN);
                        p.extend_from_slice(&q.to_be_bytes());
                        p.extend_from_slice(&dev.to_be_bytes());
                        p.extend_from_slice(&t.to_be_bytes());
                        out.clear();
                        let Ok(content) = Content::new(p) else {
                            return; // 24 bytes always fit; nothing else to do if not
                        };
                        PushRequest {
                            app_id: 1,
                            uuid: uuid_of(TCP_BASE + dev),
                            msg: PushMsg::Payload(content),
                        }
                        .encode(&mut out);
                        let mut r = [0u8; 1];
                        if s.write_all(&out).is_err() || s.read_exact(&mut r).is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        if PushReply::from_byte(r[0]) == Some(PushReply::Accepted) {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for p in ps {
            let _ = p.join();
        }
        let took = epoch.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, Ordering::Relaxed);
        (rx.join().ok(), took)
    });
    let acc = accepted.load(Ordering::Relaxed);
    let Some(d) = d else {
        return json!({ "error": "receiver panicked" });
    };
    json!({
        "conns": conns,
        "window": 1,
        "clients": n,
        "secs": took,
        "accepted": acc,
        "pushes_per_s": acc as f64 / took.max(1e-9),
        "conn_errors": errors.load(Ordering::Relaxed),
        "delivered": d.unique,
        "duplicates": d.dups,
        "other_packets": d.other,
        "lost": acc.saturating_sub(d.unique),
        "latency": percentiles(d.lat_us),
    })
}

fn ddpushd(bin: &Path, dir: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--push-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--heartbeat-reply",
        "always",
        // One source IP per 6,000 connections: the abuse limits would measure the limiter.
        "--limits",
        "false",
        "--device-tcp",
        "true",
        "--data-dir",
    ]);
    c.arg(dir);
    c
}

/// Runs the TCP section against `bin` and returns its figures.
pub fn section(bin: &Path, work: &Path, sc: &TcpScale) -> Result<Value, String> {
    let want = sc.steps.iter().copied().max().unwrap_or(0);
    let nofile = raise_nofile(want + 2_000);
    // Each connection is one fd in the server and one here. Where the hard limit cannot be
    // raised (no CAP_SYS_RESOURCE), the steps stop below it and say so.
    let cap = nofile.saturating_sub(1_000);
    let mut steps: Vec<u64> = sc.steps.iter().map(|&s| s.min(cap)).collect();
    steps.dedup();
    let clamped = want > cap;
    let max = steps.iter().copied().max().unwrap_or(0);
    let dir = work.join("tcp");
    let _ = std::fs::remove_dir_all(&dir);
    let srv: Server = proc::spawn(ddpushd(bin, &dir), Duration::from_secs(60))?;
    let admin = srv.admin.ok_or("ddpushd printed no admin address")?;
    let push_addr = srv.push.ok_or("ddpushd printed no push address")?;
    let target = srv.udp; // the TCP device port shares the UDP port's number
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = proc::rss(srv.pid()).unwrap_or(0);
    let k0 = kernel_mem();
    let errors = AtomicU64::new(0);
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut points = vec![json!({ "conns": 0, "rss": rss0, "kernel": k0 })];
    for &n in &steps {
        let have = conns.len() as u64;
        let t = Instant::now();
        conns.extend(open_devices(target, have, n, sc.sources, &errors));
        let opened = t.elapsed();
        let all = wait_for(admin, DEVICE_CONNS, n as f64, Duration::from_secs(120));
        let reg = wait_for(admin, "ddpush_clients", n as f64, Duration::from_secs(60));
        let ready = t.elapsed();
        std::thread::sleep(Duration::from_millis(1000));
        let rss = proc::rss(srv.pid()).unwrap_or(0);
        eprintln!(
            "[tcp] {n} connections open in {:.2}s, rss {:.1} MiB",
            ready.as_secs_f64(),
            rss as f64 / 1048576.0
        );
        points.push(json!({
            "conns": n,
            "open_conns_reported": gauge(admin, DEVICE_CONNS),
            "rss": rss,
            "kernel": kernel_mem(),
            "connect_secs": opened.as_secs_f64(),
            "ready_secs": ready.as_secs_f64(),
            "all_open": all.is_some() && reg.is_some(),
            "connect_per_s": (n - have) as f64 / ready.as_secs_f64().max(1e-9),
        }));
    }
    let rss_at = |i: usize| points[i]["rss"].as_f64().unwrap_or(f64::NAN);
    let last = points.len() - 1;
    let per_conn = (rss_at(last) - rss_at(0)) / max.max(1) as f64;
    let marginal = if last >= 2 {
        (rss_at(last) - rss_at(1)) / (max - steps[0]).max(1) as f64
    } else {
        per_conn
    };
    let kern = |i: usize, k: &str| points[i]["kernel"][k].as_f64().unwrap_or(f64::NAN);
    let kernel_per_conn = json!({
        "slab_bytes": (kern(last, "slab_bytes") - kern(0, "slab_bytes")) / max.max(1) as f64,
        "tcp_buffer_bytes": (kern(last, "tcp_buffer_bytes") - kern(0, "tcp_buffer_bytes")) / max.max(1) as f64,
        "note": "machine-wide, both ends of each loopback connection",
    });

    // Throughput: TCP, then UDP devices (as many) on the same server.
    let tcp_hb = tcp_heartbeats(admin, srv.pid(), &conns, 0, sc.secs);
    let fleet = Fleet::new(srv.udp, 4).map_err(|e| e.to_string())?;
    devices::register(&fleet, "udp register (tcp run)", 0, max);
    let udp_hb = udp_heartbeats(admin, srv.pid(), &fleet, max, sc.secs);

    // Latency: hot devices of each kind, 16 one-at-a-time pushers.
    let hot = (sc.hot as usize).min(conns.len());
    let tcp_push = tcp_push_latency(push_addr, &conns[..hot], 16, sc.secs);
    let udp_push = push::run(
        &fleet,
        &PushRun {
            label: "udp push 16x1 (tcp run)",
            push: push_addr,
            clients: sc.hot.min(max),
            conns: 16,
            window: 1,
            duration: Duration::from_secs_f64(sc.secs),
        },
    );
    let rss_loaded = proc::rss(srv.pid()).unwrap_or(0);

    drop(conns);
    let _ = srv.terminate(Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);

    // Idle push connections (port 9999), on a fresh server: memory per connection.
    let push_idle = sc.push_idle.min(cap);
    let srv: Server = proc::spawn(ddpushd(bin, &dir), Duration::from_secs(60))?;
    let admin = srv.admin.ok_or("ddpushd printed no admin address")?;
    let push_addr = srv.push.ok_or("ddpushd printed no push address")?;
    std::thread::sleep(Duration::from_millis(300));
    let before = proc::rss(srv.pid()).unwrap_or(0);
    let mut pushers = Vec::with_capacity(push_idle as usize);
    for i in 0..push_idle {
        match connect_from(src_addr(i, sc.sources), push_addr) {
            Ok(s) => pushers.push(s),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    wait_for(admin, PUSH_CONNS, push_idle as f64, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1000));
    let after = proc::rss(srv.pid()).unwrap_or(0);
    let push_per_conn = (after as f64 - before as f64) / push_idle.max(1) as f64;
    drop(pushers);
    let _ = srv.terminate(Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    let f = |v: &Value, p: &[&str]| {
        let mut x = v;
        for k in p {
            x = &x[*k];
        }
        x.as_f64().unwrap_or(f64::NAN)
    };
    let figures = json!({
        "tcp_conns": max,
        "tcp_conns_clamped_by_fd_limit": clamped,
        "tcp_bytes_per_idle_conn": per_conn,
        "tcp_bytes_per_idle_conn_marginal": marginal,
        "tcp_connect_per_s": points[last]["connect_per_s"],
        "tcp_heartbeats_per_s": f(&tcp_hb, &["processed_per_s"]),
        "udp_heartbeats_per_s_same_run": f(&udp_hb, &["processed_per_s"]),
        "tcp_cpu_us_per_heartbeat": f(&tcp_hb, &["server_cpu_us_per_heartbeat"]),
        "udp_cpu_us_per_heartbeat_same_run": f(&udp_hb, &["server_cpu_us_per_heartbeat"]),
        "tcp_push_latency_p50_us": f(&tcp_push, &["latency", "p50_us"]),
        "tcp_push_latency_p99_us": f(&tcp_push, &["latency", "p99_us"]),
        "tcp_pushes_per_s_16x1": f(&tcp_push, &["pushes_per_s"]),
        "tcp_push_lost": f(&tcp_push, &["lost"]),
        "udp_push_latency_p50_us_same_run": f(&udp_push, &["latency", "p50_us"]),
        "udp_push_latency_p99_us_same_run": f(&udp_push, &["latency", "p99_us"]),
        "udp_pushes_per_s_16x1_same_run": f(&udp_push, &["pushes_per_s"]),
        "push_bytes_per_idle_conn": push_per_conn,
    });
    Ok(json!({
        "nofile": nofile,
        "steps": steps,
        "sources": sc.sources,
        "connect_errors": errors.load(Ordering::Relaxed),
        "points": points,
        "bytes_per_conn_total": per_conn,
        "bytes_per_conn_marginal": marginal,
        "kernel_per_conn": kernel_per_conn,
        "rss_under_load": rss_loaded,
        "tcp_heartbeats": tcp_hb,
        "udp_heartbeats": udp_hb,
        "tcp_push_16x1": tcp_push,
        "udp_push_16x1": udp_push,
        "push_idle_conns": push_idle,
        "steps_requested": sc.steps,
        "clamped_by_fd_limit": clamped,
        "push_bytes_per_idle_conn": push_per_conn,
        "figures": figures,
    }))
}

/// `ddpush-bench tcp --server PATH [--smoke] [--steps 10000,50000] [--work-dir DIR]`: the TCP
/// section alone.
pub fn run(a: &Args) -> Result<Value, String> {
    let bin: PathBuf = a.need("server")?;
    let mut sc = TcpScale::new(a.has("smoke"));
    if let Some(s) = a.0.get("steps") {
        sc.steps = s
            .split(',')
            .map(|x| x.trim().parse().map_err(|_| format!("bad --steps {s:?}")))
            .collect::<Result<_, _>>()?;
    }
    sc.sources = a.get("sources", sc.sources)?;
    sc.secs = a.get("secs", sc.secs)?;
    let work: PathBuf = a.get(
        "work-dir",
        std::env::temp_dir().join(format!("ddpush-bench-tcp-{}", std::process::id())),
    )?;
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let v = section(&bin, &work, &sc)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({ "mode": "tcp", "tcp": v }))
}
