//! End-to-end tests of the library API (Pusher, AsyncPusher, Device) against a real
//! `ddpushd` on loopback.

mod common;

use std::time::Duration;

use common::{Server, STEP};
use ddpush_client::{
    AsyncPusher, Content, Device, DeviceEvent, DownMsg, PushOutcome, PushRequest, PushRequestExt,
    Pusher, PusherConfig, Uuid,
};

fn config() -> PusherConfig {
    PusherConfig {
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        window: 32,
    }
}

#[test]
fn pusher_pipelines_over_one_connection() {
    let server = Server::start();
    let mut pusher = Pusher::with_config(server.push_addr(), config());
    let reqs: Vec<_> = (0..500)
        .map(|i| PushRequest::text(Uuid::from_user(&format!("u{i}")), &format!("m{i}")).unwrap())
        .collect();
    let mut order = Vec::new();
    pusher
        .push_many_with(&reqs, |i, o| order.push((i, o)))
        .unwrap();
    assert_eq!(order.len(), 500);
    assert!(order
        .iter()
        .enumerate()
        .all(|(k, &(i, o))| k == i && o == PushOutcome::Accepted));
    assert!(pusher.is_connected(), "the connection is kept");
    // The pushes were stored: u7 gets its payload on its first heartbeat.
    let d = Device::builder(server.udp, Uuid::from_user("u7"))
        .start()
        .unwrap();
    let p = d.recv(STEP).expect("payload");
    assert_eq!(p.msg, DownMsg::Payload(Content::from_static(b"m7")));
}

#[test]
fn pusher_reports_closed_never_accepted_and_recovers() {
    let server = Server::start();
    let u = Uuid::from_user("erin");
    let mut pusher = Pusher::with_config(server.push_addr(), config());
    let over = PushRequest::payload(u, vec![b'x'; 501]).unwrap();
    // Alone: the server closes at the header; no reply is ever read, so no success.
    assert_eq!(pusher.push(&over).unwrap(), PushOutcome::Closed);
    assert!(!pusher.is_connected());
    // The next push reconnects.
    assert_eq!(
        pusher.push(&PushRequest::notify(u)).unwrap(),
        PushOutcome::Accepted
    );
    // Pipelined: the oversized one is closed; the ones after it go out again on a new
    // connection and are accepted; a malformed one (0x20 with N = 0) is rejected.
    let empty = PushRequest::payload(u, Vec::new()).unwrap();
    let reqs = vec![
        PushRequest::bits(u, 1),
        over.clone(),
        PushRequest::bits(u, 2),
        empty,
        PushRequest::text(u, "after").unwrap(),
    ];
    assert_eq!(
        pusher.push_many(&reqs).unwrap(),
        vec![
            PushOutcome::Accepted,
            PushOutcome::Closed,
            PushOutcome::Accepted,
            PushOutcome::Rejected,
            PushOutcome::Accepted,
        ]
    );
    let d = Device::builder(server.udp, u).start().unwrap();
    assert_eq!(d.recv(STEP).unwrap().msg, DownMsg::Notify);
    assert_eq!(d.recv(STEP).unwrap().msg, DownMsg::Bits(3));
    assert_eq!(
        d.recv(STEP).unwrap().msg,
        DownMsg::Payload(Content::from_static(b"after"))
    );
}

#[test]
fn pusher_replaces_a_connection_the_server_closed_while_idle() {
    let server = Server::start_with(&["--push-tcp-idle", "1s"]);
    let u = Uuid::from_user("frank");
    let mut pusher = Pusher::with_config(server.push_addr(), config());
    assert_eq!(
        pusher.push(&PushRequest::notify(u)).unwrap(),
        PushOutcome::Accepted
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        pusher.push(&PushRequest::bits(u, 8)).unwrap(),
        PushOutcome::Accepted,
        "a stale connection is noticed and replaced before the push; server log:\n{}",
        server.log()
    );
}

#[test]
fn pusher_connect_error_is_an_error_not_a_verdict() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut pusher = Pusher::with_config(addr, config());
    assert!(pusher
        .push(&PushRequest::notify(Uuid::from_user("x")))
        .is_err());
}

#[test]
fn async_pusher_pipelines_and_reports_closed() {
    let server = Server::start();
    let u = Uuid::from_user("grace");
    let outcomes = smol::block_on(async {
        let mut pusher = AsyncPusher::with_config(server.push_addr(), config());
        let mut reqs: Vec<_> = (0..200)
            .map(|i| PushRequest::bits(u, 1 << (i % 64)))
            .collect();
        reqs.push(PushRequest::payload(u, vec![0; 501]).unwrap());
        reqs.push(PushRequest::text(u, "last").unwrap());
        let many = pusher.push_many(&reqs).await.unwrap();
        let one = pusher.push(&PushRequest::notify(u)).await.unwrap();
        (many, one)
    });
    let (many, one) = outcomes;
    assert!(many[..200].iter().all(|o| o.is_accepted()));
    assert_eq!(many[200], PushOutcome::Closed);
    assert_eq!(many[201], PushOutcome::Accepted);
    assert_eq!(one, PushOutcome::Accepted);
}

fn device_round_trip(tcp: bool) {
    // With heartbeat replies on, the reply to the first heartbeat proves the server has
    // recorded the device as online (over TCP no reply is ever sent, so wait a little).
    let server = Server::start_with(&["--heartbeat-reply", "always"]);
    let u = Uuid::from_user(if tcp { "heidi-tcp" } else { "heidi-udp" });
    let addr = if tcp { server.tcp.unwrap() } else { server.udp };
    let mut b = Device::builder(addr, u).app_id(3);
    if tcp {
        b = b.tcp();
    }
    let d = b.start().unwrap();
    if tcp {
        wait_until(|| d.heartbeats_sent() > 0);
        std::thread::sleep(Duration::from_millis(300));
    } else {
        let p = d.recv(STEP).expect("heartbeat reply");
        assert_eq!((p.app_id, p.msg), (3, DownMsg::HeartbeatReply));
    }
    let mut pusher = Pusher::with_config(server.push_addr(), config());
    assert!(pusher.push(&PushRequest::bits(u, 5)).unwrap().is_accepted());
    let p = d.recv(STEP).expect("immediate push");
    assert_eq!(p.app_id, 0, "an immediate push has appId 0");
    assert_eq!(p.msg, DownMsg::Bits(5));
    assert!(pusher
        .push(&PushRequest::text(u, "hi").unwrap())
        .unwrap()
        .is_accepted());
    assert_eq!(
        d.recv(STEP).unwrap().msg,
        DownMsg::Payload(Content::from_static(b"hi"))
    );
    // Both were acked at once: a heartbeat now brings nothing pending back.
    wait_until(|| d.acks_sent() >= 2);
    std::thread::sleep(Duration::from_millis(200));
    d.heartbeat_now();
    let next = d.recv(Duration::from_millis(700));
    if tcp {
        assert_eq!(next, None);
    } else {
        assert_eq!(next.map(|p| p.msg), Some(DownMsg::HeartbeatReply));
    }
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + STEP;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn device_over_udp_receives_and_acks() {
    device_round_trip(false);
}

#[test]
fn device_over_tcp_receives_and_acks() {
    device_round_trip(true);
}

#[test]
fn device_over_tcp_reconnects_after_the_server_closes() {
    // The server drops idle device connections after 1 s; the device (interval 30 s) sees
    // the close, and reconnects 1 s later.
    let server = Server::start_with(&["--device-tcp-idle", "1s"]);
    let u = Uuid::from_user("ivan");
    let d = Device::builder(server.tcp.unwrap(), u)
        .tcp()
        .interval(Duration::from_secs(30))
        .start()
        .unwrap();
    let first = d.wait_connected(STEP).unwrap();
    let mut saw_error = false;
    let second = loop {
        match d.recv_event(STEP).expect("an event") {
            DeviceEvent::Error(_) => saw_error = true,
            DeviceEvent::Connected(a) => break a,
            _ => {}
        }
    };
    assert!(saw_error, "a close is reported before the reconnect");
    assert_ne!(first, second, "a new connection");
    // The new connection's heartbeat attaches it: a push arrives on it (at once, or on a
    // heartbeat if the push overtook the attaching one).
    wait_until(|| d.heartbeats_sent() >= 2);
    std::thread::sleep(Duration::from_millis(200));
    let mut pusher = Pusher::with_config(server.push_addr(), config());
    assert!(pusher.push(&PushRequest::notify(u)).unwrap().is_accepted());
    let p = d.recv(Duration::from_secs(2)).or_else(|| {
        d.heartbeat_now();
        d.recv(STEP)
    });
    assert_eq!(p.unwrap().msg, DownMsg::Notify);
}

#[test]
fn device_over_udp_makes_a_new_socket_after_an_error() {
    // Nothing listens on the port: the ICMP "port unreachable" surfaces as a socket error,
    // and the device makes a new socket (a new source port) after the retry delay.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let d = Device::builder(port, Uuid::from_user("judy"))
        .retry_delay(Duration::from_millis(200))
        .start()
        .unwrap();
    let first = d.wait_connected(STEP).unwrap();
    let mut saw_error = false;
    let second = loop {
        match d.recv_event(STEP).expect("an event") {
            DeviceEvent::Error(_) => saw_error = true,
            DeviceEvent::Connected(a) => break a,
            _ => {}
        }
    };
    assert!(saw_error);
    assert_ne!(
        first.port(),
        second.port(),
        "a new socket, a new source port"
    );
}

#[test]
fn device_heartbeats_at_once_then_every_interval() {
    let server = Server::start();
    let u = Uuid::from_user("kim");
    let mut pusher = Pusher::with_config(server.push_addr(), config());
    assert!(pusher
        .push(&PushRequest::text(u, "stored").unwrap())
        .unwrap()
        .is_accepted());
    let d = Device::builder(server.udp, u)
        .interval(Duration::from_millis(300))
        .start()
        .unwrap();
    // Delivered on the first heartbeat, sent right after start.
    assert_eq!(
        d.recv(STEP).unwrap().msg,
        DownMsg::Payload(Content::from_static(b"stored"))
    );
    std::thread::sleep(Duration::from_millis(1000));
    let n = d.heartbeats_sent();
    assert!(
        (3..=6).contains(&n),
        "{n} heartbeats in about 1 s at 300 ms"
    );
}
