//! Runs simulation scenarios over many seeds, to hunt rare bugs (see docs/SIMULATION.md).
//!
//! ```text
//! cargo run -p ddpush-sim --release -- --seeds 1000            # every scenario, seeds 0..1000
//! cargo run -p ddpush-sim --release -- --scenario crash --seed 7 # replay one run
//! cargo run -p ddpush-sim --release -- --scenario mixed --scale 3 --seeds 20
//! cargo run -p ddpush-sim --release -- --scenario cluster --seeds 1000  # every cluster scenario
//! cargo run -p ddpush-sim --release -- --scenario cluster-kill --seed 7
//! ```

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

fn usage() -> ExitCode {
    eprintln!(
        "usage: ddpush-sim [--scenario NAME|all] [--seed S | --seeds N [--first S]] [--scale K]\n\
         scenarios: lossy offline partition crash tcp mixed, cluster (all of:) cluster-anynode\n\
         cluster-kill cluster-freeze cluster-storecut cluster-crossing cluster-rolling\n\
         cluster-rehome cluster-failover"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut kinds: Vec<Which> = all();
    let mut first = 0u64;
    let mut count = 1u64;
    let mut scale = 1usize;
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
            _ => return usage(),
        }
    }
    let mut failed = 0u64;
    for seed in first..first + count {
        for &k in &kinds {
            let t = Instant::now();
            let (name, replay, result) = match k {
                Which::Single(k) => {
                    let p = Params::new(k, seed, scale);
                    (k.name(), p.replay(scale), run(&p).map(|r| r.to_string()))
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
    if failed > 0 {
        println!("{failed} failing runs");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
