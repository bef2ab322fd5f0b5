//! `ddpushd`: see `ddpushd --help` and docs/OPERATIONS.md.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ddpushd::log;
use ddpushd::settings::{Cli, Command, LogFormat, Settings};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the problem; the full usage is one --help away.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let format = log::format_in_args(std::env::args().skip(1));
            log::fatal(format, &format!("{first} (see ddpushd --help)"));
            return ExitCode::from(2);
        }
    };
    let flag_format = cli.settings.log_format;
    let file = match &cli.config {
        Some(p) => match Settings::from_file(p) {
            Ok(s) => s,
            Err(e) => {
                let format = flag_format.or_else(|| log::format_in_file(p));
                log::fatal(format.unwrap_or(LogFormat::Text), &format!("error: {e}"));
                return ExitCode::from(2);
            }
        },
        None => Settings::default(),
    };
    let format = flag_format.or(file.log_format).unwrap_or(LogFormat::Text);
    let mut settings = cli.settings;
    if let Some(Command::ImportDdpush {
        cluster_redis: Some(r),
        node_id,
        ..
    }) = &cli.command
    {
        settings.cluster_redis = Some(r.clone());
        settings.node_id.get_or_insert_with(|| node_id.clone());
    }
    let cfg = match settings.resolve(file) {
        Ok(c) => c,
        Err(e) => {
            log::fatal(format, &format!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    let dir = cfg.data_dir.clone();
    let result = match cli.command {
        Some(Command::Check { repair: false }) => return check(&dir),
        Some(Command::Check { repair: true }) | Some(Command::Recover) => return recover(&dir),
        // A probe prints its answer, not the server's log lines.
        Some(Command::Probe { path, timeout }) => return probe(&cfg, &path, timeout),
        None => {
            log::init(cfg.log_format);
            match cfg.cluster.clone() {
                Some(c) => ddpushd::cluster::run(cfg, c),
                None => ddpushd::server::run(cfg),
            }
        }
        Some(Command::ImportDdpush { file, .. }) => {
            log::init(cfg.log_format);
            match cfg.cluster.clone() {
                Some(c) => ddpushd::cluster::import(&cfg, &c, &file).map(|i| {
                    println!(
                        "imported {} records ({} with pending items, {} items) from {} into \
                         the Redis Cluster",
                        i.records,
                        i.pending_records,
                        i.items,
                        file.display()
                    );
                }),
                None => ddpushd::server::import(&cfg, &file).map(|n| {
                    println!(
                        "imported {n} records from {} into {}",
                        file.display(),
                        cfg.data_dir.display()
                    );
                }),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::fatal(format, &format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// `ddpushd probe`: exit 0 and print the answer when the server says it is ready.
fn probe(cfg: &ddpushd::settings::ServerConfig, path: &str, timeout: Duration) -> ExitCode {
    match ddpushd::probe::probe(cfg, path, timeout) {
        Ok(body) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("probe failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ddpushd check`: one line per file; exit 1 if start-up would refuse the directory.
fn check(dir: &std::path::Path) -> ExitCode {
    match ddpushd::persist::check::check(dir) {
        Ok(files) => {
            if files.is_empty() {
                println!("{}: no snapshot or journal", dir.display());
            }
            for f in &files {
                println!("{f}");
            }
            if files.iter().any(|f| f.damaged()) {
                println!("start-up refuses this data directory: run `ddpushd recover`");
                ExitCode::FAILURE
            } else {
                println!("start-up can load this data directory");
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ddpushd recover` (or `check --repair`): one line per file it rewrote.
fn recover(dir: &std::path::Path) -> ExitCode {
    match ddpushd::persist::check::recover(dir) {
        Ok(done) => {
            if done.is_empty() {
                println!("{}: nothing damaged, nothing changed", dir.display());
            }
            for r in &done {
                println!("{r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
