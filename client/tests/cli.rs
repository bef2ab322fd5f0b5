//! End-to-end tests of the `ddpush` command against a real `ddpushd` on loopback.

mod common;

use std::time::Duration;

use common::{ddpush, text, Listener, Server};

fn push(server: &Server, args: &[&str]) -> std::process::Output {
    let addr = server.push_addr();
    let mut all = vec!["push", "--server", &addr];
    all.extend_from_slice(args);
    ddpush(&all, None)
}

#[test]
fn uuid_of_a_user_is_md5_of_the_name() {
    let out = ddpush(&["uuid", "user100001"], None);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "2e72361924ef37a6166e0b228d1cbbb0");
}

#[test]
fn bad_uuid_hex_exits_2_with_a_message() {
    let out = ddpush(&["push", "--uuid", "2e7236", "--notify"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("32 hex digits"),
        "{}",
        text(&out.stderr)
    );
    // A push without a message type is a usage error too.
    let out = ddpush(&["push", "--user", "alice"], None);
    assert_eq!(out.status.code(), Some(2));
}

fn each_type_arrives(tcp: bool) {
    let server = Server::start();
    let user = if tcp { "bob-tcp" } else { "bob-udp" };
    // Pushed while the device is offline: stored, delivered on its first heartbeat in the
    // fixed order 0x10, 0x11, 0x20 with the heartbeat's appId.
    for args in [
        &["--notify"][..],
        &["--bits", "1"],
        &["--bits", "0x4"],
        &["--text", "hello"],
    ] {
        let mut a = vec!["--user", user];
        a.extend_from_slice(args);
        let out = push(&server, &a);
        assert_eq!(text(&out.stdout).trim(), "accepted");
        assert!(out.status.success());
    }
    let addr = if tcp {
        server.tcp.expect("device TCP on").to_string()
    } else {
        server.udp.to_string()
    };
    let mut args = vec!["--server", &addr, "--user", user, "--app-id", "7"];
    if tcp {
        args.push("--tcp");
    }
    let listener = Listener::start(&args);
    assert_eq!(listener.line(), "0x10 app=7 notify");
    assert_eq!(listener.line(), "0x11 app=7 bits 5 (0x0000000000000005)");
    assert_eq!(listener.line(), "0x20 app=7 text \"hello\"");
    // Now online: an immediate push (appId 0), here of bytes that are not UTF-8.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, [0xff, 0x00, 0x01]).unwrap();
    let out = push(
        &server,
        &["--user", user, "--data-file", f.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(listener.line(), "0x20 app=0 hex ff0001");
    // Everything was acked: nothing more arrives.
    assert_eq!(listener.try_line(Duration::from_millis(300)), None);
}

#[test]
fn each_type_pushed_is_printed_by_listen_udp() {
    each_type_arrives(false);
}

#[test]
fn each_type_pushed_is_printed_by_listen_tcp() {
    each_type_arrives(true);
}

#[test]
fn exit_codes_follow_the_verdict() {
    let server = Server::start_with(&["--max-clients", "1"]);
    let at_max = "x".repeat(500);
    let out = push(&server, &["--user", "carol", "--text", &at_max]);
    assert_eq!(text(&out.stdout).trim(), "accepted");
    assert_eq!(out.status.code(), Some(0));
    // 501 bytes: the server closes the connection at the header (--max-content 500).
    let over = "x".repeat(501);
    let out = push(&server, &["--user", "carol", "--text", &over]);
    assert_eq!(text(&out.stdout).trim(), "closed");
    assert_eq!(out.status.code(), Some(1));
    // A second client does not fit (--max-clients 1): 0x01.
    let out = push(&server, &["--user", "dave", "--notify"]);
    assert_eq!(text(&out.stdout).trim(), "rejected");
    assert_eq!(out.status.code(), Some(1));
    // Nobody listening: a network error, exit 3.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = ddpush(
        &[
            "push",
            "--server",
            &closed_port,
            "--user",
            "carol",
            "--notify",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

#[test]
fn batch_reports_bad_lines_and_sends_the_rest() {
    let server = Server::start();
    let over = "y".repeat(501);
    let input = format!(
        "# a comment\n\
         alice\ttext\thi there\n\
         alice\tfrobnicate\n\
         2e72361924ef37a6166e0b228d1cbbb0\tbits\t0x11\n\
         bob\ttext\t{over}\n\
         \n\
         user:carol\tnotify\n\
         dave\thex\t00ff\n"
    );
    let addr = server.push_addr();
    let out = ddpush(
        &[
            "push",
            "--server",
            &addr,
            "--batch",
            "-",
            "--connections",
            "2",
        ],
        Some(input.as_bytes()),
    );
    let err = text(&out.stderr);
    let summary = text(&out.stdout);
    assert!(err.contains("line 3: unknown type"), "{err}");
    assert!(err.contains("line 5: payload of 501 bytes"), "{err}");
    assert!(
        summary
            .starts_with("accepted 4, rejected 0, failed 0, closed 0, no verdict 0, bad lines 2;"),
        "{summary}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "bad lines make the exit non-zero"
    );
    // The pushes really went in: user100001 gets its bits on its first heartbeat.
    let udp = server.udp.to_string();
    let l = Listener::start(&["--server", &udp, "--user", "user100001"]);
    assert_eq!(l.line(), "0x11 app=1 bits 17 (0x0000000000000011)");
}

#[test]
fn big_batch_over_several_connections_all_accepted() {
    let server = Server::start();
    let mut input = String::new();
    for i in 0..2000 {
        input.push_str(&format!("user{i}\ttext\tmessage {i}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("batch.tsv");
    std::fs::write(&f, &input).unwrap();
    let addr = server.push_addr();
    let out = ddpush(
        &[
            "push",
            "--server",
            &addr,
            "--batch",
            f.to_str().unwrap(),
            "--connections",
            "4",
            "--window",
            "64",
        ],
        None,
    );
    let summary = text(&out.stdout);
    assert!(
        summary.starts_with("accepted 2000, rejected 0"),
        "{summary}"
    );
    assert!(summary.contains("/s)"), "{summary}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
