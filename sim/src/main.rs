//! Runs simulation scenarios over many seeds, to hunt rare bugs (see docs/SIMULATION.md).
//!
//! ```text
//! cargo run -p ddpush-sim --release -- --seeds 1000            # every scenario, seeds 0..1000
//! cargo run -p ddpush-sim --release -- --scenario crash --seed 7 # replay one run
//! cargo run -p ddpush-sim --release -- --scenario mixed --scale 3 --seeds 20
//! ```

use std::process::ExitCode;
use std::time::Instant;

use ddpush_sim::{run, Kind, Params};

fn usage() -> ExitCode {
    eprintln!(
        "usage: ddpush-sim [--scenario NAME|all] [--seed S | --seeds N [--first S]] [--scale K]\n\
         scenarios: lossy offline partition crash tcp mixed"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut kinds: Vec<Kind> = Kind::ALL.to_vec();
    let mut first = 0u64;
    let mut count = 1u64;
    let mut scale = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        match a.as_str() {
            "--scenario" if v == "all" => kinds = Kind::ALL.to_vec(),
            "--scenario" => match Kind::from_name(&v) {
                Some(k) => kinds = vec![k],
                None => return usage(),
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
            let p = Params::new(k, seed, scale);
            let t = Instant::now();
            match run(&p) {
                Ok(r) => println!("ok   {r} [{:.1}s]", t.elapsed().as_secs_f64()),
                Err(e) => {
                    failed += 1;
                    println!(
                        "FAIL {} seed={seed}\n{e}\nreplay: {}",
                        k.name(),
                        p.replay(scale)
                    );
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
