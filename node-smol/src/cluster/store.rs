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
//! a replica round trip. If fewer replicas confirm in time, the group's pushes are answered
//! per [`WaitFail`]. Scripts are loaded once on every node (`SCRIPT LOAD`) and called with
//! `EVALSHA`; a node that lost its script cache (a restart) gets them again on `NOSCRIPT`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};

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
    lanes: Arc<Lanes>,
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
        })
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
                    *wait_short = true;
                    if self.cfg.wait_fail == WaitFail::Ff {
                        return Err(OpError::WaitShort);
                    }
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
            StoreOp::Drain { node, done, limit } => self.drain(node, done, *limit).await,
        }
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

/// `SCRIPT LOAD` of every script on every node (masters and replicas), so that the first
/// `EVALSHA` after a fail-over finds them too.
async fn load_scripts(
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

/// Pushes in one pipeline at most (a bigger group waits for the next one).
const MAX_GROUP: usize = 512;
/// How often the lane map is read again without a reason.
const LANE_REFRESH: Duration = Duration::from_secs(5);
/// After a failed group, how soon the map may be read again.
const LANE_RETRY: Duration = Duration::from_millis(200);

/// One push waiting for its lane's next group.
struct Job {
    /// Its `EVALSHA`.
    cmd: redis::Cmd,
    /// Its record's slot (routes the group: every job of a lane has the same master).
    slot: u16,
    /// Where its outcome goes (the caller may have given up: then nobody reads it).
    reply: Sender<Result<Grouped, OpError>>,
}

/// A push whose script ran, and whether its group's `WAIT` was satisfied.
struct Grouped {
    record: StoredRecord,
    replicated: bool,
}

/// The push lanes: one per master, each a task that sends one group at a time.
struct Lanes {
    conn: ClusterConnection,
    scripts: Arc<Scripts>,
    cfg: StoreConfig,
    state: Mutex<LaneMap>,
}

struct LaneMap {
    /// The lane of every bucket.
    of_bucket: Vec<usize>,
    /// Per lane: its master's address and its queue.
    lanes: Vec<(String, Sender<Job>)>,
    /// When the map was last read (or a read was started).
    read_at: Instant,
    /// A group failed: the map may be stale.
    stale: Arc<AtomicBool>,
}

impl Lanes {
    /// One lane for every bucket until the first map is applied.
    fn new(conn: ClusterConnection, scripts: Arc<Scripts>, cfg: StoreConfig) -> Arc<Self> {
        let stale = Arc::new(AtomicBool::new(false));
        let lanes = Arc::new(Lanes {
            conn,
            scripts,
            cfg,
            state: Mutex::new(LaneMap {
                of_bucket: vec![0; BUCKETS],
                lanes: Vec::new(),
                read_at: Instant::now(),
                stale,
            }),
        });
        lanes.apply(&[]);
        lanes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneMap> {
        // The map is replaced whole under the lock: a panic elsewhere cannot leave it half
        // written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the map from `(first slot, last slot, master address)` ranges, keeping the
    /// lanes (and their tasks) of masters that stay.
    fn apply(&self, ranges: &[(u16, u16, String)]) {
        let mut st = self.lock();
        let addr_of = |b: usize| {
            let s = bucket_slot(b);
            ranges
                .iter()
                .find(|(lo, hi, _)| (*lo..=*hi).contains(&s))
                .map_or("?", |r| r.2.as_str())
                .to_string()
        };
        let mut old: Vec<(String, Sender<Job>)> = std::mem::take(&mut st.lanes);
        let mut lanes: Vec<(String, Sender<Job>)> = Vec::new();
        let mut of_bucket = vec![0; BUCKETS];
        for (b, lane) in of_bucket.iter_mut().enumerate() {
            let a = addr_of(b);
            *lane = match lanes.iter().position(|(x, _)| *x == a) {
                Some(i) => i,
                None => {
                    let tx = match old.iter().position(|(x, _)| *x == a) {
                        Some(i) => old.swap_remove(i).1,
                        None => self.spawn_lane(st.stale.clone()),
                    };
                    lanes.push((a, tx));
                    lanes.len() - 1
                }
            };
        }
        // Dropping the other senders ends their tasks once their queues are empty.
        st.lanes = lanes;
        st.of_bucket = of_bucket;
    }

    fn spawn_lane(&self, stale: Arc<AtomicBool>) -> Sender<Job> {
        let (tx, rx) = async_channel::unbounded();
        let (conn, scripts, cfg) = (self.conn.clone(), self.scripts.clone(), self.cfg.clone());
        // redis-rs drives its connections on smol's global executor; the lanes run there too.
        smol::spawn(lane(conn, scripts, cfg, rx, stale)).detach();
        tx
    }

    /// Queues a push on its bucket's lane; reads the map again when it is old or a group
    /// failed.
    fn submit(self: &Arc<Self>, b: usize, job: Job) {
        let mut st = self.lock();
        let since = st.read_at.elapsed();
        if since >= LANE_REFRESH || (since >= LANE_RETRY && st.stale.load(Ordering::Relaxed)) {
            st.read_at = Instant::now();
            st.stale.store(false, Ordering::Relaxed);
            let me = Arc::downgrade(self);
            let (conn, t) = (self.conn.clone(), self.cfg.op_timeout);
            smol::spawn(async move {
                match timeout(t, masters(&conn)).await {
                    Ok(Ok(m)) => {
                        if let Some(l) = me.upgrade() {
                            l.apply(&m);
                        }
                    }
                    Ok(Err(e)) | Err(e) => tracing::debug!(error = %e, "CLUSTER SLOTS failed"),
                }
            })
            .detach();
        }
        let i = st.of_bucket[b];
        if let Err(e) = st.lanes[i].1.try_send(job) {
            // Unbounded and its task holds the receiver while the sender lives: not reached.
            let _ = e
                .into_inner()
                .reply
                .try_send(Err(OpError::Reply("push lane stopped".into())));
        }
    }
}

/// A lane: takes every push waiting (up to [`MAX_GROUP`]), sends them as one pipeline with one
/// `WAIT`, hands out the outcomes, and only then takes the next group.
async fn lane(
    mut conn: ClusterConnection,
    scripts: Arc<Scripts>,
    cfg: StoreConfig,
    rx: Receiver<Job>,
    stale: Arc<AtomicBool>,
) {
    while let Ok(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        // Pushes whose caller gave up (time-out) are not sent: the core answered them.
        group.retain(|j| !j.reply.is_closed());
        if !group.is_empty() {
            run_group(&mut conn, &scripts, &cfg, group, &stale).await;
        }
    }
}

/// One group: the scripts and one `WAIT` in one pipeline on one connection. Scripts that met
/// `NOSCRIPT` did not run: the scripts are loaded again and those pushes go once more, as a
/// group of their own with its own `WAIT`.
async fn run_group(
    conn: &mut ClusterConnection,
    scripts: &Scripts,
    cfg: &StoreConfig,
    mut group: Vec<Job>,
    stale: &AtomicBool,
) {
    let fail = |jobs: Vec<Job>, why: String| {
        for j in jobs {
            let _ = j.reply.try_send(Err(OpError::Reply(why.clone())));
        }
    };
    for attempt in 0..2 {
        let mut p = redis::pipe();
        for j in &group {
            p.add_command(j.cmd.clone());
        }
        let waits = cfg.wait_replicas > 0;
        if waits {
            p.cmd("WAIT")
                .arg(cfg.wait_replicas)
                .arg(cfg.wait_timeout.as_millis().max(1) as u64);
        }
        let n = group.len() + usize::from(waits);
        let route = SingleNodeRoutingInfo::SpecificNode(redis::cluster_routing::Route::new(
            group[0].slot,
            SlotAddr::Master,
        ));
        let values = match conn.route_pipeline(p, 0, n, route).await {
            Ok(v) if v.len() == n => v,
            Ok(v) => {
                return fail(
                    group,
                    format!("pipeline of {n} answered {} values", v.len()),
                );
            }
            Err(e) => {
                stale.store(true, Ordering::Relaxed);
                return fail(group, e.to_string());
            }
        };
        let replicated: Result<bool, String> = if waits {
            match values.last() {
                Some(Value::Int(k)) => Ok(*k >= i64::from(cfg.wait_replicas)),
                other => Err(format!("WAIT answered {other:?}")),
            }
        } else {
            Ok(true)
        };
        let mut again = Vec::new();
        for (j, v) in group.into_iter().zip(values.iter()) {
            match v {
                Value::ServerError(e)
                    if attempt == 0 && e.kind() == Some(redis::ServerErrorKind::NoScript) =>
                {
                    again.push(j);
                }
                v => {
                    if matches!(v, Value::ServerError(_)) {
                        stale.store(true, Ordering::Relaxed);
                    }
                    let out = single(v, "pushed").and_then(|record| {
                        replicated
                            .clone()
                            .map(|replicated| Grouped { record, replicated })
                            .map_err(OpError::Reply)
                    });
                    let _ = j.reply.try_send(out);
                }
            }
        }
        if again.is_empty() {
            return;
        }
        if let Err(e) = load_scripts(conn, scripts, cfg.op_timeout).await {
            return fail(again, format!("SCRIPT LOAD after NOSCRIPT: {e}"));
        }
        group = again;
    }
    fail(group, "NOSCRIPT after SCRIPT LOAD".into());
}

/// The master of every slot range, from `CLUSTER SLOTS` on any node:
/// `(first slot, last slot, "host:port")`.
async fn masters(conn: &ClusterConnection) -> Result<Vec<(u16, u16, String)>, String> {
    let v = conn
        .clone()
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await
        .map_err(|e| e.to_string())?;
    let bad = || format!("CLUSTER SLOTS answered {v:?}");
    let Value::Array(ranges) = &v else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for r in ranges {
        let Value::Array(f) = r else {
            return Err(bad());
        };
        let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(m))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return Err(bad());
        };
        let host = text(m.first()).map_err(|_| bad())?;
        let port = number(m.get(1)).map_err(|_| bad())?;
        let lo = u16::try_from(*lo).map_err(|_| bad())?;
        let hi = u16::try_from(*hi).map_err(|_| bad())?;
        out.push((lo, hi, format!("{host}:{port}")));
    }
    Ok(out)
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
    bucket_slot(bucket(uuid))
}

/// The cluster slot of bucket `b`'s keys.
fn bucket_slot(b: usize) -> u16 {
    let tag = format!("{b:02x}");
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
