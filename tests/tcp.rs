//! TCP connections end to end (device port 9966 and push port 9999): what the readiness-driven
//! connection layer must keep, on the real `ddpushd` over loopback.

#[path = "server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use server::*;

/// An upstream packet for the uuid `ddpbench` + `i`.
fn up_for(i: u64, cmd: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![1, 1, cmd];
    v.extend_from_slice(b"ddpbench");
    v.extend_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(content);
    v
}

#[test]
fn many_connections_read_through_one_buffer_keep_their_own_frames() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let n = 64u64;
    let mut p = srv.pusher();
    for i in 0..n {
        let body = format!("payload-{i}");
        assert_eq!(push(&mut p, &up_for(i, 0x20, body.as_bytes())), Some(0));
    }
    let mut conns: Vec<TcpStream> = (0..n).map(|_| srv.device_tcp()).collect();
    // Every heartbeat split in two, the halves interleaved across all connections, so each
    // read of the shared buffer holds one connection's partial frame.
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&up_for(i as u64, 0x00, &[])[..10]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&up_for(i as u64, 0x00, &[])[10..]).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let body = format!("payload-{i}");
        let mut want = vec![1, 1, 0x20];
        want.extend_from_slice(&(body.len() as u16).to_be_bytes());
        want.extend_from_slice(body.as_bytes());
        assert_eq!(
            read_exact_hex(c, want.len()),
            hex::encode(&want),
            "device {i}"
        );
    }
}

#[test]
fn a_pusher_that_half_closes_after_its_request_still_gets_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    for _ in 0..20 {
        let mut p = srv.pusher();
        let mut reqs = up(1, 1, 0x10, &[]);
        reqs.extend(up(1, 1, 0x20, b"last"));
        p.write_all(&reqs).unwrap();
        p.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        p.read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![0, 0], "both replies, then the close");
    }
}

#[test]
fn a_pusher_that_never_reads_is_closed_as_stalled_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &["--admin-listen", "127.0.0.1:0"]);
    let admin = srv.admin.unwrap();
    // A small receive buffer on our side, so the replies back up quickly.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&srv.push.into()).unwrap();
    let mut flood: TcpStream = s.into();
    flood.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let chunk: Vec<u8> = (0..1000).flat_map(|_| up(1, 1, 0x10, &[])).collect();
    let start = Instant::now();
    let mut closed = false;
    // Enough requests for every buffer on the way (ours, the kernel's both sides, and the
    // server's bounded queue) many times over.
    for _ in 0..2000 {
        if flood.write_all(&chunk).is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the server must close a peer that stops reading");
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(metric(admin, "ddpush_tcp_closed_stalled_total"), 1.0);
    // Everyone else is served as before.
    let mut other = srv.pusher();
    assert_eq!(push(&mut other, &up(1, 1, 0x10, &[])), Some(0));
    assert_eq!(metric(admin, r#"ddpush_tcp_connections{port="push"}"#), 1.0);
}

#[test]
fn acks_and_pushes_on_an_attached_connection_after_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let mut p = srv.pusher();
    for round in 0..3u8 {
        // A fresh connection attaches on its first heartbeat; the previous one is gone.
        let mut t = srv.device_tcp();
        t.write_all(&heartbeat(1)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let body = [b'a' + round; 3];
        assert_eq!(push(&mut p, &up(1, 1, 0x20, &body)), Some(0));
        let mut want = vec![1, 0, 0x20, 0, 3];
        want.extend_from_slice(&body);
        assert_eq!(read_exact_hex(&mut t, want.len()), hex::encode(&want));
        // The ack over TCP clears it: the next heartbeat sends nothing.
        t.write_all(&up(1, 1, 0x20, &[])).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        t.write_all(&heartbeat(1)).unwrap();
        t.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 16];
        assert!(
            t.read(&mut b).is_err(),
            "nothing pending after the TCP ack (round {round})"
        );
    }
}

#[test]
fn the_default_per_ip_cap_admits_a_nat_full_of_devices() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &["--admin-listen", "127.0.0.1:0"]);
    let admin = srv.admin.unwrap();
    // 600 devices behind one address (more than the old cap of 256), all from 127.0.0.1.
    let mut conns: Vec<TcpStream> = (0..600).map(|_| srv.device_tcp()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&up_for(i as u64, 0x00, &[])).unwrap();
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    while metric(admin, r#"ddpush_tcp_connections{port="device"}"#) < 600.0 {
        assert!(Instant::now() < deadline, "all 600 connections accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(admin, "ddpush_tcp_refused_total"), 0.0);
    assert_eq!(metric(admin, "ddpush_clients"), 600.0);
}
