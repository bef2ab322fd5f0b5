//! The cluster flags, resolved and validated (flag over file over default, like every
//! setting). Each refusal names the flag.

use std::net::SocketAddr;
use std::time::Duration;

use ddpush_proto::cluster::NodeId;

use super::store::{parse_seeds, WaitFail};
use crate::settings::Settings;

/// Everything cluster mode needs, defaults applied.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `--cluster-redis`, as given.
    pub redis: String,
    /// `--node-id`.
    pub node: NodeId,
    /// `--peer-listen`.
    pub peer_listen: SocketAddr,
    /// `--peer-advertise`.
    pub peer_advertise: Option<SocketAddr>,
    /// `--cluster-secret`.
    pub secret: Option<String>,
    /// `--cluster-wait-replicas`.
    pub wait_replicas: u32,
    /// `--cluster-wait-timeout`.
    pub wait_timeout: Duration,
    /// `--cluster-wait-fail`.
    pub wait_fail: WaitFail,
    /// `--cluster-start-degraded`.
    pub start_degraded: bool,
    /// `--cluster-store-timeout`.
    pub store_timeout: Duration,
    /// `--cluster-max-inflight`.
    pub max_inflight: usize,
    /// `--cluster-drain-interval`.
    pub drain_interval: Duration,
}

impl ClusterOptions {
    /// None without `--cluster-redis`; an error naming the flag for anything invalid.
    pub fn resolve(flags: &Settings, file: &Settings) -> Result<Option<Self>, String> {
        macro_rules! pick {
            ($f:ident) => {
                flags.$f.clone().or_else(|| file.$f.clone())
            };
        }
        let Some(redis) = pick!(cluster_redis) else {
            for (set, flag) in [
                (pick!(node_id).is_some(), "--node-id"),
                (pick!(peer_advertise).is_some(), "--peer-advertise"),
            ] {
                if set {
                    return Err(format!(
                        "{flag} is a cluster setting: it needs --cluster-redis"
                    ));
                }
            }
            return Ok(None);
        };
        parse_seeds(&redis).map_err(|e| e.to_string())?;
        let node = pick!(node_id).ok_or(
            "cluster mode (--cluster-redis) needs --node-id NAME, unique and stable across \
             restarts",
        )?;
        if node.is_empty()
            || node.len() > 64
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "--node-id {node:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
            ));
        }
        let peer_listen = pick!(peer_listen).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9967)));
        let secret = pick!(cluster_secret).filter(|s| !s.is_empty());
        if !peer_listen.ip().is_loopback() && secret.is_none() {
            return Err(format!(
                "--peer-listen {peer_listen} is not a loopback address: set --cluster-secret \
                 (or DDPUSHD_CLUSTER_SECRET) on every node so that only your nodes can poke"
            ));
        }
        if secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err("--cluster-secret must be at least 16 characters".into());
        }
        let wait_replicas = pick!(cluster_wait_replicas).unwrap_or(1);
        let wait_timeout = pick!(cluster_wait_timeout).unwrap_or(Duration::from_millis(50));
        if wait_replicas > 0 && wait_timeout.is_zero() {
            return Err("--cluster-wait-timeout must be positive".into());
        }
        let store_timeout = pick!(cluster_store_timeout).unwrap_or(Duration::from_millis(500));
        if store_timeout.is_zero() {
            return Err("--cluster-store-timeout must be positive".into());
        }
        if wait_replicas > 0 && wait_timeout >= store_timeout {
            return Err(format!(
                "--cluster-wait-timeout ({}) must be shorter than --cluster-store-timeout ({})",
                humantime::format_duration(wait_timeout),
                humantime::format_duration(store_timeout)
            ));
        }
        let max_inflight = pick!(cluster_max_inflight).unwrap_or(1024);
        if max_inflight == 0 {
            return Err("--cluster-max-inflight must be at least 1".into());
        }
        let drain_interval = pick!(cluster_drain_interval).unwrap_or(Duration::from_secs(1));
        if drain_interval.is_zero() {
            return Err("--cluster-drain-interval must be positive".into());
        }
        Ok(Some(ClusterOptions {
            redis,
            node: NodeId(node),
            peer_listen,
            peer_advertise: pick!(peer_advertise),
            secret,
            wait_replicas,
            wait_timeout,
            wait_fail: pick!(cluster_wait_fail).unwrap_or(WaitFail::Ff),
            start_degraded: pick!(cluster_start_degraded).unwrap_or(false),
            store_timeout,
            max_inflight,
            drain_interval,
        }))
    }
}
