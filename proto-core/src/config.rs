//! The knobs of the core. Every field has a default equal to upstream's behaviour or, where
//! PROTOCOL.md section 8 asks for better, to the safe choice.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::DEFAULT_MAX_CONTENT;
use crate::limits::Limits;

/// The devices' heartbeat interval (PROTOCOL.md 4.6): the SDK default that the node's online
/// window is built on and that [`crate::session::DeviceSession`] keeps. One constant, so the
/// server's expectation and the clients' behaviour cannot drift apart.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(50);

/// How far a signed packet's timestamp may be from the receiver's clock, and how long its
/// nonce is remembered (PROTOCOL.md 9.3, 9.4): the node's default and the window a signed
/// [`crate::session::DeviceSession`] applies to sealed answers.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);

/// When a heartbeat with nothing pending gets the 5-byte `0x00` reply (PROTOCOL.md 4.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyPolicy {
    /// Never (upstream's default).
    #[default]
    Never,
    /// Always.
    Always,
    /// Only when the UDP source address differs from the recorded one.
    SaChanged,
}

impl std::str::FromStr for ReplyPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(ReplyPolicy::Never),
            "always" => Ok(ReplyPolicy::Always),
            "sa_changed" => Ok(ReplyPolicy::SaChanged),
            other => Err(format!(
                "unknown heartbeat reply policy {other:?} (expected never, always or sa_changed)"
            )),
        }
    }
}

/// Configuration of a [`crate::Node`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Heartbeat reply policy.
    pub reply_policy: ReplyPolicy,
    /// The devices' heartbeat interval (50 s in the SDKs).
    pub heartbeat_interval: Duration,
    /// Extra time after the interval before a client counts as offline (10 s).
    pub online_grace: Duration,
    /// Largest 0x20 payload; a push announcing more closes its connection (500).
    pub max_content: u16,
    /// Most client records held; new uuids beyond it are refused.
    pub max_clients: usize,
    /// Whether a heartbeat from an unknown uuid creates its record (upstream: yes).
    pub create_on_heartbeat: bool,
    /// A record with no heartbeat for this long is removed if nothing is pending (30 days).
    pub idle_expiry: Duration,
    /// A record with pending items is removed only once idle and its newest push is this old.
    pub pending_ttl: Duration,
    /// The in-flight window of the ack rule (`crate::ack`): a heartbeat may have crossed a
    /// send younger than this on the network, so that send's ack may still come after it.
    /// Older sends are settled by the heartbeat. Upstream's sequences need it below the
    /// shortest gap between a send and the next heartbeat that follows its loss (200 ms).
    pub ack_window: Duration,
    /// Idle timeout of device TCP connections (300 s).
    pub device_tcp_idle: Duration,
    /// Idle timeout of push connections (600 s).
    pub push_tcp_idle: Duration,
    /// Seed of the uuid hash, chosen at random by the adapter so uuids cannot be picked to
    /// collide. The core itself never draws randomness.
    pub hash_seed: u64,
    /// Signed packets (PROTOCOL.md 9.3) whose timestamp is further than this from the node's
    /// clock are dropped; it is also how long their nonces are remembered (60 s).
    pub replay_window: Duration,
    /// Abuse limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            reply_policy: ReplyPolicy::Never,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            online_grace: Duration::from_secs(10),
            max_content: DEFAULT_MAX_CONTENT,
            max_clients: 10_000_000,
            create_on_heartbeat: true,
            idle_expiry: Duration::from_secs(30 * 24 * 3600),
            pending_ttl: Duration::from_secs(30 * 24 * 3600),
            ack_window: Duration::from_millis(200),
            device_tcp_idle: Duration::from_secs(300),
            push_tcp_idle: Duration::from_secs(600),
            hash_seed: 0,
            replay_window: REPLAY_WINDOW,
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// The online window: interval plus grace (60 s by default).
    pub fn online_window(&self) -> Duration {
        self.heartbeat_interval + self.online_grace
    }

    /// Checks the values an adapter read from flags or files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_content == 0 {
            return Err(ConfigError("max_content must be at least 1".into()));
        }
        if self.online_window().as_secs() == 0 {
            return Err(ConfigError("the online window must be at least 1 s".into()));
        }
        if self.online_window() > Duration::from_secs(24 * 3600) {
            return Err(ConfigError("the online window must be at most 24 h".into()));
        }
        if self.max_clients == 0 || self.max_clients > u32::MAX as usize - 1 {
            return Err(ConfigError(
                "max_clients must be between 1 and 2^32-2".into(),
            ));
        }
        if self.replay_window.as_secs() == 0 || self.replay_window > Duration::from_secs(3600) {
            return Err(ConfigError(
                "replay_window must be between 1 s and 1 h".into(),
            ));
        }
        if self.ack_window > crate::ack::MAX_WINDOW {
            return Err(ConfigError("ack_window must be at most 60 s".into()));
        }
        Ok(())
    }
}

/// A configuration value out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);
