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
