//! Cluster mode against a real Redis Cluster and real ddpushd processes (issue #16).
//!
//! Every test here needs the 3-master + 3-replica cluster that `.ci/redis-cluster.sh run`
//! starts and names in `DDPUSH_TEST_REDIS_CLUSTER`; they are `#[ignore]`d so that
//! `cargo test --workspace` passes on a machine without redis-server, and `.ci/run` runs them
//! with `-- --ignored` inside the launcher:
//!
//!     bash .ci/redis-cluster.sh run cargo test -p ddpushd --test cluster -- --ignored

#[path = "server.rs"]
mod server;
#[path = "cluster_util.rs"]
mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ddpush_proto::cluster::{MemStore, NodeId, StoreOp, StoreReply};
use ddpush_proto::{Kind, PushMsg, Time, Uuid};
use ddpushd::cluster::store::{bucket, RedisStore};
use util::*;

/// The Lua scripts against the core's reference store: the same random operations on both,
/// every reply equal (drains compared as sets of marks, since the order of a bucketed drain
/// differs).
#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn scripts_match_the_reference_store_on_random_operations() {
    let seeds = seeds();
    smol::block_on(async {
        let store = RedisStore::connect(&seeds, store_config(0))
            .await
            .expect("connect to the test cluster");
        let run = run_id();
        let nodes: Vec<NodeId> = ["a", "b", "c"]
            .iter()
            .map(|n| NodeId(format!("{run}-{n}")))
            .collect();
        // 24 uuids over many buckets (first byte) and so over all three masters.
        let uuids: Vec<Uuid> = (0..24u8)
            .map(|i| {
                let mut u = random_uuid();
                u.0[0] = i.wrapping_mul(37);
                u
            })
            .collect();
        let mut mem = MemStore::new();
        let mut rng = Rng(0x5eed_0001 ^ u64::from(std::process::id()));
        let mut at = 1_700_000_000_000u64;
        let mut epochs: BTreeMap<(Uuid, usize), u64> = BTreeMap::new();
        let mut gens: BTreeMap<Uuid, Vec<u64>> = BTreeMap::new();
        let mut compared = [0usize; 4];
        for step in 0..1500 {
            at += rng.below(3);
            let u = uuids[rng.below(uuids.len() as u64) as usize];
            let n = rng.below(3) as usize;
            let op = match rng.below(10) {
                0..=3 => StoreOp::Push {
                    uuid: u,
                    msg: match rng.below(3) {
                        0 => PushMsg::Notify,
                        1 => PushMsg::Bits(rng.next() & rng.next()),
                        _ => PushMsg::Payload(Bytes::from(format!("p{step}\0\u{1}\u{ff}"))),
                    },
                    at: Time(at),
                },
                4..=5 => StoreOp::Bind {
                    uuid: u,
                    node: nodes[n].clone(),
                    at: Time(at),
                },
                6..=8 => {
                    let kind = match rng.below(3) {
                        0 => Kind::Notify,
                        1 => Kind::Bits,
                        _ => Kind::Payload,
                    };
                    let g = gens.get(&u).cloned().unwrap_or_default();
                    let gen = if g.is_empty() || rng.below(4) == 0 {
                        rng.below(5)
                    } else {
                        g[rng.below(g.len() as u64) as usize]
                    };
                    // Mostly the right epoch, sometimes a stale one.
                    let e = epochs.get(&(u, n)).copied().unwrap_or(0);
                    StoreOp::Ack {
                        uuid: u,
                        node: nodes[n].clone(),
                        epoch: if rng.below(5) == 0 { e + 1 } else { e },
                        kind,
                        gen,
                        bits: rng.next() & rng.next(),
                        at: Time(at),
                    }
                }
                _ => StoreOp::Drain {
                    node: nodes[n].clone(),
                    done: Vec::new(),
                    limit: 1000,
                },
            };
            let want = mem.apply(&op);
            let got = store.execute(&op).await.result.expect("store answers");
            match (&want, &got) {
                (
                    StoreReply::Drained { marks: w, more: wm },
                    StoreReply::Drained { marks: g, more: gm },
                ) => {
                    assert_eq!(w, g, "step {step}: drain {op:?}");
                    assert_eq!(wm, gm, "step {step}: drain more");
                    // Acknowledge what was drained on both, as a node does after merging.
                    let done: Vec<(Uuid, u64)> = w.iter().map(|m| (m.uuid, m.ver)).collect();
                    let op = StoreOp::Drain {
                        node: nodes[n].clone(),
                        done,
                        limit: 0,
                    };
                    let w2 = mem.apply(&op);
                    let g2 = store.execute(&op).await.result.expect("store answers");
                    assert_eq!(
                        matches!(w2, StoreReply::Drained { more: true, .. }),
                        matches!(g2, StoreReply::Drained { more: true, .. }),
                        "step {step}: marks left after done"
                    );
                    compared[3] += 1;
                }
                _ => {
                    assert_eq!(want, got, "step {step}: {op:?}");
                    let i = match op {
                        StoreOp::Push { .. } => 0,
                        StoreOp::Ack { .. } => 1,
                        _ => 2,
                    };
                    compared[i] += 1;
                }
            }
            if let StoreReply::Bound(r) = &want {
                epochs.insert((u, n), r.epoch);
            }
            if let StoreReply::Pushed(r) = &want {
                let g = gens.entry(u).or_default();
                g.extend(r.notify);
                g.extend(r.payload.as_ref().map(|p| p.0));
            }
        }
        assert!(
            compared.iter().all(|c| *c > 20),
            "every kind of operation was compared: {compared:?}"
        );
        // Every record the reference holds, Redis holds identically (read back by a bind of
        // a fresh node, which returns the record).
        let probe = NodeId(format!("{run}-probe"));
        for u in &uuids {
            let op = StoreOp::Bind {
                uuid: *u,
                node: probe.clone(),
                at: Time(at),
            };
            assert_eq!(
                mem.apply(&op),
                store.execute(&op).await.result.expect("store answers")
            );
        }
        let used: std::collections::BTreeSet<usize> = uuids.iter().map(bucket).collect();
        assert!(used.len() > 12);
    });
}

/// A drain with a small limit returns at most that many marks, says more remain, and
/// returns every mark exactly once over successive drains that report them done.
#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn drains_page_through_every_mark_once() {
    let seeds = seeds();
    smol::block_on(async {
        let store = RedisStore::connect(&seeds, store_config(0))
            .await
            .expect("connect");
        let run = run_id();
        let owner = NodeId(format!("{run}-owner"));
        let mut want = std::collections::BTreeSet::new();
        for i in 0..40u8 {
            let mut u = random_uuid();
            u.0[0] = i.wrapping_mul(7);
            let bind = StoreOp::Bind {
                uuid: u,
                node: owner.clone(),
                at: Time(1),
            };
            store.execute(&bind).await.result.expect("bind");
            let push = StoreOp::Push {
                uuid: u,
                msg: PushMsg::Notify,
                at: Time(2),
            };
            store.execute(&push).await.result.expect("push");
            want.insert(u);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut done = Vec::new();
        for round in 0..20 {
            let op = StoreOp::Drain {
                node: owner.clone(),
                done: std::mem::take(&mut done),
                limit: 16,
            };
            let Ok(StoreReply::Drained { marks, more }) = store.execute(&op).await.result else {
                panic!("drain failed");
            };
            assert!(marks.len() <= 16);
            for m in &marks {
                assert!(seen.insert(m.uuid), "round {round}: {:?} twice", m.uuid);
                assert!(m.record.notify.is_some());
                done.push((m.uuid, m.ver));
            }
            if !more && marks.is_empty() {
                break;
            }
        }
        assert_eq!(seen, want);
    });
}

fn golden_immediate() -> Vec<String> {
    server::golden()["server_to_device_immediate"]
        .as_array()
        .expect("vectors")
        .iter()
        .map(|v| v["hex"].as_str().expect("hex").to_string())
        .collect()
}

/// Test 1: a push at node B (and at C) for a device on node A is delivered by A at once, with
/// the golden bytes of 0x10, 0x11 and 0x20.
#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn push_at_any_node_is_delivered_by_the_owner_with_the_golden_bytes() {
    let run = run_id();
    let a = Node::start(&format!("{run}-a"), &[]);
    let b = Node::start(&format!("{run}-b"), &[]);
    let c = Node::start(&format!("{run}-c"), &[]);
    let uuid = random_uuid();
    let dev = device_socket();
    let first = bind_at(&dev, &uuid, a.udp);
    assert_eq!(
        first,
        vec!["0101000000"],
        "nothing pending: the heartbeat reply only"
    );
    let want = golden_immediate();
    let reqs: [(u8, Vec<u8>); 3] = [
        (0x10, vec![]),
        (0x11, 5u64.to_be_bytes().to_vec()),
        (0x20, b"hello".to_vec()),
    ];
    let mut latencies = Vec::new();
    for round in 0..10 {
        for (i, (cmd, content)) in reqs.iter().enumerate() {
            let via = if round % 2 == 0 { &b } else { &c };
            let mut p = via.pusher();
            let t = Instant::now();
            assert_eq!(
                push_one(&mut p, &push_req(&uuid, *cmd, content)),
                Some(0x00)
            );
            let got = recv_within(&dev, Duration::from_secs(3))
                .unwrap_or_else(|| panic!("round {round}: no delivery of 0x{cmd:02x}"));
            latencies.push(t.elapsed());
            assert_eq!(got, want[i], "round {round}: golden bytes of 0x{cmd:02x}");
            // The device acks from the socket it heard on, to its node.
            let ack = match cmd {
                0x11 => dev_pkt(&uuid, 1, 0x11, content),
                c => dev_pkt(&uuid, 1, *c, &[]),
            };
            dev.send_to(&ack, a.udp).expect("ack");
        }
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    eprintln!("push at a non-owner -> delivery: p50 {p50:?}, max {max:?}");
    assert!(
        p50 <= Duration::from_millis(100),
        "p50 {p50:?} above 100 ms"
    );
    // The acks cleared everything: the next heartbeat gets only the reply.
    std::thread::sleep(Duration::from_millis(300));
    dev.send_to(&dev_pkt(&uuid, 1, 0, &[]), a.udp).expect("hb");
    assert_eq!(
        recv_within(&dev, Duration::from_secs(2)).as_deref(),
        Some("0101000000")
    );
    let s = b.status();
    assert!(s["pokes"]["sent"].as_u64() >= Some(15), "{s}");
    assert!(a.status()["pokes"]["received"].as_u64() >= Some(15));
    assert_eq!(a.status()["owned"], 1);
    assert!(b.status()["peers_up"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
}

/// Test 6: steady heartbeats, NAT rebinds (a new source port each time) and the re-sends
/// they trigger cost zero Redis commands. (The periodic drain is moved out of the window:
/// it is the one timer that talks to the store.)
#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn heartbeats_and_nat_rebinds_cause_zero_redis_commands() {
    let run = run_id();
    let a = Node::start(&format!("{run}-a"), &["--cluster-drain-interval", "1h"]);
    let uuid = random_uuid();
    let dev = device_socket();
    bind_at(&dev, &uuid, a.udp);
    let mut p = a.pusher();
    assert_eq!(push_one(&mut p, &push_req(&uuid, 0x10, &[])), Some(0x00));
    assert_eq!(
        recv_within(&dev, Duration::from_secs(2)).as_deref(),
        Some("0100100000")
    );
    // Let the node's start-up traffic (first drain, bind, push) settle.
    std::thread::sleep(Duration::from_millis(500));
    let before = redis_commands();
    for i in 0..20 {
        // Half from the bound socket, half from fresh sockets (a NAT rebind each).
        let s = if i % 2 == 0 {
            device_socket()
        } else {
            dev.try_clone().expect("clone")
        };
        s.send_to(&dev_pkt(&uuid, 1, 0x00, &[]), a.udp).expect("hb");
        assert_eq!(
            recv_within(&s, Duration::from_secs(2)).as_deref(),
            Some("0101100000"),
            "heartbeat {i}: the pending 0x10 is re-sent to the heartbeat's source"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = redis_commands();
    assert_eq!(
        after - before,
        0,
        "Redis commands during 20 heartbeats and 10 rebinds"
    );
    let s = a.status();
    assert!(s["heartbeats"].as_u64() >= Some(21), "{s}");
    // The count does see what ddpushd sends: one push is at least one command.
    assert_eq!(
        push_one(&mut p, &push_req(&uuid, 0x11, &1u64.to_be_bytes())),
        Some(0x00)
    );
    assert!(
        redis_commands() > after,
        "a push shows in INFO commandstats"
    );
}

/// Runs `ddpushd ARGS` expecting it to refuse to start; returns (exit code, stderr).
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ddpushd"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let t = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("ddpushd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const LOCAL: [&str; 8] = [
    "--listen",
    "127.0.0.1:0",
    "--push-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "none",
    "--peer-listen",
    "127.0.0.1:0",
];

fn with_local<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = LOCAL.to_vec();
    v.extend_from_slice(extra);
    v
}

/// Test 7 (flags): every bad cluster setting is refused by name, before anything starts.
#[test]
fn bad_cluster_flags_are_refused_by_name() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--cluster-redis", "redis://127.0.0.1:7000"],
            "needs --node-id",
        ),
        (&["--node-id", "a"], "--node-id is a cluster setting"),
        (
            &["--cluster-redis", "http://127.0.0.1:7000", "--node-id", "a"],
            "redis://",
        ),
        (
            &[
                "--cluster-redis",
                "redis://127.0.0.1:7000",
                "--node-id",
                "a b",
            ],
            "--node-id \"a b\"",
        ),
        (
            &[
                "--cluster-redis",
                "redis://127.0.0.1:7000",
                "--node-id",
                "a",
                "--peer-listen",
                "0.0.0.0:9967",
            ],
            "--cluster-secret",
        ),
        (
            &[
                "--cluster-redis",
                "redis://127.0.0.1:7000",
                "--node-id",
                "a",
                "--cluster-wait-fail",
                "maybe",
            ],
            "--cluster-wait-fail",
        ),
        (
            &[
                "--cluster-redis",
                "redis://127.0.0.1:7000",
                "--node-id",
                "a",
                "--cluster-wait-timeout",
                "1s",
            ],
            "shorter than --cluster-store-timeout",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec![
            "--listen",
            "127.0.0.1:0",
            "--push-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "none",
        ];
        all.extend_from_slice(args);
        let (code, err) = refused(&all);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    }
}

/// Test 7 (unreachable store): a clear error and a non-zero exit; with
/// --cluster-start-degraded the node runs, is not ready, and answers pushes 0xFF.
#[test]
fn an_unreachable_redis_at_start_is_refused_unless_degraded_start_is_asked_for() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let url = format!("redis://127.0.0.1:{port}");
    let (code, err) = refused(&with_local(&["--cluster-redis", &url, "--node-id", "a"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unreachable") && err.contains(&url), "{err}");
    assert!(err.contains("--cluster-start-degraded"), "{err}");
    let args: Vec<String> = with_local(&[
        "--cluster-redis",
        &url,
        "--node-id",
        "a",
        "--cluster-start-degraded",
        "true",
    ])
    .iter()
    .map(|s| s.to_string())
    .map(|s| if s == "none" { "127.0.0.1:0".into() } else { s })
    .collect();
    let n = Node::start_args("a", args).expect("degraded start");
    let (code, body) = http_get(n.admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(r#""store_connected":false"#), "{body}");
    let mut p = n.pusher();
    let u = random_uuid();
    assert_eq!(
        push_one(&mut p, &push_req(&u, 0x10, &[])),
        Some(0xFF),
        "never 0x00 without the store"
    );
    assert_eq!(
        push_one(&mut p, &push_req(&u, 0x30, &[])),
        Some(0x01),
        "malformed is still 0x01"
    );
}

/// Test 7 (not a cluster): a plain Redis server is refused by name.
#[test]
#[ignore = "needs redis-server"]
fn a_redis_without_cluster_mode_is_refused_by_name() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let dir = tempfile::tempdir().expect("dir");
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let t = Instant::now();
    while redis_cli(&format!("127.0.0.1:{port}"), &["ping"]).trim() != "PONG" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("redis://127.0.0.1:{port}");
    let (code, err) = refused(&with_local(&["--cluster-redis", &url, "--node-id", "a"]));
    let _ = redis.kill();
    let _ = redis.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("without cluster mode") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// Test 7 (peer port): garbage and a peer with the wrong secret are refused with a clear
/// message; pushes through the refused link still arrive (by the dirty marks).
#[test]
#[ignore = "needs the Redis Cluster of .ci/redis-cluster.sh"]
fn garbage_and_a_wrong_secret_on_the_peer_port_are_refused_and_nothing_is_lost() {
    let run = run_id();
    let secret = "correct-horse-battery-staple";
    let a = Node::start(
        &format!("{run}-a"),
        &[
            "--cluster-secret",
            secret,
            "--cluster-drain-interval",
            "200ms",
        ],
    );
    // Garbage: an HTTP request, then a frame of the wrong version.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &b"DDPK\x09\x00\x00\x00\x01\x01"[..],
    ] {
        let mut s = TcpStream::connect(a.peer).expect("connect");
        s.write_all(junk).expect("write");
        let mut buf = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.read_to_end(&mut buf);
        assert!(
            String::from_utf8_lossy(&buf).contains(if junk[0] == b'G' {
                "not a ddpushd peer"
            } else {
                "version 9"
            }),
            "the refusal names the problem: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    a.wait_log("peer connection refused", Duration::from_secs(5))
        .expect("A logs the refusal");
    let b = Node::start(
        &format!("{run}-b"),
        &["--cluster-secret", "a-different-secret-value"],
    );
    let uuid = random_uuid();
    let dev = device_socket();
    bind_at(&dev, &uuid, a.udp);
    let mut p = b.pusher();
    assert_eq!(
        push_one(&mut p, &push_req(&uuid, 0x20, b"hello")),
        Some(0x00)
    );
    b.wait_log("wrong --cluster-secret", Duration::from_secs(5))
        .expect("B logs that A refused its secret");
    a.wait_log("wrong --cluster-secret", Duration::from_secs(5))
        .expect("A logs the wrong secret");
    // No poke got through, yet the push arrives: A drains its dirty marks.
    assert_eq!(
        recv_within(&dev, Duration::from_secs(5)).as_deref(),
        Some("010020000568656c6c6f")
    );
    let s = a.status();
    assert_eq!(s["pokes"]["received"], 0, "{s}");
    assert!(s["peer_refused"].as_u64() >= Some(3), "{s}");
    assert!(s["dirty_drained"].as_u64() >= Some(1), "{s}");
}
