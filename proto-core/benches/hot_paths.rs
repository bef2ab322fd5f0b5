//! Micro-benchmarks of the core's hot paths (divan): `cargo bench -p ddpush-proto`.
//!
//! The node holds 100,000 online clients, so hash lookups miss the cache as they do in a
//! loaded server. `DDPUSH_BENCH_CLIENTS=5000` runs them with the whole-server signed bench's
//! fleet instead (everything then fits the CPU's L2, as it does there).

use std::net::SocketAddr;

use ddpush_proto::{
    Config, Content, DeviceMsg, DevicePacket, Node, PushMsg, PushRequest, ReplyPolicy, Time, Uuid,
    RECORD_SIZE,
};
use divan::{black_box, Bencher};

/// Online clients of the benched node.
fn clients() -> u64 {
    static N: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("DDPUSH_BENCH_CLIENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(100_000)
    })
}

fn uuid(i: u64) -> Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(b"ddpbench");
    b[8..].copy_from_slice(&i.to_be_bytes());
    Uuid(b)
}

fn hb(i: u64) -> Vec<u8> {
    let mut v = Vec::new();
    DevicePacket {
        app_id: 1,
        uuid: uuid(i),
        msg: DeviceMsg::Heartbeat,
    }
    .encode(&mut v);
    v
}

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + (i % 50_000) as u16))
}

fn node(policy: ReplyPolicy) -> Node {
    let mut cfg = Config {
        reply_policy: policy,
        ..Config::default()
    };
    cfg.limits.enabled = false;
    let mut n = Node::new(cfg).expect("valid config");
    let now = Time::from_secs(1_000_000);
    for i in 0..clients() {
        n.handle_udp(now, addr(i), &hb(i));
    }
    drain(&mut n);
    n
}

fn drain(n: &mut Node) {
    while n.poll_change().is_some() {}
    while n.poll_transmit().is_some() {}
    while n.poll_event().is_some() {}
}

fn main() {
    let n = node(ReplyPolicy::Never);
    eprintln!(
        "record: {RECORD_SIZE} B inline; node heap with {} clients: {:.1} B/client",
        clients(),
        n.heap_bytes() as f64 / clients() as f64
    );
    let mut k = node(ReplyPolicy::Never);
    let before = k.heap_bytes();
    let now = Time::from_secs(1_000_001);
    for i in 0..clients() {
        let _ = k.set_key(
            now,
            uuid(i),
            1,
            ddpush_proto::signed::DeviceKey::new([7; 32]),
            std::time::Duration::ZERO,
        );
    }
    eprintln!(
        "keys: {:.1} B per client with a key",
        (k.heap_bytes() - before) as f64 / clients() as f64
    );
    drop(k);
    divan::main();
}

#[divan::bench]
fn decode_heartbeat(b: Bencher) {
    let p = hb(42);
    b.bench(|| DevicePacket::decode(black_box(&p)));
}

/// A heartbeat from a known client with nothing pending, policy `always` (one reply out).
#[divan::bench]
fn heartbeat_nothing_pending(b: Bencher) {
    let mut n = node(ReplyPolicy::Always);
    let c = clients();
    let pkts: Vec<Vec<u8>> = (0..1024).map(|i| hb(i * 97 % c)).collect();
    let mut i = 0usize;
    let now = Time::from_secs(1_000_001);
    b.bench_local(|| {
        i = (i + 1) & 1023;
        let k = (i as u64) * 97 % c;
        n.handle_udp(now, addr(k), &pkts[i]);
        while let Some(t) = n.poll_transmit() {
            black_box(t);
        }
    });
}

/// A 0x20 push to an online client: stored, journaled, sent at once.
#[divan::bench]
fn push_to_online_client(b: Bencher) {
    let mut n = node(ReplyPolicy::Never);
    let payload = Content::from_static(b"hello, this is a push");
    let mut i = 0u64;
    let now = Time::from_secs(1_000_001);
    let c = clients();
    b.bench_local(|| {
        i = (i + 7919) % c;
        let r = n.handle_push(
            now,
            PushRequest {
                app_id: 1,
                uuid: uuid(i),
                msg: PushMsg::Payload(payload.clone()),
            },
        );
        drain(&mut n);
        black_box(r)
    });
}

/// The size of one client record (reported, not timed in any useful sense).
#[divan::bench]
fn record_size() -> usize {
    black_box(RECORD_SIZE)
}

/// A node whose 100,000 clients all have key 1 (`[7; 32]`), and device `i`'s signed heartbeat
/// with `nonce`, stamped with the node's clock.
fn keyed_node() -> (Node, Time) {
    let mut n = node(ReplyPolicy::Always);
    let now = Time::from_secs(1_000_001);
    for i in 0..clients() {
        let _ = n.set_key(now, uuid(i), 1, bench_key(), std::time::Duration::ZERO);
    }
    drain(&mut n);
    (n, now)
}

fn bench_key() -> ddpush_proto::signed::DeviceKey {
    ddpush_proto::signed::DeviceKey::new([7; 32])
}

fn signed_hb(i: u64, nonce: u32, now: Time, key: &impl ddpush_proto::signed::MacKey) -> Vec<u8> {
    ddpush_proto::testing::signed_heartbeat(uuid(i), key, 1, now.secs32(), nonce)
}

/// Signed devices (PROTOCOL.md 9): every client keyed, nothing pending, policy `always`, so
/// the sealed reply is computed too. The device-side signing is inside the loop (each packet
/// needs a fresh nonce); `sign_heartbeat` measures it alone, to subtract.
#[divan::bench]
fn heartbeat_signed_nothing_pending(b: Bencher) {
    let (mut n, now) = keyed_node();
    let key = bench_key();
    let mut i = 0u64;
    let mut nonce = 0u32;
    b.bench_local(|| {
        i = (i + 97) % clients();
        nonce = nonce.wrapping_add(1);
        n.handle_udp(now, addr(i), &signed_hb(i, nonce, now, &key));
        while let Some(t) = n.poll_transmit() {
            black_box(t);
        }
    });
}

/// The same as `heartbeat_signed_nothing_pending`, the server's side only: the signed packets
/// are made outside the timed part (divan's inputs), so this is what the node spends on a
/// signed heartbeat and its sealed reply, to compare with `heartbeat_nothing_pending`.
#[divan::bench]
fn heartbeat_signed_server_only(b: Bencher) {
    let (mut n, now) = keyed_node();
    let keyed = ddpush_proto::signed::KeyedMac::new(&bench_key());
    let mut i = 0u64;
    let mut nonce = 0u32;
    b.with_inputs(|| {
        i = (i + 97) % clients();
        nonce = nonce.wrapping_add(1);
        (addr(i), signed_hb(i, nonce, now, &keyed))
    })
    .bench_local_values(|(a, pkt)| {
        n.handle_udp(now, a, &pkt);
        while let Some(t) = n.poll_transmit() {
            black_box(t);
        }
    });
}

/// Datagrams per receive batch in the `*_batch64` benches (the server's `recvmmsg` batch).
const BATCH: u64 = 64;

/// Hands `BATCH` heartbeats per iteration to the node, made by `make(i)` outside the timed
/// part, either as one batch ([`Node::handle_udp_batch`], as the server does) or one by one.
/// Before each batch (untimed) 4 MiB are read, twice this CPU's L2: in the server the
/// kernel's receive and send paths run between two batches and leave little of the node's
/// memory in the core's caches (docs/BENCHMARKS.md, the server's profile).
fn batch64(b: Bencher, mut n: Node, batched: bool, mut make: impl FnMut(u64) -> Vec<u8>) {
    let now = Time::from_secs(1_000_001);
    let mut i = 0u64;
    let evict: Vec<u8> = (0..4u32 << 20).map(|x| x as u8).collect();
    b.counter(divan::counter::ItemsCount::new(BATCH))
        .with_inputs(|| {
            black_box(evict.chunks(64).map(|l| l[0]).fold(0u8, u8::wrapping_add));
            (0..BATCH)
                .map(|_| {
                    i = (i + 97) % clients();
                    (addr(i), make(i))
                })
                .collect::<Vec<_>>()
        })
        .bench_local_values(|pkts| {
            let batch: Vec<(SocketAddr, &[u8])> =
                pkts.iter().map(|(a, p)| (*a, p.as_slice())).collect();
            if batched {
                n.handle_udp_batch(now, &batch);
            } else {
                for &(a, p) in &batch {
                    n.handle_udp(now, a, p);
                }
            }
            while let Some(t) = n.poll_transmit() {
                black_box(t);
            }
        });
}

/// Every client keyed, each heartbeat signed with the next nonce, handed in by [`batch64`].
fn signed_batch64(b: Bencher, batched: bool) {
    let (n, now) = keyed_node();
    let keyed = ddpush_proto::signed::KeyedMac::new(&bench_key());
    let mut nonce = 0u32;
    batch64(b, n, batched, |i| {
        nonce = nonce.wrapping_add(1);
        signed_hb(i, nonce, now, &keyed)
    });
}

/// 64 signed heartbeats as one receive batch: the keyring entries of the batch are loaded
/// together before the first is checked, so their misses overlap. Compare with
/// `heartbeat_signed_one_by_one_batch64` (the same packets through `handle_udp`) and
/// `heartbeat_unsigned_batch64`; per heartbeat is the time divided by 64.
#[divan::bench]
fn heartbeat_signed_batch64(b: Bencher) {
    signed_batch64(b, true);
}

/// `heartbeat_signed_batch64`'s packets, each through `handle_udp` (no batch).
#[divan::bench]
fn heartbeat_signed_one_by_one_batch64(b: Bencher) {
    signed_batch64(b, false);
}

/// 64 v1 heartbeats as one receive batch (nothing is loaded ahead for v1 packets).
#[divan::bench]
fn heartbeat_unsigned_batch64(b: Bencher) {
    batch64(b, node(ReplyPolicy::Always), true, hb);
}

/// `heartbeat_nothing_pending` measured as `heartbeat_signed_server_only` is: the same walk
/// over all 100,000 clients (so the same cache misses) and packets made outside the timed
/// part. The signed bench minus this one is what signing adds in the core.
#[divan::bench]
fn heartbeat_unsigned_server_only(b: Bencher) {
    let (mut n, now) = (node(ReplyPolicy::Always), Time::from_secs(1_000_001));
    let mut i = 0u64;
    b.with_inputs(|| {
        i = (i + 97) % clients();
        (addr(i), hb(i))
    })
    .bench_local_values(|(a, pkt)| {
        n.handle_udp(now, a, &pkt);
        while let Some(t) = n.poll_transmit() {
            black_box(t);
        }
    });
}

/// What a signed device spends on one heartbeat (and what the signed bench above includes).
#[divan::bench]
fn sign_heartbeat(b: Bencher) {
    use ddpush_proto::signed::{device_to_vec, DeviceKey, Seal};
    let key = DeviceKey::new([7; 32]);
    let p = DevicePacket {
        app_id: 1,
        uuid: uuid(1),
        msg: DeviceMsg::Heartbeat,
    };
    let mut nonce = 0u32;
    b.bench_local(|| {
        nonce = nonce.wrapping_add(1);
        let seal = Seal {
            key_id: 1,
            ts: 1_000_001,
            nonce,
        };
        device_to_vec(black_box(&p), seal, &key)
    });
}

/// The server's MAC work on a signed heartbeat alone: parse and verify the tag under the
/// pre-keyed current key (no keyring, no node).
#[divan::bench]
fn verify_heartbeat_tag(b: Bencher) {
    let keyed = ddpush_proto::signed::KeyedMac::new(&bench_key());
    let pkt = signed_hb(1, 1, Time::from_secs(1_000_001), &keyed);
    b.bench_local(|| {
        let f = ddpush_proto::signed::SignedFrame::parse(black_box(&pkt)).expect("valid");
        f.verify(&keyed)
    });
}

/// The server's MAC work on the sealed heartbeat reply alone.
#[divan::bench]
fn seal_reply(b: Bencher) {
    use ddpush_proto::signed::{Seal, SealedDown};
    let keyed = ddpush_proto::signed::KeyedMac::new(&bench_key());
    let mut nonce = 0u32;
    b.bench_local(|| {
        nonce = nonce.wrapping_add(1);
        let p = ddpush_proto::DownPacket {
            app_id: 1,
            msg: ddpush_proto::DownMsg::HeartbeatReply,
        };
        let seal = Seal {
            key_id: 1,
            ts: 1_000_001,
            nonce,
        };
        SealedDown::new(black_box(p), seal, &keyed).tag
    });
}

/// Two SHA-256 compressions (what one tag under a pre-keyed key costs at least), to read the
/// two benches above against.
#[divan::bench]
fn sha256_two_blocks(b: Bencher) {
    let mut st = [0x6a09e667u32; 8];
    let blk = [sha2::digest::generic_array::GenericArray::from([7u8; 64])];
    b.bench_local(|| {
        sha2::compress256(black_box(&mut st), black_box(&blk));
        sha2::compress256(black_box(&mut st), black_box(&blk));
    });
}
