//! End-to-end tests: the real `ddpushd` binary over real loopback sockets, raw bytes only.

#[path = "server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use server::*;

/// A JSON array of hex strings from the golden vectors.
fn hex_list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("an array of hex strings")
        .iter()
        .map(|h| h.as_str().expect("a hex string").to_string())
        .collect()
}

fn hx(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[test]
fn every_push_request_row_gets_its_reply_byte() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let g = golden();
    let mut p = srv.pusher();
    for row in g["push_requests"].as_array().unwrap() {
        let req = hx(row["hex"].as_str().unwrap());
        let name = row["name"].as_str().unwrap();
        match row["reply"].as_str() {
            Some(r) => {
                let got = push(&mut p, &req);
                assert_eq!(got, Some(hx(r)[0]), "row {name}");
            }
            None => {
                // N = 501: the server closes without a reply, right after the header.
                assert_eq!(push(&mut p, &req), None, "row {name}");
                p = srv.pusher();
            }
        }
    }
}

#[test]
fn offline_sequence_and_golden_udp_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let g = golden();
    let mut p = srv.pusher();
    let bits = |m: u64| m.to_be_bytes();
    for req in [
        up(1, 1, 0x10, &[]),
        up(1, 1, 0x11, &bits(1)),
        up(1, 1, 0x11, &bits(4)),
        up(1, 1, 0x20, b"hi"),
        up(1, 1, 0x20, b"hello"),
    ] {
        assert_eq!(push(&mut p, &req), Some(0));
    }
    let d = srv.device();
    d.send(&heartbeat(7)).unwrap();
    let seq = &g["offline_sequence"];
    let want = hex_list(&seq["first_heartbeat_replies"]);
    assert_eq!(recv_n(&d, 3), want);
    d.send(&up(1, 7, 0x11, &bits(1))).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    d.send(&heartbeat(7)).unwrap();
    let want = hex_list(&seq["after_ack_0x11_mask_1_next_heartbeat"]);
    assert_eq!(recv_n(&d, 3), want);
    for ack in [
        up(1, 7, 0x10, &[]),
        up(1, 7, 0x11, &bits(4)),
        up(1, 7, 0x20, &[]),
    ] {
        d.send(&ack).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    d.send(&heartbeat(7)).unwrap();
    recv_none(&d, Duration::from_millis(400));
}

#[test]
fn immediate_push_to_online_udp_and_tcp_devices_uses_app_id_zero() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let g = golden();
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    recv_none(&d, Duration::from_millis(200)); // policy never: no reply
    let mut t = srv.device_tcp();
    t.write_all(&heartbeat(1)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut p = srv.pusher();
    let imm = g["server_to_device_immediate"].as_array().unwrap();
    let reqs = [
        up(1, 1, 0x10, &[]),
        up(1, 1, 0x11, &5u64.to_be_bytes()),
        up(1, 1, 0x20, b"hello"),
    ];
    for (req, want) in reqs.iter().zip(imm) {
        assert_eq!(push(&mut p, req), Some(0));
        let want = want["hex"].as_str().unwrap();
        assert_eq!(recv_n(&d, 1), vec![want.to_string()]);
        assert_eq!(read_exact_hex(&mut t, want.len() / 2), want);
    }
}

#[test]
fn tcp_heartbeat_gets_the_back_to_back_stream_and_split_frames_work() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let g = golden();
    let mut p = srv.pusher();
    // Pipelined: three requests in one write, three replies in order.
    let mut all = up(1, 1, 0x10, &[]);
    all.extend(up(1, 1, 0x11, &5u64.to_be_bytes()));
    all.extend(up(1, 1, 0x20, b"hello"));
    p.write_all(&all).unwrap();
    assert_eq!(read_exact_hex(&mut p, 3), "000000");
    let mut t = srv.device_tcp();
    // The heartbeat split across three writes.
    let hb = heartbeat(1);
    for part in [&hb[..1], &hb[1..10], &hb[10..]] {
        t.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let want = g["tcp_stream_on_heartbeat_app_1"].as_str().unwrap();
    assert_eq!(read_exact_hex(&mut t, want.len() / 2), want);
    // The SDK's three acks in one write: all must take effect (upstream lost the last).
    let mut acks = up(1, 1, 0x10, &[]);
    acks.extend(up(1, 1, 0x11, &5u64.to_be_bytes()));
    acks.extend(up(1, 1, 0x20, &[]));
    t.write_all(&acks).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    t.write_all(&heartbeat(1)).unwrap();
    t.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut b = [0u8; 64];
    match t.read(&mut b) {
        Err(_) => {}
        Ok(n) => panic!(
            "expected nothing after all acks, got {}",
            hex::encode(&b[..n])
        ),
    }
}

#[test]
fn heartbeat_reply_policy_always_answers_with_the_golden_reply() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &["--heartbeat-reply", "always"]);
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    assert_eq!(recv_n(&d, 1), vec!["0101000000".to_string()]);
}

#[test]
fn device_tcp_frame_announcing_more_than_8_bytes_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut t = srv.device_tcp();
    t.write_all(&up(1, 1, 0x20, &[0u8; 9])).unwrap();
    let mut b = [0u8; 8];
    assert!(
        matches!(t.read(&mut b), Ok(0) | Err(_)),
        "connection must close"
    );
}

#[test]
fn garbage_on_every_port_changes_nothing_and_service_continues() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    assert_eq!(push(&mut p, &up(1, 1, 0x20, b"keep")), Some(0));
    let d = srv.device();
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xFF; 3],
        up(2, 1, 0x00, &[]),
        up(1, 1, 0x20, &[1, 2, 3, 4, 5]), // a 0x20 ack with N=5 must not clear
        up(1, 1, 0xFF, &[]),
        up(1, 1, 0x00, &[0]),
        vec![0x01; 600],
    ];
    for j in &junk {
        d.send(j).unwrap();
    }
    let mut t = srv.device_tcp();
    t.write_all(&up(2, 1, 0x20, &[])).unwrap(); // version-2 ack over TCP
    t.write_all(&up(1, 1, 0x20, &[1, 2, 3, 4, 5])).unwrap();
    let mut g = srv.pusher();
    g.write_all(&[0u8; 21]).unwrap(); // version 0, cmd 0: rejected, not fatal
    let mut r = [0u8; 1];
    g.read_exact(&mut r).unwrap();
    assert_eq!(r[0], 1);
    std::thread::sleep(Duration::from_millis(200));
    d.send(&heartbeat(3)).unwrap();
    assert_eq!(
        recv_n(&d, 1),
        vec![format!("01032000046b656570")],
        "the payload survived every malformed ack"
    );
}

#[test]
fn a_stalled_push_connection_does_not_block_another() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    // One peer stops mid-request; another floods requests and never reads a reply.
    let mut half = srv.pusher();
    half.write_all(&up(1, 1, 0x20, b"abc")[..10]).unwrap();
    let mut flood = srv.pusher();
    let mut many = Vec::new();
    for _ in 0..20_000 {
        many.extend(up(1, 1, 0x10, &[]));
    }
    let writer = std::thread::spawn(move || {
        let _ = flood.write_all(&many);
        flood
    });
    let mut other = srv.pusher();
    for i in 0..200u32 {
        let body = format!("msg{i}");
        assert_eq!(push(&mut other, &up(1, 1, 0x20, body.as_bytes())), Some(0));
    }
    drop(writer.join().unwrap());
}

#[test]
fn graceful_restart_keeps_pending_messages() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    assert_eq!(push(&mut p, &up(1, 1, 0x11, &5u64.to_be_bytes())), Some(0));
    assert_eq!(push(&mut p, &up(1, 1, 0x20, b"hello")), Some(0));
    let (status, took) = srv.terminate(Duration::from_secs(5));
    assert!(status.success(), "SIGTERM exit status {status:?}");
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    let srv = Server::start(dir.path(), &[]);
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    assert_eq!(
        recv_n(&d, 2),
        vec![
            "01011100080000000000000005".to_string(),
            "010120000568656c6c6f".to_string()
        ]
    );
}

#[test]
fn kill_9_after_accepted_pushes_loses_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &["--fsync", "never"]);
    let mut p = srv.pusher();
    // 300 clients, each with its own payload; a snapshot never ran (default period 60 s).
    let uuid_of = |i: u32| {
        let mut u = [0u8; 16];
        u[..4].copy_from_slice(&i.to_be_bytes());
        u
    };
    let mut batch = Vec::new();
    for i in 0..300u32 {
        let mut req = vec![1, 1, 0x20];
        req.extend_from_slice(&uuid_of(i));
        let body = format!("payload-{i}");
        req.extend_from_slice(&(body.len() as u16).to_be_bytes());
        req.extend_from_slice(body.as_bytes());
        batch.extend(req);
    }
    p.write_all(&batch).unwrap();
    let replies = read_exact_hex(&mut p, 300);
    assert_eq!(replies, "00".repeat(300));
    srv.kill9();
    let srv = Server::start(dir.path(), &[]);
    let d = srv.device();
    for i in 0..300u32 {
        let mut hb = vec![1, 1, 0];
        hb.extend_from_slice(&uuid_of(i));
        hb.extend_from_slice(&[0, 0]);
        d.send(&hb).unwrap();
        let got = recv_n(&d, 1).remove(0);
        let body = format!("payload-{i}");
        assert_eq!(
            got,
            format!("010120{:04x}{}", body.len(), hex::encode(&body))
        );
    }
}

#[test]
fn acks_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    assert_eq!(push(&mut p, &up(1, 1, 0x11, &3u64.to_be_bytes())), Some(0));
    assert_eq!(push(&mut p, &up(1, 1, 0x20, b"stay")), Some(0));
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    assert_eq!(
        recv_n(&d, 2),
        vec![
            "01011100080000000000000003".to_string(),
            "010120000473746179".to_string()
        ]
    );
    // Ack only the bits; the payload stays pending.
    d.send(&up(1, 1, 0x11, &3u64.to_be_bytes())).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.send(&heartbeat(1)).unwrap();
    assert_eq!(recv_n(&d, 1), vec!["010120000473746179".to_string()]);
    srv.kill9();
    let srv = Server::start(dir.path(), &[]);
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    // The journaled ack holds: only the payload comes back.
    assert_eq!(recv_n(&d, 1), vec!["010120000473746179".to_string()]);
    recv_none(&d, Duration::from_millis(300));
}

#[test]
fn corrupt_state_refuses_to_start_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    assert_eq!(push(&mut p, &up(1, 1, 0x20, b"hello")), Some(0));
    let (status, _) = srv.terminate(Duration::from_secs(5));
    assert!(status.success());
    let snap = dir.path().join("snapshot.cbor");
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&snap, &bytes).unwrap();
    let err = Server::try_start(dir.path(), &[])
        .err()
        .expect("must refuse to start");
    assert!(err.contains("snapshot.cbor"), "{err}");
    assert!(err.contains("corrupt at byte offset"), "{err}");
    // The damaged file is left for the operator, not replaced.
    assert_eq!(std::fs::read(&snap).unwrap(), bytes);
}

#[test]
fn bad_flags_config_and_busy_ports_exit_non_zero_with_one_line() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (s, e) = run(&["--fsync", "sometimes"]);
    assert_eq!(s.code(), Some(2));
    assert!(e.contains("sometimes") && e.lines().count() == 1, "{e}");
    let (s, e) = run(&["--no-such-flag"]);
    assert_eq!(s.code(), Some(2));
    assert!(e.contains("--no-such-flag"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nheartbeat-replyy = \"always\"\n",
    )
    .unwrap();
    let (s, e) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(s.code(), Some(2));
    assert!(e.contains("heartbeat-replyy"), "{e}");
    std::fs::write(&cfg, "max-content = 0\n").unwrap();
    let (s, e) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(s.code(), Some(2));
    assert!(e.contains("max_content"), "{e}");
    let (s, e) = run(&["--admin-listen", "0.0.0.0:0"]);
    assert_eq!(s.code(), Some(2));
    assert!(e.contains("admin-token"), "{e}");
    // Address in use: a second server on the first one's push port.
    let srv = Server::start(dir.path(), &[]);
    let other = tempfile::tempdir().unwrap();
    let push = srv.push.to_string();
    let (s, e) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "none",
        "--push-listen",
        &push,
        "--data-dir",
        other.path().to_str().unwrap(),
    ]);
    assert_eq!(s.code(), Some(1));
    assert!(
        e.contains("cannot bind push TCP") && e.contains(&push),
        "{e}"
    );
}

#[test]
fn config_file_values_apply_and_flags_override_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "heartbeat-reply = \"always\"\nmax-content = 10\n").unwrap();
    let data = dir.path().join("data");
    let c = cfg.to_str().unwrap();
    let srv = Server::start(&data, &["--config", c]);
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    assert_eq!(recv_n(&d, 1), vec!["0101000000".to_string()]);
    let mut p = srv.pusher();
    assert_eq!(
        push(&mut p, &up(1, 1, 0x20, &[b'a'; 11])),
        None,
        "max-content 10 from the file"
    );
    drop(srv);
    let srv = Server::start(&data, &["--config", c, "--heartbeat-reply", "never"]);
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    recv_none(&d, Duration::from_millis(300));
}

#[test]
fn import_ddpush_keeps_pending_items() {
    let dir = tempfile::tempdir().unwrap();
    // One upstream record for uuid 2e72...: flag set, mask 5, payload "hello".
    let mut rec = Vec::new();
    rec.extend_from_slice(UUID_HEX.as_bytes());
    rec.extend_from_slice(&(-1i64).to_be_bytes());
    rec.push(1);
    rec.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
    rec.extend_from_slice(&5u64.to_be_bytes());
    rec.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
    rec.extend_from_slice(&5i32.to_be_bytes());
    rec.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
    rec.extend_from_slice(b"hello");
    let file = dir.path().join("nodeStatus.dat");
    std::fs::write(&file, &rec).unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(bin())
        .args(["--data-dir", data.to_str().unwrap(), "import-ddpush"])
        .arg(&file)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 1 records"));
    let srv = Server::start(&data, &[]);
    let d = srv.device();
    d.send(&heartbeat(1)).unwrap();
    assert_eq!(
        recv_n(&d, 3),
        vec![
            "0101100000".to_string(),
            "01011100080000000000000005".to_string(),
            "010120000568656c6c6f".to_string()
        ]
    );
    // A truncated upstream file is refused with the offset.
    std::fs::write(&file, &rec[..rec.len() - 2]).unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "--data-dir",
            dir.path().join("d2").to_str().unwrap(),
            "import-ddpush",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("offset 0"));
}

#[test]
fn sigterm_exits_promptly_and_writes_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &["--snapshot-interval", "1h"]);
    let mut p = srv.pusher();
    assert_eq!(push(&mut p, &up(1, 1, 0x10, &[])), Some(0));
    let (status, took) = srv.terminate(Duration::from_secs(5));
    assert!(status.success());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(dir.path().join("snapshot.cbor").exists());
}

#[test]
fn push_connection_idle_timeout_closes_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &["--push-tcp-idle", "1s", "--device-tcp-idle", "1s"],
    );
    let mut p = srv.pusher();
    let mut t = srv.device_tcp();
    let start = std::time::Instant::now();
    let mut b = [0u8; 1];
    assert!(matches!(p.read(&mut b), Ok(0) | Err(_)));
    assert!(matches!(t.read(&mut b), Ok(0) | Err(_)));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let _ = TcpStream::connect(srv.push).unwrap();
}
