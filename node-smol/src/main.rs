//! `ddpushd`: see `ddpushd --help` and docs/OPERATIONS.md.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
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
            eprintln!("{first} (see ddpushd --help)");
            return ExitCode::from(2);
        }
    };
    let file = match &cli.config {
        Some(p) => match Settings::from_file(p) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => Settings::default(),
    };
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
            eprintln!("error: {e}");
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
            init_logging(cfg.log_format);
            match cfg.cluster.clone() {
                Some(c) => ddpushd::cluster::run(cfg, c),
                None => ddpushd::server::run(cfg),
            }
        }
        Some(Command::ImportDdpush { file, .. }) => {
            init_logging(cfg.log_format);
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
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (the service manager or container runtime collects them); `RUST_LOG`
/// filters them, `info` by default. Both formats carry the same fields on every line.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
    tracing::info!(
        version = env!("DDPUSH_VERSION"),
        pid = std::process::id(),
        "ddpushd starting"
    );
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
