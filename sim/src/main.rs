//! Runs simulation scenarios over many seeds, to hunt rare bugs (see docs/SIMULATION.md).
//!
//! ```text
//! cargo run -p ddpush-sim --release -- --seeds 1000            # every scenario, seeds 0..1000
//! cargo run -p ddpush-sim --release -- --scenario crash --seed 7 # replay one run
//! cargo run -p ddpush-sim --release -- --scenario mixed --scale 3 --seeds 20
//! cargo run -p ddpush-sim --release -- --scenario cluster --seeds 1000  # every cluster scenario
//! cargo run -p ddpush-sim --release -- --scenario cluster-kill --seed 7
//! cargo run -p ddpush-sim --release -- --scenario lossy --seeds 100 --nat off  # no NATs
//! ```
//!
//! After the runs it prints one line per single-node scenario: runs, failing seeds, accepted
//! pushes and re-received 0x20 payloads (per 1,000 accepted pushes).

use std::process::ExitCode;
use std::time::Instant;

use ddpush_sim::{cluster, run, Kind, Params};

#[derive(Clone, Copy)]
enum Which {
    Single(Kind),
    Cluster(cluster::Kind),
}

fn all() -> Vec<Which> {
    let mut v: Vec<Which> = Kind::ALL.iter().map(|k| Which::Single(*k)).collect();
    v.extend(cluster::Kind::ALL.iter().map(|k| Which::Cluster(*k)));
    v
}

/// One single-node scenario's runs, for the summary line.
#[derive(Default)]
struct Sum {
    name: &'static str,
    runs: u64,
    failing: Vec<u64>,
    accepted: u64,
    dups: u64,
    /// The most duplicate receipts of one payload.
    max: usize,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: ddpush-sim [--scenario NAME|all] [--seed S | --seeds N [--first S]] [--scale K] \
         [--nat on|off] [--skew-ahead SECS]\n\
         scenarios: lossy offline partition crash tcp mixed disk-full signed, cluster (all of:)\n\
         cluster-anynode cluster-kill cluster-freeze cluster-storecut cluster-crossing cluster-acks\n\
         cluster-rolling cluster-rehome cluster-failover"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut kinds: Vec<Which> = all();
    let mut first = 0u64;
    let mut count = 1u64;
    let mut scale = 1usize;
    let mut nat = true;
    let mut skew_ahead = 0i64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        match a.as_str() {
            "--scenario" if v == "all" => kinds = all(),
            "--scenario" if v == "cluster" => {
                kinds = cluster::Kind::ALL
                    .iter()
                    .map(|k| Which::Cluster(*k))
                    .collect()
            }
            "--scenario" => match (Kind::from_name(&v), cluster::Kind::from_name(&v)) {
                (Some(k), _) => kinds = vec![Which::Single(k)],
                (_, Some(k)) => kinds = vec![Which::Cluster(k)],
                _ => return usage(),
            },
            "--seed" => match v.parse() {
                Ok(s) => {
                    first = s;
                    count = 1;
                }
                Err(_) => return usage(),
            },
            "--first" => match v.parse() {
                Ok(s) => first = s,
                Err(_) => return usage(),
            },
            "--seeds" => match v.parse() {
                Ok(n) => count = n,
                Err(_) => return usage(),
            },
            "--scale" => match v.parse() {
                Ok(n) => scale = n,
                Err(_) => return usage(),
            },
            "--skew-ahead" => match v.parse() {
                Ok(s) => skew_ahead = s,
                Err(_) => return usage(),
            },
            "--nat" => match v.as_str() {
                "on" => nat = true,
                "off" => nat = false,
                _ => return usage(),
            },
            _ => return usage(),
        }
    }
    let mut failed = 0u64;
    let mut sums: Vec<Sum> = Vec::new();
    for seed in first..first + count {
        for &k in &kinds {
            let t = Instant::now();
            let (name, replay, result) = match k {
                Which::Single(k) => {
                    let mut p = Params::new(k, seed, scale);
                    p.nat = nat;
                    if p.signed {
                        p.max_skew_ahead_s = skew_ahead;
                    }
                    let i = match sums.iter().position(|s| s.name == k.name()) {
                        Some(i) => i,
                        None => {
                            sums.push(Sum {
                                name: k.name(),
                                ..Sum::default()
                            });
                            sums.len() - 1
                        }
                    };
                    let r = run(&p);
                    let sum = &mut sums[i];
                    sum.runs += 1;
                    match &r {
                        Ok(r) => {
                            sum.accepted += r.accepted as u64;
                            sum.dups += r.duplicates as u64;
                            sum.max = sum.max.max(r.max_duplicates);
                        }
                        Err(_) => sum.failing.push(seed),
                    }
                    (k.name(), p.replay(scale), r.map(|r| r.to_string()))
                }
                Which::Cluster(k) => {
                    let p = cluster::Params::new(k, seed, scale);
                    (
                        k.name(),
                        p.replay(scale),
                        cluster::run(&p).map(|r| r.to_string()),
                    )
                }
            };
            match result {
                Ok(r) => println!("ok   {r} [{:.1}s]", t.elapsed().as_secs_f64()),
                Err(e) => {
                    failed += 1;
                    println!("FAIL {name} seed={seed}\n{e}\nreplay: {replay}");
                }
            }
        }
    }
    for s in &sums {
        let (name, runs, fails, accepted, dups, max) =
            (s.name, s.runs, &s.failing, s.accepted, s.dups, s.max);
        let per = if accepted > 0 {
            dups as f64 * 1000.0 / accepted as f64
        } else {
            0.0
        };
        println!(
            "summary {name} seeds {first}..{} nat={} runs={runs} failing={fails:?} \
             accepted={accepted} dups={dups} ({per:.2}/1000) max-dups/item={max}",
            first + count,
            if nat { "on" } else { "off" },
        );
    }
    if failed > 0 {
        println!("{failed} failing runs");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
