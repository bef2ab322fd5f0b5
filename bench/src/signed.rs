//! Signed devices (PROTOCOL.md 9) against the real ddpushd: keys provisioned over the admin
//! API, then heartbeats/s of all-signed vs all-unsigned devices, measured in alternation.
//!
//! ```text
//! ddpush-bench signed --server PATH/ddpushd [--clients N] [--rounds K] [--secs T]
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn spread(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "min": min, "max": max, "median": median(v.to_vec()) })
}

/// The `signed` mode.
pub fn run(a: &Args) -> Result<Value, String> {
    let bin: PathBuf = a.need("server")?;
    let n: u64 = a.get("clients", 10_000)?;
    let rounds: usize = a.get("rounds", 5)?;
    let secs: f64 = a.get("secs", 3.0)?;
    let window: usize = a.get("window", 256)?;
    let rate: f64 = a.get("rate", 0.0)?;
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
    let srv = proc::spawn(
        proc::ddpushd_cmd(
            &bin,
            &dir,
            "127.0.0.1:0",
            "127.0.0.1:0",
            &["--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN],
        ),
        Duration::from_secs(120),
    )?;
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

    let mut runs = Vec::new();
    let mut hb = (Vec::new(), Vec::new());
    let mut cpu = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for signed in [false, true] {
            let label = format!("{}#{round}", if signed { "signed" } else { "unsigned" });
            let c0 = proc::cpu_secs(pid).unwrap_or(0.0);
            let r = devices::drive(
                &fleet,
                &Drive {
                    label: &label,
                    range: if signed { (n, 2 * n) } else { (0, n) },
                    once: false,
                    duration: Duration::from_secs_f64(secs),
                    pace,
                    signer: signed.then_some(&signer),
                },
                &mut || {},
            );
            let c1 = proc::cpu_secs(pid).unwrap_or(0.0);
            let per_s = r.answered as f64 / r.secs.max(1e-9);
            let us = (c1 - c0) / (r.answered.max(1) as f64) * 1e6;
            let (h, c) = if signed {
                (&mut hb.1, &mut cpu.1)
            } else {
                (&mut hb.0, &mut cpu.0)
            };
            h.push(per_s);
            c.push(us);
            runs.push(json!({
                "label": label,
                "signed": signed,
                "run": r.json(),
                "server_cpu_s": c1 - c0,
                "server_cpu_us_per_answered": us,
            }));
        }
    }
    srv.terminate(Duration::from_secs(30))?;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n.max(1) as f64;
    Ok(json!({
        "mode": "signed",
        "clients_per_fleet": n,
        "rounds": rounds,
        "secs": secs,
        "window": window,
        "rate": rate,
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
        "heartbeats_per_s": { "unsigned": spread(&hb.0), "signed": spread(&hb.1) },
        "signed_over_unsigned": median(hb.1.clone()) / median(hb.0.clone()),
        "server_cpu_us_per_heartbeat": { "unsigned": spread(&cpu.0), "signed": spread(&cpu.1) },
        "runs": runs,
    }))
}
