//! The whole benchmark table in one run against the real `ddpushd` binary.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ddpush_proto::{RecordState, Time};
use serde_json::{json, Value};

use crate::devices::{self, Drive, Fleet, Pace};
use crate::proc::{self, Server};
use crate::push::{self, PushRun};
use crate::Args;

/// Sizes of one run.
struct Scale {
    hb_clients: u64,
    hb_secs: f64,
    cpu_rate: f64,
    sockets: usize,
    window: usize,
    push_clients: u64,
    push_secs: f64,
    mem_steps: Vec<u64>,
    fsync_conns: usize,
    fsync_window: usize,
}

fn scale(smoke: bool) -> Scale {
    if smoke {
        Scale {
            hb_clients: 2_000,
            hb_secs: 0.5,
            cpu_rate: 5_000.0,
            sockets: 2,
            window: 64,
            push_clients: 256,
            push_secs: 0.5,
            mem_steps: vec![1_000, 2_000, 4_000],
            fsync_conns: 4,
            fsync_window: 4,
        }
    } else {
        Scale {
            hb_clients: 100_000,
            hb_secs: 3.0,
            cpu_rate: 100_000.0,
            sockets: 4,
            window: 256,
            push_clients: 4_096,
            push_secs: 5.0,
            mem_steps: vec![100_000, 250_000, 500_000, 1_000_000],
            fsync_conns: 64,
            fsync_window: 16,
        }
    }
}

/// Snapshot bytes holding `n` idle clients, each with a heartbeat a minute ago and an address.
pub fn seed_bytes(n: u64) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let t = Time(now.saturating_sub(120_000));
    let recs = (0..n).map(move |i| RecordState {
        uuid: devices::uuid_of(i),
        last_heartbeat: Some(t),
        last_active: t,
        last_push: None,
        addr: Some(SocketAddr::from((
            [127, 0, 0, 1],
            10_000 + (i % 50_000) as u16,
        ))),
        notify: false,
        bits: 0,
        payload: None,
    });
    ddpushd::persist::encode_snapshot(1, now, recs)
}

fn free_port() -> u16 {
    // A UDP port whose TCP twin is free too (ddpushd binds both when --device-tcp is on).
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let p = u.local_addr().expect("addr").port();
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Result<Server, String> {
    proc::spawn(
        proc::ddpushd_cmd(bin, dir, "127.0.0.1:0", "127.0.0.1:0", extra),
        Duration::from_secs(120),
    )
}

fn fresh_dir(work: &Path, name: &str) -> PathBuf {
    let d = work.join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Closed-loop throughput and open-loop CPU cost against one UDP target.
fn udp_figures(pid: u32, fleet: &Fleet, sc: &Scale, who: &str) -> Value {
    let tp = devices::drive(
        fleet,
        &Drive {
            label: &format!("{who} throughput"),
            range: (0, sc.hb_clients),
            once: false,
            duration: Duration::from_secs_f64(sc.hb_secs),
            pace: Pace::Window(sc.window),
            signer: None,
        },
        &mut || {},
    );
    let c0 = proc::cpu_secs(pid).unwrap_or(0.0);
    let cpu = devices::drive(
        fleet,
        &Drive {
            label: &format!("{who} cpu@{}", sc.cpu_rate),
            range: (0, sc.hb_clients),
            once: false,
            duration: Duration::from_secs_f64(sc.hb_secs),
            pace: Pace::Rate(sc.cpu_rate),
            signer: None,
        },
        &mut || {},
    );
    let c1 = proc::cpu_secs(pid).unwrap_or(0.0);
    let per = if cpu.answered > 0 {
        (c1 - c0) / cpu.answered as f64 * 1e6
    } else {
        0.0
    };
    json!({
        "throughput": tp.json(),
        "cpu_run": cpu.json(),
        "cpu_s": c1 - c0,
        "cpu_us_per_answered": per,
    })
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

/// Runs every phase and returns the results, with a flat `figures` object for the table.
pub fn run(a: &Args) -> Result<Value, String> {
    let bin: PathBuf = a.need("server")?;
    let sc = scale(a.has("smoke"));
    let work: PathBuf = a.get(
        "work-dir",
        std::env::temp_dir().join(format!("ddpush-bench-{}", std::process::id())),
    )?;
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let t_all = Instant::now();
    let err = |e: std::io::Error| e.to_string();

    // 1. Heartbeats. The responder and the server run side by side and are measured in
    //    alternation, three rounds each; the best throughput and the median CPU cost of each
    //    are reported, so a noisy neighbour on this shared machine hurts both alike.
    let mut c = Command::new(&me);
    c.arg("responder");
    let resp = proc::spawn(c, Duration::from_secs(10))?;
    let rfleet = Fleet::new(resp.udp, sc.sockets).map_err(err)?;
    let srv = start(&bin, &fresh_dir(&work, "hb"), &[])?;
    let fleet = Fleet::new(srv.udp, sc.sockets).map_err(err)?;
    let reg = devices::register(&fleet, "register", 0, sc.hb_clients);
    let mut responder_runs = Vec::new();
    let mut server_runs = Vec::new();
    for round in 0..3 {
        responder_runs.push(udp_figures(
            resp.pid(),
            &rfleet,
            &sc,
            &format!("responder#{round}"),
        ));
        server_runs.push(udp_figures(
            srv.pid(),
            &fleet,
            &sc,
            &format!("ddpushd#{round}"),
        ));
    }
    drop(rfleet);
    drop(resp);
    // Overload: open loop as fast as the generator goes; memory is sampled throughout.
    let port = srv.udp.port();
    let drops0 = proc::udp_drops(port);
    let rss0 = proc::rss(srv.pid()).unwrap_or(0);
    let mut rss_max = rss0;
    let pid = srv.pid();
    let over = devices::drive(
        &fleet,
        &Drive {
            label: "overload",
            range: (0, sc.hb_clients),
            once: false,
            duration: Duration::from_secs_f64(sc.hb_secs),
            pace: Pace::Rate(0.0),
            signer: None,
        },
        &mut || rss_max = rss_max.max(proc::rss(pid).unwrap_or(0)),
    );
    let drops = proc::udp_drops(port) - drops0;
    let rss_after = proc::rss(pid).unwrap_or(0);
    let overload = json!({
        "run": over.json(),
        "kernel_drops": drops,
        "rss_before": rss0,
        "rss_max": rss_max,
        "rss_after": rss_after,
    });
    srv.terminate(Duration::from_secs(30))?;
    drop(fleet);

    // 2. Pushes to online clients.
    let srv = start(&bin, &fresh_dir(&work, "push"), &[])?;
    let fleet = Fleet::new(srv.udp, sc.sockets).map_err(err)?;
    devices::register(&fleet, "register", 0, sc.push_clients);
    let push_addr = srv.push.ok_or("ddpushd printed no push address")?;
    let push_run = |label: &str, conns: usize, window: usize| {
        push::run(
            &fleet,
            &PushRun {
                label,
                push: push_addr,
                clients: sc.push_clients,
                conns,
                window,
                duration: Duration::from_secs_f64(sc.push_secs),
            },
        )
    };
    let pipelined = push_run("push 1x64", 1, 64);
    let serial1 = push_run("push 1x1", 1, 1);
    let serial16 = push_run("push 16x1", 16, 1);
    let push_cpu = proc::cpu_secs(srv.pid());
    srv.terminate(Duration::from_secs(30))?;
    drop(fleet);

    // 3. fsync always, many pipelined connections: group commit.
    let fdir = fresh_dir(&work, "fsync");
    let srv = start(
        &bin,
        &fdir,
        &["--fsync", "always", "--admin-listen", "127.0.0.1:0"],
    )?;
    let fleet = Fleet::new(srv.udp, sc.sockets).map_err(err)?;
    devices::register(&fleet, "register", 0, sc.push_clients);
    let writes0 = srv
        .admin
        .and_then(|a| proc::metric(a, "ddpush_journal_writes_total"));
    let fs = push::run(
        &fleet,
        &PushRun {
            label: "push fsync=always",
            push: srv.push.ok_or("no push address")?,
            clients: sc.push_clients,
            conns: sc.fsync_conns,
            window: sc.fsync_window,
            duration: Duration::from_secs_f64(sc.push_secs),
        },
    );
    let writes1 = srv
        .admin
        .and_then(|a| proc::metric(a, "ddpush_journal_writes_total"));
    srv.terminate(Duration::from_secs(30))?;
    drop(fleet);
    let fsync_us = fsync_latency(&fdir);
    let journal_writes = match (writes0, writes1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let accepted = f(&fs, &["accepted"]);
    let fsync = json!({
        "run": fs,
        "journal_writes": journal_writes,
        "pushes_per_fsync": journal_writes.map(|w| accepted / w.max(1.0)),
        "one_fsync_us": fsync_us,
        "one_fsync_per_push_bound_per_s": 1e6 / fsync_us.max(1e-9),
    });

    // 4. Memory against client count, then SIGTERM and start-up with the largest.
    let mdir = fresh_dir(&work, "mem");
    let srv = start(&bin, &mdir, &[])?;
    let fleet = Fleet::new(srv.udp, sc.sockets).map_err(err)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut points = vec![json!({ "clients": 0, "rss": proc::rss(srv.pid()) })];
    let mut have = 0;
    for &n in &sc.mem_steps {
        let r = devices::register(&fleet, &format!("register {n}"), have, n);
        have = n;
        std::thread::sleep(Duration::from_millis(500));
        points.push(json!({
            "clients": n,
            "rss": proc::rss(srv.pid()),
            "registered_answers": r.answered,
        }));
    }
    let shutdown = srv.terminate(Duration::from_secs(120))?;
    drop(fleet);
    let snapshot_bytes = std::fs::metadata(mdir.join("snapshot.cbor"))
        .map(|m| m.len())
        .unwrap_or(0);
    let (startup, rss_restarted) = {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let udp: SocketAddr = listen.parse().unwrap();
        let waiter = std::thread::spawn(move || devices::wait_answer(udp, Duration::from_secs(60)));
        let srv = proc::spawn(
            proc::ddpushd_cmd(&bin, &mdir, &listen, "127.0.0.1:0", &[]),
            Duration::from_secs(120),
        )?;
        let answered = waiter.join().ok().flatten();
        let s = answered.map(|t| t.duration_since(srv.spawned).as_secs_f64());
        let rss = proc::rss(srv.pid());
        srv.terminate(Duration::from_secs(120))?;
        (s, rss)
    };
    let rss_at = |i: usize| points[i]["rss"].as_f64().unwrap_or(f64::NAN);
    let last = points.len() - 1;
    let marginal = (rss_at(last) - rss_at(1))
        / (sc.mem_steps[sc.mem_steps.len() - 1] - sc.mem_steps[0]) as f64;
    let memory = json!({
        "points": points,
        "bytes_per_client_marginal": marginal,
        "bytes_per_client_total": (rss_at(last) - rss_at(0)) / have as f64,
        "rss_after_restart": rss_restarted,
        "snapshot_bytes": snapshot_bytes,
    });
    // 5. TCP devices at scale, with UDP figures from the same server next to them.
    let tcp = crate::tcp::section(&bin, &work, &crate::tcp::TcpScale::new(a.has("smoke")))?;
    let _ = std::fs::remove_dir_all(&work);

    let best = |runs: &[Value]| {
        runs.iter()
            .map(|r| f(r, &["throughput", "answered_per_s"]))
            .fold(0.0, f64::max)
    };
    let median = |runs: &[Value]| {
        let mut v: Vec<f64> = runs
            .iter()
            .map(|r| f(r, &["cpu_us_per_answered"]))
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (resp_rate, resp_cpu) = (best(&responder_runs), median(&responder_runs));
    let (srv_rate, srv_cpu) = (best(&server_runs), median(&server_runs));
    let srv_loss = server_runs
        .iter()
        .map(|r| f(r, &["throughput", "loss"]))
        .fold(0.0, f64::max);
    let figures = json!({
        "bytes_per_idle_client": marginal,
        "heartbeats_per_s": srv_rate,
        "responder_heartbeats_per_s": resp_rate,
        "heartbeat_ratio": srv_rate / resp_rate,
        "heartbeat_loss": srv_loss,
        "cpu_us_per_heartbeat": srv_cpu,
        "responder_cpu_us_per_heartbeat": resp_cpu,
        "cpu_ratio": srv_cpu / resp_cpu,
        "pushes_per_s_pipelined_1x64": f(&pipelined, &["pushes_per_s"]),
        "pushes_per_s_serial_1": f(&serial1, &["pushes_per_s"]),
        "pushes_per_s_serial_16": f(&serial16, &["pushes_per_s"]),
        "push_lost_total": f(&pipelined, &["lost"]) + f(&serial1, &["lost"]) + f(&serial16, &["lost"]),
        "latency_p50_us_serial_16": f(&serial16, &["latency", "p50_us"]),
        "latency_p99_us_serial_16": f(&serial16, &["latency", "p99_us"]),
        "latency_p999_us_serial_16": f(&serial16, &["latency", "p999_us"]),
        "startup_s": startup,
        "shutdown_s": shutdown.as_secs_f64(),
        "overload_offered_per_s": f(&overload, &["run", "sent_per_s"]),
        "overload_answered_per_s": f(&overload, &["run", "answered_per_s"]),
        "overload_kernel_drops": drops,
        "overload_rss_growth": rss_max as f64 - rss0 as f64,
        "pushes_per_s_fsync_always": f(&fsync, &["run", "pushes_per_s"]),
        "pushes_per_fsync": fsync["pushes_per_fsync"],
    });
    let mut figures = figures;
    if let (Some(all), Some(t)) = (figures.as_object_mut(), tcp["figures"].as_object()) {
        all.extend(t.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(json!({
        "mode": "suite",
        "smoke": a.has("smoke"),
        "machine": machine(),
        "secs": t_all.elapsed().as_secs_f64(),
        "figures": figures,
        "responder": responder_runs,
        "server_heartbeat": server_runs,
        "registration": reg.json(),
        "overload": overload,
        "push": { "pipelined_1x64": pipelined, "serial_1": serial1, "serial_16": serial16, "server_cpu_s": push_cpu },
        "fsync_always": fsync,
        "memory": memory,
        "tcp": tcp,
    }))
}

/// Microseconds one small write + fdatasync takes in `dir`'s filesystem.
fn fsync_latency(dir: &Path) -> f64 {
    use std::io::Write;
    let _ = std::fs::create_dir_all(dir);
    let p = dir.join("fsync-probe");
    let Ok(mut fl) = std::fs::File::create(&p) else {
        return f64::NAN;
    };
    let n = 50;
    let t = Instant::now();
    for _ in 0..n {
        let _ = fl.write_all(&[0u8; 64]);
        let _ = fl.sync_data();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let _ = std::fs::remove_file(&p);
    us
}
