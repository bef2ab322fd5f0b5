//! Real write failures on the real binary, without root: `ddpushd` runs under `RLIMIT_FSIZE`
//! (set in the child before exec), so a journal or snapshot write past the limit fails with
//! `EFBIG` (ddpushd handles SIGXFSZ, so it is not killed). Raising the limit of the running
//! process (`prlimit(2)`) is the "space comes back" step. `kill -9` at each point, then a
//! restart without a limit: every push answered accepted is there, none answered `FF`/503.

#![cfg(target_os = "linux")]

#[path = "server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use server::Server;

const IO: Duration = Duration::from_secs(5);

/// A server with its admin port, and every log line read so far.
struct Proc {
    srv: Server,
    admin: SocketAddr,
    seen: Vec<String>,
}

impl Proc {
    /// Starts ddpushd on `dir`; with `fsize`, under that file-size limit.
    fn start(dir: &Path, fsize: Option<u64>, extra: &[&str]) -> Proc {
        let mut args = vec!["--admin-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let srv = Server::try_start_with(dir, &args, |cmd| {
            let Some(limit) = fsize else { return };
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
        .unwrap_or_else(|e| panic!("ddpushd did not start: {e}"));
        let admin = srv.admin.expect("admin address in the listening line");
        Proc {
            srv,
            admin,
            seen: Vec::new(),
        }
    }

    fn kill9(self) {
        self.srv.kill9();
    }

    /// Lifts the file-size limit of the running process: the "space is back" step.
    fn lift_limit(&self) {
        let r = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: prlimit reads `r` and writes nothing (null old-limit pointer).
        let rc = unsafe {
            libc::prlimit(
                self.srv.child.id() as libc::pid_t,
                libc::RLIMIT_FSIZE,
                &r,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    fn pusher(&self) -> TcpStream {
        self.srv.pusher()
    }

    fn log_lines(&mut self) -> &[String] {
        self.seen.extend(self.srv.log_lines());
        &self.seen
    }

    /// Waits for a log line containing `needle`: the server writes it and a thread here reads
    /// it, so it may arrive after the reply that followed it.
    fn wait_for_line(&mut self, needle: &str) {
        let t = Instant::now();
        while !self.log_lines().iter().any(|l| l.contains(needle)) {
            assert!(t.elapsed() < IO, "no log line with {needle:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a UDP heartbeat for push `i`'s uuid gets back.
    fn heartbeat_answer(&self, i: u32) -> Vec<u8> {
        let d = UdpSocket::bind("127.0.0.1:0").unwrap();
        d.set_read_timeout(Some(IO)).unwrap();
        let mut hb = vec![1, 1, 0x00];
        hb.extend_from_slice(&uuid(i));
        hb.extend_from_slice(&[0, 0]);
        d.send_to(&hb, self.srv.udp).unwrap();
        let mut buf = [0u8; 2048];
        let k = d.recv(&mut buf).unwrap();
        buf[..k].to_vec()
    }

    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        server::http(self.admin, method, path, None, body)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.http("GET", "/status", "").1).unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        server::metric(self.admin, name)
    }

    /// The pending 0x20 of a record, if any.
    fn pending(&self, u: &[u8; 16]) -> Option<Vec<u8>> {
        let (status, body) = self.http("GET", &format!("/clients/{}", hex(u)), "");
        if status == 404 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let b64 = v["pending"]["payload_base64"].as_str()?;
        use base64::Engine;
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
    }
}

fn uuid(i: u32) -> [u8; 16] {
    let mut u = [0xC3u8; 16];
    u[12..].copy_from_slice(&i.to_be_bytes());
    u
}

fn hex(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 490-byte payload naming its push.
fn body(i: u32) -> Vec<u8> {
    let mut b = format!("push {i:06} ").into_bytes();
    b.resize(490, b'.');
    b
}

fn push9999(p: &mut TcpStream, i: u32) -> u8 {
    let b = body(i);
    let mut v = vec![1, 1, 0x20];
    v.extend_from_slice(&uuid(i));
    v.extend_from_slice(&(b.len() as u16).to_be_bytes());
    v.extend_from_slice(&b);
    p.write_all(&v).unwrap();
    let mut r = [0u8; 1];
    p.read_exact(&mut r).unwrap();
    r[0]
}

fn push_admin(s: &Proc, i: u32) -> u16 {
    let text = String::from_utf8(body(i)).unwrap();
    let req = format!(
        r#"{{"uuid":"{}","type":"payload","text":"{text}"}}"#,
        hex(&uuid(i))
    );
    s.http("POST", "/push", &req).0
}

#[derive(Default)]
struct Ledger {
    accepted: Vec<u32>,
    refused: Vec<u32>,
}

impl Ledger {
    fn check(&self, s: &Proc) {
        for &i in &self.accepted {
            assert_eq!(s.pending(&uuid(i)), Some(body(i)), "accepted push {i} lost");
        }
        for &i in &self.refused {
            assert_eq!(s.pending(&uuid(i)), None, "refused push {i} is stored");
        }
    }
}

/// Pushes (alternating 9999 and admin) until one is refused; returns the next index.
fn fill(s: &Proc, p: &mut TcpStream, led: &mut Ledger, mut i: u32) -> u32 {
    loop {
        assert!(i < 10_000, "the limit never hit");
        let ok = if i.is_multiple_of(2) {
            match push9999(p, i) {
                0x00 => true,
                0xFF => false,
                other => panic!("reply {other:#04x}"),
            }
        } else {
            match push_admin(s, i) {
                200 => true,
                503 => false,
                other => panic!("HTTP {other}"),
            }
        };
        if ok {
            led.accepted.push(i);
        } else {
            led.refused.push(i);
            return i + 1;
        }
        i += 1;
    }
}

#[test]
fn efbig_in_the_journal_then_space_back_then_kill9_at_each_point() {
    // Point 0: kill -9 while degraded. Point 1: after space came back and more pushes.
    for point in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Proc::start(
            dir.path(),
            Some(48 * 1024),
            &["--fsync", "always", "--snapshot-interval", "1h"],
        );
        let mut p = s.pusher();
        let mut led = Ledger::default();
        let mut i = fill(&s, &mut p, &mut led, 0);
        assert!(led.accepted.len() > 50, "{} accepted", led.accepted.len());
        // Still full: every further push is refused on both front ends.
        for _ in 0..6 {
            let ok = if i.is_multiple_of(2) {
                push9999(&mut p, i) == 0
            } else {
                push_admin(&s, i) == 200
            };
            assert!(!ok, "push {i} accepted past the limit");
            led.refused.push(i);
            i += 1;
        }
        assert_eq!(s.status()["degraded"], true);
        assert_eq!(s.metric("ddpush_storage_ok"), 0.0);
        assert!(s.metric("ddpush_storage_failed_writes_total") >= 7.0);
        s.wait_for_line("storage degraded");
        let lines = s.log_lines().to_vec();
        let degraded: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("storage degraded"))
            .collect();
        assert_eq!(degraded.len(), 1, "one line per episode: {degraded:?}");
        assert!(degraded[0].contains("File too large"), "{}", degraded[0]);
        if point == 1 {
            s.lift_limit();
            for _ in 0..20 {
                let ok = if i.is_multiple_of(2) {
                    push9999(&mut p, i) == 0
                } else {
                    push_admin(&s, i) == 200
                };
                assert!(ok, "push {i} refused after the limit was lifted");
                led.accepted.push(i);
                i += 1;
            }
            assert_eq!(s.status()["degraded"], false);
            assert_eq!(s.metric("ddpush_storage_ok"), 1.0);
            s.wait_for_line("storage recovered");
        }
        s.kill9();

        let s = Proc::start(dir.path(), None, &[]);
        led.check(&s);
        // And a device gets what was accepted for it.
        let last = *led.accepted.last().unwrap();
        assert!(s.heartbeat_answer(last).ends_with(&body(last)));
        drop(s);
        let out = Command::new(env!("CARGO_BIN_EXE_ddpushd"))
            .arg("--data-dir")
            .arg(dir.path())
            .arg("check")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            !text.contains("torn") && !text.contains("DAMAGED"),
            "{text}"
        );
    }
}

#[test]
fn efbig_in_snapshots_keeps_the_journals_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    // Journals rotate at every snapshot attempt and stay small; the snapshot of all records
    // does not fit.
    let mut s = Proc::start(dir.path(), Some(40 * 1024), &["--snapshot-interval", "1s"]);
    let mut p = s.pusher();
    let mut led = Ledger::default();
    let mut i = 0;
    let t = Instant::now();
    while s.metric("ddpush_storage_failed_writes_total") < 2.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "snapshots never failed"
        );
        for _ in 0..5 {
            let r = push9999(&mut p, i);
            if r == 0 {
                led.accepted.push(i);
            } else {
                led.refused.push(i);
            }
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(led.accepted.len() > 60, "{}", led.accepted.len());
    assert!(s
        .log_lines()
        .iter()
        .any(|l| l.contains("snapshot failed") && l.contains("File too large")));
    assert!(!dir.path().join("snapshot.tmp").exists());
    // kill -9 with snapshots failing: the journals hold everything.
    s.kill9();
    let mut s = Proc::start(dir.path(), Some(40 * 1024), &["--snapshot-interval", "1s"]);
    led.check(&s);
    let t = Instant::now();
    while s.metric("ddpush_storage_failed_writes_total") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "snapshot did not fail"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = s.metric("ddpush_snapshots_total");
    s.lift_limit();
    let t = Instant::now();
    while s.metric("ddpush_snapshots_total") <= done {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the retry never succeeded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The counter moves before the line is read here (another thread): wait for the line.
    s.wait_for_line("snapshot written again");
    s.kill9();
    let s = Proc::start(dir.path(), None, &[]);
    led.check(&s);
}

/// A restart while the disk is still full: the server must not refuse to start (that would turn
/// a full disk into an outage of every device). It loads its state, serves devices from
/// memory, refuses pushes, and accepts them again once space is back, with no restart.
#[test]
fn a_start_while_the_disk_is_full_serves_devices_refuses_pushes_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut led = Ledger::default();
    let s = Proc::start(dir.path(), None, &["--fsync", "always"]);
    let mut p = s.pusher();
    assert_eq!(push9999(&mut p, 1), 0x00);
    led.accepted.push(1);
    drop(p);
    s.kill9();

    // A limit below the size of a journal header: this run's journal cannot be created.
    let mut s = Proc::start(dir.path(), Some(8), &["--fsync", "always"]);
    assert_eq!(s.status()["degraded"], true, "degraded from the start");
    assert_eq!(s.metric("ddpush_storage_ok"), 0.0);
    let degraded: Vec<_> = (s.srv.startup.iter())
        .filter(|l| l.contains("storage degraded at start"))
        .collect();
    assert_eq!(degraded.len(), 1, "{:?}", s.srv.startup);
    assert!(degraded[0].contains("File too large"), "{}", degraded[0]);
    // Devices are served from the loaded state.
    assert!(
        s.heartbeat_answer(1).ends_with(&body(1)),
        "the stored payload is delivered"
    );
    // Pushes are refused on both front ends.
    let mut p = s.pusher();
    assert_eq!(push9999(&mut p, 2), 0xFF);
    assert_eq!(push_admin(&s, 3), 503);
    led.refused.extend([2, 3]);
    // Space comes back: accepted again, without a restart.
    s.lift_limit();
    assert_eq!(push9999(&mut p, 4), 0x00);
    assert_eq!(push_admin(&s, 5), 200);
    led.accepted.extend([4, 5]);
    assert_eq!(s.status()["degraded"], false);
    s.wait_for_line("storage recovered");
    drop(p);
    s.kill9();

    let s = Proc::start(dir.path(), None, &[]);
    led.check(&s);
}

/// `POST /clients/{uuid}/clear` on a full disk: answered only after its journal write, so a
/// removal the disk did not take is answered 503 and the record is kept, live and after a
/// `kill -9`; every removal answered 200 stays removed.
#[test]
fn a_clear_on_a_full_disk_is_refused_and_the_record_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Proc::start(
        dir.path(),
        Some(48 * 1024),
        &["--fsync", "always", "--snapshot-interval", "1h"],
    );
    let mut p = s.pusher();
    let mut led = Ledger::default();
    fill(&s, &mut p, &mut led, 0);
    // A removal's frame is smaller than a push's, so a few may still fit: clear accepted
    // records until the disk refuses one.
    let mut removed = Vec::new();
    let mut kept = None;
    for &i in &led.accepted {
        let (status, text) = s.http("POST", &format!("/clients/{}/clear", hex(&uuid(i))), "");
        match status {
            200 => removed.push(i),
            503 => {
                assert!(text.contains("removal was not written"), "{text}");
                kept = Some(i);
                break;
            }
            other => panic!("clear answered {other}: {text}"),
        }
    }
    let kept = kept.expect("no clear was refused on the full disk");
    assert!(removed.len() < 30, "{} clears fit", removed.len());
    // Memory matches the disk: the record is still there, with its payload.
    assert_eq!(s.pending(&uuid(kept)), Some(body(kept)));
    assert_eq!(s.status()["degraded"], true);
    s.wait_for_line("storage degraded");
    s.kill9();

    let s = Proc::start(dir.path(), None, &[]);
    assert_eq!(
        s.pending(&uuid(kept)),
        Some(body(kept)),
        "refused clear took effect"
    );
    for &i in &removed {
        assert_eq!(s.pending(&uuid(i)), None, "cleared record {i} came back");
    }
    led.accepted.retain(|i| !removed.contains(i));
    led.check(&s);
    assert!(s.heartbeat_answer(kept).ends_with(&body(kept)));
}

/// With space, a clear answers 200 once written: after `kill -9` and a restart the record is
/// gone and the others are not.
#[test]
fn a_clear_with_space_survives_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let s = Proc::start(dir.path(), None, &["--fsync", "always"]);
    assert_eq!(push_admin(&s, 1), 200);
    assert_eq!(push_admin(&s, 2), 200);
    let (status, text) = s.http("POST", &format!("/clients/{}/clear", hex(&uuid(1))), "");
    assert_eq!((status, text.as_str()), (200, r#"{"removed":true}"#));
    assert_eq!(s.pending(&uuid(1)), None);
    s.kill9();
    let s = Proc::start(dir.path(), None, &[]);
    let (status, _) = s.http("GET", &format!("/clients/{}", hex(&uuid(1))), "");
    assert_eq!(status, 404, "the cleared record came back");
    assert_eq!(s.pending(&uuid(2)), Some(body(2)));
    let (status, _) = s.http("POST", &format!("/clients/{}/clear", hex(&uuid(1))), "");
    assert_eq!(status, 404);
}
