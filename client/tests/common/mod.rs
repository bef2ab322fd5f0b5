//! Test support: a real `ddpushd` on loopback ports it chose, and `ddpush` runs with time
//! limits. Every wait is bounded; every child is killed when its guard drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long any single step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

pub fn ddpush_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ddpush"))
}

/// The `ddpushd` binary next to `ddpush`, built (same profile) if it is not there yet.
pub fn ddpushd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = ddpush_bin().with_file_name(format!("ddpushd{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            let profile_dir = bin.parent().expect("profile dir");
            let target_dir = profile_dir.parent().expect("target dir");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "ddpushd", "--target-dir"])
                .arg(target_dir);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build -p ddpushd");
            assert!(status.success(), "cargo build -p ddpushd failed");
        }
        bin
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running `ddpushd`, killed on drop.
pub struct Server {
    child: Child,
    pub udp: SocketAddr,
    pub tcp: Option<SocketAddr>,
    pub push: SocketAddr,
    /// The admin port, when started with `--admin-listen`.
    pub admin: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts `ddpushd` on loopback port 0 with extra flags; waits for its "listening" line.
    pub fn start_with(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(ddpushd_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--push-listen", "127.0.0.1:0"]);
        if !extra.contains(&"--admin-listen") {
            cmd.args(["--admin-listen", "none"]);
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ddpushd");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if line.contains("ddpushd listening") {
                    let _ = tx.send(line.clone());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let line = match rx.recv_timeout(STEP) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ddpushd did not start; log:\n{}", log.lock().unwrap());
            }
        };
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        Server {
            udp: field("udp=").expect("udp= in the listening line"),
            tcp: field("tcp="),
            push: field("push=").expect("push= in the listening line"),
            admin: field("admin="),
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn push_addr(&self) -> String {
        self.push.to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ddpush` with `args` (and `stdin`), killing it if it takes longer than [`STEP`].
pub fn ddpush(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(ddpush_bin())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddpush");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&data);
        });
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait ddpush") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ddpush {args:?} did not finish in {STEP:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `ddpush listen` child whose stdout lines are read with a time limit; killed on drop.
pub struct Listener {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Listener {
    pub fn start(args: &[&str]) -> Listener {
        let mut child = Command::new(ddpush_bin())
            .arg("listen")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ddpush listen");
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let s2 = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = s2.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Listener {
            child,
            lines: rx,
            stderr,
        }
    }

    /// The next line on stdout, failing the test after `STEP`.
    pub fn line(&self) -> String {
        self.lines.recv_timeout(STEP).unwrap_or_else(|_| {
            panic!(
                "no line from ddpush listen; its stderr:\n{}",
                self.stderr.lock().unwrap()
            )
        })
    }

    /// A line within `wait`, if any.
    pub fn try_line(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
