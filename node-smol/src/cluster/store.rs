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
//! A drain asks every bucket of its node how many marks it holds (one script per bucket, all
//! in flight at once), then fetches at most its limit of them from those that have any
//! ([`super::drain`]).
//!
//! # Durability and group commit
//! Pushes go through one *lane* per Redis master (the masters of the buckets' slots, read
//! with `CLUSTER SLOTS`). A lane sends its pushes as one pipeline, every waiting push's script
//! and then one `WAIT n timeout` (`--cluster-wait-replicas`), and sends the next pipeline only
//! when that one answered: the pushes that arrive meanwhile form the next group. One pipeline
//! goes on one connection to one node, and `WAIT` covers every write made on its connection
//! before it, so a push is confirmed only by a `WAIT` on the node where its script ran, even
//! when the lane map is stale (a script redirected elsewhere fails and its push gets `0xFF`).
//! One replica round trip per group instead of one per push: a `WAIT` blocks its connection
//! until the replicas answered, so per-push `WAIT`s serialised every push of a master behind
//! a replica round trip. If fewer replicas confirm in time, the group's pushes come back as
//! `PushedUnreplicated` and the core's acceptance rule answers them per [`WaitFail`]
//! (`ddpush_proto::driver::WaitPolicy`). Scripts are loaded once on every node (`SCRIPT LOAD`) and called with
//! `EVALSHA`; a node that lost its script cache (a restart) gets them again on `NOSCRIPT`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddpush_proto::cluster::{NodeId, StoreError, StoreOp, StoreReply, StoreResult, StoredRecord};
use ddpush_proto::driver::WaitPolicy;
use ddpush_proto::{Kind, PushMsg, Uuid};
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};

/// Buckets of uuids (the hash tags). 256 tags spread over the 16384 slots, so a cluster can
/// grow to 256 masters; a drain costs one script per bucket.
pub const BUCKETS: usize = 256;

use super::drain::{self, DrainState};
pub use super::keys::{bucket, record_key, slot};
use super::keys::{dirty_prefix, node_key};
use super::lanes::{masters, Job, Lanes};
use super::reply::{array, record, single, text, OpError, RECORD_FIELDS};

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

impl WaitFail {
    /// The core's acceptance policy this choice stands for.
    pub fn policy(self) -> WaitPolicy {
        match self {
            WaitFail::Ff => WaitPolicy::Refuse,
            WaitFail::Accept => WaitPolicy::Accept,
        }
    }
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
pub(super) struct Scripts {
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
    lanes: Arc<Lanes>,
    drains: Arc<DrainState>,
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
        let scripts = Arc::new(Scripts::new());
        load_scripts(&conn, &scripts, cfg.op_timeout)
            .await
            .map_err(|reason| ConnectError::Refused {
                seeds: seeds.into(),
                reason: format!("SCRIPT LOAD: {reason}"),
            })?;
        let lanes = Lanes::new(conn.clone(), scripts.clone(), cfg.clone());
        // The first lane map now; without one every push takes one lane (correct, slower)
        // until the next refresh.
        match timeout(cfg.op_timeout, masters(&conn)).await {
            Ok(Ok(m)) => lanes.apply(&m),
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "CLUSTER SLOTS failed; one push lane until the next try")
            }
        }
        Ok(RedisStore {
            conn,
            scripts,
            cfg,
            lanes,
            drains: Arc::default(),
        })
    }

    /// Records that drains have read from Redis so far (each is handed to the core: a drain
    /// reads no more than its limit).
    pub fn drain_records_read(&self) -> u64 {
        self.drains.records_read()
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

    /// The record of `uuid` as the store holds it now (`None`: no record, or it expired), for
    /// the admin API's `GET /clients/{uuid}`. A plain read outside the core: it changes
    /// nothing and decides nothing, so it needs no script and no `WAIT`.
    pub async fn read_record(&self, uuid: &Uuid) -> Result<Option<StoredRecord>, String> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(record_key(uuid)).arg(&RECORD_FIELDS[..]);
        let v: Value = timeout(self.cfg.op_timeout, cmd.query_async(&mut c))
            .await?
            .map_err(|e| e.to_string())?;
        let fields = array(&v).map_err(|e| e.to_string())?;
        if fields.iter().all(|f| matches!(f, Value::Nil)) {
            return Ok(None);
        }
        // The scripts' reply form: "" for an absent optional field, 0 for an absent number
        // (`load` in lua/record.lua reads a hash the same way).
        let fields: Vec<Value> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| match f {
                Value::Nil if matches!(i, 0 | 2 | 4 | 5) => Value::BulkString(b"0".to_vec()),
                Value::Nil => Value::BulkString(Vec::new()),
                other => other.clone(),
            })
            .collect();
        record(&fields).map(Some).map_err(|e| e.to_string())
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
                // EVALSHA by hand: the lane pipelines it (NOSCRIPT is handled there).
                let mut inv = redis::cmd("EVALSHA");
                inv.arg(self.scripts.push.get_hash())
                    .arg(1)
                    .arg(record_key(uuid));
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
                let (tx, rx) = async_channel::bounded(1);
                self.lanes.submit(
                    bucket(uuid),
                    Job {
                        cmd: inv,
                        slot: slot(uuid),
                        reply: tx,
                    },
                );
                let done = rx
                    .recv()
                    .await
                    .map_err(|_| OpError::Reply("push lane stopped".into()))??;
                if !done.replicated {
                    // Whether this is `0x00` is the core's acceptance rule (`WaitPolicy`).
                    *wait_short = true;
                    return Ok(StoreReply::PushedUnreplicated(done.record));
                }
                Ok(StoreReply::Pushed(done.record))
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
            StoreOp::Drain { node, done, limit } => {
                drain::drain(
                    &self.conn,
                    &self.scripts.drain,
                    &self.drains,
                    node,
                    done,
                    *limit,
                )
                .await
            }
        }
    }
}

/// `SCRIPT LOAD` of every script on every node (masters and replicas), so that the first
/// `EVALSHA` after a fail-over finds them too.
pub(super) async fn load_scripts(
    conn: &ClusterConnection,
    scripts: &Scripts,
    t: Duration,
) -> Result<(), String> {
    for s in scripts.all() {
        // redis-rs routes SCRIPT LOAD to every node of the cluster.
        timeout(t * 4, s.load_async(&mut conn.clone()))
            .await?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
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

/// Runs `f` for at most `t`.
pub(super) async fn timeout<T>(
    t: Duration,
    f: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    futures_lite::future::or(async { Ok(f.await) }, async {
        async_io::Timer::after(t).await;
        Err(format!("no answer within {t:?}"))
    })
    .await
}
