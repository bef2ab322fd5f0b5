//! Scenarios: a world built from a seed, faults injected at seeded moments, guarantees checked.

use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::signed::{DeviceKey, SignedDrop};
use ddpush_proto::{Config, Content, DownMsg, Event, Pending, PushMsg};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::app::{self, Planned};
use crate::attacker::{self, AttackPlan, AttackStats};
use crate::device::{self, Plan};
use crate::net::{self, NatPlan, NetStats};
use crate::server::{self, DEVICE_PORT, PUSH_PORT};
use crate::world::{device_uuid, Shared};

/// The scenarios of docs/SIMULATION.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 1: UDP devices on links losing 5-30% (bursty and steady).
    Lossy,
    /// 2: devices go silent past the online window and return from a new port.
    Offline,
    /// 3: the server is cut off from device groups and the app server for minutes.
    Partition,
    /// 4: the server host crashes (also between journal and reply, and mid-snapshot).
    Crash,
    /// 5: TCP devices that lose their connection and reconnect.
    Tcp,
    /// 6: all of the above at once, with more devices.
    Mixed,
    /// 7: the server's disk fills (journal writes and snapshots fail) and crashes come on top:
    /// pushes answered `0xFF` must never be delivered, every `0x00` must be.
    DiskFull,
    /// 8: every device is signed (PROTOCOL.md 9), clocks skewed within the window, on lossy
    /// and clean links, with offline periods and crashes; an attacker who knows every uuid
    /// replays what it copies off the server's link and heartbeats every uuid in v1. It must
    /// never get a mask or payload or move an address; the devices must still get every push.
    Signed,
}

impl Kind {
    /// Every scenario.
    pub const ALL: [Kind; 8] = [
        Kind::Lossy,
        Kind::Offline,
        Kind::Partition,
        Kind::Crash,
        Kind::Tcp,
        Kind::Mixed,
        Kind::DiskFull,
        Kind::Signed,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lossy => "lossy",
            Kind::Offline => "offline",
            Kind::Partition => "partition",
            Kind::Crash => "crash",
            Kind::Tcp => "tcp",
            Kind::Mixed => "mixed",
            Kind::DiskFull => "disk-full",
            Kind::Signed => "signed",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// The sizes and faults of one run. Build with [`Params::new`], then adjust.
#[derive(Clone, Debug)]
pub struct Params {
    /// Which scenario.
    pub kind: Kind,
    /// The seed of everything (turmoil's RNG and ours).
    pub seed: u64,
    /// UDP devices.
    pub udp_devices: usize,
    /// TCP devices.
    pub tcp_devices: usize,
    /// Hosts the UDP devices are spread over (each is one IP and one link to the server).
    pub udp_hosts: usize,
    /// Pushes per device, on average.
    pub pushes_per_device: f64,
    /// Length of the push phase (ms); faults happen in it.
    pub push_phase: u64,
    /// Lossy phase after the pushes (ms).
    pub settle: u64,
    /// Link loss on some hosts (turmoil, bursty) and in some devices (steady).
    pub loss: bool,
    /// Share of UDP devices that go silent past the online window and come back.
    pub offline: f64,
    /// Partitions of device hosts and the app server.
    pub partitions: bool,
    /// Server crashes.
    pub crashes: usize,
    /// TCP devices drop their connection and reconnect.
    pub tcp_drops: bool,
    /// The server's disk fills twice during the push phase (writes fail, pushes get `0xFF`).
    pub disk_full: bool,
    /// UDP device hosts sit behind NATs that rebind idle mappings and, on lossy hosts,
    /// duplicate and hold back datagrams (`sim/src/net.rs`).
    pub nat: bool,
    /// Every device is a signed device with its own key (provisioned before it starts).
    pub signed: bool,
    /// Largest amount a signed device's clock is behind the server's (s).
    pub max_skew_s: i64,
    /// Largest amount a signed device's clock is ahead of the server's (s). 0 in the signed
    /// scenario: a clock ahead by d makes the last d seconds of its packets before a server
    /// crash replayable after the restart (SECURITY.md); `--skew-ahead` shows it.
    pub max_skew_ahead_s: i64,
    /// An attacker host replays captured signed packets and heartbeats every uuid in v1
    /// (`sim/src/attacker.rs`).
    pub attacker: bool,
    /// Share of loss-free UDP devices without away periods that restart once during the push
    /// phase (new session, new socket); with an attacker, it injects the answers it captured
    /// before the restart.
    pub device_restarts: f64,
}

/// Clean phase at the end: no loss, no faults; long enough for every record to drain.
const CLEAN: u64 = 200_000;
/// The last stretch of the clean phase in which no device may receive anything.
const QUIET: u64 = 70_000;
/// When pushes start (every device has sent its first heartbeat).
const PUSH_START: u64 = 55_000;
/// Largest amount a signed scenario device's clock is behind the server's (s).
const SIGNED_SKEW_S: i64 = 20;

impl Params {
    /// The CI-sized parameters of a scenario (`scale` 1); larger scales multiply devices.
    pub fn new(kind: Kind, seed: u64, scale: usize) -> Params {
        let s = scale.max(1);
        let base = Params {
            kind,
            seed,
            udp_devices: 0,
            tcp_devices: 0,
            udp_hosts: 4,
            pushes_per_device: 3.0,
            push_phase: 300_000,
            settle: 0,
            loss: false,
            offline: 0.0,
            partitions: false,
            crashes: 0,
            tcp_drops: false,
            disk_full: false,
            nat: true,
            signed: false,
            max_skew_s: 0,
            max_skew_ahead_s: 0,
            attacker: false,
            device_restarts: 0.0,
        };
        match kind {
            Kind::Lossy => Params {
                udp_devices: 300 * s,
                udp_hosts: 6,
                settle: 600_000,
                loss: true,
                ..base
            },
            Kind::Offline => Params {
                udp_devices: 200 * s,
                udp_hosts: 2,
                offline: 0.4,
                ..base
            },
            Kind::Partition => Params {
                udp_devices: 200 * s,
                partitions: true,
                push_phase: 480_000,
                ..base
            },
            Kind::Crash => Params {
                udp_devices: 200 * s,
                tcp_devices: 40 * s,
                crashes: 8,
                push_phase: 420_000,
                ..base
            },
            Kind::Tcp => Params {
                tcp_devices: 150 * s,
                tcp_drops: true,
                ..base
            },
            Kind::Mixed => Params {
                udp_devices: 1600 * s,
                tcp_devices: 400 * s,
                udp_hosts: 8,
                pushes_per_device: 2.0,
                push_phase: 480_000,
                settle: 300_000,
                loss: true,
                offline: 0.2,
                partitions: true,
                crashes: 6,
                tcp_drops: true,
                ..base
            },
            Kind::DiskFull => Params {
                udp_devices: 150 * s,
                tcp_devices: 30 * s,
                pushes_per_device: 6.0,
                crashes: 3,
                disk_full: true,
                ..base
            },
            Kind::Signed => Params {
                udp_devices: 200 * s,
                tcp_devices: 40 * s,
                settle: 200_000,
                loss: true,
                offline: 0.2,
                crashes: 3,
                signed: true,
                max_skew_s: SIGNED_SKEW_S,
                attacker: true,
                device_restarts: 0.3,
                ..base
            },
        }
    }

    /// The command that replays this run.
    pub fn replay(&self, scale: usize) -> String {
        format!(
            "cargo run -p ddpush-sim --release -- --scenario {} --seed {} --scale {}{}{}",
            self.kind.name(),
            self.seed,
            scale,
            if self.nat { "" } else { " --nat off" },
            if self.max_skew_ahead_s > 0 {
                format!(" --skew-ahead {}", self.max_skew_ahead_s)
            } else {
                String::new()
            }
        )
    }
}

/// How the server's links to one UDP device host misbehave.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// No loss, never partitioned: the exact per-episode checks apply.
    Clean,
    /// turmoil's bursty loss at this fail rate.
    Bursty(f64),
    /// Steady random loss inside each device (5-30%).
    Steady,
    /// Partitioned from the server for minutes.
    Cut,
}

fn roles(p: &Params) -> Vec<Role> {
    let mut rng = SmallRng::seed_from_u64(p.seed ^ 0x5eed_0001);
    let mut pattern = Vec::new();
    if p.offline > 0.0 || p.crashes > 0 || !p.loss {
        pattern.push(Role::Clean);
    }
    if p.loss {
        pattern.push(Role::Bursty(0.0));
        pattern.push(Role::Steady);
    }
    if p.partitions {
        pattern.push(Role::Cut);
    }
    (0..p.udp_hosts)
        .map(|h| match pattern[h % pattern.len()] {
            Role::Bursty(_) => Role::Bursty(rng.random_range(0.05..0.25)),
            r => r,
        })
        .collect()
}

/// A scheduled fault.
#[derive(Clone, Debug)]
enum Fault {
    /// Crash now (how), restart after `down` ms.
    Crash(CrashHow, u64),
    Partition(Vec<String>, u64),
    /// The disk is full for this many ms.
    DiskFull(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CrashHow {
    AtRandom,
    AfterJournal,
    InSnapshot,
}

/// Measured results of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Seed.
    pub seed: u64,
    /// Devices simulated.
    pub devices: usize,
    /// Simulated time (s).
    pub sim_secs: u64,
    /// Pushes answered 0x00.
    pub accepted: usize,
    /// Pushes answered 0xFF because the disk was full (never delivered).
    pub refused: usize,
    /// Devices not judged: a push to them was in flight across a crash and then refused.
    pub unknown: usize,
    /// Immediate (0 heartbeats) and later deliveries of 0x20 payloads, by heartbeats needed.
    pub hb_histogram: Vec<usize>,
    /// 0x20 payloads delivered, and the mean heartbeats they took.
    pub hb_mean: f64,
    /// Receipts of a 0x20 payload the device had already received.
    pub duplicates: usize,
    /// The most receipts of one payload after its first.
    pub max_duplicates: usize,
    /// Crashes and restarts.
    pub crashes: usize,
    /// Crash points: after journal, in snapshot.
    pub crash_points: (usize, usize),
    /// Snapshots written, and torn by a crash.
    pub snapshots: (u64, u64),
    /// App server reconnects.
    pub app_reconnects: u32,
    /// Offline transitions checked, and away/reconnect episodes checked.
    pub offline_checked: usize,
    /// Episodes whose return delivery was checked.
    pub episodes_checked: usize,
    /// Trace hash (same seed, same hash).
    pub trace: u64,
    /// Items in the trace.
    pub trace_items: u64,
    /// What the NATs did.
    pub net: NetStats,
    /// Devices whose last receipt was an older payload that the network delivered after the
    /// newest (both were in flight together).
    pub reordered_payloads: usize,
    /// Signed scenario: the server's signed-device counters, summed over restarts.
    pub signed: Option<crate::world::SignedCounts>,
    /// Server packets signed devices dropped unacked (a NAT's duplicate of a sealed answer
    /// is a replay to the device).
    pub device_refused: u64,
    /// Signed scenario: what the attacker did and got.
    pub attack: Option<AttackStats>,
    /// Devices that restarted (new session, new socket).
    pub device_restarts: usize,
    /// Answers captured before a device's restart and injected after it: refused and accepted
    /// by the restarted device (accepted must be 0).
    pub restart_replays: (u64, u64),
}

impl Report {
    /// Receipts of an already received 0x20 payload per 1,000 accepted pushes.
    pub fn dups_per_1000(&self) -> f64 {
        if self.accepted == 0 {
            0.0
        } else {
            self.duplicates as f64 * 1000.0 / self.accepted as f64
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} seed={} devices={} sim={}s accepted={} refused={} unjudged={} payload-delivery-heartbeats={:?} mean={:.2} \
             dups={} ({:.1}/1000) max-dups/item={} crashes={} (after-journal {}, in-snapshot {}) \
             snapshots={}/{} torn app-reconnects={} offline-checked={} episodes-checked={} \
             nat-rebinds={} dup-datagrams={} held-datagrams={} overtaken-payloads={} \
             trace={:016x} ({} items)",
            self.scenario,
            self.seed,
            self.devices,
            self.sim_secs,
            self.accepted,
            self.refused,
            self.unknown,
            self.hb_histogram,
            self.hb_mean,
            self.duplicates,
            self.dups_per_1000(),
            self.max_duplicates,
            self.crashes,
            self.crash_points.0,
            self.crash_points.1,
            self.snapshots.0,
            self.snapshots.1,
            self.app_reconnects,
            self.offline_checked,
            self.episodes_checked,
            self.net.rebinds,
            self.net.duplicated,
            self.net.held,
            self.reordered_payloads,
            self.trace,
            self.trace_items
        )?;
        if let Some(s) = &self.signed {
            write!(
                f,
                " signed: accepted={} dropped={:?} unsigned-refused={:?} device-refused={}",
                s.accepted, s.dropped, s.unsigned, self.device_refused
            )?;
        }
        if self.device_restarts > 0 {
            write!(
                f,
                " device-restarts={} injected-after-restart: refused={} accepted={}",
                self.device_restarts, self.restart_replays.0, self.restart_replays.1
            )?;
        }
        if let Some(a) = &self.attack {
            write!(
                f,
                " attacker: replayed={} tcp-replayed={} forged={} v1-heartbeats={} v1-acks={} \
                 got: bare-0x10={} 0x11={} 0x20={} heartbeat-replies={} sealed={} other={} \
                 address-moves={} restarts-found={} injected={}",
                a.replayed,
                a.tcp_replayed,
                a.forged,
                a.v1_heartbeats,
                a.v1_acks,
                a.got_notify,
                a.got_bits,
                a.got_payload,
                a.got_reply,
                a.got_sealed,
                a.got_other,
                a.moved,
                a.restarts_found,
                a.injected
            )?;
        }
        Ok(())
    }
}

fn core_config(seed: u64) -> Config {
    let mut cfg = Config {
        hash_seed: seed,
        ..Config::default()
    };
    // Abuse limits off: each simulated device host stands for many real clients behind one
    // IP (hundreds per host here), so the per-IP source rate and amplification budget, sized
    // for one IP per client or a small NAT, would throttle legitimate re-sends and turn a
    // delivery check into a test of the limiter. The limiter has its own tests in proto-core.
    cfg.limits.enabled = false;
    cfg
}

/// Runs one scenario; `Err` lists every violated guarantee.
pub fn run(p: &Params) -> Result<Report, String> {
    let mut rng = SmallRng::seed_from_u64(p.seed);
    let n = p.udp_devices + p.tcp_devices;
    let push_end = PUSH_START + p.push_phase;
    let clean_at = push_end + p.settle;
    let end = clean_at + CLEAN;
    let roles = roles(p);
    let tcp_hosts = p.tcp_devices.div_ceil(200);

    // Devices: UDP ones first, spread round-robin over the hosts.
    let mut host_of = Vec::with_capacity(n);
    let mut plans = Vec::with_capacity(n);
    for i in 0..n {
        let tcp = i >= p.udp_devices;
        let host = if tcp {
            p.udp_hosts + (i - p.udp_devices) % tcp_hosts.max(1)
        } else {
            i % p.udp_hosts
        };
        let role = if tcp { Role::Clean } else { roles[host] };
        let loss = if role == Role::Steady {
            rng.random_range(0.05..0.30)
        } else {
            0.0
        };
        let mut away = Vec::new();
        if tcp && p.tcp_drops {
            let mut t = PUSH_START + 5_000;
            for _ in 0..rng.random_range(1..=3) {
                let from = rng.random_range(t..push_end - 30_000);
                let until = from + rng.random_range(2_000..120_000);
                if until + 10_000 > push_end {
                    break;
                }
                away.push((from, until));
                t = until + 5_000;
                if t + 30_000 >= push_end {
                    break;
                }
            }
        } else if !tcp && role == Role::Clean && rng.random_bool(p.offline) {
            let from = rng.random_range(PUSH_START..push_end - 250_000);
            away.push((from, from + rng.random_range(90_000..240_000)));
        }
        // Drawn in the order the fields were always drawn in (appId, start, then the seed
        // below), so the other scenarios' runs stay as they were.
        let app_id = rng.random_range(1..=3);
        let start = rng.random_range(0..50_000);
        // A signed device's key and clock skew (drawn only in the signed scenario). A clock
        // behind the server's is at most as far behind as the device's start, so it never
        // reads a time before the simulation's epoch (1970 for a real clock).
        let (key, skew_s) = if p.signed {
            let id: u8 = rng.random();
            let key = DeviceKey::new(rng.random());
            let behind = p.max_skew_s.min(start as i64 / 1000 - 1).max(0);
            (
                Some((id, key)),
                rng.random_range(-behind..=p.max_skew_ahead_s),
            )
        } else {
            (None, 0)
        };
        host_of.push(host);
        plans.push(Plan {
            idx: i,
            app_id,
            tcp,
            loss,
            start,
            away,
            end,
            seed: rng.random(),
            key,
            skew_s,
            restart: None,
        });
    }
    // Device restarts, from an RNG of their own so the draws above stay as they were.
    if p.device_restarts > 0.0 {
        let mut rr = SmallRng::seed_from_u64(p.seed ^ 0x5eed_0004);
        for pl in plans.iter_mut() {
            if !pl.tcp
                && roles[host_of[pl.idx]] == Role::Clean
                && pl.away.is_empty()
                && rr.random_bool(p.device_restarts)
            {
                pl.restart = Some((rr.random_range(2_000..30_000), rr.random_range(500..5_000)));
            }
        }
    }

    // Pushes at random times to random devices; payloads are unique so receipts can be traced.
    let total = (n as f64 * p.pushes_per_device) as usize;
    let mut pushes: Vec<Planned> = (0..total)
        .map(|k| {
            let device = rng.random_range(0..n);
            let msg = match rng.random_range(0..3) {
                0 => PushMsg::Notify,
                1 => PushMsg::Bits(1u64 << rng.random_range(0..64)),
                _ => {
                    let len = rng.random_range(0..100);
                    let mut s = format!("m{k}:");
                    s.extend(std::iter::repeat_n('x', len));
                    PushMsg::Payload(Content::try_from(s).expect("about 100 bytes"))
                }
            };
            Planned {
                at: rng.random_range(PUSH_START..push_end),
                device,
                msg,
            }
        })
        .collect();
    pushes.sort_by_key(|x| x.at);

    // Faults.
    let mut faults: Vec<(u64, Fault)> = Vec::new();
    if p.partitions {
        let cut: Vec<String> = roles
            .iter()
            .enumerate()
            .filter(|(_, r)| **r == Role::Cut)
            .map(|(h, _)| {
                if p.nat {
                    format!("nat{h}")
                } else {
                    format!("udp{h}")
                }
            })
            .collect();
        let mut a = cut.clone();
        a.push("app".into());
        faults.push((
            PUSH_START + rng.random_range(20_000..60_000),
            Fault::Partition(a, rng.random_range(150_000..240_000)),
        ));
        faults.push((
            push_end - rng.random_range(130_000..150_000),
            Fault::Partition(vec!["app".into()], rng.random_range(60_000..120_000)),
        ));
    }
    for k in 0..p.crashes {
        let how = match k % 3 {
            0 => CrashHow::AtRandom,
            1 => CrashHow::AfterJournal,
            _ => CrashHow::InSnapshot,
        };
        let at = rng.random_range(PUSH_START..push_end + p.settle / 2);
        faults.push((at, Fault::Crash(how, rng.random_range(1_000..20_000))));
    }
    if p.disk_full {
        for _ in 0..2 {
            let at = rng.random_range(PUSH_START..push_end);
            faults.push((at, Fault::DiskFull(rng.random_range(5_000..40_000))));
        }
    }
    faults.sort_by_key(|f| f.0);

    let uuids: Vec<_> = (0..n).map(device_uuid).collect();
    let sh = Shared::new(uuids.clone());
    *sh.provision.borrow_mut() = plans
        .iter()
        .filter_map(|pl| pl.key.clone().map(|(id, k)| (uuids[pl.idx], id, k)))
        .collect();
    let signed_uuids: Vec<_> = plans
        .iter()
        .filter(|pl| pl.key.is_some())
        .map(|pl| uuids[pl.idx])
        .collect();

    let mut b = turmoil::Builder::new();
    b.simulation_duration(Duration::from_millis(end + 120_000))
        .tick_duration(Duration::from_millis(50))
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(150))
        .udp_capacity(1 << 16)
        .tcp_capacity(1 << 16)
        .rng_seed(p.seed);
    let mut sim = b.build();

    let cfg = core_config(p.seed);
    {
        let sh = sh.clone();
        sim.host("server", move || server::run(sh.clone(), cfg.clone()));
    }
    let server_ip = sim.lookup("server");
    let udp_addr: std::net::SocketAddr = (server_ip, DEVICE_PORT).into();
    // NATs in front of the UDP hosts: idle timeouts from 20 s (a rebind on every heartbeat)
    // to 120 s (never), duplication and holds only where the link is lossy anyway, so the
    // exact checks of loss-free hosts keep counting server re-sends only.
    let mut nat_rng = SmallRng::seed_from_u64(p.seed ^ 0x5eed_0002);
    let mut nat_addr = Vec::new();
    for (h, role) in roles.iter().enumerate() {
        if !p.nat {
            nat_addr.push(udp_addr);
            continue;
        }
        let lossy = matches!(role, Role::Bursty(_) | Role::Steady);
        let plan = NatPlan {
            seed: nat_rng.random(),
            idle_timeout: nat_rng.random_range(20_000..120_000),
            dup: if lossy { 0.005 } else { 0.0 },
            hold: if lossy { 0.02 } else { 0.0 },
            hold_max: 150,
        };
        let name = format!("nat{h}");
        let sh = sh.clone();
        sim.host(name.as_str(), move || {
            net::run(sh.clone(), plan.clone(), udp_addr)
        });
        // The NAT sits next to the server: a fixed short latency, so uplink copies of a
        // duplicated datagram arrive together.
        sim.set_link_latency(name.as_str(), "server", Duration::from_millis(2));
        nat_addr.push((sim.lookup(name.as_str()), DEVICE_PORT).into());
    }
    // The host whose link to the server carries a UDP host's traffic.
    let edge = |h: usize| {
        if p.nat {
            format!("nat{h}")
        } else {
            format!("udp{h}")
        }
    };
    for h in 0..p.udp_hosts + tcp_hosts {
        let name = if h < p.udp_hosts {
            format!("udp{h}")
        } else {
            format!("tcp{}", h - p.udp_hosts)
        };
        let mine: Vec<Plan> = plans
            .iter()
            .filter(|pl| host_of[pl.idx] == h)
            .cloned()
            .collect();
        let sh = sh.clone();
        let udp_addr = nat_addr.get(h).copied().unwrap_or(udp_addr);
        sim.client(name.as_str(), async move {
            let mut handles = Vec::new();
            for pl in mine {
                let sh = sh.clone();
                handles.push(tokio::task::spawn_local(async move {
                    if pl.tcp {
                        device::tcp(sh, pl, udp_addr).await
                    } else {
                        device::udp(sh, pl, udp_addr).await
                    }
                }));
            }
            for h in handles {
                h.await.map_err(|e| e.to_string())??;
            }
            Ok(())
        });
        if let Some(Role::Bursty(rate)) = roles.get(h) {
            sim.set_link_fail_rate(edge(h).as_str(), "server", *rate);
        }
    }
    {
        let sh = sh.clone();
        let push_addr = (server_ip, PUSH_PORT).into();
        sim.client("app", app::run(sh, pushes, push_addr, clean_at + CLEAN / 2));
    }
    let attacker_ip = if p.attacker {
        let plan = AttackPlan {
            seed: p.seed ^ 0x5eed_0003,
            start: 20_000,
            end,
            uuids: uuids.clone(),
        };
        let sh = sh.clone();
        let tcp_addr = (server_ip, DEVICE_PORT).into();
        sim.client(
            "attacker",
            attacker::run(sh.clone(), plan, udp_addr, tcp_addr),
        );
        let ip = sim.lookup("attacker");
        sh.capture.borrow_mut().on = Some(ip);
        Some(ip)
    } else {
        None
    };
    let mut moved_seen = std::collections::BTreeSet::new();
    let mut next_addr_check = 0u64;

    // Drive.
    let mut errors: Vec<String> = Vec::new();
    let mut report = Report {
        scenario: p.kind.name(),
        seed: p.seed,
        devices: n,
        ..Report::default()
    };
    let mut next_fault = 0usize;
    let mut repairs: Vec<(u64, Vec<String>)> = Vec::new();
    // Disk-full periods (start, end) ms: pushes answered in them may get 0xFF.
    let mut full_windows: Vec<(u64, u64)> = Vec::new();
    let mut restart_at: Option<u64> = None;
    let mut armed: Option<CrashHow> = None;
    let mut pre_crash: Option<Vec<Pending>> = None;
    let mut downtimes: Vec<(u64, u64)> = Vec::new();
    let mut pending_down = 0u64;
    let mut clean_done = false;
    loop {
        let done = sim.step().map_err(|e| format!("simulation error: {e}"))?;
        let now = sim.elapsed().as_millis() as u64;

        // A restart finished restoring: the durable state must equal the state at the crash.
        let restored = sh.faults.borrow_mut().restored.take();
        if let Some(r) = restored {
            let pre = pre_crash.take().unwrap_or_default();
            // After failed writes the journal lacks those turns' acks, creations and expiries
            // (their pushes were refused): the restored state may hold more, never less.
            let relaxed = sh.store.borrow().failed_writes > 0;
            if (relaxed && !covers(&r, &pre)) || (!relaxed && r != pre) {
                let lost = pre.iter().filter(|x| !r.contains(x)).count();
                errors.push(format!(
                    "restart at {now} ms: restored state differs from the state at the crash \
                     ({lost} of {} records differ)",
                    pre.len()
                ));
            }
        }

        let crash_now = sh.faults.borrow().halted
            || (armed == Some(CrashHow::AtRandom) && restart_at.is_none());
        if crash_now && restart_at.is_none() {
            let how = armed.take().unwrap_or(CrashHow::AtRandom);
            match how {
                CrashHow::AfterJournal => report.crash_points.0 += 1,
                CrashHow::InSnapshot => report.crash_points.1 += 1,
                CrashHow::AtRandom => {}
            }
            pre_crash = sh.node.borrow().as_ref().map(|n| n.pending());
            if let Some(node) = sh.node.borrow().as_ref() {
                sh.signed.borrow_mut().add(node);
            }
            sim.crash("server");
            *sh.node.borrow_mut() = None;
            {
                let mut f = sh.faults.borrow_mut();
                f.halted = false;
                f.crash_after_journal = false;
                f.crash_in_snapshot = false;
            }
            report.crashes += 1;
            restart_at = Some(now + pending_down);
            downtimes.push((now, now + pending_down));
        }
        if let Some(t) = restart_at {
            if now >= t {
                sh.faults.borrow_mut().want_restored = true;
                sim.bounce("server");
                restart_at = None;
            }
        }

        while next_fault < faults.len() && faults[next_fault].0 <= now {
            match &faults[next_fault].1 {
                Fault::Crash(how, down) => {
                    if armed.is_some() || restart_at.is_some() {
                        break; // one crash at a time; this one waits
                    }
                    armed = Some(*how);
                    pending_down = *down;
                    let mut f = sh.faults.borrow_mut();
                    f.crash_after_journal = *how == CrashHow::AfterJournal;
                    f.crash_in_snapshot = *how == CrashHow::InSnapshot;
                }
                Fault::Partition(hosts, dur) => {
                    for h in hosts {
                        sim.partition("server", h.as_str());
                    }
                    repairs.push((now + dur, hosts.clone()));
                }
                Fault::DiskFull(dur) => {
                    sh.faults.borrow_mut().disk_full = true;
                    full_windows.push((now, now + dur));
                }
            }
            next_fault += 1;
        }
        if sh.faults.borrow().disk_full && !full_windows.iter().any(|w| now < w.1) {
            sh.faults.borrow_mut().disk_full = false;
        }
        repairs.retain(|(t, hosts)| {
            if now >= *t {
                for h in hosts {
                    sim.repair("server", h.as_str());
                }
                false
            } else {
                true
            }
        });

        // No signed-only uuid's recorded address may ever be the attacker's.
        if let (Some(ip), true) = (attacker_ip, now >= next_addr_check) {
            next_addr_check = now + 1_000;
            if let Some(node) = sh.node.borrow().as_ref() {
                for u in &signed_uuids {
                    let at_attacker = node
                        .record(u)
                        .and_then(|r| r.addr)
                        .is_some_and(|a| a.ip() == ip);
                    if at_attacker {
                        sh.attack.borrow_mut().moved += 1;
                        if moved_seen.insert(*u) {
                            errors.push(format!(
                                "{now} ms: the attacker moved signed-only uuid {u}'s address"
                            ));
                        }
                    }
                }
            }
        }

        if !clean_done && now >= clean_at {
            // The clean phase: no loss anywhere, every fault healed, nothing armed.
            clean_done = true;
            sh.faults.borrow_mut().loss_off = true;
            sh.faults.borrow_mut().disk_full = false;
            for (h, r) in roles.iter().enumerate() {
                if let Role::Bursty(_) = r {
                    sim.set_link_fail_rate(edge(h).as_str(), "server", 0.0);
                }
            }
            if armed.take().is_some() {
                let mut f = sh.faults.borrow_mut();
                f.crash_after_journal = false;
                f.crash_in_snapshot = false;
            }
            next_fault = faults.len();
        }
        if done {
            break;
        }
    }
    report.sim_secs = sim.elapsed().as_secs();

    check(
        p,
        &sh,
        &host_of,
        &roles,
        end,
        &downtimes,
        &plans.iter().map(|pl| pl.skew_s).collect::<Vec<_>>(),
        &full_windows,
        &mut report,
        &mut errors,
    );
    let tr = sh.trace.borrow();
    report.trace = tr.hash();
    report.trace_items = tr.items;
    let st = sh.store.borrow();
    report.snapshots = (st.snapshots, st.torn);
    report.app_reconnects = sh.app.borrow().reconnects.len() as u32;
    report.net = *sh.net.borrow();
    report.device_refused = sh.devices.iter().map(|d| d.borrow().refused).sum();
    if p.signed {
        if let Some(node) = sh.node.borrow().as_ref() {
            sh.signed.borrow_mut().add(node);
        }
        report.signed = Some(sh.signed.borrow().clone());
    }
    check_restart_replays(p, &sh, &mut report, &mut errors);
    if p.attacker {
        let a = *sh.attack.borrow();
        check_attack(&a, report.signed.as_ref(), &mut errors);
        report.attack = Some(a);
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        let more = errors.len().saturating_sub(20);
        errors.truncate(20);
        if more > 0 {
            errors.push(format!("... and {more} more"));
        }
        Err(format!("{}\n{report}", errors.join("\n")))
    }
}

/// A restarted device accepts none of the answers captured before its restart (its start
/// floor, PROTOCOL.md 9.4), so no old payload is shown again; and the replay really ran.
fn check_restart_replays(p: &Params, sh: &Shared, report: &mut Report, errors: &mut Vec<String>) {
    for (i, d) in sh.devices.iter().enumerate() {
        let log = d.borrow();
        if log.restarts.is_empty() {
            continue;
        }
        report.device_restarts += 1;
        report.restart_replays.0 += log.replays_refused;
        report.restart_replays.1 += log.replays_accepted;
        if log.replays_accepted > 0 {
            errors.push(format!(
                "device {i} accepted {} captured answers injected after its restart at {:?} ms \
                 ({} of them 0x20 payloads shown again)",
                log.replays_accepted, log.restarts, log.replayed_payloads
            ));
        }
    }
    if p.attacker && p.device_restarts > 0.0 {
        let found = sh.attack.borrow().restarts_found;
        if report.device_restarts == 0 || found == 0 || report.restart_replays.0 == 0 {
            errors.push(format!(
                "the replay to restarted devices did not run ({} restarts, {found} found, \
                 {} injected answers refused)",
                report.device_restarts, report.restart_replays.0
            ));
        }
    }
}

/// What the attacker may get from signed-only uuids: bare `0x10`s, nothing else; and the
/// attack must really have happened (replays sent and refused as replays, forgeries refused
/// by their tag, v1 heartbeats answered with the bare `0x10`).
fn check_attack(
    a: &AttackStats,
    signed: Option<&crate::world::SignedCounts>,
    errors: &mut Vec<String>,
) {
    for (what, n) in [
        ("0x11 masks", a.got_bits),
        ("0x20 payloads", a.got_payload),
        ("heartbeat replies", a.got_reply),
        ("sealed packets", a.got_sealed),
        ("undecodable packets", a.got_other),
    ] {
        if n > 0 {
            errors.push(format!("the attacker received {n} {what}"));
        }
    }
    let refused = |r: SignedDrop| signed.map_or(0, |s| s.dropped.get(r));
    if a.replayed == 0 || refused(SignedDrop::Replayed) == 0 {
        errors.push("no captured packet was replayed and refused: the attack did not run".into());
    }
    if a.forged == 0 || refused(SignedDrop::Tag) == 0 {
        errors.push("no forgery was sent and refused".into());
    }
    if a.v1_heartbeats == 0 || a.got_notify == 0 {
        errors.push("no v1 heartbeat of the attacker got its bare 0x10".into());
    }
}

/// Whether `restored` holds every pending item of `live` (and possibly more).
fn covers(restored: &[Pending], live: &[Pending]) -> bool {
    live.iter()
        .filter(|p| p.notify || p.bits != 0 || p.payload.is_some())
        .all(|p| {
            restored.iter().any(|q| {
                q.uuid == p.uuid
                    && (q.notify || !p.notify)
                    && q.bits & p.bits == p.bits
                    && (p.payload.is_none() || q.payload == p.payload)
            })
        })
}

/// What the app server was told was accepted, folded per device as the protocol stores it.
#[derive(Default, Clone)]
struct Expected {
    notify_last_sent: Option<u64>,
    bits: u64,
    /// The last payload, when the app first sent it and when its reply arrived (ms).
    payload: Option<(Content, u64, u64)>,
}

#[allow(clippy::too_many_arguments)]
fn check(
    p: &Params,
    sh: &Rc<Shared>,
    host_of: &[usize],
    roles: &[Role],
    end: u64,
    downtimes: &[(u64, u64)],
    skews: &[i64],
    full_windows: &[(u64, u64)],
    report: &mut Report,
    errors: &mut Vec<String>,
) {
    let app = sh.app.borrow();
    if app.unanswered > 0 {
        errors.push(format!("{} pushes never answered", app.unanswered));
    }
    let n = sh.devices.len();
    let mut exp = vec![Expected::default(); n];
    let mut unknown = std::collections::BTreeSet::new();
    for a in &app.answered {
        if a.reply != 0 {
            // 0xFF only while the disk was full: the push was taken back and must never
            // reach the device (the final-state checks below hold it to that).
            let full = full_windows
                .iter()
                .any(|&(s, e)| a.sent_at <= e && s <= a.replied_at);
            if a.reply == 0xFF && full {
                report.refused += 1;
                // A request that was in flight across a crash may have been stored by its
                // first attempt (journaled, reply lost) and refused on the retry: its fate is
                // unknown, so this device's final state is not judged.
                if downtimes
                    .iter()
                    .any(|&(s, e)| a.sent_at <= e && s <= a.replied_at)
                {
                    unknown.insert(a.device);
                }
            } else {
                errors.push(format!(
                    "push to device {} answered {:#04x}",
                    a.device, a.reply
                ));
            }
            continue;
        }
        report.accepted += 1;
        let e = &mut exp[a.device];
        match &a.msg {
            PushMsg::Notify => e.notify_last_sent = Some(a.sent_at),
            PushMsg::Bits(b) => e.bits |= b,
            PushMsg::Payload(b) => e.payload = Some((b.clone(), a.sent_at, a.replied_at)),
        }
    }

    // The server ends with nothing pending: every item was delivered and acked.
    match sh.node.borrow().as_ref() {
        Some(node) => {
            let left: Vec<_> = node
                .pending()
                .into_iter()
                .filter(|x| x.notify || x.bits != 0 || x.payload.is_some())
                .collect();
            if !left.is_empty() {
                errors.push(format!("{} records still pending at the end", left.len()));
            }
        }
        None => errors.push("server down at the end".into()),
    }

    let overlaps = |a: u64, b: u64, spans: &[(u64, u64)]| {
        spans.iter().any(|&(s, e)| a < e + 2_000 && s < b + 2_000)
    };
    let events = sh.events.borrow();
    let mut hist: Vec<usize> = Vec::new();
    let mut hb_sum = 0usize;
    for (i, e) in exp.iter().enumerate() {
        if unknown.contains(&i) {
            report.unknown += 1;
            continue;
        }
        let log = sh.devices[i].borrow();
        // A restarted server refuses signed packets stamped up to its restart second
        // (PROTOCOL.md 9.3: it does not know the pairs accepted before), so a signed device
        // whose clock is d s behind is not heard for d s more after each restart: for it, a
        // crash's influence lasts that much longer.
        let behind = u64::try_from(-skews[i].min(0)).unwrap_or(0);
        let downtimes: Vec<(u64, u64)> = downtimes
            .iter()
            .map(|&(down, up)| {
                (
                    down,
                    if behind > 0 {
                        up + (behind + 1) * 1000
                    } else {
                        up
                    },
                )
            })
            .collect();
        let downtimes = &downtimes[..];
        // Final state: exactly the last payload, the OR of the bits, the flag.
        let mut bits = 0u64;
        let mut last_payload: Option<&Content> = None;
        // The last receipt of the last pushed payload, and receipts of other payloads after it.
        let mut newest_at: Option<u64> = None;
        let mut stale_after: Vec<u64> = Vec::new();
        let mut last_notify: Option<u64> = None;
        let mut seen: std::collections::HashMap<&[u8], usize> = Default::default();
        for r in &log.rx {
            match &r.msg {
                DownMsg::Notify => last_notify = Some(r.at),
                DownMsg::Bits(b) => bits |= b,
                DownMsg::Payload(b) => {
                    last_payload = Some(b);
                    *seen.entry(b.as_ref()).or_default() += 1;
                    if e.payload.as_ref().is_some_and(|(n, _, _)| n == b) {
                        newest_at = Some(r.at);
                        stale_after.clear();
                    } else if newest_at.is_some() {
                        stale_after.push(r.at);
                    }
                }
                DownMsg::HeartbeatReply => {}
            }
            if r.at + QUIET > end {
                errors.push(format!(
                    "device {i} received {:?} at {} ms, after everything was acked",
                    r.msg, r.at
                ));
                break;
            }
        }
        if bits != e.bits {
            errors.push(format!("device {i}: bits {bits:#x}, pushed {:#x}", e.bits));
        }
        // The device ends with the last pushed payload. The one exception is the network's:
        // an older payload sent before the last push was accepted (the server stores only the
        // newest, so it cannot send an older one after that) and still in flight, overtaken by
        // the newest on the way. In flight means within the longest path delay: device link
        // 150 ms + a NAT hold 150 ms + the NAT link, rounded up to turmoil's 50 ms steps.
        const IN_FLIGHT: u64 = 400;
        let overtaken = match (&e.payload, newest_at) {
            (Some((_, _, replied)), Some(_)) => {
                !stale_after.is_empty() && stale_after.iter().all(|&t| t <= replied + IN_FLIGHT)
            }
            _ => false,
        };
        if overtaken {
            report.reordered_payloads += 1;
        } else if last_payload.map(|b| b.as_ref()) != e.payload.as_ref().map(|(b, _, _)| b.as_ref())
        {
            errors.push(format!(
                "device {i}: last payload {:?}, last pushed {:?}",
                last_payload.map(|b| String::from_utf8_lossy(&b[..b.len().min(12)]).into_owned()),
                e.payload
                    .as_ref()
                    .map(|(b, _, _)| String::from_utf8_lossy(&b[..b.len().min(12)]).into_owned())
            ));
        }
        match (e.notify_last_sent, last_notify) {
            (None, None) => {}
            (Some(s), Some(r)) if r >= s => {}
            (s, r) => errors.push(format!(
                "device {i}: 0x10 pushed at {s:?}, last received at {r:?}"
            )),
        }
        // Re-sends of an acked payload: without loss, at most one (the ack rule sends a payload
        // once more when an older one may overtake it), one per restart while it was pending
        // (an ack lost to the downtime, or in flight across the restart, which clears nothing),
        // and one per app-server reconnect while a push of those bytes waited for its reply
        // (the app sends the request again: a new push for the server, which has no ids).
        let tcp = i >= p.udp_devices;
        let exact = tcp || roles[host_of[i]] == Role::Clean;
        for (k, &c) in seen.iter() {
            report.duplicates += c - 1;
            report.max_duplicates = report.max_duplicates.max(c - 1);
            if !exact || c <= 1 {
                continue;
            }
            let times: Vec<u64> = log
                .rx
                .iter()
                .filter(|r| matches!(&r.msg, DownMsg::Payload(x) if x.as_ref() == *k))
                .map(|r| r.at)
                .collect();
            let (first, last) = (times[0], times[times.len() - 1]);
            let restarts = downtimes
                .iter()
                .filter(|&&(_, up)| up + 12_000 >= first && up <= last)
                .count();
            let repushed = app
                .answered
                .iter()
                .filter(|a| {
                    a.device == i && matches!(&a.msg, PushMsg::Payload(x) if x.as_ref() == *k)
                })
                .map(|a| {
                    (app.reconnects.iter())
                        .filter(|&&t| t > a.sent_at && t < a.replied_at)
                        .count()
                })
                .sum::<usize>();
            if c - 1 > 1 + restarts + repushed {
                errors.push(format!(
                    "device {i}: payload {:?} re-sent {} times after its ack ({restarts} restarts, {repushed} app re-pushes), at {times:?}",
                    String::from_utf8_lossy(&k[..k.len().min(12)]),
                    c - 1
                ));
            }
        }
        // Heartbeats each payload took: heartbeats sent between its push and its first receipt.
        for a in app.answered.iter().filter(|a| a.device == i) {
            if let PushMsg::Payload(b) = &a.msg {
                if let Some(r) = log
                    .rx
                    .iter()
                    .find(|r| matches!(&r.msg, DownMsg::Payload(x) if x == b))
                {
                    let hbs = log
                        .heartbeats
                        .iter()
                        .filter(|&&t| t >= a.sent_at && t <= r.at)
                        .count();
                    if hist.len() <= hbs {
                        hist.resize(hbs + 1, 0);
                    }
                    hist[hbs] += 1;
                    hb_sum += hbs;
                }
            }
        }

        // Away periods, where the exact rules apply (no loss, no crash nearby; clean hosts
        // are never partitioned).
        let uuid = log.uuid;
        for aw in &log.away {
            if !exact || aw.back == u64::MAX || overlaps(aw.last_sent, aw.back, downtimes) {
                continue;
            }
            if !tcp && aw.back > aw.last_sent + 65_000 {
                // Offline on time, no immediate push while offline, nothing sent to it.
                let off = events.iter().find(|l| {
                    l.at > aw.last_sent
                        && matches!(&l.event, Event::Offline { uuid: u } if *u == uuid)
                });
                match off {
                    Some(l) if l.at >= aw.last_sent + 60_000 && l.at <= aw.last_sent + 62_100 => {
                        report.offline_checked += 1;
                        let sent_while_offline = events.iter().any(|x| {
                            x.at > l.at
                                && x.at < aw.back
                                && matches!(&x.event,
                                    Event::PushAccepted { uuid: u, sent, .. } if *u == uuid && *sent > 0)
                        });
                        if sent_while_offline {
                            errors.push(format!("device {i}: immediate push while offline"));
                        }
                        if log.rx_away.iter().any(|&t| t > l.at + 1_000) {
                            errors.push(format!("device {i}: received a packet while offline"));
                        }
                    }
                    other => errors.push(format!(
                        "device {i}: silent from {} ms (last sent {}), offline event at {:?}",
                        aw.from,
                        aw.last_sent,
                        other.map(|l| l.at)
                    )),
                }
            }
            // Everything pushed while away arrives right after the first heartbeat back.
            let next_hb = log
                .heartbeats
                .iter()
                .copied()
                .find(|&t| t > aw.back)
                .unwrap_or(u64::MAX);
            let got: Vec<&DownMsg> = log
                .rx
                .iter()
                .filter(|r| r.at >= aw.back && r.at < next_hb)
                .map(|r| &r.msg)
                .collect();
            let mut want_bits = 0u64;
            let mut want_notify = false;
            let mut want_payload: Option<(&Content, u64)> = None;
            for a in app.answered.iter().filter(|a| {
                a.device == i && a.reply == 0 && a.sent_at >= aw.from && a.replied_at < aw.back
            }) {
                match &a.msg {
                    PushMsg::Notify => want_notify = true,
                    PushMsg::Bits(b) => want_bits |= b,
                    PushMsg::Payload(b) => want_payload = Some((b, a.sent_at)),
                }
            }
            let got_bits = got.iter().fold(0u64, |acc, m| match m {
                DownMsg::Bits(b) => acc | b,
                _ => acc,
            });
            let got_notify = got.iter().any(|m| matches!(m, DownMsg::Notify));
            let payload_ok = want_payload.is_none_or(|(w, sent)| {
                got.iter().any(|m| match m {
                    DownMsg::Payload(b) => {
                        b == w
                            || app.answered.iter().any(|a| {
                                a.device == i
                                    && a.sent_at > sent
                                    && matches!(&a.msg, PushMsg::Payload(x) if x == b)
                            })
                    }
                    _ => false,
                })
            });
            if got_bits & want_bits != want_bits || (want_notify && !got_notify) || !payload_ok {
                errors.push(format!(
                    "device {i}: away {}..{} ms: first heartbeat back did not bring everything \
                     (bits {got_bits:#x}/{want_bits:#x}, notify {got_notify}/{want_notify}, payload ok {payload_ok})",
                    aw.from, aw.back
                ));
            }
            report.episodes_checked += 1;
        }
    }
    let delivered: usize = hist.iter().sum();
    report.hb_mean = if delivered > 0 {
        hb_sum as f64 / delivered as f64
    } else {
        0.0
    };
    report.hb_histogram = hist;
}
