//! Helpers of the cluster tests: the test cluster's addresses, ids that never collide across
//! runs (the cluster outlives a test run), and a small seeded random source.

#![allow(dead_code)]

use std::time::Duration;

use ddpush_proto::Uuid;
use ddpushd::cluster::store::{StoreConfig, WaitFail};

/// The seeds exported by `.ci/redis-cluster.sh`.
pub fn seeds() -> String {
    std::env::var("DDPUSH_TEST_REDIS_CLUSTER").expect(
        "DDPUSH_TEST_REDIS_CLUSTER is not set: run these tests inside \
         `bash .ci/redis-cluster.sh run cargo test -p ddpushd --test cluster -- --ignored`",
    )
}

/// Each seed as host:port.
pub fn seed_addrs() -> Vec<String> {
    seeds()
        .split(',')
        .map(|s| s.trim_start_matches("redis://").to_string())
        .collect()
}

pub fn store_config(wait_replicas: u32) -> StoreConfig {
    StoreConfig {
        pending_ttl: Duration::from_secs(30 * 86400),
        wait_replicas,
        wait_timeout: Duration::from_millis(200),
        wait_fail: WaitFail::Ff,
        op_timeout: Duration::from_secs(2),
    }
}

fn os_random() -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut b).expect("random bytes");
    b
}

/// A name unique to this run, for node ids and keys.
pub fn run_id() -> String {
    let b = os_random();
    format!("t{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

pub fn random_uuid() -> Uuid {
    Uuid(os_random())
}

/// xorshift64*: reproducible operation sequences from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
