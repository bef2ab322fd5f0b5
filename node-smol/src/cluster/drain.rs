//! One drain of a node's dirty marks on Redis, in two steps so that it reads no more records
//! than it hands the core.
//!
//! The marks of a node are spread over [`BUCKETS`] sorted sets (one per hash tag). A drain
//! that asked every bucket for `limit` marks would read up to `BUCKETS x limit` records
//! (16,384 with the core's 64) to return `limit`: with a large backlog every drain round
//! made Redis load and send, and the event loop's thread parse, 256 times what the core
//! could use, round after round until the backlog was gone. So:
//!
//! 1. every bucket's script runs with the marks the core reports done and a limit of 0: it
//!    removes those marks and counts what is left (no record is read);
//! 2. only if marks are left, `limit` is shared among the buckets that have them, one at a
//!    time in turn from a cursor that moves on with every drain ([`share`]), and only those
//!    buckets' scripts fetch their oldest marks with their records.
//!
//! A drain therefore reads at most `limit` records whatever the backlog, and a backlog larger
//! than `limit` is drained from every bucket in turn. An empty backlog costs step 1 only, as
//! before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ddpush_proto::cluster::{Mark, NodeId, StoreReply};
use ddpush_proto::Uuid;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};

use super::keys::bucket;
use super::reply::{array, number, record, text, OpError, RECORD_LEN};
use super::store::BUCKETS;

/// What a drain keeps between calls: where the next one starts sharing, and how many records
/// drains have read (for `/status`).
#[derive(Debug, Default)]
pub(super) struct DrainState {
    cursor: AtomicUsize,
    read: AtomicU64,
}

impl DrainState {
    /// Records read by drains so far.
    pub(super) fn records_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

/// Runs one bucket's drain script: removes `done`, returns (marks left, up to `limit` marks).
async fn bucket_script(
    conn: &ClusterConnection,
    script: &Script,
    node: &NodeId,
    b: usize,
    done: &[(Uuid, u64)],
    limit: usize,
) -> Result<(usize, Vec<Mark>), OpError> {
    let mut inv = script.prepare_invoke();
    inv.key(format!("ddp:{{{b:02x}}}:d:{}", node.0))
        .arg(format!("ddp:{{{b:02x}}}:r:"))
        .arg(limit);
    for (u, v) in done {
        inv.arg(u.to_hex()).arg(*v);
    }
    let v: Value = inv.invoke_async(&mut conn.clone()).await?;
    let items = array(&v)?;
    if text(items.first())? != "drained" {
        return Err(OpError::Reply(
            "drain script answered something else".into(),
        ));
    }
    let left = number(items.get(1))? as usize;
    let mut marks = Vec::new();
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
    if marks.len() > limit {
        return Err(OpError::Reply("more marks than asked for".into()));
    }
    Ok((left, marks))
}

/// One drain of `node`'s marks: `done` removed, then at most `limit` marks (by uuid), and
/// whether more remain.
pub(super) async fn drain(
    conn: &ClusterConnection,
    script: &Script,
    state: &DrainState,
    node: &NodeId,
    done: &[(Uuid, u64)],
    limit: usize,
) -> Result<StoreReply, OpError> {
    let mut per_bucket: Vec<Vec<(Uuid, u64)>> = vec![Vec::new(); BUCKETS];
    for (u, v) in done {
        per_bucket[bucket(u)].push((*u, *v));
    }
    let counts = futures_util::future::join_all(
        per_bucket
            .iter()
            .enumerate()
            .map(|(b, done)| bucket_script(conn, script, node, b, done, 0)),
    )
    .await
    .into_iter()
    .map(|r| r.map(|(left, _)| left))
    .collect::<Result<Vec<usize>, OpError>>()?;
    let total: usize = counts.iter().sum();
    if total == 0 || limit == 0 {
        return Ok(StoreReply::Drained {
            marks: Vec::new(),
            more: total > 0,
        });
    }
    // The core runs one drain at a time: a plain load and store of the cursor suffice.
    let start = state.cursor.load(Ordering::Relaxed) % BUCKETS;
    let (quota, next) = share(&counts, limit, start);
    state.cursor.store(next, Ordering::Relaxed);
    let fetched = futures_util::future::join_all(
        quota
            .into_iter()
            .map(|(b, n)| bucket_script(conn, script, node, b, &[], n)),
    )
    .await;
    let mut marks = Vec::new();
    for r in fetched {
        marks.extend(r?.1);
    }
    state.read.fetch_add(marks.len() as u64, Ordering::Relaxed);
    marks.sort_by_key(|m| m.uuid);
    let more = total > marks.len();
    Ok(StoreReply::Drained { marks, more })
}

/// How many marks to fetch from which bucket: `limit` shared among the buckets with marks
/// left (`counts`), one mark at a time in turn from bucket `start` on, until the limit or the
/// marks run out. Returns (bucket, marks) for every bucket that gets any, and where the next
/// drain starts: after the bucket that got the last mark, so that successive drains of a
/// large backlog sweep every bucket.
pub(super) fn share(counts: &[usize], limit: usize, start: usize) -> (Vec<(usize, usize)>, usize) {
    let n = counts.len();
    let mut take = vec![0usize; n];
    let mut left = limit;
    let mut next = start;
    while left > 0 {
        let before = left;
        for i in 0..n {
            let b = (start + i) % n;
            if left == 0 {
                break;
            }
            if take[b] < counts[b] {
                take[b] += 1;
                left -= 1;
                next = (b + 1) % n;
            }
        }
        if left == before {
            break;
        }
    }
    let quota = take
        .into_iter()
        .enumerate()
        .filter(|&(_, t)| t > 0)
        .collect();
    (quota, next)
}

#[cfg(test)]
mod tests {
    use super::share;
    use proptest::prelude::*;

    #[test]
    fn the_limit_goes_round_the_buckets_from_the_cursor() {
        let counts = [0, 5, 1, 0, 9];
        assert_eq!(share(&counts, 3, 4), (vec![(1, 1), (2, 1), (4, 1)], 3));
        assert_eq!(share(&counts, 2, 4), (vec![(1, 1), (4, 1)], 2));
        assert_eq!(share(&counts, 2, 2), (vec![(2, 1), (4, 1)], 0));
        assert_eq!(share(&counts, 6, 0), (vec![(1, 3), (2, 1), (4, 2)], 2));
        assert_eq!(share(&counts, 100, 3), (vec![(1, 5), (2, 1), (4, 9)], 0));
        assert_eq!(share(&[0, 0], 10, 1), (vec![], 1));
        // Successive drains of 2 from the cursor each returns sweep the buckets.
        let counts = [3; 6];
        let (a, n) = share(&counts, 2, 0);
        let (b, n) = share(&counts, 2, n);
        let (c, _) = share(&counts, 2, n);
        assert_eq!(
            [a, b, c],
            [
                vec![(0, 1), (1, 1)],
                vec![(2, 1), (3, 1)],
                vec![(4, 1), (5, 1)]
            ]
        );
    }

    proptest! {
        /// Never more than the limit or a bucket's marks; all of it used while marks remain;
        /// and shared evenly: two buckets that both still have marks differ by at most one.
        #[test]
        fn shares_are_bounded_complete_and_even(
            counts in proptest::collection::vec(0usize..40, 1..64),
            limit in 0usize..300,
            start in 0usize..64,
        ) {
            let (got, next) = share(&counts, limit, start % counts.len());
            prop_assert!(next < counts.len());
            let total: usize = counts.iter().sum();
            let taken: usize = got.iter().map(|&(_, t)| t).sum();
            prop_assert_eq!(taken, limit.min(total));
            for &(b, t) in &got {
                prop_assert!(t <= counts[b]);
            }
            let mut take = vec![0usize; counts.len()];
            for &(b, t) in &got {
                take[b] = t;
            }
            let unfinished: Vec<usize> = (0..counts.len())
                .filter(|&b| take[b] < counts[b])
                .map(|b| take[b])
                .collect();
            if let (Some(lo), Some(hi)) = (unfinished.iter().min(), take.iter().max()) {
                // A bucket left with marks got at least one less than the most-served one.
                prop_assert!(hi - lo <= 1, "{take:?} of {counts:?}");
            }
        }
    }
}
