//! Abuse limits: per-source datagram rate, per-uuid answer rate, and the amplification bound.
//!
//! A heartbeat is 21 bytes with a spoofable source address, and the answer can be 500 bytes of
//! payload. As QUIC does for unvalidated addresses (RFC 9000 section 8), we bound what
//! heartbeat-driven traffic may send toward one IP address by what that address sent us:
//! `sent <= factor * received + burst` (plus `burst` regained every `burst_period`). Pushes from
//! app servers are not counted: they are not attacker-driven.
//!
//! Both modes apply them through one [`Guard`] (with the TCP connection bounds and
//! `max_clients`), so a limit means the same on a single node and on a cluster node.
//!
//! State lives in fixed-size tables indexed by a keyed hash, so memory is bounded whatever the
//! number of sources; two keys that share a slot share a budget, which errs toward limiting.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use foldhash::fast::FixedState;
use hashbrown::HashMap;

use crate::counters::{counter_key, CounterKey};
use crate::node::Port;
use crate::time::Time;

/// Configurable abuse limits; the defaults leave normal traffic untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Master switch (tests of raw behaviour turn it off).
    pub enabled: bool,
    /// Datagrams per second accepted from one source IP, sustained.
    pub source_rate: u32,
    /// Datagrams accepted from one source IP in a burst.
    pub source_burst: u32,
    /// Heartbeat answers per second for one uuid, sustained.
    pub uuid_rate: u32,
    /// Heartbeat answers for one uuid in a burst.
    pub uuid_burst: u32,
    /// Heartbeat-triggered bytes sent per byte received from an IP.
    pub amp_factor: u32,
    /// Bytes an IP may be sent beyond `amp_factor` times what it sent.
    pub amp_burst: u32,
    /// How often `amp_burst` is regained.
    pub amp_period: Duration,
    /// Slots in each limiter table (rounded up to a power of two).
    pub table_size: usize,
    /// Concurrent TCP connections from one IP, per port (docs/SECURITY.md says why 4096: a
    /// carrier or office NAT puts thousands of devices behind one address).
    pub conns_per_ip: u32,
    /// Concurrent TCP connections in all.
    pub max_conns: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            enabled: true,
            source_rate: 5_000,
            source_burst: 10_000,
            uuid_rate: 5,
            uuid_burst: 20,
            amp_factor: 3,
            amp_burst: 16 * 1024,
            amp_period: Duration::from_secs(10),
            table_size: 1 << 16,
            conns_per_ip: 4096,
            max_conns: 100_000,
        }
    }
}

/// A token bucket in milli-tokens, refilled lazily from the last time it was touched.
#[derive(Clone, Copy, Default)]
struct Bucket {
    tag: u32,
    milli: u64,
    last_ms: u64,
}

impl Bucket {
    fn refill(&mut self, now: Time, rate_per_s: u64, cap_milli: u64) {
        let dt = now.0.saturating_sub(self.last_ms);
        self.milli = (self.milli + dt.saturating_mul(rate_per_s)).min(cap_milli);
        self.last_ms = self.last_ms.max(now.0);
    }
}

/// One table of buckets keyed by a 64-bit hash.
struct Table {
    slots: Vec<Bucket>,
    mask: usize,
}

impl Table {
    fn new(size: usize) -> Self {
        let n = size.max(1).next_power_of_two();
        Table {
            slots: Vec::new(),
            mask: n - 1,
        }
    }

    /// The bucket for `hash`, reset to full when the slot last held another key.
    fn get(&mut self, hash: u64, now: Time, cap_milli: u64) -> &mut Bucket {
        if self.slots.is_empty() {
            // Allocated on first use so a node with limits off or idle pays nothing.
            self.slots = vec![Bucket::default(); self.mask + 1];
        }
        let i = (hash as usize) & self.mask;
        let tag = (hash >> 32) as u32 | 1;
        let b = &mut self.slots[i];
        if b.tag != tag {
            *b = Bucket {
                tag,
                milli: cap_milli,
                last_ms: now.0,
            };
        }
        b
    }
}

/// Why a datagram or an answer was held back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limited {
    /// The source IP exceeded its datagram rate.
    SourceRate,
    /// The uuid exceeded its heartbeat-answer rate.
    UuidRate,
    /// Answering would exceed the amplification bound toward the source IP.
    Amplification,
}

counter_key!(Limited {
    SourceRate,
    UuidRate,
    Amplification
});

impl Limited {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Limited::SourceRate => "source_rate",
            Limited::UuidRate => "uuid_rate",
            Limited::Amplification => "amplification",
        }
    }
}

/// The limiter state of a node.
pub(crate) struct Limiter {
    cfg: Limits,
    seed: u64,
    sources: Table,
    uuids: Table,
    amp: Table,
}

impl Limiter {
    pub(crate) fn new(cfg: Limits, seed: u64) -> Self {
        Limiter {
            sources: Table::new(cfg.table_size),
            uuids: Table::new(cfg.table_size),
            amp: Table::new(cfg.table_size),
            cfg,
            seed,
        }
    }

    pub(crate) fn config(&self) -> &Limits {
        &self.cfg
    }

    fn ip_hash(&self, ip: IpAddr) -> u64 {
        use std::hash::BuildHasher;
        let st = foldhash::fast::FixedState::with_seed(self.seed ^ 0x05ee_d1b5);
        match ip {
            IpAddr::V4(a) => st.hash_one(a.octets()),
            IpAddr::V6(a) => st.hash_one(a.octets()),
        }
    }

    /// Counts one datagram of `len` bytes from `ip`; false if the source is over its rate.
    /// The bytes earn amplification credit either way: they did arrive.
    pub(crate) fn on_datagram(&mut self, now: Time, ip: IpAddr, len: usize) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let h = self.ip_hash(ip);
        let cap = self.amp_cap();
        let factor = u64::from(self.cfg.amp_factor);
        let rate = self.amp_refill();
        let a = self.amp.get(h, now, cap);
        // Milli-units keep the refill exact in integers: `burst` bytes per period.
        a.refill(now, rate, cap);
        a.milli = (a.milli + (len as u64) * factor * 1000).min(cap);
        let cap_s = u64::from(self.cfg.source_burst) * 1000;
        let rate_s = u64::from(self.cfg.source_rate);
        let b = self.sources.get(h, now, cap_s);
        b.refill(now, rate_s, cap_s);
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }

    fn amp_cap(&self) -> u64 {
        u64::from(self.cfg.amp_burst) * 1000
    }

    /// Refill rate in milli-bytes per millisecond, i.e. bytes per second.
    fn amp_refill(&self) -> u64 {
        let period_ms = (self.cfg.amp_period.as_millis() as u64).max(1);
        u64::from(self.cfg.amp_burst) * 1000 / period_ms
    }

    /// Takes one heartbeat answer from the client's budget (keyed by a single node's record
    /// slot, a cluster node's uuid).
    pub(crate) fn answer_key(&mut self, now: Time, key: impl Hash) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::with_seed(self.seed ^ 0x0000_1d1d).hash_one(key);
        let cap = u64::from(self.cfg.uuid_burst) * 1000;
        let rate = u64::from(self.cfg.uuid_rate);
        let b = self.uuids.get(h, now, cap);
        b.refill(now, rate, cap);
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Spends amplification credit toward `ip` for `bytes` of heartbeat-driven traffic.
    pub(crate) fn spend(&mut self, now: Time, ip: IpAddr, bytes: usize) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let h = self.ip_hash(ip);
        let cap = self.amp_cap();
        let rate = self.amp_refill();
        let a = self.amp.get(h, now, cap);
        a.refill(now, rate, cap);
        let cost = bytes as u64 * 1000;
        if a.milli >= cost {
            a.milli -= cost;
            true
        } else {
            false
        }
    }
}

/// The abuse limits and the connection bounds as a node applies them: the one piece of code
/// the single node ([`crate::Node`]) and the cluster node ([`crate::cluster::ClusterNode`])
/// both run, so that every limit means the same in both modes. Each check says whether the
/// input passes; a node that holds one back counts it ([`Guard::held`] says whether it is the
/// first of its kind, for one log line).
pub(crate) struct Guard {
    limiter: Limiter,
    /// Open TCP connections per source IP and port.
    conns_per_ip: HashMap<(IpAddr, Port), u32, FixedState>,
    logged: [bool; Limited::COUNT],
    capacity_logged: bool,
}

impl Guard {
    pub(crate) fn new(cfg: Limits, seed: u64) -> Self {
        Guard {
            limiter: Limiter::new(cfg, seed),
            conns_per_ip: HashMap::with_hasher(FixedState::with_seed(seed ^ 8)),
            logged: [false; Limited::COUNT],
            capacity_logged: false,
        }
    }

    /// A datagram of `len` bytes from `ip` arrived: over the source's rate, it is dropped
    /// before it is decoded ([`Limited::SourceRate`]).
    pub(crate) fn datagram(&mut self, now: Time, ip: IpAddr, len: usize) -> Result<(), Limited> {
        if self.limiter.on_datagram(now, ip, len) {
            Ok(())
        } else {
            Err(Limited::SourceRate)
        }
    }

    /// A heartbeat of the client `key` (a single node's record slot, a cluster node's uuid)
    /// wants an answer: over the uuid's rate, it gets none ([`Limited::UuidRate`]).
    pub(crate) fn answer(&mut self, now: Time, key: impl Hash) -> Result<(), Limited> {
        if self.limiter.answer_key(now, key) {
            Ok(())
        } else {
            Err(Limited::UuidRate)
        }
    }

    /// A heartbeat answer of `bytes` toward `ip`: beyond the amplification bound it is not
    /// sent ([`Limited::Amplification`]).
    pub(crate) fn spend(&mut self, now: Time, ip: IpAddr, bytes: usize) -> Result<(), Limited> {
        if self.limiter.spend(now, ip, bytes) {
            Ok(())
        } else {
            Err(Limited::Amplification)
        }
    }

    /// Notes a hold-back; true for the first of its kind (log it once).
    pub(crate) fn held(&mut self, l: Limited) -> bool {
        !std::mem::replace(&mut self.logged[l.index()], true)
    }

    /// A TCP connection from `ip` on `port`, with `open` connections open in all: admitted
    /// (and counted until [`Guard::close`]) unless a bound is reached.
    pub(crate) fn open(&mut self, open: usize, port: Port, ip: IpAddr) -> bool {
        let lim = self.limiter.config();
        let per_ip = self.conns_per_ip.get(&(ip, port)).copied().unwrap_or(0);
        if lim.enabled && (open as u64 >= u64::from(lim.max_conns) || per_ip >= lim.conns_per_ip) {
            return false;
        }
        *self.conns_per_ip.entry((ip, port)).or_insert(0) += 1;
        true
    }

    /// An admitted connection closed.
    pub(crate) fn close(&mut self, port: Port, ip: IpAddr) {
        if let Some(n) = self.conns_per_ip.get_mut(&(ip, port)) {
            *n -= 1;
            if *n == 0 {
                self.conns_per_ip.remove(&(ip, port));
            }
        }
    }

    /// Whether a new client may be taken with `held` clients held and `max` allowed
    /// (`--max-clients`). `Err(first)`: refused, `first` for the first refusal (log it once).
    pub(crate) fn admit_client(&mut self, held: usize, max: usize) -> Result<(), bool> {
        if held < max {
            Ok(())
        } else {
            Err(!std::mem::replace(&mut self.capacity_logged, true))
        }
    }
}
