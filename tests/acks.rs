//! End-to-end tests of the ack rule (issue 12) against the real `ddpushd`, over real loopback
//! sockets, written as the byte sequences a device and a `Pusher` exchange with it.
//!
//! Packets are hex with spaces for reading; `U` stands for the uuid of the golden vectors
//! (MD5 "user100001"). Device packets: `01 01 00 U 0000` heartbeat (appId 1), `01 01 20 U 0000`
//! ack of a 0x20, `01 01 10 U 0000` ack of a 0x10. Pushes: `01 01 20 U <len> <text>`, one reply
//! byte. Server to device: `01 00 ..` an immediate push, `01 01 ..` a heartbeat's answer.

#[path = "server.rs"]
mod server;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use server::*;

/// The shortest step the rule must handle (issue 12, case 1).
const STEP: Duration = Duration::from_millis(150);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(600);

/// Hex with spaces, `U` for the uuid.
fn b(s: &str) -> Vec<u8> {
    let s = s.replace('U', UUID_HEX).replace(' ', "");
    hex::decode(&s).unwrap_or_else(|e| panic!("bad hex {s}: {e}"))
}

/// The hex of a text, for readable payload packets.
fn t(text: &str) -> String {
    format!("{:04x} {}", text.len(), hex::encode(text))
}

const HB: &str = "01 01 00 U 0000";
const ACK_20: &str = "01 01 20 U 0000";
const ACK_10: &str = "01 01 10 U 0000";

fn push_20(p: &mut TcpStream, text: &str) {
    assert_eq!(push(p, &b(&format!("01 01 20 U {}", t(text)))), Some(0));
}

fn push_10(p: &mut TcpStream) {
    assert_eq!(push(p, &b("01 01 10 U 0000")), Some(0));
}

/// What the device expects: `01 <app> 20 <len> <text>`.
fn down_20(app: u8, text: &str) -> String {
    hex::encode(b(&format!("01 {app:02x} 20 {}", t(text))))
}

fn send(d: &UdpSocket, hex: &str) {
    d.send(&b(hex)).unwrap();
}

/// A device socket that sends to the server's UDP port.
fn device_at(srv: &Server) -> UdpSocket {
    let d = UdpSocket::bind("127.0.0.1:0").unwrap();
    d.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    d.connect(srv.udp).unwrap();
    d
}

fn pause() {
    std::thread::sleep(STEP);
}

// ------------------------------------------------------------------------------------------
// Case 1: upstream's sequences keep upstream's result
// ------------------------------------------------------------------------------------------

/// Heartbeat -> "three" (not acked); push "four" (sent at once); heartbeat -> "four"; one ack;
/// the next heartbeat gets nothing. Steps 150 ms apart.
#[test]
fn upstream_one_ack_of_the_resend_clears() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    let d = device_at(&srv);
    push_20(&mut p, "three");
    send(&d, HB);
    assert_eq!(recv_n(&d, 1), vec![down_20(1, "three")]);
    pause();
    push_20(&mut p, "four");
    assert_eq!(recv_n(&d, 1), vec![down_20(0, "four")]);
    pause();
    send(&d, HB);
    assert_eq!(recv_n(&d, 1), vec![down_20(1, "four")]);
    pause();
    send(&d, ACK_20);
    pause();
    send(&d, HB);
    recv_none(&d, QUIET);
}

/// An item sent on three heartbeats and acked once, then a new push, a heartbeat re-send and
/// one ack: nothing more. For 0x20 and for 0x10.
#[test]
fn upstream_resends_acked_once_then_a_new_push() {
    for notify in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let srv = Server::start(dir.path(), &[]);
        let mut p = srv.pusher();
        let d = device_at(&srv);
        let (ack, first, second) = if notify {
            ("01 01 10 U 0000", "01011000 00", "01001000 00")
        } else {
            ("01 01 20 U 0000", "", "")
        };
        if notify {
            push_10(&mut p);
        } else {
            push_20(&mut p, "one");
        }
        for _ in 0..3 {
            send(&d, HB);
            let want = if notify {
                hex::encode(b(first))
            } else {
                down_20(1, "one")
            };
            assert_eq!(recv_n(&d, 1), vec![want], "notify={notify}");
            pause();
        }
        send(&d, ack);
        pause();
        if notify {
            push_10(&mut p);
            assert_eq!(recv_n(&d, 1), vec![hex::encode(b(second))]);
        } else {
            push_20(&mut p, "two");
            assert_eq!(recv_n(&d, 1), vec![down_20(0, "two")]);
        }
        pause();
        send(&d, HB);
        assert_eq!(recv_n(&d, 1).len(), 1, "re-sent on the heartbeat");
        pause();
        send(&d, ack);
        pause();
        send(&d, HB);
        recv_none(&d, QUIET);
    }
}

// ------------------------------------------------------------------------------------------
// Case 2: the real SDK (acks every message at once) sees no duplicate when nothing is lost
// ------------------------------------------------------------------------------------------

/// An online client gets an immediate 0x20 "hello", acks it: its next heartbeat gets nothing.
#[test]
fn sdk_acked_immediate_push_is_not_resent() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    let d = device_at(&srv);
    send(&d, HB);
    recv_none(&d, Duration::from_millis(200));
    for text in ["hello", "again"] {
        push_20(&mut p, text);
        assert_eq!(recv_n(&d, 1), vec![down_20(0, text)]);
        send(&d, ACK_20);
        pause();
        send(&d, HB);
        recv_none(&d, QUIET);
    }
    push_10(&mut p);
    assert_eq!(recv_n(&d, 1), vec!["0100100000".to_string()]);
    send(&d, ACK_10);
    pause();
    send(&d, HB);
    recv_none(&d, QUIET);
}

/// The app is killed (the server still counts it online); "one" and "two" go out at once to
/// the dead socket; the app starts again on a new socket: its first heartbeat gets "two", the
/// SDK acks it, and nothing more comes.
#[test]
fn sdk_new_socket_after_sends_to_the_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    let old = device_at(&srv);
    send(&old, HB);
    pause();
    drop(old);
    push_20(&mut p, "one");
    push_20(&mut p, "two");
    let d = device_at(&srv);
    send(&d, HB);
    assert_eq!(recv_n(&d, 1), vec![down_20(1, "two")]);
    send(&d, ACK_20);
    for _ in 0..3 {
        pause();
        send(&d, HB);
        recv_none(&d, Duration::from_millis(300));
    }
}

/// Right after a restart of the server: the item whose ack was lost to the restart comes on the
/// first heartbeat, its ack clears it at once, and an immediate push acked at once is not
/// re-sent either.
#[test]
fn sdk_no_duplicate_right_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    let d = device_at(&srv);
    send(&d, HB);
    pause();
    push_20(&mut p, "before");
    assert_eq!(recv_n(&d, 1), vec![down_20(0, "before")]);
    // The server stops before the device's ack arrives.
    let (status, _) = srv.terminate(Duration::from_secs(10));
    assert!(status.success());
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    d.connect(srv.udp).unwrap(); // same device socket, the server's new port
    send(&d, HB);
    assert_eq!(recv_n(&d, 1), vec![down_20(1, "before")]);
    send(&d, ACK_20);
    // (An ack that reached the server only after the next push would be taken for the older
    // send: a crossing, which costs one re-send. Let it arrive first, as it does in practice.)
    pause();
    push_20(&mut p, "after");
    assert_eq!(recv_n(&d, 1), vec![down_20(0, "after")]);
    send(&d, ACK_20);
    pause();
    send(&d, HB);
    recv_none(&d, QUIET);
}

// ------------------------------------------------------------------------------------------
// Case 3: no newer message is lost to the ack of an older send
// ------------------------------------------------------------------------------------------

/// Heartbeat -> "A"; push "B" (its immediate send is lost: the device never sees it); the ack
/// of "A" arrives after "B" was pushed: the next heartbeat delivers "B", and the ack of that
/// re-send stops it. The same for the 0x10 flag.
#[test]
fn ack_of_an_older_send_does_not_clear_the_newer_push_udp() {
    older_ack_after_a_lost_newer_push_udp(1);
}

/// Case 3 with a network that duplicates datagrams (lossy seed 3660 of the simulator): A is sent
/// on a heartbeat, B pushed 150 ms later (its immediate send lost), and the device's one ack of
/// A reaches the server twice. The copy must not clear B: the next heartbeat still brings B, and
/// the ack of that re-send clears it. For 0x20 and 0x10.
#[test]
fn a_duplicated_ack_of_an_older_send_does_not_clear_the_newer_push_udp() {
    older_ack_after_a_lost_newer_push_udp(2);
}

/// A sent on a heartbeat, B pushed 150 ms later with its immediate send lost, then `copies`
/// copies of A's one ack (2: the network duplicated it): the next heartbeat still brings B and
/// the ack of that re-send clears it. For 0x20 and 0x10.
fn older_ack_after_a_lost_newer_push_udp(copies: usize) {
    for notify in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let srv = Server::start(dir.path(), &[]);
        let mut p = srv.pusher();
        let d = device_at(&srv);
        let ack = if notify { ACK_10 } else { ACK_20 };
        if notify {
            push_10(&mut p);
        } else {
            push_20(&mut p, "A");
        }
        send(&d, HB);
        assert_eq!(recv_n(&d, 1).len(), 1, "A");
        pause();
        if notify {
            push_10(&mut p);
        } else {
            push_20(&mut p, "B");
        }
        let _lost = recv_n(&d, 1); // "lost": the device does not see or ack it
        for _ in 0..copies {
            send(&d, ack); // the ack of A (and the network's copies of it)
        }
        pause();
        send(&d, HB);
        let want = if notify {
            "0101100000".to_string()
        } else {
            down_20(1, "B")
        };
        assert_eq!(
            recv_n(&d, 1),
            vec![want],
            "notify={notify}, {copies} acks of A: B delivered"
        );
        send(&d, ack);
        pause();
        send(&d, HB);
        recv_none(&d, QUIET);
    }
}

/// Case 3 over a device TCP connection, for 0x20 and 0x10.
#[test]
fn ack_of_an_older_send_does_not_clear_the_newer_push_tcp() {
    for notify in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let srv = Server::start(dir.path(), &[]);
        let mut p = srv.pusher();
        let mut s = srv.device_tcp();
        let (ack, a_len, b_want) = if notify {
            (ACK_10, 5, "0101100000".to_string())
        } else {
            (ACK_20, 6, down_20(1, "B"))
        };
        if notify {
            push_10(&mut p);
        } else {
            push_20(&mut p, "A");
        }
        s.write_all(&b(HB)).unwrap();
        let _a = read_exact_hex(&mut s, a_len);
        pause();
        if notify {
            push_10(&mut p);
        } else {
            push_20(&mut p, "B");
        }
        // B's immediate copy is on the stream; the device has not read it when it acks A.
        s.write_all(&b(ack)).unwrap();
        let _unread = read_exact_hex(&mut s, a_len);
        pause();
        s.write_all(&b(HB)).unwrap();
        assert_eq!(read_exact_hex(&mut s, a_len), b_want, "notify={notify}");
        // Now the device acks both copies of B it has read.
        s.write_all(&b(ack)).unwrap();
        s.write_all(&b(ack)).unwrap();
        pause();
        s.write_all(&b(HB)).unwrap();
        s.set_read_timeout(Some(QUIET)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("notify={notify}: expected nothing, got {other:?} {buf:02x?}"),
        }
    }
}

/// Case 3 across an operator's removal, over TCP (fuzz finding 8, docs/FUZZING.md): the flag is
/// sent twice on the device's connection (its immediate send, and a heartbeat's answer: the
/// heartbeat crossed it), the operator clears the client, the app server pushes a new 0x10
/// (the record is re-created with the removed one's ledger), the device heartbeats on the same
/// connection and gets the new flag, and only then does the ack of one of the first sends
/// arrive. It must not clear the new flag; the next heartbeat re-sends it. The ack window is
/// set to 30 s so that the whole sequence is inside it however slow the machine (with the
/// default 200 ms, a slower heartbeat would settle the first sends, condition C of
/// PROTOCOL-NOTES.md).
#[test]
fn ack_across_a_removal_does_not_clear_the_push_after_it_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &["--admin-listen", "127.0.0.1:0", "--ack-window", "30s"],
    );
    let admin = srv.admin.expect("admin address in the listening line");
    let mut p = srv.pusher();
    let mut s = srv.device_tcp();
    s.write_all(&b(HB)).unwrap();
    pause();
    push_10(&mut p);
    assert_eq!(
        read_exact_hex(&mut s, 5),
        "0100100000",
        "the immediate send"
    );
    s.write_all(&b(HB)).unwrap();
    assert_eq!(
        read_exact_hex(&mut s, 5),
        "0101100000",
        "the heartbeat's re-send"
    );
    let (st, body) = http(
        admin,
        "POST",
        &format!("/clients/{UUID_HEX}/clear"),
        None,
        "",
    );
    assert_eq!(st, 200, "{body}");
    push_10(&mut p);
    s.write_all(&b(HB)).unwrap();
    // appId 1: the heartbeat's answer (the re-created record had no path for an immediate send).
    assert_eq!(read_exact_hex(&mut s, 5), "0101100000", "the new flag");
    // The late ack of a send made before the removal.
    s.write_all(&b(ACK_10)).unwrap();
    pause();
    s.write_all(&b(HB)).unwrap();
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut got = [0u8; 5];
    match s.read_exact(&mut got) {
        Ok(()) => assert_eq!(hex::encode(got), "0101100000"),
        Err(e) => panic!("the new flag was cleared by the ack of an older send: {e}"),
    }
    // The device acks the other first send and both copies of the new flag: cleared.
    for _ in 0..3 {
        s.write_all(&b(ACK_10)).unwrap();
    }
    pause();
    s.write_all(&b(HB)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected nothing, got {other:?} {buf:02x?}"),
    }
}
