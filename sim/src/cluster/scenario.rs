//! Cluster scenarios: 3 nodes, a store host, devices behind an L4 load balancer, app servers
//! pushing to random nodes; faults at seeded moments; the guarantees of docs/CLUSTER.md
//! checked at the end.

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::cluster::{ClusterConfig, ClusterEvent, NodeId, StoreOp, StoreReply};
use ddpush_proto::{Config, Content, DownMsg, Kind as MsgKind, PushMsg};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::app::{self, Planned};
use super::world::{node_name, DeviceFaults, World};
use super::{device, node, store};
use crate::server::DEVICE_PORT;
use crate::world::device_uuid;

/// The cluster scenarios of docs/CLUSTER.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Pushes at random nodes: delivered by the owner with the golden bytes, also while the
    /// node-to-node link between two nodes is cut (their pokes lost; the owner's drain delivers).
    AnyNode,
    /// kill -9 of one node mid-burst; it restarts 30 s later.
    Kill,
    /// One node partitioned from everything for longer than the online window, then back.
    Freeze,
    /// One node partitioned from the store only.
    StoreCut,
    /// Acks of older sends crossing newer pushes made at another node.
    Crossing,
    /// The ack races of issue 12 across nodes: 0x10 and 0x20 pushed in quick runs at random
    /// nodes while the network loses datagrams to devices (immediate sends), loses acks and moves
    /// devices to new sockets.
    Acks,
    /// Every node restarted in turn under load.
    Rolling,
    /// A node with a third of the devices is lost for good: mass re-home.
    Rehome,
    /// The store host crashes and its replica takes over (replies wait for the replica).
    Failover,
}

impl Kind {
    /// Every scenario.
    pub const ALL: [Kind; 9] = [
        Kind::AnyNode,
        Kind::Kill,
        Kind::Freeze,
        Kind::StoreCut,
        Kind::Crossing,
        Kind::Acks,
        Kind::Rolling,
        Kind::Rehome,
        Kind::Failover,
    ];

    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::AnyNode => "cluster-anynode",
            Kind::Kill => "cluster-kill",
            Kind::Freeze => "cluster-freeze",
            Kind::StoreCut => "cluster-storecut",
            Kind::Crossing => "cluster-crossing",
            Kind::Acks => "cluster-acks",
            Kind::Rolling => "cluster-rolling",
            Kind::Rehome => "cluster-rehome",
            Kind::Failover => "cluster-failover",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Sizes of one run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Which scenario.
    pub kind: Kind,
    /// Seed of everything.
    pub seed: u64,
    /// Devices.
    pub devices: usize,
    /// Pushes per device on average.
    pub pushes_per_device: f64,
    /// Push phase (ms).
    pub push_phase: u64,
    /// Max one-way latency node <-> store (ms).
    pub store_latency: u64,
    /// Replication lag of the store (ms).
    pub lag: u64,
    /// Share of the devices on TCP connections (the others on UDP).
    pub tcp_share: f64,
}

const NODES: usize = 3;
const PUSH_START: u64 = 55_000;
/// Clean phase: everything healed, no faults.
const CLEAN: u64 = 200_000;
/// Nothing may arrive at a device in the last stretch.
const QUIET: u64 = 70_000;
/// The load balancer's health check notices a dead or cut node after this long.
const LB_DETECT: u64 = 2_000;
/// Two packets sent this close together may arrive in either order (max latency 60 ms).
const REORDER: u64 = 150;
const PUSHERS: usize = 3;
/// Pushes in the 6 s around a fault.
const BURST: usize = 60;
const DEVICE_HOSTS: usize = 3;
/// `cluster-anynode`: pushes during the node-to-node link cut, each at one of the two cut nodes
/// for a device the other one serves.
const CUT_BURST: usize = 30;
/// `cluster-anynode`: a push made while its owner's link was down must reach the device from
/// the owner before the link is back, if it stays down this much longer (the drain runs every
/// second and at once after a lost link).
const DRAIN_WITHIN: u64 = 3_000;
/// `cluster-acks`: the network's faults on device datagrams start here, after a steady window
/// without them (a lost ack is a lost sign of life too, so it may legitimately take a device
/// offline and cost a bind).
const ACK_FAULTS_FROM: u64 = 120_000;
/// Share of the devices on TCP in every scenario.
const TCP_SHARE: f64 = 1.0 / 3.0;

impl Params {
    /// CI-sized parameters; `scale` multiplies the devices.
    pub fn new(kind: Kind, seed: u64, scale: usize) -> Params {
        let s = scale.max(1);
        let base = Params {
            kind,
            seed,
            devices: 90 * s,
            pushes_per_device: 3.0,
            push_phase: 200_000,
            store_latency: 5,
            lag: 50,
            tcp_share: TCP_SHARE,
        };
        match kind {
            Kind::Rehome => Params {
                devices: 300 * s,
                pushes_per_device: 1.0,
                ..base
            },
            Kind::Crossing | Kind::Acks => Params {
                pushes_per_device: 6.0,
                ..base
            },
            Kind::Rolling => Params {
                push_phase: 260_000,
                ..base
            },
            // A replica 200 ms behind (replies wait for it, within the 500 ms store time-out).
            Kind::Failover => Params { lag: 200, ..base },
            _ => base,
        }
    }

    /// The command that replays this run.
    pub fn replay(&self, scale: usize) -> String {
        format!(
            "cargo run -p ddpush-sim --release -- --scenario {} --seed {} --scale {}",
            self.kind.name(),
            self.seed,
            scale
        )
    }
}

#[derive(Clone, Debug)]
enum Fault {
    /// Crash node; restart after the duration (None: never).
    Kill(usize, Option<u64>),
    /// Partition node from every host for the duration.
    Freeze(usize, u64),
    /// Partition node from the store for the duration.
    StoreCut(usize, u64),
    /// Crash the store host and promote its replica; back after the duration.
    StoreFailover(u64),
    /// Partition two nodes from each other (only their node-to-node link) for the duration.
    PeerCut(usize, usize, u64),
}

/// Figures of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Seed.
    pub seed: u64,
    /// Devices.
    pub devices: usize,
    /// Of those, devices on TCP.
    pub tcp_devices: usize,
    /// TCP device connections opened.
    pub tcp_connects: u64,
    /// Push attempts, and those answered `0x00`, `0xFF`, not at all.
    pub attempts: usize,
    /// Pushes answered `0x00`.
    pub accepted: usize,
    /// Attempts answered `0xFF`.
    pub failed: usize,
    /// Attempts without a reply.
    pub unanswered: usize,
    /// Accepted pushes delivered in their merged form.
    pub delivered: usize,
    /// Receipts of a 0x20 payload already received, per 1,000 accepted pushes.
    pub dups_per_1000: f64,
    /// Re-home time (ms) of the devices of a lost node: until the last one was bound elsewhere.
    pub rehome_ms: Option<u64>,
    /// Devices re-homed, and binds per second while they did.
    pub rehomed: usize,
    /// Of those, devices on TCP.
    pub rehomed_tcp: usize,
    /// Re-home time (ms) of the lost node's TCP devices: their connection ends with the node
    /// (or is reset by the load balancer), so they reconnect before their next heartbeat.
    pub rehome_tcp_ms: Option<u64>,
    /// Binds per second during the re-home.
    pub binds_per_s: f64,
    /// Store ops per accepted push (push + ack + bind + drain, all of them).
    pub ops_per_push: f64,
    /// Push and ack ops per accepted push.
    pub push_ack_ops_per_push: f64,
    /// Store ops per heartbeat in the steady window (must be 0).
    pub ops_per_heartbeat_steady: f64,
    /// Heartbeats in the steady window.
    pub steady_heartbeats: usize,
    /// Ack ops the store refused to clear with (generation crossed) or as stale.
    pub acks_not_cleared: usize,
    /// Acks the nodes' ack rule attributed to an older or superseded send, to none, or that
    /// came from a path no send went to: never cleared, no store op.
    pub acks_older: u64,
    /// Datagrams to devices the network lost, acks it lost, new device sockets.
    pub lost_down: u64,
    /// Acks lost.
    pub lost_acks: u64,
    /// New device sockets (source port changes).
    pub rebinds: u64,
    /// Pokes sent.
    pub pokes: u64,
    /// Pokes dropped at a full link queue.
    pub pokes_dropped: u64,
    /// Node-to-node links that came up (dials that succeeded).
    pub links_up: usize,
    /// `handle_peer_lost` calls (both ends of every link that went down).
    pub peer_lost: usize,
    /// `cluster-anynode`: pushes accepted at a node while its link to the device's owner was
    /// down; of those, the ones whose link stayed down long enough to tell (3 s more),
    /// all of which reached the device from the owner before the link was back (by its drain,
    /// not a poke).
    pub pushes_link_down: usize,
    /// See `pushes_link_down`.
    pub drained_while_down: usize,
    /// Accepted pushes whose store write a fail-over dropped.
    pub lost_by_failover: usize,
    /// Store writes a fail-over dropped (applied, not yet replicated).
    pub writes_dropped: usize,
    /// FNV-1a of every device receipt and push reply with its time: same seed, same hash.
    pub trace: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} seed={} devices={} (tcp={}, {} connects) attempts={} accepted={} ff={} \
             unanswered={} delivered={} dups/1000={:.1} rehome={} rehomed={} (tcp={} in {}) \
             binds/s={:.1} ops/push={:.2} \
             push+ack-ops/push={:.2} ops/heartbeat(steady)={:.3} ({} hb) acks-not-cleared={} \
             acks-older={} lost-down={} lost-acks={} rebinds={} pokes={} (dropped {}) \
             links-up={} peer-lost={} link-down-pushes={} (drained {}) lost-by-failover={} \
             writes-dropped={} trace={:016x}",
            self.scenario,
            self.seed,
            self.devices,
            self.tcp_devices,
            self.tcp_connects,
            self.attempts,
            self.accepted,
            self.failed,
            self.unanswered,
            self.delivered,
            self.dups_per_1000,
            self.rehome_ms
                .map_or("-".to_string(), |t| format!("{:.1}s", t as f64 / 1000.0)),
            self.rehomed,
            self.rehomed_tcp,
            self.rehome_tcp_ms
                .map_or("-".to_string(), |t| format!("{:.1}s", t as f64 / 1000.0)),
            self.binds_per_s,
            self.ops_per_push,
            self.push_ack_ops_per_push,
            self.ops_per_heartbeat_steady,
            self.steady_heartbeats,
            self.acks_not_cleared,
            self.acks_older,
            self.lost_down,
            self.lost_acks,
            self.rebinds,
            self.pokes,
            self.pokes_dropped,
            self.links_up,
            self.peer_lost,
            self.pushes_link_down,
            self.drained_while_down,
            self.lost_by_failover,
            self.writes_dropped,
            self.trace,
        )
    }
}

fn core_config(seed: u64) -> Config {
    let mut cfg = Config {
        hash_seed: seed,
        ..Config::default()
    };
    cfg.limits.enabled = false;
    cfg
}

/// Runs one cluster scenario; `Err` lists every violated guarantee.
pub fn run(p: &Params) -> Result<Report, String> {
    let mut rng = SmallRng::seed_from_u64(p.seed ^ 0xc105_7e12);
    let n = p.devices;
    let push_end = PUSH_START + p.push_phase;
    let end = push_end + CLEAN;

    let victim = rng.random_range(0..NODES);
    let mid = PUSH_START + rng.random_range(40_000..p.push_phase / 2);

    // Pushes, plus a burst around the fault.
    let total = (n as f64 * p.pushes_per_device) as usize;
    let mut pushes: Vec<Planned> = Vec::with_capacity(total);
    let mut k = 0usize;
    while pushes.len() < total {
        let device = rng.random_range(0..n);
        let at = rng.random_range(PUSH_START..push_end);
        let payload = |k: usize, rng: &mut SmallRng| {
            let mut s = format!("m{k}:");
            s.extend(std::iter::repeat_n('x', rng.random_range(0..60)));
            PushMsg::Payload(Content::new(s).expect("payloads are short"))
        };
        if p.kind == Kind::Crossing {
            // Two payloads for one device, 0-300 ms apart: the second often lands while the
            // first is on its way to the device or its ack on its way back.
            pushes.push(Planned {
                at,
                device,
                msg: payload(k, &mut rng),
                node: None,
            });
            k += 1;
            pushes.push(Planned {
                at: at + rng.random_range(0..300),
                device,
                msg: payload(k, &mut rng),
                node: None,
            });
            k += 1;
            continue;
        }
        if p.kind == Kind::Acks {
            // A run of 2-3 pushes of one kind (0x10 or 0x20) for one device, 100-300 ms apart
            // (issue 12's steps are as short as 150 ms), each at a random node: each one may
            // cross the ack of the one before, or find its immediate send lost.
            let notify = rng.random_bool(0.5);
            let mut t = at;
            for _ in 0..rng.random_range(2..=3) {
                let msg = if notify {
                    PushMsg::Notify
                } else {
                    payload(k, &mut rng)
                };
                pushes.push(Planned {
                    at: t,
                    device,
                    msg,
                    node: None,
                });
                k += 1;
                t += rng.random_range(0..200);
            }
            continue;
        }
        let msg = match rng.random_range(0..3) {
            0 => PushMsg::Notify,
            1 => PushMsg::Bits(1u64 << rng.random_range(0..64)),
            _ => payload(k, &mut rng),
        };
        pushes.push(Planned {
            at,
            device,
            msg,
            node: None,
        });
        k += 1;
    }
    if matches!(
        p.kind,
        Kind::Kill | Kind::Freeze | Kind::Failover | Kind::Rehome
    ) {
        for _ in 0..BURST {
            let msg = match rng.random_range(0..3) {
                0 => PushMsg::Notify,
                1 => PushMsg::Bits(1u64 << rng.random_range(0..64)),
                _ => PushMsg::Payload(Content::new(format!("m{k}:burst")).expect("short")),
            };
            k += 1;
            pushes.push(Planned {
                at: mid - 3_000 + rng.random_range(0..6_000),
                device: rng.random_range(0..n),
                msg,
                node: None,
            });
        }
    }
    // cluster-anynode: the link between two nodes is cut for 40-70 s, and a burst of pushes
    // is made at each of them for devices the other one serves: their pokes cannot go.
    let peer_cut = if p.kind == Kind::AnyNode {
        let a = victim;
        let b = (victim + rng.random_range(1..NODES)) % NODES;
        let dur = rng.random_range(40_000..70_000);
        for _ in 0..CUT_BURST {
            let (x, y) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            let served: Vec<usize> = (0..n).filter(|&d| World::home(NODES, d) == y).collect();
            let device = served[rng.random_range(0..served.len())];
            let msg = match rng.random_range(0..3) {
                0 => PushMsg::Notify,
                1 => PushMsg::Bits(1u64 << rng.random_range(0..64)),
                _ => PushMsg::Payload(Content::new(format!("m{k}:cut")).expect("short")),
            };
            k += 1;
            pushes.push(Planned {
                // After the ends noticed the cut (within peer::SILENCE + a keepalive).
                at: mid + 8_000 + rng.random_range(0..dur - 16_000),
                device,
                msg,
                node: Some(x),
            });
        }
        Some((a, b, mid, mid + dur))
    } else {
        None
    };
    pushes.sort_by_key(|x| x.at);

    // Faults.
    let mut faults: Vec<(u64, Fault)> = Vec::new();
    match p.kind {
        Kind::AnyNode => {
            if let Some((a, b, from, until)) = peer_cut {
                faults.push((from, Fault::PeerCut(a, b, until - from)));
            }
        }
        Kind::Crossing | Kind::Acks => {}
        Kind::Kill => faults.push((mid, Fault::Kill(victim, Some(30_000)))),
        Kind::Freeze => faults.push((
            mid,
            Fault::Freeze(victim, rng.random_range(70_000..100_000)),
        )),
        Kind::StoreCut => faults.push((
            mid,
            Fault::StoreCut(victim, rng.random_range(20_000..60_000)),
        )),
        Kind::Rolling => {
            for i in 0..NODES {
                let at = PUSH_START + 40_000 + i as u64 * 70_000;
                faults.push((at, Fault::Kill((victim + i) % NODES, Some(10_000))));
            }
        }
        Kind::Rehome => faults.push((mid, Fault::Kill(victim, None))),
        Kind::Failover => faults.push((mid, Fault::StoreFailover(rng.random_range(1_000..5_000)))),
    }

    let uuids: Vec<_> = (0..n).map(device_uuid).collect();
    // Its own RNG, so the choice does not move the other draws.
    let mut tcp_rng = SmallRng::seed_from_u64(p.seed ^ 0x7c9_de51);
    let tcp: Vec<bool> = (0..n).map(|_| tcp_rng.random_bool(p.tcp_share)).collect();
    let net = if p.kind == Kind::Acks {
        DeviceFaults {
            down_loss: 0.15,
            ack_loss: 0.05,
            rebind: 0.2,
            from: ACK_FAULTS_FROM,
            until: push_end,
            seed: rng.random(),
        }
    } else {
        DeviceFaults::default()
    };
    let w = World::new(NODES, uuids, tcp, p.lag, true, net);

    let mut b = turmoil::Builder::new();
    b.simulation_duration(Duration::from_millis(end + 60_000))
        .tick_duration(Duration::from_millis(50))
        .min_message_latency(Duration::from_millis(2))
        .max_message_latency(Duration::from_millis(60))
        .udp_capacity(1 << 16)
        .tcp_capacity(1 << 16)
        .rng_seed(p.seed);
    let mut sim = b.build();

    {
        let w = w.clone();
        sim.host("store", move || store::run(w.clone()));
    }
    for i in 0..NODES {
        let w = w.clone();
        let cfg = core_config(p.seed);
        let cc = ClusterConfig::new(NodeId(node_name(i)));
        sim.host(node_name(i).as_str(), move || {
            node::run(w.clone(), i, cfg.clone(), cc.clone())
        });
        sim.set_link_max_message_latency(
            node_name(i).as_str(),
            "store",
            Duration::from_millis(p.store_latency.max(1)),
        );
    }
    *w.node_addrs.borrow_mut() = (0..NODES)
        .map(|i| (sim.lookup(node_name(i)), DEVICE_PORT).into())
        .collect();
    let mut hosts: Vec<String> = vec!["store".into()];
    for h in 0..DEVICE_HOSTS {
        let name = format!("dev{h}");
        let mine: Vec<(usize, u8, u64)> = (0..n)
            .filter(|i| i % DEVICE_HOSTS == h)
            .map(|i| (i, rng.random_range(1..=3), rng.random_range(0..50_000)))
            .collect();
        let w = w.clone();
        sim.client(name.as_str(), async move {
            let mut hs = Vec::new();
            for (i, app_id, start) in mine {
                let w = w.clone();
                hs.push(if w.tcp[i] {
                    tokio::task::spawn_local(device::run_tcp(w, i, app_id, start, end))
                } else {
                    tokio::task::spawn_local(device::run(w, i, app_id, start, end))
                });
            }
            for h in hs {
                h.await.map_err(|e| e.to_string())??;
            }
            Ok(())
        });
        hosts.push(name);
    }
    for a in 0..PUSHERS {
        let name = format!("app{a}");
        let mine: Vec<(usize, Planned)> = pushes
            .iter()
            .cloned()
            .enumerate()
            .filter(|(i, _)| i % PUSHERS == a)
            .collect();
        let seed = rng.random();
        sim.client(name.as_str(), app::run(w.clone(), mine, seed));
        hosts.push(name);
    }
    for i in 0..NODES {
        hosts.push(node_name(i));
    }

    // Drive.
    let mut next = 0usize;
    // (when, action)
    let mut later: Vec<(u64, Action)> = Vec::new();
    let mut lost_at: Option<(u64, usize)> = None;
    let mut store_cut: Option<(usize, u64, u64)> = None;
    let mut steady_end = if p.kind == Kind::Acks {
        ACK_FAULTS_FROM
    } else {
        push_end
    };
    loop {
        let done = sim.step().map_err(|e| format!("simulation error: {e}"))?;
        let now = sim.elapsed().as_millis() as u64;
        while next < faults.len() && faults[next].0 <= now {
            // A cut node-to-node link moves no device: the steady window (no binds) goes on.
            if !matches!(faults[next].1, Fault::PeerCut(..)) {
                steady_end = steady_end.min(faults[next].0);
            }
            match faults[next].1.clone() {
                Fault::Kill(k, back) => {
                    sim.crash(node_name(k).as_str());
                    later.push((now + LB_DETECT, Action::Lb(k, false)));
                    if lost_at.is_none() {
                        lost_at = Some((now, k));
                    }
                    if let Some(d) = back {
                        later.push((now + d, Action::Bounce(k)));
                        later.push((now + d + LB_DETECT, Action::Lb(k, true)));
                    }
                }
                Fault::Freeze(k, d) => {
                    for h in hosts.iter().filter(|h| **h != node_name(k)) {
                        sim.partition(node_name(k).as_str(), h.as_str());
                    }
                    later.push((now + LB_DETECT, Action::Lb(k, false)));
                    later.push((now + d, Action::Heal(k)));
                    later.push((now + d + LB_DETECT, Action::Lb(k, true)));
                    lost_at = Some((now, k));
                }
                Fault::StoreCut(k, d) => {
                    sim.partition(node_name(k).as_str(), "store");
                    later.push((now + d, Action::RepairStore(k)));
                    store_cut = Some((k, now, now + d));
                }
                Fault::PeerCut(a, b, d) => {
                    sim.partition(node_name(a).as_str(), node_name(b).as_str());
                    later.push((now + d, Action::RepairPeers(a, b)));
                }
                Fault::StoreFailover(d) => {
                    sim.crash("store");
                    w.store.borrow_mut().fail_over(now);
                    later.push((now + d, Action::BounceStore));
                }
            }
            next += 1;
        }
        later.sort_by_key(|a| a.0);
        while later.first().is_some_and(|a| a.0 <= now) {
            let (_, a) = later.remove(0);
            match a {
                Action::Lb(k, up) => w.lb_up.borrow_mut()[k] = up,
                Action::Bounce(k) => sim.bounce(node_name(k).as_str()),
                Action::BounceStore => sim.bounce("store"),
                Action::RepairStore(k) => sim.repair(node_name(k).as_str(), "store"),
                Action::RepairPeers(a, b) => {
                    sim.repair(node_name(a).as_str(), node_name(b).as_str())
                }
                Action::Heal(k) => {
                    for h in hosts.iter().filter(|h| **h != node_name(k)) {
                        sim.repair(node_name(k).as_str(), h.as_str());
                    }
                }
            }
        }
        if done {
            break;
        }
    }

    let mut report = Report {
        scenario: p.kind.name(),
        seed: p.seed,
        devices: n,
        tcp_devices: w.tcp.iter().filter(|&&t| t).count(),
        ..Report::default()
    };
    let mut errors = Vec::new();
    check(
        p,
        &w,
        end,
        steady_end,
        lost_at,
        store_cut,
        peer_cut,
        &mut report,
        &mut errors,
    );
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

enum Action {
    Lb(usize, bool),
    Bounce(usize),
    BounceStore,
    RepairStore(usize),
    RepairPeers(usize, usize),
    Heal(usize),
}

fn device_of(uuid: &ddpush_proto::Uuid) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&uuid.0[8..]);
    u64::from_be_bytes(b) as usize
}

fn node_idx(id: &NodeId) -> usize {
    id.0.trim_start_matches('n').parse().unwrap_or(usize::MAX)
}

/// The bytes a device must get for `msg`, built by hand from PROTOCOL.md 3 (not the codec).
fn golden(app_id: u8, msg: &DownMsg) -> Vec<u8> {
    let (cmd, content): (u8, Vec<u8>) = match msg {
        DownMsg::HeartbeatReply => (0x00, vec![]),
        DownMsg::Notify => (0x10, vec![]),
        DownMsg::Bits(m) => (0x11, m.to_be_bytes().to_vec()),
        DownMsg::Payload(p) => (0x20, p.to_vec()),
    };
    let mut v = vec![0x01, app_id, cmd];
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(&content);
    v
}

#[allow(clippy::too_many_arguments)]
fn check(
    p: &Params,
    w: &Rc<World>,
    end: u64,
    steady_end: u64,
    lost_at: Option<(u64, usize)>,
    store_cut: Option<(usize, u64, u64)>,
    peer_cut: Option<(usize, usize, u64, u64)>,
    report: &mut Report,
    errors: &mut Vec<String>,
) {
    let attempts = w.attempts.borrow();
    let st = w.store.borrow();
    let events = w.events.borrow();
    let n = w.uuids.len();
    report.attempts = attempts.len();
    for a in attempts.iter() {
        match a.reply {
            Some(0) => report.accepted += 1,
            Some(0xFF) => report.failed += 1,
            Some(b) => errors.push(format!("push to device {} answered {b:#04x}", a.device)),
            None => report.unanswered += 1,
        }
    }
    if matches!(p.kind, Kind::AnyNode | Kind::Crossing | Kind::Acks)
        && report.accepted != attempts.len()
    {
        errors.push(format!(
            "{} of {} attempts not accepted without any fault",
            attempts.len() - report.accepted,
            attempts.len()
        ));
    }
    if let Some((k, from, until)) = store_cut {
        for a in attempts
            .iter()
            .filter(|a| a.node == k && a.reply == Some(0))
        {
            // Sent in the cut and arriving before the repair (the app -> node link takes up
            // to 60 ms, a new connection a round trip more).
            if a.sent_at >= from && a.sent_at + 3 * REORDER < until {
                errors.push(format!(
                    "push at node {k} answered 0x00 at {} ms while it was cut from the store",
                    a.sent_at
                ));
            }
        }
    }

    // Store order of payload writes that survived, per device.
    let mut payload_pos: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut last_payload: Vec<Option<Vec<u8>>> = vec![None; n];
    let mut last_notify_at: Vec<Option<u64>> = vec![None; n];
    let mut lost_payloads: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
    for (i, a) in st.log.iter().enumerate() {
        if let StoreOp::Push { uuid, msg, .. } = &a.op {
            let d = device_of(uuid);
            match msg {
                PushMsg::Payload(b) => {
                    let e = lost_payloads.entry(b.to_vec()).or_insert(true);
                    *e &= a.lost;
                    if !a.lost {
                        payload_pos.insert(b.to_vec(), i);
                        last_payload[d] = Some(b.to_vec());
                    }
                }
                PushMsg::Notify if !a.lost => last_notify_at[d] = Some(a.at),
                _ => {}
            }
        }
    }
    // Every record ends with nothing pending (each item's last generation was acked).
    let left = st
        .primary
        .records()
        .filter(|(_, r)| r.has_pending())
        .count();
    if left > 0 {
        errors.push(format!(
            "{left} records still pending in the store at the end"
        ));
    }

    let mut dups = 0usize;
    for d in 0..n {
        let log = w.devices[d].borrow();
        let mut bits = 0u64;
        let mut seen: BTreeMap<&[u8], usize> = BTreeMap::new();
        let mut last_rx_payload: Option<&[u8]> = None;
        for r in &log.rx {
            match &r.msg {
                DownMsg::Bits(b) => bits |= b,
                DownMsg::Payload(b) => {
                    *seen.entry(b.as_ref()).or_default() += 1;
                    last_rx_payload = Some(b.as_ref());
                }
                _ => {}
            }
            if r.at + QUIET > end {
                errors.push(format!(
                    "device {d} received {:?} at {} ms, after everything was acked",
                    r.msg, r.at
                ));
            }
            if p.kind == Kind::AnyNode {
                let app = if r.bytes.get(1) == Some(&0) {
                    0
                } else {
                    r.bytes.get(1).copied().unwrap_or(0)
                };
                if r.bytes != golden(app, &r.msg) {
                    errors.push(format!("device {d}: bytes {:02x?} are not golden", r.bytes));
                }
                if r.from != Some(r.routed) {
                    errors.push(format!(
                        "device {d}: got {:?} from node {:?}, attached to node {}",
                        r.msg, r.from, r.routed
                    ));
                }
            }
        }
        dups += seen.values().map(|c| c - 1).sum::<usize>();
        // The last stored payload arrives; nothing arrives after it except a packet the
        // network reordered (sent before it, overtaken on the wire: no id can order those).
        if let Some(want) = last_payload[d].as_deref() {
            match log.rx.iter().rposition(|r| {
                r.msg == DownMsg::Payload(Content::copy_from_slice(want).unwrap_or_default())
            }) {
                None => errors.push(format!(
                    "device {d}: last stored payload {:?} never received",
                    String::from_utf8_lossy(&want[..want.len().min(10)])
                )),
                Some(i) => {
                    let t = log.rx[i].at;
                    if let Some(r) = log.rx[i + 1..]
                        .iter()
                        .find(|r| matches!(r.msg, DownMsg::Payload(_)) && r.at > t + REORDER)
                    {
                        errors.push(format!(
                            "device {d}: {:?} received at {} ms after the last stored payload at {t} ms",
                            r.msg, r.at
                        ));
                    }
                }
            }
        } else if last_rx_payload.is_some() {
            errors.push(format!("device {d}: received a payload none was stored"));
        }
        if let Some(t) = last_notify_at[d] {
            if !log.rx.iter().any(|r| r.msg == DownMsg::Notify && r.at >= t) {
                errors.push(format!(
                    "device {d}: 0x10 stored at {t} ms never received after"
                ));
            }
        }
        let mut all_bits = 0u64;
        for a in attempts.iter().filter(|a| a.device == d) {
            if let PushMsg::Bits(b) = a.msg {
                all_bits |= b;
            }
            if a.reply != Some(0) {
                continue;
            }
            let ok = match &a.msg {
                PushMsg::Notify => log
                    .rx
                    .iter()
                    .any(|r| r.msg == DownMsg::Notify && r.at >= a.sent_at),
                PushMsg::Bits(b) => log
                    .rx
                    .iter()
                    .any(|r| matches!(r.msg, DownMsg::Bits(m) if m & b == *b && r.at >= a.sent_at)),
                PushMsg::Payload(b) => {
                    if lost_payloads.get(b.as_ref()) == Some(&true) {
                        report.lost_by_failover += 1;
                        errors.push(format!("device {d}: accepted payload dropped by fail-over"));
                        continue;
                    }
                    let pos = payload_pos.get(b.as_ref()).copied().unwrap_or(0);
                    seen.contains_key(b.as_ref())
                        || payload_pos
                            .iter()
                            .any(|(q, &i)| i > pos && seen.contains_key(q.as_slice()))
                }
            };
            if ok {
                report.delivered += 1;
            } else {
                errors.push(format!(
                    "device {d}: accepted {:?} (sent {} ms) never delivered",
                    a.msg, a.sent_at
                ));
            }
        }
        if bits & !all_bits != 0 {
            errors.push(format!("device {d}: received bits {bits:#x} never pushed"));
        }
    }
    report.dups_per_1000 = if report.accepted > 0 {
        dups as f64 * 1000.0 / report.accepted as f64
    } else {
        0.0
    };

    // Every clearing ack answers a send that node made under that epoch with that generation.
    for a in st.log.iter() {
        if let (
            StoreOp::Ack {
                uuid,
                node,
                epoch,
                kind,
                gen,
                ..
            },
            StoreReply::Acked { cleared, .. },
        ) = (&a.op, &a.reply)
        {
            if !*cleared {
                report.acks_not_cleared += 1;
                continue;
            }
            if *kind == MsgKind::Bits {
                continue;
            }
            let ni = node_idx(node);
            let sent = events.iter().any(|l| {
                l.node == ni
                    && l.at <= a.at
                    && matches!(&l.event, ClusterEvent::Sent { uuid: u, kind: k, gen: g, epoch: e }
                        if u == uuid && k == kind && g == gen && e == epoch)
            });
            if !sent {
                errors.push(format!(
                    "store cleared {kind:?} gen {gen} of {uuid} on an ack by {node} at epoch {epoch} \
                     with no such send"
                ));
            }
        } else if matches!(a.reply, StoreReply::Stale(_)) {
            report.acks_not_cleared += 1;
        }
    }

    // Re-home: the devices whose last heartbeat before the loss went to the lost node.
    if let Some((t0, k)) = lost_at {
        let mut binds: Vec<u64> = Vec::new();
        for d in 0..n {
            let log = w.devices[d].borrow();
            let was_there = log
                .heartbeats
                .iter()
                .rev()
                .find(|h| h.0 < t0)
                .is_some_and(|h| h.1 == k);
            if !was_there {
                continue;
            }
            let uuid = w.uuids[d];
            match events.iter().find(|l| {
                // Bound anywhere after the loss: at a survivor, or at the restarted node (a new
                // incarnation with no state) when the load balancer sent it back.
                l.at >= t0 && matches!(&l.event, ClusterEvent::Bound { uuid: u, .. } if *u == uuid)
            }) {
                Some(l) => {
                    binds.push(l.at);
                    if w.tcp[d] {
                        report.rehomed_tcp += 1;
                        let t = l.at - t0;
                        report.rehome_tcp_ms = Some(report.rehome_tcp_ms.map_or(t, |m| m.max(t)));
                    }
                }
                None => errors.push(format!("device {d} of the lost node never re-homed")),
            }
        }
        binds.sort_unstable();
        report.rehomed = binds.len();
        if let (Some(first), Some(last)) = (binds.first(), binds.last()) {
            report.rehome_ms = Some(last - t0);
            let span = (last - first).max(1) as f64 / 1000.0;
            report.binds_per_s = binds.len() as f64 / span;
        }
    }

    // Node-to-node links: a lost node's links break at the survivors, and they drain.
    let silence = super::peer::SILENCE.as_millis() as u64;
    let lost = w.peer_lost.borrow();
    report.peer_lost = lost.len();
    report.links_up = w.links_up.borrow().len();
    if let (Some((t0, k)), Kind::Kill | Kind::Freeze | Kind::Rolling | Kind::Rehome) =
        (lost_at, p.kind)
    {
        if !lost
            .iter()
            .any(|&(t, at, peer)| at != k && peer == k && t >= t0 && t <= t0 + 3 * silence)
        {
            errors.push(format!(
                "no survivor called handle_peer_lost for its links with lost node {k}"
            ));
        }
    }
    if let Some((a, b, from, until)) = peer_cut {
        check_peer_cut(
            w,
            &attempts,
            &events,
            &payload_pos,
            (a, b, from, until),
            report,
            errors,
        );
    }

    report.writes_dropped = st.log.iter().filter(|a| a.lost).count();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut add = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for d in 0..n {
        for r in &w.devices[d].borrow().rx {
            add(&r.at.to_be_bytes());
            add(&r.bytes);
        }
    }
    for a in attempts.iter() {
        add(&a.sent_at.to_be_bytes());
        add(&[a.reply.unwrap_or(0xEE)]);
    }
    report.trace = h;

    // Store operations.
    let c = w.counts();
    let all: u64 = c.store_ops.iter().sum();
    if report.accepted > 0 {
        report.ops_per_push = all as f64 / report.accepted as f64;
        report.push_ack_ops_per_push =
            (c.store_ops[0] + c.store_ops[1]) as f64 / report.accepted as f64;
    }
    report.pokes = c.pokes[0];
    report.pokes_dropped = c.pokes_dropped;
    report.acks_older = c.unattributed;
    let f = *w.fault_counts.borrow();
    (report.lost_down, report.lost_acks, report.rebinds) = (f.lost_down, f.lost_acks, f.rebinds);
    report.tcp_connects = f.tcp_connects;
    // Steady window: every device started and bound, no fault yet.
    let from = 60_000;
    let hb: usize = (0..n)
        .map(|d| {
            w.devices[d]
                .borrow()
                .heartbeats
                .iter()
                .filter(|h| h.0 >= from && h.0 < steady_end)
                .count()
        })
        .sum();
    let binds = events
        .iter()
        .filter(|l| {
            l.at >= from && l.at < steady_end && matches!(l.event, ClusterEvent::Bound { .. })
        })
        .count();
    report.steady_heartbeats = hb;
    report.ops_per_heartbeat_steady = if hb > 0 {
        binds as f64 / hb as f64
    } else {
        0.0
    };
    if binds > 0 {
        errors.push(format!(
            "{binds} binds in the steady window ({hb} heartbeats)"
        ));
    }
}

/// `cluster-anynode`'s cut of the link between nodes `a` and `b` (from `from` to `until`):
/// both ends called `handle_peer_lost`, and every push accepted at one of them while its link
/// to the device's owner (the other) was down reached the device from the owner before the
/// link was back: through the store (the owner's drain of its dirty marks), since no poke
/// could carry it.
fn check_peer_cut(
    w: &World,
    attempts: &[super::world::Attempt],
    events: &[super::world::Logged],
    payload_pos: &BTreeMap<Vec<u8>, usize>,
    (a, b, from, until): (usize, usize, u64, u64),
    report: &mut Report,
    errors: &mut Vec<String>,
) {
    let silence = super::peer::SILENCE.as_millis() as u64;
    let lost = w.peer_lost.borrow();
    for (x, y) in [(a, b), (b, a)] {
        if !lost
            .iter()
            .any(|&(t, at, peer)| at == x && peer == y && t >= from && t <= until + 2 * silence)
        {
            errors.push(format!(
                "node {x} never called handle_peer_lost for its link with node {y} during the cut"
            ));
        }
    }
    let downs = w.links_down.borrow();
    let mut checked = 0usize;
    for att in attempts
        .iter()
        .filter(|t| t.reply == Some(0) && (t.node == a || t.node == b))
    {
        let (x, y) = if att.node == a { (a, b) } else { (b, a) };
        let uuid = w.uuids[att.device];
        let owner = events
            .iter()
            .filter(|l| {
                l.at <= att.sent_at
                    && matches!(&l.event, ClusterEvent::Bound { uuid: u, .. } if *u == uuid)
            })
            .last()
            .map(|l| l.node);
        if owner != Some(y) {
            continue;
        }
        let Some(down) = downs.iter().find(|l| {
            l.from == x
                && l.to == y
                && l.since <= att.sent_at
                && l.until.is_none_or(|u| u > att.sent_at)
        }) else {
            continue;
        };
        report.pushes_link_down += 1;
        let back = down.until.unwrap_or(u64::MAX);
        if back < att.sent_at + DRAIN_WITHIN {
            continue; // back too soon to tell a drain from a poke queued on the link
        }
        checked += 1;
        let log = w.devices[att.device].borrow();
        let by_owner =
            |r: &&super::world::Rx| r.from == Some(y) && r.at >= att.sent_at && r.at < back;
        let ok = match &att.msg {
            PushMsg::Notify => log
                .rx
                .iter()
                .filter(by_owner)
                .any(|r| r.msg == DownMsg::Notify),
            PushMsg::Bits(bits) => log
                .rx
                .iter()
                .filter(by_owner)
                .any(|r| matches!(r.msg, DownMsg::Bits(m) if m & bits == *bits)),
            // This payload, or one stored after it (the last one wins).
            PushMsg::Payload(want) => {
                let pos = payload_pos.get(want.as_ref()).copied();
                log.rx.iter().filter(by_owner).any(|r| match &r.msg {
                    DownMsg::Payload(got) => {
                        got.as_ref() == want.as_ref()
                            || payload_pos.get(got.as_ref()).copied() > pos
                    }
                    _ => false,
                })
            }
        };
        if ok {
            report.drained_while_down += 1;
        } else {
            errors.push(format!(
                "device {}: {:?} accepted at node {x} at {} ms while its link to the owner {y} \
                 was down (until {back} ms) did not reach the device from {y} meanwhile",
                att.device, att.msg, att.sent_at
            ));
        }
    }
    if checked == 0 {
        errors.push("no push was accepted while the cut link was down".to_string());
    }
}
