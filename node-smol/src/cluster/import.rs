//! `ddpushd import-ddpush FILE --cluster-redis ...`: loads an upstream `nodeStatus.dat` into
//! the Redis Cluster. Every pending item becomes the same store push an app server's push
//! would be (so the core's merge rules apply: the flag, the OR of the masks, the payload),
//! stamped with the record's last push time; records with nothing pending carry nothing a
//! cluster keeps (heartbeat times and addresses stay node-local) and are skipped.

use std::io;
use std::path::Path;

use ddpush_proto::cluster::{Confirmation, StoreOp};
use ddpush_proto::driver::StoreConfirmed;
use ddpush_proto::{upstream, PushMsg, PushReply};

use super::store::{RedisStore, StoreConfig};
use super::ClusterOptions;
use crate::server::ServerError;
use crate::settings::ServerConfig;

/// Operations in flight during an import.
const CONCURRENCY: usize = 64;

/// What an import did.
pub struct Imported {
    /// Records in the file.
    pub records: usize,
    /// Records with something pending, now in the store.
    pub pending_records: usize,
    /// Store pushes made.
    pub items: usize,
}

/// Reads `file` and pushes every pending item into the cluster; stops at the first failure
/// (running it again repeats items, which at worst delivers a 0x10 or 0x20 twice).
pub fn import(
    cfg: &ServerConfig,
    opts: &ClusterOptions,
    file: &Path,
) -> Result<Imported, ServerError> {
    let bytes = std::fs::read(file)?;
    let records = upstream::read_node_status(&bytes).map_err(|source| ServerError::Import {
        file: file.display().to_string(),
        source,
    })?;
    let now = ddpush_proto::Time(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    );
    let mut ops = Vec::new();
    let mut pending_records = 0;
    for r in &records {
        let at = r.last_push.unwrap_or(now);
        let mut msgs = Vec::new();
        if r.notify {
            msgs.push(PushMsg::Notify);
        }
        if r.bits != 0 {
            msgs.push(PushMsg::Bits(r.bits));
        }
        if let Some(p) = &r.payload {
            msgs.push(PushMsg::Payload(p.clone()));
        }
        if !msgs.is_empty() {
            pending_records += 1;
        }
        ops.extend(msgs.into_iter().map(|msg| StoreOp::Push {
            uuid: r.uuid,
            msg,
            at,
        }));
    }
    let store_cfg = StoreConfig {
        pending_ttl: cfg.core.pending_ttl,
        wait_replicas: opts.wait_replicas,
        wait_timeout: opts.wait_timeout,
        op_timeout: opts.store_timeout,
    };
    let step = StoreConfirmed {
        wait: opts.wait_fail.policy(),
    };
    smol::block_on(async {
        let store = RedisStore::connect(&opts.redis, store_cfg)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut done = 0;
        for chunk in ops.chunks(CONCURRENCY) {
            let results =
                futures_util::future::join_all(chunk.iter().map(|op| store.execute(op))).await;
            for (op, r) in chunk.iter().zip(results) {
                // The same acceptance rule as a node's pushes (`--cluster-wait-fail`).
                let c = Confirmation::of(&r.result);
                if step.reply(&c) != PushReply::Accepted {
                    let why = match c {
                        Confirmation::Failed(e) => e.to_string(),
                        _ => "fewer replicas than --cluster-wait-replicas confirmed it in time"
                            .to_string(),
                    };
                    let uuid = op.uuid().map(|u| u.to_hex()).unwrap_or_default();
                    return Err(ServerError::from(io::Error::other(format!(
                        "storing {uuid} failed ({why}) after {done} of {} items; nothing was \
                         rolled back, running the import again is safe",
                        ops.len()
                    ))));
                }
                done += 1;
            }
        }
        Ok(Imported {
            records: records.len(),
            pending_records,
            items: done,
        })
    })
}
