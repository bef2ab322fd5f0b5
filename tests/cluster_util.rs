//! Helpers of the cluster tests: the test cluster's addresses, ids that never collide across
//! runs (the cluster outlives a test run), and a small seeded random source.

#![allow(dead_code)]

use std::time::Duration;

use ddpush_proto::Uuid;
use ddpushd::cluster::store::StoreConfig;

/// The seeds exported by `.ci/redis-cluster.sh`.
pub fn seeds() -> String {
    std::env::var("DDPUSH_TEST_REDIS_CLUSTER").expect(
        "DDPUSH_TEST_REDIS_CLUSTER is not set: run these tests inside \
         `bash .ci/redis-cluster.sh run cargo test -p ddpushd --test cluster -- --ignored`",
    )
}

/// Each seed as host:port.
pub fn seed_addrs() -> Vec<String> {
    seeds()
        .split(',')
        .map(|s| s.trim_start_matches("redis://").to_string())
        .collect()
}

pub fn store_config(wait_replicas: u32) -> StoreConfig {
    StoreConfig {
        pending_ttl: Duration::from_secs(30 * 86400),
        wait_replicas,
        wait_timeout: Duration::from_millis(200),
        op_timeout: Duration::from_secs(2),
    }
}

fn os_random() -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut b).expect("random bytes");
    b
}

/// A name unique to this run, for node ids and keys.
pub fn run_id() -> String {
    let b = os_random();
    format!("t{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

pub fn random_uuid() -> Uuid {
    Uuid(os_random())
}

/// xorshift64*: reproducible operation sequences from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ------------------------------------------------------------------------------------------
// ddpushd cluster nodes as real processes
// ------------------------------------------------------------------------------------------

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

/// A running cluster node; killed when dropped.
pub struct Node {
    pub id: String,
    pub child: Child,
    pub udp: SocketAddr,
    /// Device TCP (same port as UDP), if enabled.
    pub tcp: Option<SocketAddr>,
    pub push: SocketAddr,
    pub admin: SocketAddr,
    pub peer: SocketAddr,
    pub log: mpsc::Receiver<String>,
    pub args: Vec<String>,
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}

/// Flags every test node gets: loopback ports it picks, a short online window so failures
/// show within seconds, replies to heartbeats so test devices notice a dead node, and store
/// time-outs long enough for a loaded 2-core CI machine (a WAIT of the default 50 ms can
/// miss there; the tests are about losses, not about latency).
pub fn base_args(id: &str) -> Vec<String> {
    [
        "--cluster-redis",
        &seeds(),
        "--node-id",
        id,
        "--listen",
        "127.0.0.1:0",
        "--push-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
        "--heartbeat-interval",
        "1s",
        "--online-grace",
        "1s",
        "--heartbeat-reply",
        "always",
        "--limits",
        "false",
        "--cluster-wait-timeout",
        "500ms",
        "--cluster-store-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Node {
    /// Starts a node with `base_args(id)` and `extra`.
    pub fn start(id: &str, extra: &[&str]) -> Node {
        let mut args = base_args(id);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(id, args).unwrap_or_else(|e| panic!("node {id} did not start: {e}"))
    }

    /// Starts `ddpushd ARGS`; waits for the cluster listening line.
    pub fn start_args(id: &str, args: Vec<String>) -> Result<Node, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ddpushd"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let rx = super::server::lines_of(stderr);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("ddpushd listening (cluster mode)") => {
                    let get = |k| field(&line, k).ok_or(format!("no {k}= in {line}"));
                    return Ok(Node {
                        id: id.to_string(),
                        udp: get("udp")?,
                        tcp: field(&line, "tcp"),
                        push: get("push")?,
                        admin: get("admin")?,
                        peer: get("peer")?,
                        child,
                        log: rx,
                        args,
                    });
                }
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(format!("exit {status:?}; stderr: {}", seen.join("\n")));
                }
            }
        }
    }

    /// The same node again on the same ports (after a stop).
    pub fn restart(self) -> Node {
        let mut args = self.args.clone();
        let set = |args: &mut Vec<String>, flag: &str, v: SocketAddr| {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = v.to_string();
            }
        };
        set(&mut args, "--listen", self.udp);
        set(&mut args, "--push-listen", self.push);
        set(&mut args, "--admin-listen", self.admin);
        set(&mut args, "--peer-listen", self.peer);
        let id = self.id.clone();
        self.stop();
        // The ports were just released; retry briefly if the kernel still holds one.
        let mut last = String::new();
        for _ in 0..50 {
            match Self::start_args(&id, args.clone()) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("restart of {id} failed: {last}");
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {}", self.child.id());
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        self.signal("TERM");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} did not stop within 10 s of SIGTERM", self.id);
    }

    /// SIGKILL.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Waits until a log line containing `needle` appears (lines read are returned too).
    pub fn wait_log(&self, needle: &str, within: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(l),
                Ok(l) => seen.push(l),
                Err(_) => return Err(seen),
            }
        }
    }

    pub fn pusher(&self) -> TcpStream {
        let s = TcpStream::connect(self.push).expect("push connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    /// A device connection on the node's TCP port.
    pub fn device_tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.tcp.expect("device TCP enabled")).expect("tcp connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.admin, "/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET on the admin port: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .expect("write");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    let code = r
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = r.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (code, body)
}

/// A push request for `uuid` (DDPush v1, appId 1).
pub fn push_req(uuid: &Uuid, cmd: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![1, 1, cmd];
    v.extend_from_slice(&uuid.0);
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(content);
    v
}

/// A device packet for `uuid`.
pub fn dev_pkt(uuid: &Uuid, app: u8, cmd: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![1, app, cmd];
    v.extend_from_slice(&uuid.0);
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(content);
    v
}

/// Sends one push and reads its reply byte.
pub fn push_one(s: &mut TcpStream, req: &[u8]) -> Option<u8> {
    s.write_all(req).ok()?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// A device socket on loopback.
pub fn device_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// Receives one datagram within `t` (hex), or None.
pub fn recv_within(s: &UdpSocket, t: Duration) -> Option<String> {
    s.set_read_timeout(Some(t.max(Duration::from_millis(1))))
        .ok()?;
    let mut b = [0u8; 2048];
    let r = s.recv(&mut b).ok().map(|n| hex::encode(&b[..n]));
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    r
}

/// Heartbeats `uuid` at `node` from `s` until the node answers (bound); returns what came.
pub fn bind_at(s: &UdpSocket, uuid: &Uuid, node: SocketAddr) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        s.send_to(&dev_pkt(uuid, 1, 0x00, &[]), node).expect("send");
        let mut got = Vec::new();
        while let Some(h) = recv_within(s, Duration::from_millis(200)) {
            got.push(h);
        }
        if !got.is_empty() {
            return got;
        }
    }
    panic!("no answer to heartbeats at {node}");
}

/// Sum of the calls of every Redis command on every node of the test cluster, except those
/// no ddpushd sends (INFO itself, replication, the cluster bus's own).
pub fn redis_commands() -> u64 {
    let mut total = 0;
    for a in seed_addrs() {
        let (host, port) = a.rsplit_once(':').expect("host:port");
        let out = Command::new("redis-cli")
            .args(["-h", host, "-p", port, "info", "commandstats"])
            .output()
            .expect("redis-cli");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let (name, stats) = rest.split_once(':').unwrap_or((rest, ""));
            if matches!(
                name,
                "info" | "replconf" | "ping" | "psync" | "sync" | "command"
            ) {
                continue;
            }
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            total += calls;
        }
    }
    total
}

/// A redis-cli command against one node; stdout.
pub fn redis_cli(addr: &str, args: &[&str]) -> String {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let out = Command::new("redis-cli")
        .args(["-h", host, "-p", port])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).to_string()
}

// ------------------------------------------------------------------------------------------
// A fleet of devices that behave like the SDK behind an L4 load balancer
// ------------------------------------------------------------------------------------------

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What one device received.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// OR of every 0x11 mask received.
    pub bits: u64,
    /// Every 0x20 payload received.
    pub payloads: Vec<Vec<u8>>,
    /// 0x10 received.
    pub notifies: u64,
    /// Which node (index) the device talks to now.
    pub node: usize,
    /// Times it re-targeted.
    pub moves: u64,
}

/// Devices heartbeating every `every`, acking everything at once from the socket it came on
/// (the SDK's behaviour), and moving to the next node when theirs has not answered for
/// `give_up` (what an L4 balancer does for a dead backend).
pub struct Fleet {
    pub uuids: Vec<Uuid>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fleet {
    /// `n` devices; device i starts at node `start(i)`.
    pub fn start(
        n: usize,
        nodes: Vec<SocketAddr>,
        start: impl Fn(usize) -> usize,
        bucket: Option<usize>,
        every: Duration,
        give_up: Duration,
    ) -> Fleet {
        let uuids: Vec<Uuid> = (0..n)
            .map(|_| loop {
                let u = random_uuid();
                if bucket.is_none_or(|b| ddpushd::cluster::store::bucket(&u) == b) {
                    break u;
                }
            })
            .collect();
        let seen = Arc::new(Mutex::new(
            (0..n)
                .map(|i| Seen {
                    node: start(i) % nodes.len(),
                    ..Seen::default()
                })
                .collect::<Vec<_>>(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let socks: Vec<UdpSocket> = (0..n)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
                s.set_nonblocking(true).expect("nonblocking");
                s
            })
            .collect();
        let (u2, s2, st2) = (uuids.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut last_hb = vec![Instant::now() - every; n];
            let mut last_answer = vec![Instant::now(); n];
            let mut buf = [0u8; 2048];
            while !st2.load(Ordering::Relaxed) {
                let now = Instant::now();
                let mut seen = s2.lock().expect("lock");
                for i in 0..n {
                    let node = nodes[seen[i].node];
                    while let Ok(k) = socks[i].recv(&mut buf) {
                        last_answer[i] = now;
                        let p = &buf[..k];
                        if k < 5 {
                            continue;
                        }
                        let ack = match p[2] {
                            0x10 => {
                                seen[i].notifies += 1;
                                Some(dev_pkt(&u2[i], 1, 0x10, &[]))
                            }
                            0x11 if k == 13 => {
                                let mut m = [0u8; 8];
                                m.copy_from_slice(&p[5..13]);
                                seen[i].bits |= u64::from_be_bytes(m);
                                Some(dev_pkt(&u2[i], 1, 0x11, &m))
                            }
                            0x20 => {
                                seen[i].payloads.push(p[5..].to_vec());
                                Some(dev_pkt(&u2[i], 1, 0x20, &[]))
                            }
                            _ => None,
                        };
                        if let Some(a) = ack {
                            let _ = socks[i].send_to(&a, node);
                        }
                    }
                    if now.duration_since(last_answer[i]) > give_up {
                        seen[i].node = (seen[i].node + 1) % nodes.len();
                        seen[i].moves += 1;
                        last_answer[i] = now;
                        last_hb[i] = now - every;
                    }
                    if now.duration_since(last_hb[i]) >= every {
                        last_hb[i] = now;
                        let _ =
                            socks[i].send_to(&dev_pkt(&u2[i], 1, 0x00, &[]), nodes[seen[i].node]);
                    }
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Fleet {
            uuids,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits until `done(seen)` holds, up to `t`; returns the last snapshot and whether it held.
    pub fn wait_until(&self, t: Duration, done: impl Fn(&[Seen]) -> bool) -> (Vec<Seen>, bool) {
        let deadline = Instant::now() + t;
        loop {
            let s = self.snapshot();
            if done(&s) {
                return (s, true);
            }
            if Instant::now() > deadline {
                return (s, false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pushes bit `k` of device `d` for every (d, k) in `plan`, one at a time, through the node
/// `via(step)` of `nodes`, reconnecting after a broken connection. Returns, per device, the
/// bits answered 0x00, and the count of 0xFF answers with the node index they came from.
pub struct Pushed {
    pub accepted: Vec<u64>,
    pub ff: Vec<(usize, usize)>,
    pub broken: usize,
}

pub fn push_bits(
    uuids: &[Uuid],
    plan: &[(usize, u32)],
    nodes: &[SocketAddr],
    via: impl Fn(usize) -> usize,
    mut between: impl FnMut(usize),
) -> Pushed {
    let mut out = Pushed {
        accepted: vec![0; uuids.len()],
        ff: Vec::new(),
        broken: 0,
    };
    let mut conns: Vec<Option<TcpStream>> = nodes.iter().map(|_| None).collect();
    for (step, (d, k)) in plan.iter().enumerate() {
        between(step);
        let n = via(step) % nodes.len();
        let bit = 1u64 << k;
        let req = push_req(&uuids[*d], 0x11, &bit.to_be_bytes());
        if conns[n].is_none() {
            conns[n] = TcpStream::connect_timeout(&nodes[n], Duration::from_millis(500))
                .ok()
                .inspect(|s| {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                    let _ = s.set_nodelay(true);
                });
        }
        let reply = conns[n].as_mut().and_then(|s| push_one(s, &req));
        match reply {
            Some(0x00) => out.accepted[*d] |= bit,
            Some(0xFF) => out.ff.push((n, step)),
            Some(other) => panic!("push {step}: reply {other:#04x}"),
            None => {
                out.broken += 1;
                conns[n] = None;
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// A seed address that becomes reachable when the test says so
// ------------------------------------------------------------------------------------------

/// A loopback TCP port that closes every connection until [`SeedGate::open`], then forwards
/// each new one to `to` (a seed of the test cluster). A node given it as its only seed with
/// `--cluster-start-degraded` starts with the store unreachable and connects once the gate
/// opens: its connection then goes through the gate only for the seed's first answers (the
/// cluster client connects to the masters `CLUSTER SLOTS` names). Stopped when dropped.
pub struct SeedGate {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SeedGate {
    pub fn new(to: String) -> SeedGate {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind gate");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let open = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (open.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) if o.load(Ordering::Relaxed) => forward(c, &to),
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SeedGate {
            addr,
            open,
            stop,
            thread: Some(thread),
        }
    }

    /// From now on connections reach the seed.
    pub fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for SeedGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways between `c` and a new connection to `to` until either side closes.
fn forward(c: TcpStream, to: &str) {
    let Ok(up) = TcpStream::connect(to) else {
        return;
    };
    let _ = c.set_nonblocking(false);
    for (mut from, mut into) in [
        (c.try_clone(), up.try_clone()),
        (up.try_clone(), c.try_clone()),
    ]
    .into_iter()
    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
    {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut into);
            let _ = into.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    }
}
