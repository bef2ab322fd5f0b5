//! Push lanes: one per Redis master; each sends its waiting pushes as one pipeline (the
//! scripts, then one `WAIT`) and the next group only when that one has answered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use ddpush_proto::cluster::StoredRecord;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::Value;

use super::keys::*;
use super::reply::*;
use super::store::*;

/// Pushes in one pipeline at most (a bigger group waits for the next one).
pub(super) const MAX_GROUP: usize = 512;
/// How often the lane map is read again without a reason.
pub(super) const LANE_REFRESH: Duration = Duration::from_secs(5);
/// After a failed group, how soon the map may be read again.
pub(super) const LANE_RETRY: Duration = Duration::from_millis(200);

/// One push waiting for its lane's next group.
pub(super) struct Job {
    /// Its `EVALSHA`.
    pub(super) cmd: redis::Cmd,
    /// Its record's slot (routes the group: every job of a lane has the same master).
    pub(super) slot: u16,
    /// Where its outcome goes (the caller may have given up: then nobody reads it).
    pub(super) reply: Sender<Result<Grouped, OpError>>,
}

/// A push whose script ran, and whether its group's `WAIT` was satisfied.
pub(super) struct Grouped {
    pub(super) record: StoredRecord,
    pub(super) replicated: bool,
}

/// The push lanes: one per master, each a task that sends one group at a time.
pub(super) struct Lanes {
    conn: ClusterConnection,
    scripts: Arc<Scripts>,
    cfg: StoreConfig,
    state: Mutex<LaneMap>,
}

pub(super) struct LaneMap {
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
    pub(super) fn new(
        conn: ClusterConnection,
        scripts: Arc<Scripts>,
        cfg: StoreConfig,
    ) -> Arc<Self> {
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
    pub(super) fn apply(&self, ranges: &[(u16, u16, String)]) {
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
    pub(super) fn submit(self: &Arc<Self>, b: usize, job: Job) {
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
pub(super) async fn lane(
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
pub(super) async fn run_group(
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
pub(super) async fn masters(conn: &ClusterConnection) -> Result<Vec<(u16, u16, String)>, String> {
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
