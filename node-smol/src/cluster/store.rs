//! The shared store on a real Redis Cluster: executes the core's [`StoreOp`]s and hands back
//! their [`StoreResult`]s.
//!
//! The semantics of every operation are the core's ([`ddpush_proto::cluster::MemStore`] is the
//! reference); the Lua scripts in `lua/` do exactly that on one hash per uuid, atomically, and
//! the tests in `tests/cluster.rs` hold the two side by side on random operations. Nothing here
//! decides anything about the protocol: it maps values to Redis commands and back.
//!
//! # Keys
//! A uuid falls in one of [`BUCKETS`] buckets (a hash of it). The bucket is the key's hash
//! tag, so a record and every node's dirty set of that bucket share one cluster slot, which is
//! what lets one script change both atomically:
//! - `ddp:{bb}:r:<uuid hex>`: the record (a hash);
//! - `ddp:{bb}:d:<node id>`: the node's dirty marks in bucket `bb` (a sorted set: member uuid,
//!   score the record version that set the mark).
//!
//! A drain asks every bucket of its node (one script per bucket, all in flight at once).
//!
//! # Durability
//! After a push script, `WAIT n timeout` on the same master asks for `n` replicas
//! (`--cluster-wait-replicas`); if fewer confirm in time, the push is answered per
//! [`WaitFail`]. Scripts are loaded once on every node (`SCRIPT LOAD`) and called with
//! `EVALSHA`; a node that lost its script cache (a restart) gets them again on `NOSCRIPT`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddpush_proto::cluster::{
    Gen, Mark, NodeId, StoreError, StoreOp, StoreReply, StoreResult, StoredRecord,
};
use ddpush_proto::{Content, Kind, PushMsg, Time, Uuid};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisError, Script, Value};

/// Buckets of uuids (the hash tags). 256 tags spread over the 16384 slots, so a cluster can
/// grow to 256 masters; a drain costs one script per bucket.
pub const BUCKETS: usize = 256;

const PROLOGUE: &str = include_str!("lua/record.lua");

/// What a push answers when fewer than `--cluster-wait-replicas` replicas confirmed its write
/// within `--cluster-wait-timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitFail {
    /// `0xFF`: the push is on the master only and could be lost with it; the app server
    /// should retry (it may then be delivered twice, never lost).
    Ff,
    /// `0x00`: accepted on the master's word alone; a master lost before it replicated
    /// loses the push.
    Accept,
}

/// How the adapter talks to the store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Records (and dirty sets) expire this long after their newest push or bind.
    pub pending_ttl: Duration,
    /// Replicas that must confirm a push before `0x00` (0: do not wait).
    pub wait_replicas: u32,
    /// How long to wait for them.
    pub wait_timeout: Duration,
    /// What to answer when they do not confirm.
    pub wait_fail: WaitFail,
    /// Every operation gives up after this long (the core also times out on its own).
    pub op_timeout: Duration,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A seed URL does not parse.
    #[error("--cluster-redis {url}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No seed answered.
    #[error("Redis Cluster unreachable at {seeds}: {reason}")]
    Unreachable {
        /// The seeds.
        seeds: String,
        /// The last error.
        reason: String,
    },
    /// A seed answered but is not in cluster mode.
    #[error(
        "{url} is a Redis server without cluster mode (cluster_enabled:0): ddpushd needs a \
         Redis Cluster (cluster-enabled yes)"
    )]
    NotACluster {
        /// The seed.
        url: String,
    },
    /// The cluster answered but refused something ddpushd needs.
    #[error("Redis Cluster at {seeds}: {reason}")]
    Refused {
        /// The seeds.
        seeds: String,
        /// What failed.
        reason: String,
    },
}

/// The loaded scripts.
struct Scripts {
    push: Script,
    ack: Script,
    bind: Script,
    drain: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PROLOGUE}\n{body}"));
        Scripts {
            push: s(include_str!("lua/push.lua")),
            ack: s(include_str!("lua/ack.lua")),
            bind: s(include_str!("lua/bind.lua")),
            drain: s(include_str!("lua/drain.lua")),
        }
    }

    fn all(&self) -> [&Script; 4] {
        [&self.push, &self.ack, &self.bind, &self.drain]
    }
}

/// A connection to the Redis Cluster that executes store operations. Cheap to clone; every
/// clone shares the multiplexed connections.
#[derive(Clone)]
pub struct RedisStore {
    conn: ClusterConnection,
    scripts: Arc<Scripts>,
    cfg: StoreConfig,
}

/// The outcome of one operation, with what the adapter's metrics want to know.
pub struct Executed {
    /// What goes back to the core.
    pub result: StoreResult,
    /// How long Redis took (script and WAIT).
    pub took: Duration,
    /// A push whose WAIT was not satisfied (answered per [`WaitFail`]).
    pub wait_short: bool,
}

/// Parses the comma-separated `--cluster-redis` list (each `redis://` or `rediss://`, with an
/// optional `user:password@`).
pub fn parse_seeds(list: &str) -> Result<Vec<redis::ConnectionInfo>, ConnectError> {
    use redis::IntoConnectionInfo;
    let mut out = Vec::new();
    for url in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(ConnectError::BadUrl {
                url: url.to_string(),
                reason: "expected redis://HOST:PORT or rediss://HOST:PORT".into(),
            });
        }
        out.push(
            url.into_connection_info()
                .map_err(|e| ConnectError::BadUrl {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?,
        );
    }
    if out.is_empty() {
        return Err(ConnectError::BadUrl {
            url: list.to_string(),
            reason: "no seed address given".into(),
        });
    }
    Ok(out)
}

impl RedisStore {
    /// Connects to the cluster through its seeds, checks that it is a cluster, and loads the
    /// scripts on every node.
    pub async fn connect(seeds: &str, cfg: StoreConfig) -> Result<Self, ConnectError> {
        let infos = parse_seeds(seeds)?;
        // rediss:// needs a crypto provider; installing one twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        check_cluster_mode(seeds, &infos, cfg.op_timeout).await?;
        let client = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(cfg.op_timeout)
            .response_timeout(cfg.op_timeout)
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()
            .map_err(|e| ConnectError::Refused {
                seeds: seeds.into(),
                reason: e.to_string(),
            })?;
        let conn = timeout(cfg.op_timeout * 4, client.get_async_connection())
            .await
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|reason| ConnectError::Unreachable {
                seeds: seeds.into(),
                reason,
            })?;
        let store = RedisStore {
            conn,
            scripts: Arc::new(Scripts::new()),
            cfg,
        };
        store
            .load_scripts()
            .await
            .map_err(|reason| ConnectError::Refused {
                seeds: seeds.into(),
                reason: format!("SCRIPT LOAD: {reason}"),
            })?;
        Ok(store)
    }

    /// `SCRIPT LOAD` of every script on every node (masters and replicas), so that the first
    /// `EVALSHA` after a fail-over finds them too.
    async fn load_scripts(&self) -> Result<(), String> {
        for s in self.scripts.all() {
            // redis-rs routes SCRIPT LOAD to every node of the cluster.
            timeout(
                self.cfg.op_timeout * 4,
                s.load_async(&mut self.conn.clone()),
            )
            .await?
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Records where this node's peer link listens (`ddp:n:<node id>`), for the others to
    /// dial. Read only when a link is dialed, so steady traffic never touches it.
    pub async fn register_node(&self, node: &NodeId, addr: SocketAddr) -> Result<(), String> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(node_key(node)).arg(addr.to_string());
        timeout(self.cfg.op_timeout, cmd.query_async::<()>(&mut c))
            .await?
            .map_err(|e| e.to_string())
    }

    /// Where `node` said its peer link listens.
    pub async fn lookup_node(&self, node: &NodeId) -> Result<Option<SocketAddr>, String> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(node_key(node));
        let v: Option<String> = timeout(self.cfg.op_timeout, cmd.query_async(&mut c))
            .await?
            .map_err(|e| e.to_string())?;
        match v {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| format!("{}: not an address: {s:?}", node_key(node))),
        }
    }

    /// Executes one operation; never panics on anything Redis says.
    pub async fn execute(&self, op: &StoreOp) -> Executed {
        let start = Instant::now();
        let mut wait_short = false;
        let result = match timeout(self.cfg.op_timeout, self.run(op, &mut wait_short)).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "store operation failed");
                Err(StoreError::Unavailable)
            }
        };
        Executed {
            result,
            took: start.elapsed(),
            wait_short,
        }
    }

    async fn run(&self, op: &StoreOp, wait_short: &mut bool) -> Result<StoreReply, OpError> {
        let ttl = self.cfg.pending_ttl.as_millis().max(1).to_string();
        match op {
            StoreOp::Push { uuid, msg, at } => {
                let mut inv = self.scripts.push.prepare_invoke();
                inv.key(record_key(uuid));
                match msg {
                    PushMsg::Notify => inv.arg("n"),
                    PushMsg::Bits(_) => inv.arg("b"),
                    PushMsg::Payload(_) => inv.arg("p"),
                };
                inv.arg(at.as_millis())
                    .arg(&ttl)
                    .arg(dirty_prefix(uuid))
                    .arg(uuid.to_hex());
                match msg {
                    PushMsg::Notify => {}
                    PushMsg::Bits(b) => {
                        inv.arg(b >> 32).arg(b & 0xffff_ffff);
                    }
                    PushMsg::Payload(p) => {
                        inv.arg(p.bytes().as_ref());
                    }
                }
                let v: Value = inv.invoke_async(&mut self.conn.clone()).await?;
                let rec = single(&v, "pushed")?;
                if self.cfg.wait_replicas > 0 && !self.wait(uuid).await? {
                    *wait_short = true;
                    if self.cfg.wait_fail == WaitFail::Ff {
                        return Err(OpError::WaitShort);
                    }
                }
                Ok(StoreReply::Pushed(rec))
            }
            StoreOp::Ack {
                uuid,
                node,
                epoch,
                kind,
                gen,
                bits,
                at,
            } => {
                let mut inv = self.scripts.ack.prepare_invoke();
                inv.key(record_key(uuid))
                    .arg(&node.0)
                    .arg(*epoch)
                    .arg(match kind {
                        Kind::Notify => "n",
                        Kind::Bits => "b",
                        Kind::Payload => "p",
                    })
                    .arg(*gen)
                    .arg(bits >> 32)
                    .arg(bits & 0xffff_ffff)
                    .arg(at.as_millis());
                let v: Value = inv.invoke_async(&mut self.conn.clone()).await?;
                let items = array(&v)?;
                match text(items.first())? {
                    "stale" => Ok(StoreReply::Stale(record(&items[1..])?)),
                    "acked" => Ok(StoreReply::Acked {
                        cleared: text(items.get(1))? == "1",
                        record: record(items.get(2..).unwrap_or_default())?,
                    }),
                    other => Err(OpError::Reply(format!("ack script answered {other:?}"))),
                }
            }
            StoreOp::Bind { uuid, node, at } => {
                let mut inv = self.scripts.bind.prepare_invoke();
                inv.key(record_key(uuid))
                    .arg(&node.0)
                    .arg(at.as_millis())
                    .arg(&ttl)
                    .arg(dirty_prefix(uuid))
                    .arg(uuid.to_hex());
                let v: Value = inv.invoke_async(&mut self.conn.clone()).await?;
                Ok(StoreReply::Bound(single(&v, "bound")?))
            }
            StoreOp::Drain { node, done, limit } => self.drain(node, done, *limit).await,
        }
    }

    /// `WAIT` on the master of the uuid's slot: true if enough replicas have every write made
    /// on that connection so far (the push among them).
    async fn wait(&self, uuid: &Uuid) -> Result<bool, OpError> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.cfg.wait_replicas)
            .arg(self.cfg.wait_timeout.as_millis().max(1) as u64);
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
            redis::cluster_routing::Route::new(slot(uuid), SlotAddr::Master),
        ));
        let v = self.conn.clone().route_command(cmd, route).await?;
        let n: i64 = redis::from_redis_value(v).map_err(|e| OpError::Reply(e.to_string()))?;
        Ok(n >= i64::from(self.cfg.wait_replicas))
    }

    /// One drain: every bucket's script at once, then the first `limit` marks by uuid.
    async fn drain(
        &self,
        node: &NodeId,
        done: &[(Uuid, u64)],
        limit: usize,
    ) -> Result<StoreReply, OpError> {
        let mut per_bucket: Vec<Vec<(Uuid, u64)>> = vec![Vec::new(); BUCKETS];
        for (u, v) in done {
            per_bucket[bucket(u)].push((*u, *v));
        }
        let calls = per_bucket.into_iter().enumerate().map(|(b, done)| {
            let mut conn = self.conn.clone();
            let script = &self.scripts.drain;
            async move {
                let mut inv = script.prepare_invoke();
                inv.key(format!("ddp:{{{b:02x}}}:d:{}", node.0))
                    .arg(format!("ddp:{{{b:02x}}}:r:"))
                    .arg(limit);
                for (u, v) in &done {
                    inv.arg(u.to_hex()).arg(*v);
                }
                let v: Value = inv.invoke_async(&mut conn).await?;
                Ok::<_, OpError>(v)
            }
        });
        let replies = futures_util::future::join_all(calls).await;
        let mut marks = Vec::new();
        let mut remaining = 0usize;
        for r in replies {
            let v = r?;
            let items = array(&v)?;
            if text(items.first())? != "drained" {
                return Err(OpError::Reply(
                    "drain script answered something else".into(),
                ));
            }
            remaining += number(items.get(1))? as usize;
            for m in items[2..].chunks(2 + RECORD_LEN) {
                if m.len() != 2 + RECORD_LEN {
                    return Err(OpError::Reply("short mark in drain reply".into()));
                }
                let uuid = Uuid::from_hex(text(m.first())?)
                    .ok_or_else(|| OpError::Reply("bad uuid in a dirty set".into()))?;
                marks.push(Mark {
                    uuid,
                    ver: number(m.get(1))?,
                    record: record(&m[2..])?,
                });
            }
        }
        marks.sort_by_key(|m| m.uuid);
        marks.truncate(limit);
        let more = remaining > marks.len();
        Ok(StoreReply::Drained { marks, more })
    }
}

/// The bucket of a uuid (its hash tag): FNV-1a of all 16 bytes, so that uuids spread over
/// the buckets whatever their form (the SDKs' MD5 sums, or sequential ids with a common
/// prefix).
pub fn bucket(uuid: &Uuid) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in uuid.0 {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    ((h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) as usize) % BUCKETS
}

/// The key of a uuid's record.
pub fn record_key(uuid: &Uuid) -> String {
    format!("ddp:{{{:02x}}}:r:{}", bucket(uuid), uuid.to_hex())
}

fn node_key(node: &NodeId) -> String {
    format!("ddp:n:{}", node.0)
}

fn dirty_prefix(uuid: &Uuid) -> String {
    format!("ddp:{{{:02x}}}:d:", bucket(uuid))
}

/// The cluster slot of a uuid's keys: CRC16 (XMODEM) of the hash tag, mod 16384, as Redis
/// computes it.
pub fn slot(uuid: &Uuid) -> u16 {
    let tag = format!("{:02x}", bucket(uuid));
    let mut crc: u16 = 0;
    for b in tag.bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Connects to the seeds one by one with a plain connection and asks `INFO cluster`: a
/// server without cluster mode is refused by name, unreachable seeds are skipped (the cluster
/// client tries them again), and if none answers at all the cluster is unreachable.
async fn check_cluster_mode(
    seeds: &str,
    infos: &[redis::ConnectionInfo],
    t: Duration,
) -> Result<(), ConnectError> {
    let mut last = String::from("no seed answered");
    for info in infos {
        let url = info.addr().to_string();
        let client = match redis::Client::open(info.clone()) {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let answer = timeout(t * 2, async {
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let s: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        })
        .await
        .and_then(|r| r);
        match answer {
            Ok(s) if s.contains("cluster_enabled:1") => return Ok(()),
            Ok(_) => return Err(ConnectError::NotACluster { url }),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(ConnectError::Unreachable {
        seeds: seeds.into(),
        reason: last,
    })
}

/// Why one operation failed (all of it becomes [`StoreError::Unavailable`] for the core).
#[derive(Debug, thiserror::Error)]
enum OpError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("unexpected reply: {0}")]
    Reply(String),
    #[error("fewer replicas than --cluster-wait-replicas confirmed the write in time")]
    WaitShort,
}

/// Fields of a record in a script reply.
const RECORD_LEN: usize = 11;

fn array(v: &Value) -> Result<&[Value], OpError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(OpError::Reply(format!("expected an array, got {other:?}"))),
    }
}

fn bytes(v: Option<&Value>) -> Result<&[u8], OpError> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.as_bytes()),
        other => Err(OpError::Reply(format!("expected a string, got {other:?}"))),
    }
}

fn text(v: Option<&Value>) -> Result<&str, OpError> {
    std::str::from_utf8(bytes(v)?).map_err(|_| OpError::Reply("not UTF-8".into()))
}

fn number(v: Option<&Value>) -> Result<u64, OpError> {
    if let Some(Value::Int(i)) = v {
        return u64::try_from(*i).map_err(|_| OpError::Reply("negative number".into()));
    }
    let t = text(v)?;
    t.parse()
        .map_err(|_| OpError::Reply(format!("not a number: {t:?}")))
}

fn opt_number(v: Option<&Value>) -> Result<Option<u64>, OpError> {
    if bytes(v)?.is_empty() {
        Ok(None)
    } else {
        number(v).map(Some)
    }
}

/// A reply `{tag, record...}` with the expected tag.
fn single(v: &Value, tag: &str) -> Result<StoredRecord, OpError> {
    let items = array(v)?;
    let got = text(items.first())?;
    if got != tag {
        return Err(OpError::Reply(format!("expected {tag:?}, got {got:?}")));
    }
    record(&items[1..])
}

/// The 11 record fields of a reply (see `lua/record.lua`).
fn record(f: &[Value]) -> Result<StoredRecord, OpError> {
    if f.len() < RECORD_LEN {
        return Err(OpError::Reply("short record in reply".into()));
    }
    let owner = text(f.get(1))?;
    let bh = number(f.get(4))?;
    let bl = number(f.get(5))?;
    if bh > u64::from(u32::MAX) || bl > u64::from(u32::MAX) {
        return Err(OpError::Reply("mask half out of range".into()));
    }
    let payload = match opt_number(f.get(6))? {
        None => None,
        Some(g) => Some((
            g as Gen,
            Content::copy_from_slice(bytes(f.get(7))?)
                .map_err(|_| OpError::Reply("payload longer than a length field".into()))?,
        )),
    };
    let t = |i: usize| opt_number(f.get(i)).map(|o| o.map(Time));
    Ok(StoredRecord {
        ver: number(f.first())?,
        owner: (!owner.is_empty()).then(|| NodeId(owner.to_string())),
        epoch: number(f.get(2))?,
        notify: opt_number(f.get(3))?,
        bits: (bh << 32) | bl,
        payload,
        pushed_at: [t(8)?, t(9)?, t(10)?],
    })
}

/// Runs `f` for at most `t`.
async fn timeout<T>(t: Duration, f: impl std::future::Future<Output = T>) -> Result<T, String> {
    futures_lite::future::or(async { Ok(f.await) }, async {
        async_io::Timer::after(t).await;
        Err(format!("no answer within {t:?}"))
    })
    .await
}
