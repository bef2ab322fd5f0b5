//! Command line and config file. Every flag has a TOML key of the same name (kebab-case);
//! a flag overrides the file, the file overrides the default. The flag names are a public
//! interface: keep them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ddpush_proto::{Config, Limits, ReplyPolicy};
use serde::Deserialize;

use crate::persist::Fsync;

/// ddpushd: a DDPush v1 push server (UDP and TCP 9966 for devices, TCP 9999 for app servers).
#[derive(Debug, Parser)]
#[command(name = "ddpushd", version = env!("DDPUSH_VERSION"), about, long_about = None)]
pub struct Cli {
    /// Server settings (also accepted as keys of the --config file).
    #[command(flatten)]
    pub settings: Settings,
    /// Read settings from this TOML file (keys as the flag names, e.g. `push-listen = "..."`).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Subcommand (default: run the server).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Things ddpushd can do besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load an upstream DDPush `nodeStatus.dat` into the data directory, keeping pending items,
    /// then exit. Records already present for the same uuid are replaced.
    ImportDdpush {
        /// The upstream file.
        file: PathBuf,
        /// Import into this Redis Cluster instead (as the server's --cluster-redis; the
        /// other cluster flags go before the subcommand)
        #[arg(long, value_name = "URL,...")]
        cluster_redis: Option<String>,
        /// With --cluster-redis: the node id to use (any name; the import binds nothing)
        #[arg(long, value_name = "NAME", default_value = "import")]
        node_id: String,
    },
    /// Ask the running server's admin endpoint (the configured admin-listen, with the
    /// configured token) whether it is ready; exit 0 if so, 1 with the reason if not. For
    /// container health checks and scripts.
    Probe {
        /// Path to ask: /readyz (ready to serve) or /healthz (alive).
        #[arg(long, default_value = "/readyz")]
        path: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = duration)]
        timeout: Duration,
    },
    /// Read every snapshot and journal in the data directory and report, per file, the whole
    /// frames read and the first bad offset and what it means. Exits 1 if start-up would refuse.
    Check {
        /// Also do what `recover` does.
        #[arg(long)]
        repair: bool,
    },
    /// Keep every whole frame before the first damage of each damaged file, move the damaged
    /// original aside (never deleted), and say how many frames were kept and bytes set aside.
    Recover,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 50s, 10m, 30days)"))
}

/// Where the optional admin HTTP endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminListen {
    /// Disabled.
    None,
    /// Listening on this address.
    Addr(SocketAddr),
}

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(AdminListen::None);
        }
        s.parse()
            .map(AdminListen::Addr)
            .map_err(|e| format!("{s:?}: {e} (expected ADDR:PORT or none)"))
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv4 or IPv6 network in CIDR form, for the push-port allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map(V4).unwrap_or(V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(n), V4(a)) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & m == u32::from(a) & m
            }
            (V6(n), V6(a)) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|e| format!("{s:?}: {e} (expected CIDR like 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?
        };
        Ok(Cidr { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Every setting. `None` means "not given here"; [`Settings::resolve`] applies defaults.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Device address, UDP and TCP [default: 0.0.0.0:9966]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// App-server push address (TCP). Loopback by default: app servers on other hosts need
    /// an explicit --push-listen 0.0.0.0:9999 [default: 127.0.0.1:9999]
    #[arg(long, value_name = "ADDR")]
    pub push_listen: Option<SocketAddr>,
    /// Admin HTTP endpoint (/metrics, /status, /clients, /push), or `none`
    /// [default: 127.0.0.1:9900]
    #[arg(long, value_name = "ADDR|none")]
    pub admin_listen: Option<AdminListen>,
    /// Bearer token for the admin endpoint; required when it listens beyond loopback
    #[arg(
        long,
        value_name = "TOKEN",
        env = "DDPUSHD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Networks allowed to connect to the push port, comma-separated CIDRs
    /// [default: any]
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub push_allow: Option<Vec<Cidr>>,
    /// Data directory for the snapshot and journals [default: ./data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Heartbeat reply when nothing is pending [default: never]
    #[arg(long, value_name = "never|always|sa_changed")]
    pub heartbeat_reply: Option<ReplyPolicy>,
    /// Journal fsync policy: always (survives power loss), interval (every second), never
    /// [default: interval]
    #[arg(long, value_enum)]
    pub fsync: Option<Fsync>,
    /// Snapshot period; snapshots capture heartbeat times and let journals be deleted
    /// [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub snapshot_interval: Option<Duration>,
    /// Devices' heartbeat interval [default: 50s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// Grace after the interval before a client counts as offline [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub online_grace: Option<Duration>,
    /// Largest 0x20 payload in bytes; a push announcing more is cut off [default: 500]
    #[arg(long, value_name = "BYTES")]
    pub max_content: Option<u16>,
    /// Most client records; pushes for new uuids beyond it get 0x01 [default: 10000000]
    #[arg(long, value_name = "N")]
    pub max_clients: Option<usize>,
    /// Remove records with no heartbeat for this long and nothing pending [default: 30days]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub idle_expiry: Option<Duration>,
    /// Idle records with pending items are removed once their newest push is this old
    /// [default: 30days]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub pending_ttl: Option<Duration>,
    /// In-flight window of the ack rule: a heartbeat settles the 0x10/0x20 sends made more
    /// than this before it (their acks are in or lost); younger ones may still be acked
    /// [default: 200ms]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub ack_window: Option<Duration>,
    /// Signed devices: packets stamped further than this from the server's clock are dropped,
    /// and nonces are remembered this long (PROTOCOL.md 9.3) [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub replay_window: Option<Duration>,
    /// Whether a heartbeat from an unknown uuid creates its record [default: true]
    #[arg(long, value_name = "BOOL")]
    pub create_on_heartbeat: Option<bool>,
    /// Accept device TCP connections on the listen address [default: true]
    #[arg(long, value_name = "BOOL")]
    pub device_tcp: Option<bool>,
    /// Idle timeout of device TCP connections [default: 300s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub device_tcp_idle: Option<Duration>,
    /// Idle timeout of push connections [default: 600s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub push_tcp_idle: Option<Duration>,
    /// Most concurrent TCP connections, both ports [default: 100000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,
    /// Most concurrent TCP connections from one IP, per port [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// UDP socket send and receive buffer size in bytes [default: 33554432]
    #[arg(long, value_name = "BYTES")]
    pub udp_buffer: Option<usize>,
    /// Log line format on stderr: text (for people) or json (one object per line, for log
    /// shippers) [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Abuse limits on (datagram rate per IP, answer rate per uuid, amplification bound)
    /// [default: true]
    #[arg(long, value_name = "BOOL")]
    pub limits: Option<bool>,
    /// Datagrams per second accepted from one IP [default: 5000]
    #[arg(long, value_name = "N")]
    pub limit_source_rate: Option<u32>,
    /// Heartbeat answers per second per uuid, sustained (burst 4x) [default: 5]
    #[arg(long, value_name = "N")]
    pub limit_uuid_rate: Option<u32>,
    /// Heartbeat-triggered bytes sent per byte received from an IP [default: 3]
    #[arg(long, value_name = "N")]
    pub limit_amplification: Option<u32>,
    /// Cluster mode: the Redis Cluster's seed nodes, comma-separated redis:// or rediss://
    /// URLs (a password in the URL works). Without it, ddpushd is a single node [default: off]
    #[arg(long, value_name = "URL,...")]
    pub cluster_redis: Option<String>,
    /// This node's name in the cluster: unique and stable across restarts (letters, digits,
    /// `.`, `_`, `-`; at most 64); required in cluster mode
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Node-to-node link address (TCP) [default: 127.0.0.1:9967]
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,
    /// The address other nodes dial for the node-to-node link, if not the bound
    /// --peer-listen address [default: the bound --peer-listen address]
    #[arg(long, value_name = "ADDR")]
    pub peer_advertise: Option<SocketAddr>,
    /// Shared secret that authenticates node-to-node links; required when --peer-listen is
    /// not loopback
    #[arg(
        long,
        value_name = "SECRET",
        env = "DDPUSHD_CLUSTER_SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
    /// Replicas that must have a push (Redis WAIT) before it is answered 0x00 [default: 1]
    #[arg(long, value_name = "N")]
    pub cluster_wait_replicas: Option<u32>,
    /// How long a push waits for those replicas [default: 50ms]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub cluster_wait_timeout: Option<Duration>,
    /// The answer when the replicas did not confirm in time: ff (0xFF; the push may still be
    /// delivered, the app server should retry) or accept (0x00 on the master's word alone)
    /// [default: ff]
    #[arg(long, value_enum)]
    pub cluster_wait_fail: Option<crate::cluster::store::WaitFail>,
    /// Start even when the Redis Cluster is unreachable (pushes get 0xFF until it is back)
    /// instead of refusing to start [default: false]
    #[arg(long, value_name = "BOOL")]
    pub cluster_start_degraded: Option<bool>,
    /// A store operation without an answer after this long has failed (a push gets 0xFF)
    /// [default: 500ms]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub cluster_store_timeout: Option<Duration>,
    /// Most store operations in flight; pushes beyond it wait (back-pressure on the push
    /// connections), they are never dropped [default: 1024]
    #[arg(long, value_name = "N")]
    pub cluster_max_inflight: Option<usize>,
    /// How often a node drains its dirty marks (pushes whose poke it missed) [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    #[serde(default, with = "humantime_serde")]
    pub cluster_drain_interval: Option<Duration>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// `tracing`'s human-readable lines, `key=value` fields.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`).
    Json,
}

/// Everything the server needs, defaults applied.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Device address.
    pub listen: SocketAddr,
    /// Push address.
    pub push_listen: SocketAddr,
    /// Admin address.
    pub admin_listen: AdminListen,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// Push-port allowlist (empty: any).
    pub push_allow: Vec<Cidr>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Fsync policy.
    pub fsync: Fsync,
    /// Snapshot period.
    pub snapshot_interval: Duration,
    /// Device TCP enabled.
    pub device_tcp: bool,
    /// UDP buffer size.
    pub udp_buffer: usize,
    /// Log line format.
    pub log_format: LogFormat,
    /// The core's configuration.
    pub core: Config,
    /// Cluster mode (`--cluster-redis`), if on.
    pub cluster: Option<crate::cluster::ClusterOptions>,
}

impl Settings {
    /// Reads a TOML file; unknown keys and bad values are errors naming the key.
    pub fn from_file(path: &std::path::Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            format!(
                "config file {}: {}",
                path.display(),
                e.to_string().replace('\n', " ").trim()
            )
        })
    }

    /// `self` (flags) over `file` over defaults.
    pub fn resolve(self, file: Settings) -> Result<ServerConfig, String> {
        let cluster = crate::cluster::ClusterOptions::resolve(&self, &file)?;
        macro_rules! pick {
            ($f:ident, $d:expr) => {
                self.$f.or(file.$f).unwrap_or($d)
            };
        }
        let base = Config::default();
        let lim = Limits::default();
        let limits_on = pick!(limits, lim.enabled);
        let uuid_rate = pick!(limit_uuid_rate, lim.uuid_rate);
        let source_rate = pick!(limit_source_rate, lim.source_rate);
        let core = Config {
            reply_policy: pick!(heartbeat_reply, base.reply_policy),
            heartbeat_interval: pick!(heartbeat_interval, base.heartbeat_interval),
            online_grace: pick!(online_grace, base.online_grace),
            max_content: pick!(max_content, base.max_content),
            max_clients: pick!(max_clients, base.max_clients),
            create_on_heartbeat: pick!(create_on_heartbeat, base.create_on_heartbeat),
            idle_expiry: pick!(idle_expiry, base.idle_expiry),
            pending_ttl: pick!(pending_ttl, base.pending_ttl),
            ack_window: pick!(ack_window, base.ack_window),
            replay_window: pick!(replay_window, base.replay_window),
            device_tcp_idle: pick!(device_tcp_idle, base.device_tcp_idle),
            push_tcp_idle: pick!(push_tcp_idle, base.push_tcp_idle),
            hash_seed: random_seed(),
            limits: Limits {
                enabled: limits_on,
                source_rate,
                source_burst: source_rate.saturating_mul(2),
                uuid_rate,
                uuid_burst: uuid_rate.saturating_mul(4),
                amp_factor: pick!(limit_amplification, lim.amp_factor),
                max_conns: pick!(max_connections, lim.max_conns),
                conns_per_ip: pick!(max_connections_per_ip, lim.conns_per_ip),
                ..lim
            },
        };
        core.validate().map_err(|e| e.to_string())?;
        let admin_listen = pick!(
            admin_listen,
            AdminListen::Addr(SocketAddr::from(([127, 0, 0, 1], 9900)))
        );
        let admin_token = self.admin_token.or(file.admin_token);
        if let AdminListen::Addr(a) = admin_listen {
            if !a.ip().is_loopback() && admin_token.is_none() {
                return Err(format!(
                    "--admin-listen {a} is not a loopback address: set --admin-token \
                     (or DDPUSHD_ADMIN_TOKEN) so the admin API is not open to the network"
                ));
            }
        }
        Ok(ServerConfig {
            cluster,
            listen: pick!(listen, SocketAddr::from(([0, 0, 0, 0], 9966))),
            push_listen: pick!(push_listen, SocketAddr::from(([127, 0, 0, 1], 9999))),
            admin_listen,
            admin_token,
            push_allow: pick!(push_allow, Vec::new()),
            data_dir: pick!(data_dir, PathBuf::from("./data")),
            fsync: pick!(fsync, Fsync::Interval),
            snapshot_interval: pick!(snapshot_interval, Duration::from_secs(60)),
            device_tcp: pick!(device_tcp, true),
            udp_buffer: pick!(udp_buffer, 32 << 20),
            log_format: pick!(log_format, LogFormat::Text),
            core,
        })
    }
}

/// The hash seed keeps uuids from being chosen to collide in the index. Drawn here, in the
/// adapter, so the core stays deterministic.
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // Without OS randomness the seed is fixed: slower under a collision attack, still correct.
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}
