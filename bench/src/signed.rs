//! Signed devices (PROTOCOL.md 9) against the real ddpushd: keys provisioned over the admin
//! API, then heartbeats/s of all-signed vs all-unsigned devices, measured in alternation.
//!
//! ```text
//! ddpush-bench signed --server PATH/ddpushd [--clients N] [--rounds K] [--secs T]
//!                     [--warmup K] [--server-cpu C] [--client-cpu C]
//!                     [--window W] [--rate R] [--sockets S] [--work-dir DIR]
//! ```
//!
//! `--rate R` offers R heartbeats/s (open loop) instead of keeping W in flight per socket: on
//! a machine shared with other work, the server CPU per heartbeat at a rate both fleets reach
//! is a steadier cost figure than closed-loop heartbeats/s, which follow the neighbours' load.
//!
//! One server holds both fleets: devices `0..N` speak v1, devices `N..2N` have a key each
//! (`PUT /clients/{uuid}/key`). Rounds alternate unsigned and signed runs, so a neighbour's
//! load on this shared machine hurts both alike; every run is reported, with the median and
//! the spread. Signed heartbeats are signed by the core's encoder as they are sent (a counter
//! nonce per device, the wall clock as timestamp); their sealed answers are counted when they
//! have the shape of a sealed heartbeat reply (the answer names no uuid, so the generator cannot
//! tell which device's key to check it with; `proto-core/tests` verify the seals).

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ddpush_proto::signed::{encode_device, DeviceKey, KeyedMac, Seal, TRAILER_LEN, VERSION};
use ddpush_proto::{DeviceMsg, DevicePacket};
use serde_json::{json, Value};

use crate::devices::{self, uuid_of, Drive, Fleet, Pace, HB_LEN};
use crate::{proc, Args};

/// Bytes of a signed heartbeat on the wire.
pub const SIGNED_HB_LEN: usize = HB_LEN + TRAILER_LEN;
/// Bytes of a sealed heartbeat reply: the 5-byte header and the trailer.
const SEALED_REPLY_LEN: usize = 5 + TRAILER_LEN;
const KEY_ID: u8 = 1;
const TOKEN: &str = "bench-token-not-secret";

/// Device `i`'s key: distinct per device, derived from its index.
pub fn key_of(i: u64) -> DeviceKey {
    let mut k = [0x5Au8; 32];
    k[..8].copy_from_slice(&i.to_be_bytes());
    DeviceKey::new(k)
}

/// Signs heartbeats for devices `base..base + n`, each with its own key and nonce counter.
/// Each key is HMAC-keyed once ([`KeyedMac`]), as a device holding its key would do: the
/// generator shares the machine's cores with the server, so its signing costs are kept low.
pub struct Signer {
    base: u64,
    keys: Vec<KeyedMac>,
    nonces: RefCell<Vec<u32>>,
}

impl Signer {
    /// Keys for devices `base..base + n`.
    pub fn new(base: u64, n: u64) -> Self {
        Signer {
            base,
            keys: (base..base + n)
                .map(|i| KeyedMac::new(&key_of(i)))
                .collect(),
            nonces: RefCell::new(vec![0; n as usize]),
        }
    }

    /// Device `i`'s next signed heartbeat, stamped with the wall clock.
    pub fn heartbeat(&self, i: u64, out: &mut Vec<u8>) {
        let j = (i - self.base) as usize;
        let nonce = {
            let mut n = self.nonces.borrow_mut();
            n[j] = n[j].wrapping_add(1);
            n[j]
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        let p = DevicePacket {
            app_id: 1,
            uuid: uuid_of(i),
            msg: DeviceMsg::Heartbeat,
        };
        let seal = Seal {
            key_id: KEY_ID,
            ts,
            nonce,
        };
        encode_device(&p, seal, &self.keys[j], out);
    }

    /// Whether `b` has the shape of a sealed heartbeat reply (version 2, cmd 0x00, N = 0).
    pub fn is_reply(b: &[u8]) -> bool {
        b.len() == SEALED_REPLY_LEN && b[0] == VERSION && b[2] == 0x00 && b[3..5] == [0, 0]
    }
}

/// One HTTP/1.1 request to the admin API; returns the status code.
fn http(admin: SocketAddr, method: &str, path: &str, body: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .map_err(|e| format!("admin connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nx-ddpush-csrf: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {resp:?}"))
}

/// Provisions the keys of devices `lo..hi` over the admin API, one request each.
pub fn provision(admin: SocketAddr, lo: u64, hi: u64) -> Result<f64, String> {
    let t = std::time::Instant::now();
    for i in lo..hi {
        let body = format!(
            "{{\"key_id\": {KEY_ID}, \"key\": \"{}\"}}",
            key_of(i).to_hex()
        );
        let path = format!("/clients/{}/key", uuid_of(i).to_hex());
        let code = http(admin, "PUT", &path, &body)?;
        if code != 200 {
            return Err(format!("PUT {path} answered {code}"));
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn median(v: Vec<f64>) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile of `v` (linear between the two nearest ranks), NaN if empty.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let at = q * (v.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

/// Median, interquartile range and extremes: the spread of one kind of figure over rounds.
fn spread(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({
        "min": min,
        "q1": quantile(v.to_vec(), 0.25),
        "median": median(v.to_vec()),
        "q3": quantile(v.to_vec(), 0.75),
        "max": max,
        "n": v.len(),
    })
}

/// What one timed run of one fleet measured.
struct Sample {
    /// Answered heartbeats per second (wall clock).
    per_s: f64,
    /// Server CPU (all threads, nanosecond scheduler time) per answered heartbeat, in us.
    server_us: f64,
    /// Share of one CPU the server used over the run (1.0: one core busy throughout).
    server_util: f64,
    /// The generator's own CPU per sent heartbeat, in us.
    client_us: f64,
}

/// Runs one fleet for one timed run and measures it.
fn measure(
    fleet: &Fleet,
    drive: &Drive<'_>,
    pid: u32,
    runs: &mut Vec<Value>,
) -> Result<Sample, String> {
    let (s0, g0, st0) = (
        proc::cpu_ns(pid).ok_or("server gone")?,
        proc::self_cpu_ns(),
        proc::steal_ticks(),
    );
    let r = devices::drive(fleet, drive, &mut || {});
    let (s1, g1, st1) = (
        proc::cpu_ns(pid).ok_or("server gone")?,
        proc::self_cpu_ns(),
        proc::steal_ticks(),
    );
    let server_s = (s1 - s0) as f64 / 1e9;
    let sample = Sample {
        per_s: r.answered as f64 / r.secs.max(1e-9),
        server_us: server_s / (r.answered.max(1) as f64) * 1e6,
        server_util: server_s / r.secs.max(1e-9),
        client_us: (g1 - g0) as f64 / 1e3 / (r.sent.max(1) as f64),
    };
    runs.push(json!({
        "label": drive.label,
        "signed": drive.signer.is_some(),
        "run": r.json(),
        "server_cpu_s": server_s,
        "server_cpu_us_per_answered": sample.server_us,
        "server_util": sample.server_util,
        "client_cpu_us_per_sent": sample.client_us,
        "steal_ticks": st1 - st0,
        "load1": proc::load1(),
    }));
    Ok(sample)
}

/// The `signed` mode.
///
/// Rounds alternate their order (unsigned then signed, then signed then unsigned), so drift
/// over the run and whatever the first run of a pair pays (caches, the other fleet's records)
/// fall on both fleets alike; `--warmup K` rounds are run first and not counted. Each round
/// gives a pair, and the ratios are taken within the pair, then summarised (median and
/// interquartile range over rounds): a neighbour's burst then moves one pair, not one side of
/// the comparison. Two ratios are reported: heartbeats/s (the issue's figure, which on a
/// shared 2-core machine also follows the generator's and the neighbours' CPU use) and
/// heartbeats per server CPU second (the server's own cost, from its threads' scheduler run
/// time in nanoseconds). `--server-cpu C` / `--client-cpu C` pin the server and this
/// generator to different CPUs, so they do not take turns on one.
pub fn run(a: &Args) -> Result<Value, String> {
    let bin: PathBuf = a.need("server")?;
    let n: u64 = a.get("clients", 10_000)?;
    let rounds: usize = a.get("rounds", 5)?;
    let warmup: usize = a.get("warmup", 1)?;
    let secs: f64 = a.get("secs", 3.0)?;
    let window: usize = a.get("window", 256)?;
    let rate: f64 = a.get("rate", 0.0)?;
    let cpu_flag = |k: &str| -> Result<Option<usize>, String> {
        if a.has(k) {
            a.need(k).map(Some)
        } else {
            Ok(None)
        }
    };
    let (server_cpu, client_cpu) = (cpu_flag("server-cpu")?, cpu_flag("client-cpu")?);
    let pace = if rate > 0.0 {
        Pace::Rate(rate)
    } else {
        Pace::Window(window)
    };
    let work: PathBuf = a.get(
        "work-dir",
        std::env::temp_dir().join(format!("ddpush-bench-signed-{}", std::process::id())),
    )?;
    let dir = work.join("signed");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    if let Some(c) = client_cpu {
        proc::pin_self(c)?;
    }
    let mut cmd = proc::ddpushd_cmd(
        &bin,
        &dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN],
    );
    if let Some(c) = server_cpu {
        proc::pin_command(&mut cmd, c)?;
    }
    let srv = proc::spawn(cmd, Duration::from_secs(120))?;
    let admin = srv.admin.ok_or("ddpushd printed no admin address")?;
    let pid = srv.pid();
    let fleet = Fleet::new(srv.udp, a.get("sockets", 4)?).map_err(|e| e.to_string())?;
    let signer = Signer::new(n, n);

    // Memory: the v1 fleet's records, then the keys alone, then the signed fleet's records.
    let rss0 = proc::rss(pid).unwrap_or(0);
    let reg_v1 = devices::register(&fleet, "register v1", 0, n);
    let rss1 = proc::rss(pid).unwrap_or(0);
    let prov_s = provision(admin, n, 2 * n)?;
    let rss2 = proc::rss(pid).unwrap_or(0);
    let reg_signed = devices::drive(
        &fleet,
        &Drive {
            label: "register signed",
            range: (n, 2 * n),
            once: true,
            duration: Duration::from_secs(120),
            pace: Pace::Window(256),
            signer: Some(&signer),
        },
        &mut || {},
    );
    let rss3 = proc::rss(pid).unwrap_or(0);
    let keys = proc::metric(admin, "ddpush_keys");
    let load_start = proc::load1();

    let mut runs = Vec::new();
    let mut side: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for round in 0..warmup + rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut pair: [Option<Sample>; 2] = [None, None];
        for signed in order {
            let label = format!(
                "{}{}#{round}",
                if round < warmup { "warmup-" } else { "" },
                if signed { "signed" } else { "unsigned" }
            );
            let d = Drive {
                label: &label,
                range: if signed { (n, 2 * n) } else { (0, n) },
                once: false,
                duration: Duration::from_secs_f64(secs),
                pace,
                signer: signed.then_some(&signer),
            };
            pair[usize::from(signed)] = Some(measure(&fleet, &d, pid, &mut runs)?);
        }
        if round >= warmup {
            let [Some(u), Some(s)] = pair else {
                unreachable!("both fleets ran")
            };
            side[0].push(u);
            side[1].push(s);
        }
    }
    let load_end = proc::load1();
    srv.terminate(Duration::from_secs(30))?;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n.max(1) as f64;
    let of = |k: usize, f: fn(&Sample) -> f64| side[k].iter().map(f).collect::<Vec<f64>>();
    let paired = |f: fn(&Sample, &Sample) -> f64| {
        side[0]
            .iter()
            .zip(&side[1])
            .map(|(u, s)| f(u, s))
            .collect::<Vec<f64>>()
    };
    let thr = paired(|u, s| s.per_s / u.per_s);
    let cpu = paired(|u, s| u.server_us / s.server_us);
    let extra = paired(|u, s| s.server_us - u.server_us);
    let (q, m) = (|v: &[f64], x| quantile(v.to_vec(), x), median);
    eprintln!(
        "signed/unsigned over {rounds} rounds: heartbeats/s {:.3} (IQR {:.3}-{:.3}), \
         heartbeats per server CPU second {:.3} (IQR {:.3}-{:.3}), extra server CPU {:.3} us \
         per signed heartbeat; load {load_start:.2} -> {load_end:.2}",
        m(thr.clone()),
        q(&thr, 0.25),
        q(&thr, 0.75),
        m(cpu.clone()),
        q(&cpu, 0.25),
        q(&cpu, 0.75),
        m(extra.clone()),
    );
    let util = m(side.iter().flatten().map(|s| s.server_util).collect());
    if util < 0.9 {
        eprintln!(
            "note: ddpushd used {util:.2} of a CPU (median over runs): it was not the \
             bottleneck, so heartbeats/s follow the scheduling of the pair and its neighbours; \
             read the per-server-CPU-second ratio"
        );
    }
    Ok(json!({
        "mode": "signed",
        "clients_per_fleet": n,
        "rounds": rounds,
        "warmup": warmup,
        "secs": secs,
        "window": window,
        "rate": rate,
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "load1": { "start": load_start, "end": load_end },
        "register_v1": reg_v1.json(),
        "provision_s": prov_s,
        "register_signed": reg_signed.json(),
        "keys_metric": keys,
        "memory": {
            "rss_start": rss0,
            "rss_after_v1_records": rss1,
            "rss_after_keys": rss2,
            "rss_after_signed_records": rss3,
            "bytes_per_v1_record": per(rss0, rss1),
            "bytes_per_key": per(rss1, rss2),
            "bytes_per_signed_client": per(rss1, rss3),
        },
        "heartbeats_per_s": { "unsigned": spread(&of(0, |s| s.per_s)), "signed": spread(&of(1, |s| s.per_s)) },
        "server_cpu_us_per_heartbeat": {
            "unsigned": spread(&of(0, |s| s.server_us)),
            "signed": spread(&of(1, |s| s.server_us)),
        },
        "server_util": { "unsigned": spread(&of(0, |s| s.server_util)), "signed": spread(&of(1, |s| s.server_util)) },
        "client_cpu_us_per_sent": {
            "unsigned": spread(&of(0, |s| s.client_us)),
            "signed": spread(&of(1, |s| s.client_us)),
        },
        // Within each round's pair, then over rounds.
        "paired": {
            "heartbeats_per_s_signed_over_unsigned": spread(&thr),
            "per_server_cpu_s_signed_over_unsigned": spread(&cpu),
            "extra_server_cpu_us_per_signed_heartbeat": spread(&extra),
        },
        "signed_over_unsigned": m(thr),
        "runs": runs,
    }))
}
