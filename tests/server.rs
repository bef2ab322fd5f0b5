//! Starts a real `ddpushd` on loopback ports it picks itself, and talks raw bytes to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const UUID_HEX: &str = "2e72361924ef37a6166e0b228d1cbbb0";
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&UUID_HEX[i * 2..i * 2 + 2], 16).unwrap();
    }
    u
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ddpushd"))
}

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub push: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub log: mpsc::Receiver<String>,
    /// The log lines written before the listening line (state loading).
    pub startup: Vec<String>,
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Server {
    /// Starts `ddpushd` with the given data dir and extra flags; waits for its listening line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::try_start(data_dir, extra).unwrap_or_else(|e| panic!("ddpushd did not start: {e}"))
    }

    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Server, String> {
        Self::try_start_with(data_dir, extra, |_| {})
    }

    /// As [`Server::try_start`], with `configure` applied to the command before the spawn
    /// (a resource limit for the child, say).
    pub fn try_start_with(
        data_dir: &Path,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Server, String> {
        let mut cmd = Command::new(bin());
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--push-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if !extra.contains(&"--admin-listen") {
            cmd.args(["--admin-listen", "none"]);
        }
        configure(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().unwrap();
        let rx = lines_of(stderr);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("ddpushd listening") {
                        let udp = field(&line, "udp").ok_or("no udp= in listening line")?;
                        return Ok(Server {
                            udp,
                            tcp: field(&line, "tcp").unwrap_or(udp),
                            push: field(&line, "push").ok_or("no push=")?,
                            admin: field(&line, "admin"),
                            child,
                            data_dir: data_dir.to_path_buf(),
                            log: rx,
                            startup: seen,
                        });
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(format!("exit {status:?}; stderr: {}", seen.join("\n")));
                }
            }
        }
    }

    pub fn device(&self) -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.connect(self.udp).unwrap();
        s
    }

    pub fn pusher(&self) -> TcpStream {
        let s = TcpStream::connect(self.push).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    pub fn device_tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.tcp).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub fn terminate(mut self, limit: Duration) -> (ExitStatus, Duration) {
        let t = Instant::now();
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, t.elapsed());
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("ddpushd did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream packet: version, appId, cmd, uuid, u16 length, content.
pub fn up(version: u8, app: u8, cmd: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![version, app, cmd];
    v.extend_from_slice(&uuid());
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(content);
    v
}

pub fn heartbeat(app: u8) -> Vec<u8> {
    up(1, app, 0x00, &[])
}

/// Sends a push and reads its reply byte (None: connection closed).
pub fn push(s: &mut TcpStream, req: &[u8]) -> Option<u8> {
    s.write_all(req).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// Receives datagrams until `n` arrived (panics on timeout).
pub fn recv_n(s: &UdpSocket, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < n {
        let k = s
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("expected {n} datagrams, got {out:?}: {e}"));
        out.push(hex::encode(&buf[..k]));
    }
    out
}

/// Asserts nothing arrives for `wait`.
pub fn recv_none(s: &UdpSocket, wait: Duration) {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    if let Ok(k) = s.recv(&mut buf) {
        panic!("expected silence, got {}", hex::encode(&buf[..k]));
    }
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// Reads exactly `n` bytes from a stream.
pub fn read_exact_hex(s: &mut TcpStream, n: usize) -> String {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("expected {n} bytes: {e}"));
    hex::encode(b)
}

pub fn golden() -> serde_json::Value {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto-core/tests/data/golden-vectors.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("golden vectors at {} are required: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// The lines a child writes to `stream`, read on a thread of their own so that the child never
/// blocks on a full pipe.
pub fn lines_of(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The value of one sample in a `/metrics` text: `name` with its labels exactly as printed.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// One sample of the admin endpoint's `/metrics` (no token: tests bind the admin port to
/// loopback).
pub fn metric(admin: SocketAddr, name: &str) -> f64 {
    let (status, text) = http(admin, "GET", "/metrics", None, "");
    assert_eq!(status, 200, "{text}");
    sample(&text, name)
}

/// One HTTP/1.1 request; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    // State-changing requests carry what the admin port's cross-site rules ask for.
    let write = if method == "GET" {
        ""
    } else {
        "content-type: application/json\r\nx-ddpush-csrf: 1\r\n"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}{write}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
