//! `ddpush-bench`: load generator, do-nothing responder and benchmark suite for ddpush-rs.
//!
//! ```text
//! ddpush-bench responder [--listen 127.0.0.1:0]
//! ddpush-bench heartbeat --target ADDR [--clients N] [--sockets S] [--secs T]
//!                        [--window W | --rate R] [--register] [--first N] [--server-pid PID]
//! ddpush-bench push --udp ADDR --push ADDR [--clients N] [--sockets S] [--conns C]
//!                   [--window W] [--secs T] [--first N] [--server-pid PID]
//! ddpush-bench seed --data-dir DIR --clients N
//! ddpush-bench tcp --server PATH/ddpushd [--smoke] [--steps 10000,50000,100000]
//! ddpush-bench suite --server PATH/ddpushd [--smoke] [--work-dir DIR] [--out FILE]
//! ddpush-bench signed --server PATH/ddpushd [--clients N] [--rounds K] [--secs T]
//!                     [--warmup K] [--server-cpu C] [--client-cpu C]
//! ddpush-bench report --in FILE --doc docs/BENCHMARKS.md --charts docs/bench
//! ```
//!
//! Every mode prints progress lines on stderr and one final JSON line on stdout.

mod devices;
mod net;
mod proc;
mod push;
mod report;
mod signed;
mod suite;
mod tcp;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use serde_json::{json, Value};

/// `--key value` flags and bare `--switch`es.
pub struct Args(HashMap<String, String>);

impl Args {
    fn parse(v: &[String]) -> Result<Args, String> {
        let mut m = HashMap::new();
        let mut i = 0;
        while i < v.len() {
            let k = v[i]
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {:?}", v[i]))?;
            match v.get(i + 1) {
                Some(val) if !val.starts_with("--") => {
                    m.insert(k.to_string(), val.clone());
                    i += 2;
                }
                _ => {
                    m.insert(k.to_string(), String::new());
                    i += 1;
                }
            }
        }
        Ok(Args(m))
    }

    /// A typed flag with a default.
    pub fn get<T: FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("bad value for --{k}: {v:?}")),
        }
    }

    /// A required flag.
    pub fn need<T: FromStr>(&self, k: &str) -> Result<T, String> {
        let v = self.0.get(k).ok_or_else(|| format!("--{k} is required"))?;
        v.parse().map_err(|_| format!("bad value for --{k}: {v:?}"))
    }

    /// A bare switch.
    pub fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = argv.first() else {
        eprintln!("usage: ddpush-bench responder|heartbeat|push|seed|suite|report [--flags]");
        return ExitCode::from(2);
    };
    let result = Args::parse(&argv[1..]).and_then(|a| match mode.as_str() {
        "responder" => responder(&a),
        "heartbeat" => heartbeat(&a),
        "push" => push_mode(&a),
        "seed" => seed(&a),
        "suite" => suite::run(&a),
        "tcp" => tcp::run(&a),
        "signed" => signed::run(&a),
        "report" => report::run(&a),
        "check" => check(&a),
        "-h" | "--help" | "help" => {
            println!(
                "{}",
                include_str!("main.rs")
                    .lines()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            Ok(json!({}))
        }
        m => Err(format!("unknown mode {m:?}")),
    });
    match result {
        Ok(v) => {
            if v != json!({}) {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The do-nothing responder: answers each datagram with the 5-byte heartbeat reply
/// `01 <appId> 00 0000`, nothing else. One thread, one `recv_from` and one `send_to` per
/// datagram, the same socket buffer as ddpushd's default.
fn responder(a: &Args) -> Result<Value, String> {
    let listen: SocketAddr = a.get("listen", "127.0.0.1:0".parse().unwrap())?;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        None,
    )
    .map_err(|e| e.to_string())?;
    let _ = s.set_recv_buffer_size(32 << 20);
    let _ = s.set_send_buffer_size(32 << 20);
    s.bind(&listen.into()).map_err(|e| e.to_string())?;
    let sock: UdpSocket = s.into();
    eprintln!(
        "responder listening udp={}",
        sock.local_addr().map_err(|e| e.to_string())?
    );
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n >= 2 {
                let _ = sock.send_to(&[1, buf[1], 0, 0, 0], from);
            }
        }
    }
}

/// Every key of a suite's `figures` object.
pub const FIGURE_KEYS: &[&str] = &[
    "bytes_per_idle_client",
    "heartbeats_per_s",
    "responder_heartbeats_per_s",
    "heartbeat_ratio",
    "heartbeat_loss",
    "cpu_us_per_heartbeat",
    "responder_cpu_us_per_heartbeat",
    "cpu_ratio",
    "pushes_per_s_pipelined_1x64",
    "pushes_per_s_serial_1",
    "pushes_per_s_serial_16",
    "push_lost_total",
    "latency_p50_us_serial_16",
    "latency_p99_us_serial_16",
    "latency_p999_us_serial_16",
    "startup_s",
    "shutdown_s",
    "overload_offered_per_s",
    "overload_answered_per_s",
    "overload_kernel_drops",
    "overload_rss_growth",
    "pushes_per_s_fsync_always",
    "pushes_per_fsync",
    "tcp_conns",
    "tcp_bytes_per_idle_conn",
    "tcp_connect_per_s",
    "tcp_heartbeats_per_s",
    "udp_heartbeats_per_s_same_run",
    "tcp_push_latency_p50_us",
    "tcp_push_latency_p99_us",
    "udp_push_latency_p50_us_same_run",
    "udp_push_latency_p99_us_same_run",
    "push_bytes_per_idle_conn",
];

/// `check --in FILE`: the last line of FILE is a suite result with every figure present.
/// No timing assertions: only that the run produced its JSON.
fn check(a: &Args) -> Result<Value, String> {
    let p: PathBuf = a.need("in")?;
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let last = text.lines().last().ok_or("empty result file")?;
    let v: Value =
        serde_json::from_str(last).map_err(|e| format!("final line is not JSON: {e}"))?;
    let g = &v["figures"];
    let missing: Vec<&str> = FIGURE_KEYS
        .iter()
        .copied()
        .filter(|k| g.get(*k).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(format!("figures missing: {missing:?}"));
    }
    for k in [
        "machine",
        "responder",
        "server_heartbeat",
        "overload",
        "push",
        "fsync_always",
        "memory",
        "tcp",
    ] {
        if v.get(k).is_none() {
            return Err(format!("key {k} missing"));
        }
    }
    eprintln!("check: {} figures present", FIGURE_KEYS.len());
    Ok(json!({}))
}

fn server_sample(pid: Option<u32>) -> Value {
    match pid {
        Some(p) => json!({ "pid": p, "rss_bytes": proc::rss(p), "cpu_s": proc::cpu_secs(p) }),
        None => json!(null),
    }
}

fn heartbeat(a: &Args) -> Result<Value, String> {
    let target: SocketAddr = a.need("target")?;
    devices::FIRST.store(a.get("first", 0)?, std::sync::atomic::Ordering::Relaxed);
    let clients: u64 = a.get("clients", 10_000)?;
    let fleet = devices::Fleet::new(target, a.get("sockets", 4)?).map_err(|e| e.to_string())?;
    let pid: Option<u32> = a.0.get("server-pid").and_then(|p| p.parse().ok());
    let reg = a
        .has("register")
        .then(|| devices::register(&fleet, "register", 0, clients).json());
    let pace = match a.0.get("rate") {
        Some(r) => devices::Pace::Rate(r.parse().map_err(|_| "bad --rate")?),
        None => devices::Pace::Window(a.get("window", 256)?),
    };
    let before = server_sample(pid);
    let r = devices::drive(
        &fleet,
        &devices::Drive {
            label: "heartbeat",
            range: (0, clients),
            once: false,
            duration: Duration::from_secs_f64(a.get("secs", 5.0)?),
            pace,
            signer: None,
        },
        &mut || {},
    );
    Ok(json!({
        "mode": "heartbeat",
        "register": reg,
        "result": r.json(),
        "server_before": before,
        "server_after": server_sample(pid),
    }))
}

fn push_mode(a: &Args) -> Result<Value, String> {
    let udp: SocketAddr = a.need("udp")?;
    devices::FIRST.store(a.get("first", 0)?, std::sync::atomic::Ordering::Relaxed);
    let clients: u64 = a.get("clients", 4096)?;
    let fleet = devices::Fleet::new(udp, a.get("sockets", 4)?).map_err(|e| e.to_string())?;
    let pid: Option<u32> = a.0.get("server-pid").and_then(|p| p.parse().ok());
    let reg = devices::register(&fleet, "register", 0, clients);
    let r = push::run(
        &fleet,
        &push::PushRun {
            label: "push",
            push: a.need("push")?,
            clients,
            conns: a.get("conns", 1)?,
            window: a.get("window", 1)?,
            duration: Duration::from_secs_f64(a.get("secs", 5.0)?),
        },
    );
    Ok(json!({ "mode": "push", "register": reg.json(), "result": r, "server": server_sample(pid) }))
}

/// Writes a data directory holding `clients` idle records, with the server's own encoder.
fn seed(a: &Args) -> Result<Value, String> {
    let dir: PathBuf = a.need("data-dir")?;
    let n: u64 = a.need("clients")?;
    let t = std::time::Instant::now();
    let bytes = suite::seed_bytes(n);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    ddpushd::persist::write_snapshot_file(&dir, &bytes).map_err(|e| e.to_string())?;
    Ok(
        json!({ "mode": "seed", "clients": n, "bytes": bytes.len(), "secs": t.elapsed().as_secs_f64() }),
    )
}
