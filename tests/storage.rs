//! Storage faults over the real server loop, in-process: the data directory's writes go
//! through `persist::FailingDisk`, which fails the N-th write or every write while "full",
//! each time after writing half of it. A crash is the loop stopping between two turns with
//! nothing more written (what `kill -9` leaves); the restart is a fresh server on the same
//! directory with the real disk. No root needed.
//!
//! The rule checked everywhere: after the restart, every push answered `00` (port 9999) or
//! "accepted" (admin) is pending, and none answered `FF` / 503 is.

#[path = "server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use ddpushd::persist::{Disk, FailingDisk, Faults, OsDisk};
use ddpushd::server::{run_with, Bound, Control, Stop};
use ddpushd::settings::{Cli, Settings};

const IO: Duration = Duration::from_secs(5);

struct InProc {
    bound: Bound,
    stop: async_channel::Sender<Stop>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl InProc {
    fn start(dir: &Path, disk: Arc<dyn Disk>, extra: &[&str]) -> InProc {
        let mut args = vec![
            "ddpushd",
            "--listen",
            "127.0.0.1:0",
            "--push-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let cfg = Cli::try_parse_from(args)
            .unwrap()
            .settings
            .resolve(Settings::default())
            .unwrap();
        let (btx, brx) = async_channel::bounded(1);
        let (stx, srx) = async_channel::bounded(1);
        let thread = std::thread::spawn(move || {
            run_with(
                cfg,
                disk,
                Some(Control {
                    bound: btx,
                    stop: srx,
                }),
            )
            .map_err(|e| e.to_string())
        });
        let bound = brx.recv_blocking().expect("server did not start");
        InProc {
            bound,
            stop: stx,
            thread: Some(thread),
        }
    }

    fn stop(mut self, how: Stop) {
        self.stop.send_blocking(how).unwrap();
        let r = self.thread.take().unwrap().join().unwrap();
        r.unwrap();
    }

    fn admin(&self) -> SocketAddr {
        self.bound.admin.unwrap()
    }

    fn pusher(&self) -> TcpStream {
        let s = TcpStream::connect(self.bound.push).unwrap();
        s.set_read_timeout(Some(IO)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.send_blocking(Stop::Crash);
            let _ = t.join();
        }
    }
}

fn uuid(i: u32) -> [u8; 16] {
    let mut u = [0x5au8; 16];
    u[..4].copy_from_slice(&i.to_be_bytes());
    u
}

fn hex(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

fn payload_req(u: &[u8; 16], body: &[u8]) -> Vec<u8> {
    let mut v = vec![1, 1, 0x20];
    v.extend_from_slice(u);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn push9999(p: &mut TcpStream, u: &[u8; 16], body: &[u8]) -> u8 {
    p.write_all(&payload_req(u, body)).unwrap();
    let mut b = [0u8; 1];
    p.read_exact(&mut b).unwrap();
    b[0]
}

fn push_admin(srv: &InProc, u: &[u8; 16], text: &str) -> (u16, String) {
    let body = format!(
        r#"{{"uuid":"{}","type":"payload","text":"{text}"}}"#,
        hex(u)
    );
    server::http(srv.admin(), "POST", "/push", None, &body)
}

fn metric(srv: &InProc, name: &str) -> f64 {
    server::metric(srv.admin(), name)
}

fn degraded(srv: &InProc) -> bool {
    let (_, s) = server::http(srv.admin(), "GET", "/status", None, "");
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    v["degraded"].as_bool().unwrap()
}

/// The pending payload of a record after a restart, if any.
fn pending_payload(srv: &InProc, u: &[u8; 16]) -> Option<String> {
    let (status, body) = server::http(
        srv.admin(),
        "GET",
        &format!("/clients/{}", hex(u)),
        None,
        "",
    );
    if status == 404 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let b64 = v["pending"]["payload_base64"].as_str()?;
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(String::from_utf8(raw).unwrap())
}

/// What each push was answered, to be checked after a restart.
#[derive(Default)]
struct Ledger {
    accepted: Vec<([u8; 16], String)>,
    refused: Vec<([u8; 16], String)>,
}

impl Ledger {
    fn note(&mut self, u: [u8; 16], body: &str, ok: bool) {
        if ok {
            self.accepted.push((u, body.to_string()));
        } else {
            self.refused.push((u, body.to_string()));
        }
    }

    /// One push per uuid: the accepted ones are pending with their body, the refused absent.
    fn check(&self, srv: &InProc) {
        for (u, body) in &self.accepted {
            assert_eq!(
                pending_payload(srv, u).as_deref(),
                Some(body.as_str()),
                "accepted push lost"
            );
        }
        for (u, body) in &self.refused {
            assert_eq!(pending_payload(srv, u), None, "refused push {body} kept");
        }
    }
}

#[test]
fn disk_fills_mid_turn_comes_back_and_a_crash_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::default();
    let faults: Arc<Faults> = disk.faults.clone();
    let srv = InProc::start(dir.path(), Arc::new(disk), &["--fsync", "always"]);
    let mut p = srv.pusher();
    let mut led = Ledger::default();
    let mut n = 0u32;
    let mut next = || {
        n += 1;
        (uuid(n), format!("push-{n}"))
    };

    // A device that is online: deliveries keep working from memory while degraded.
    let dev = UdpSocket::bind("127.0.0.1:0").unwrap();
    dev.set_read_timeout(Some(IO)).unwrap();
    let dev_uuid = uuid(9999);
    let mut hb = vec![1, 1, 0x00];
    hb.extend_from_slice(&dev_uuid);
    hb.extend_from_slice(&[0, 0]);
    dev.send_to(&hb, srv.bound.udp).unwrap();

    for _ in 0..3 {
        let (u, b) = next();
        let ok = push9999(&mut p, &u, b.as_bytes()) == 0x00;
        assert!(ok);
        led.note(u, &b, ok);
    }
    assert_eq!(push9999(&mut p, &dev_uuid, b"for the device"), 0x00);
    let mut buf = [0u8; 2048];
    let k = dev.recv(&mut buf).unwrap();
    assert!(buf[..k].ends_with(b"for the device"));
    assert!(!degraded(&srv));

    faults.set_full(true);
    for i in 0..4 {
        let (u, b) = next();
        let r = push9999(&mut p, &u, b.as_bytes());
        assert_eq!(r, 0xFF, "push {i} while the disk is full");
        led.note(u, &b, false);
        let (u, b) = next();
        let (status, body) = push_admin(&srv, &u, &b);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"failed\""), "{body}");
        led.note(u, &b, false);
    }
    assert!(degraded(&srv));
    assert_eq!(metric(&srv, "ddpush_storage_ok"), 0.0);
    assert!(metric(&srv, "ddpush_storage_failed_writes_total") >= 8.0);
    assert_eq!(metric(&srv, "ddpush_pushes_failed_total"), 8.0);
    // The device still gets its accepted item from memory, and no refused one.
    dev.send_to(&hb, srv.bound.udp).unwrap();
    let k = dev.recv(&mut buf).unwrap();
    assert!(buf[..k].ends_with(b"for the device"));

    faults.set_full(false);
    for _ in 0..3 {
        let (u, b) = next();
        let ok = push9999(&mut p, &u, b.as_bytes()) == 0x00;
        assert!(
            ok,
            "space is back: pushes are accepted again without a restart"
        );
        led.note(u, &b, ok);
        let (u, b) = next();
        let (status, body) = push_admin(&srv, &u, &b);
        assert_eq!(status, 200, "{body}");
        led.note(u, &b, true);
    }
    assert!(!degraded(&srv));
    assert_eq!(metric(&srv, "ddpush_storage_ok"), 1.0);
    srv.stop(Stop::Crash);

    let srv = InProc::start(dir.path(), Arc::new(OsDisk), &[]);
    led.check(&srv);
    assert_eq!(
        pending_payload(&srv, &dev_uuid).as_deref(),
        Some("for the device")
    );
}

#[test]
fn the_nth_write_lands_half_then_a_crash_at_each_point() {
    // Crash right after the failed write, after the next good one, and after a later one.
    for crash_after in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let disk = FailingDisk::default();
        let faults = disk.faults.clone();
        let srv = InProc::start(dir.path(), Arc::new(disk), &[]);
        let mut p = srv.pusher();
        let mut led = Ledger::default();
        for i in 0..5u32 {
            let u = uuid(100 + i);
            let b = format!("first-{i}");
            led.note(u, &b, push9999(&mut p, &u, b.as_bytes()) == 0);
        }
        faults.fail_nth_from_now(1);
        let u = uuid(200);
        assert_eq!(push9999(&mut p, &u, b"half-written"), 0xFF);
        led.note(u, "half-written", false);
        for i in 0..crash_after {
            let u = uuid(300 + i);
            let b = format!("after-{i}");
            let ok = push9999(&mut p, &u, b.as_bytes()) == 0;
            assert!(ok);
            led.note(u, &b, ok);
        }
        srv.stop(Stop::Crash);
        let srv = InProc::start(dir.path(), Arc::new(OsDisk), &[]);
        led.check(&srv);
        drop(srv);
        // The journal is whole frames only: check finds nothing torn or damaged.
        for r in ddpushd::persist::check::check(dir.path()).unwrap() {
            assert_eq!(r.end, ddpushd::persist::journal::End::Clean, "{r}");
        }
    }
}

#[test]
fn disk_fills_during_a_snapshot_which_is_retried_and_journals_kept() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::default();
    let faults = disk.faults.clone();
    let srv = InProc::start(dir.path(), Arc::new(disk), &["--snapshot-interval", "1s"]);
    let mut p = srv.pusher();
    let mut led = Ledger::default();
    for i in 0..20u32 {
        let u = uuid(400 + i);
        let b = format!("before-{i}");
        led.note(u, &b, push9999(&mut p, &u, b.as_bytes()) == 0);
    }
    let snaps = |srv: &InProc| metric(srv, "ddpush_snapshots_total");
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(15), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("a first snapshot", &|| snaps(&srv) >= 1.0);
    let first = std::fs::read(dir.path().join("snapshot.cbor")).unwrap();
    // More pushes (journaled), then the disk fills: the next snapshots fail.
    for i in 0..10u32 {
        let u = uuid(500 + i);
        let b = format!("middle-{i}");
        led.note(u, &b, push9999(&mut p, &u, b.as_bytes()) == 0);
    }
    let failed_before = metric(&srv, "ddpush_storage_failed_writes_total");
    let done_before = snaps(&srv);
    faults.set_full(true);
    wait("a failed snapshot", &|| {
        metric(&srv, "ddpush_storage_failed_writes_total") > failed_before
    });
    assert_eq!(
        snaps(&srv),
        done_before,
        "a snapshot succeeded on a full disk"
    );
    assert_eq!(
        std::fs::read(dir.path().join("snapshot.cbor")).unwrap(),
        first,
        "the previous snapshot was touched"
    );
    assert!(!dir.path().join("snapshot.tmp").exists());
    // Crash with the disk still full: the old snapshot plus its journals hold everything.
    srv.stop(Stop::Crash);
    let disk = FailingDisk::default();
    let faults = disk.faults.clone();
    let srv = InProc::start(dir.path(), Arc::new(disk), &["--snapshot-interval", "1s"]);
    led.check(&srv);
    // Space comes back in this run: the retried snapshot succeeds.
    faults.set_full(true);
    let failed_before = metric(&srv, "ddpush_storage_failed_writes_total");
    let mut p = srv.pusher();
    let u = uuid(600);
    assert_eq!(push9999(&mut p, &u, b"refused"), 0xFF);
    led.note(u, "refused", false);
    wait("a failed snapshot", &|| {
        metric(&srv, "ddpush_storage_failed_writes_total") > failed_before + 1.0
    });
    let done_before = snaps(&srv);
    faults.set_full(false);
    wait("the retried snapshot", &|| snaps(&srv) > done_before);
    let u = uuid(601);
    assert_eq!(push9999(&mut p, &u, b"after"), 0);
    led.note(u, "after", true);
    srv.stop(Stop::Crash);
    let srv = InProc::start(dir.path(), Arc::new(OsDisk), &[]);
    led.check(&srv);
}

#[test]
fn a_failing_fsync_refuses_pushes_until_one_succeeds_then_a_snapshot_rewrites_memory() {
    // `--fsync interval`: writes succeed, the periodic fsync fails (a device that takes bytes
    // it cannot write back). Pushes written since the last good fsync are no base for more.
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::default();
    let faults = disk.faults.clone();
    let srv = InProc::start(dir.path(), Arc::new(disk), &["--fsync", "interval"]);
    let mut p = srv.pusher();
    let mut led = Ledger::default();
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(15), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let u = uuid(700);
    assert_eq!(push9999(&mut p, &u, b"before"), 0);
    led.note(u, "before", true);
    faults.set_sync_fails(true);
    // Written, not yet synced: the next periodic fsync fails.
    let u = uuid(701);
    assert_eq!(push9999(&mut p, &u, b"unsynced"), 0);
    led.note(u, "unsynced", true);
    wait("the periodic fsync to fail", &|| degraded(&srv));
    assert_eq!(metric(&srv, "ddpush_storage_ok"), 0.0);
    for i in 0..3u32 {
        let u = uuid(710 + i);
        assert_eq!(
            push9999(&mut p, &u, b"refused"),
            0xFF,
            "push {i} accepted while fsync fails"
        );
        led.note(u, "refused", false);
        let u = uuid(720 + i);
        let (status, body) = push_admin(&srv, &u, "refused");
        assert_eq!(status, 503, "{body}");
        led.note(u, "refused", false);
        // Still degraded after more failed periodic fsyncs: no flapping to "recovered".
        std::thread::sleep(Duration::from_millis(600));
        assert!(degraded(&srv), "recovered while fsync still fails");
    }
    let snaps = metric(&srv, "ddpush_snapshots_total");
    faults.set_sync_fails(false);
    let u = uuid(730);
    assert_eq!(push9999(&mut p, &u, b"after"), 0, "fsync works again");
    led.note(u, "after", true);
    assert!(!degraded(&srv));
    // The default snapshot interval is 60 s: this one follows the failed fsync.
    wait("a snapshot after the failed fsync", &|| {
        metric(&srv, "ddpush_snapshots_total") > snaps
    });
    srv.stop(Stop::Crash);
    let srv = InProc::start(dir.path(), Arc::new(OsDisk), &[]);
    led.check(&srv);
}

fn clear(srv: &InProc, u: &[u8; 16]) -> (u16, String) {
    let path = format!("/clients/{}/clear", hex(u));
    server::http(srv.admin(), "POST", &path, None, "")
}

/// A removal whose write lands only half: answered 503 and the record stays, live and after
/// a crash. Space comes back: the next clear is answered 200 without a restart, and a crash
/// after it does not bring that record back (nor does the half frame stop the start).
#[test]
fn a_clear_whose_write_fails_keeps_the_record_and_the_next_one_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::default();
    let faults: Arc<Faults> = disk.faults.clone();
    let srv = InProc::start(dir.path(), Arc::new(disk), &["--fsync", "always"]);
    let mut p = srv.pusher();
    let (a, b, c) = (uuid(71), uuid(72), uuid(73));
    for (u, body) in [(&a, "kept a"), (&b, "gone b"), (&c, "kept c")] {
        assert_eq!(push9999(&mut p, u, body.as_bytes()), 0x00);
    }

    faults.set_full(true);
    let (status, body) = clear(&srv, &a);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("removal was not written"), "{body}");
    assert_eq!(pending_payload(&srv, &a).as_deref(), Some("kept a"));
    assert!(degraded(&srv));

    faults.set_full(false);
    let (status, body) = clear(&srv, &b);
    assert_eq!((status, body.as_str()), (200, r#"{"removed":true}"#));
    assert!(!degraded(&srv));
    srv.stop(Stop::Crash);

    let srv = InProc::start(dir.path(), Arc::new(OsDisk), &[]);
    assert_eq!(pending_payload(&srv, &a).as_deref(), Some("kept a"));
    assert_eq!(clear(&srv, &b).0, 404, "a written removal came undone");
    assert_eq!(pending_payload(&srv, &c).as_deref(), Some("kept c"));
}

/// `GET /status` on `admin`: how long the answer took, or `None` if none came within `limit`.
fn status_within(admin: SocketAddr, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    let req = format!("GET /status HTTP/1.1\r\nhost: {admin}\r\ncontent-length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

/// Slow turns one after another (every `--fsync always` turn takes 20 ms, as on a struggling
/// disk, with 16 pushers keeping the loop busy) must not starve the admin port: its
/// connection tasks share the loop's thread and run only when the loop lets them. Each
/// `/status` must come back within a bound far above the few turns it needs (a starved port
/// answers never: the request's own time-out is a task that does not run either).
#[test]
fn the_admin_port_answers_while_slow_turns_follow_each_other() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::default();
    disk.faults.set_sync_delay_ms(20);
    let srv = InProc::start(dir.path(), Arc::new(disk), &["--fsync", "always"]);
    let stop = Arc::new(AtomicBool::new(false));
    let pushed = Arc::new(AtomicU64::new(0));
    let pushers: Vec<_> = (0..16u32)
        .map(|k| {
            let mut p = srv.pusher();
            let (stop, pushed) = (stop.clone(), pushed.clone());
            std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    assert_eq!(push9999(&mut p, &uuid(k * 1000 + i % 100), b"x"), 0x00);
                    pushed.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A few turns would do; the bound is far above that, and a starved port misses it.
    let bound = Duration::from_secs(2);
    let mut answers = Vec::new();
    for _ in 0..10 {
        let a = status_within(srv.admin(), bound).filter(|&t| t < bound);
        answers.push(a);
        if a.is_none() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for p in pushers {
        p.join().unwrap();
    }
    let pushed = pushed.load(Ordering::SeqCst);
    eprintln!("/status answered in {answers:?} while {pushed} pushes were accepted");
    assert!(pushed >= 20, "the pushers were not busy: {pushed} pushes");
    assert!(
        answers.iter().all(Option::is_some),
        "the admin port starved behind slow turns (no answer within {bound:?}): {answers:?}"
    );
}
