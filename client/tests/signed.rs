//! `ddpush listen --key-file F` as a signed device against a real `ddpushd` (PROTOCOL.md 9):
//! the key file is the body of `PUT /clients/{uuid}/key`; with it the listener prints the
//! payload and its signed ack clears it; a bad key file is refused with a message naming the
//! problem and exit code 2.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{ddpush, text, Listener, Server, STEP};

const TOKEN: &str = "t0ken-for-tests";
const KEY: &str = r#"{"key_id": 9, "key": "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf", "grace_s": 3600}"#;

/// One admin request; (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\nx-ddpush-csrf: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

fn key_file(dir: &std::path::Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

fn signed_listener_gets_the_payload(tcp: bool) {
    let server = Server::start_with(&["--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN]);
    let admin = server.admin.expect("admin= in the listening line");
    let user = if tcp { "carol-tcp" } else { "carol-udp" };
    let uuid = text(&ddpush(&["uuid", user], None).stdout)
        .trim()
        .to_string();
    // The same document provisions the server and the device.
    let (status, body) = http(admin, "PUT", &format!("/clients/{uuid}/key"), KEY);
    assert_eq!(status, 200, "{body}");
    let dir = tempfile::tempdir().unwrap();
    let f = key_file(dir.path(), "carol.key", KEY);

    let out = ddpush(
        &[
            "push",
            "--server",
            &server.push_addr(),
            "--user",
            user,
            "--text",
            "for carol only",
        ],
        None,
    );
    assert_eq!(text(&out.stdout).trim(), "accepted");
    let addr = if tcp {
        server.tcp.expect("device TCP").to_string()
    } else {
        server.udp.to_string()
    };
    // Server and listener share this machine's clock: a start then costs ~2 s (PROTOCOL.md
    // 9.4), not the default bound's minute.
    let mut args = vec![
        "--server",
        &addr,
        "--user",
        user,
        "--key-file",
        &f,
        "--server-ahead",
        "1",
    ];
    if tcp {
        args.push("--tcp");
    }
    let l = Listener::start(&args);
    assert_eq!(l.line(), "0x20 app=1 text \"for carol only\"");
    // The signed ack cleared it on the server.
    let deadline = Instant::now() + STEP;
    loop {
        let (status, body) = http(admin, "GET", &format!("/clients/{uuid}"), "");
        assert_eq!(status, 200, "{body}");
        if body.contains("\"payload_base64\":null") {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(l);

    // Without the key file, the same user gets only the bare 0x10 of a new push.
    let out = ddpush(
        &[
            "push",
            "--server",
            &server.push_addr(),
            "--user",
            user,
            "--text",
            "still secret",
        ],
        None,
    );
    assert_eq!(text(&out.stdout).trim(), "accepted");
    let mut args = vec!["--server", &addr, "--user", user, "--interval", "0.3"];
    if tcp {
        args.push("--tcp");
    }
    let v1 = Listener::start(&args);
    assert_eq!(v1.line(), "0x10 app=1 notify");
    // Each v1 heartbeat (every 0.3 s) gets the bare 0x10 again, and never more.
    let until = Instant::now() + Duration::from_secs(2);
    let mut lines = 1;
    while Instant::now() < until {
        if let Some(line) = v1.try_line(Duration::from_millis(500)) {
            assert_eq!(
                line, "0x10 app=1 notify",
                "a v1 listener got more than a bare 0x10"
            );
            lines += 1;
        }
    }
    assert!(
        lines >= 2,
        "one 0x10 per v1 heartbeat while something is pending"
    );
}

#[test]
fn signed_listener_over_udp() {
    signed_listener_gets_the_payload(false);
}

#[test]
fn signed_listener_over_tcp() {
    signed_listener_gets_the_payload(true);
}

#[test]
fn a_bad_key_file_is_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.key").to_string_lossy().into_owned();
    let short = key_file(dir.path(), "short.key", r#"{"key_id": 1, "key": "abcd"}"#);
    let id = key_file(
        dir.path(),
        "id.key",
        r#"{"key_id": 300, "key": "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"}"#,
    );
    let junk = key_file(dir.path(), "junk.key", "key_id=1\n");
    for (f, problem) in [
        (&missing, "cannot read key file"),
        (&short, "\"key\" must be 64 hex digits"),
        (&id, "\"key_id\" must be an integer from 0 to 255"),
        (&junk, "not JSON"),
    ] {
        let out = ddpush(
            &[
                "listen",
                "--server",
                "127.0.0.1:9",
                "--user",
                "x",
                "--key-file",
                f,
            ],
            None,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{f}: {err}");
        assert!(
            err.contains(problem) && err.contains(f.as_str()),
            "{f}: {err}"
        );
        assert!(!err.contains("listening as"), "started anyway: {err}");
    }
}
