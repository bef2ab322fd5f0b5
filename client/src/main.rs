//! `ddpush`: push to a DDPush server and watch pushes arrive, without writing Java.
//!
//! Exit codes: 0 success (every push accepted); 1 a push was not accepted (rejected, failed,
//! closed) or a batch had bad lines; 2 usage error; 3 network error (no connection, timeout).

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use ddpush_client::batch;
use ddpush_client::{
    Content, Device, DeviceEvent, DownMsg, DownPacket, KeyFile, PushError, PushMsg, PushOutcome,
    PushRequest, Pusher, PusherConfig, Uuid,
};

const EXIT_NOT_ACCEPTED: u8 = 1;
const EXIT_NETWORK: u8 = 3;

#[derive(Parser)]
#[command(
    name = "ddpush",
    version = env!("DDPUSH_VERSION"),
    about = "Push to a DDPush v1 server and watch pushes arrive"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one push and print the server's verdict, or send a batch (--batch)
    Push(PushArgs),
    /// Act as a device (heartbeats, acks, reconnects) and print each message as it arrives
    Listen(ListenArgs),
    /// Print the uuid of a user name: MD5 of its UTF-8 bytes, as the DDPush SDKs derive it
    Uuid {
        /// The user name
        name: String,
    },
}

#[derive(Args)]
#[command(
    group(ArgGroup::new("target").args(["uuid", "user"])),
    group(ArgGroup::new("what").args(["notify", "bits", "text", "data_file"])),
)]
struct PushArgs {
    /// The server's push port
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9999")]
    server: String,
    /// Target client, as 32 hex digits
    #[arg(long, value_name = "HEX32", value_parser = parse_uuid)]
    uuid: Option<Uuid>,
    /// Target client by user name (uuid = MD5 of the UTF-8 name)
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Push 0x10 "you have news"
    #[arg(long)]
    notify: bool,
    /// Push 0x11 category bits (decimal or 0x-hex u64)
    #[arg(long, value_name = "N", value_parser = batch::parse_bits)]
    bits: Option<u64>,
    /// Push a 0x20 payload of UTF-8 text
    #[arg(long, value_name = "STR")]
    text: Option<String>,
    /// Push a 0x20 payload read from a file (`-`: standard input)
    #[arg(long, value_name = "F")]
    data_file: Option<PathBuf>,
    /// Send one push per line of FILE (`-`: standard input); see docs/CLIENT.md for the
    /// format: TARGET<TAB>TYPE[<TAB>DATA]
    #[arg(
        long,
        value_name = "FILE|-",
        conflicts_with_all = ["uuid", "user", "notify", "bits", "text", "data_file"]
    )]
    batch: Option<String>,
    /// The appId byte of the requests
    #[arg(long, value_name = "N", default_value_t = 1)]
    app_id: u8,
    /// Seconds to wait for a connection or a reply
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    timeout: f64,
    /// Batch: connections to spread the pushes over (one uuid always uses the same one)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    connections: u16,
    /// Batch: most requests in flight per connection
    #[arg(long, value_name = "N", default_value_t = 256)]
    window: usize,
    /// Batch: longest payload accepted from a line; longer lines are reported as bad (the
    /// server closes the connection on them). Match the server's --max-content.
    #[arg(long, value_name = "BYTES", default_value_t = ddpush_client::ddpush_proto::codec::DEFAULT_MAX_CONTENT)]
    max_content: u16,
    /// Batch: progress display (auto: a bar on a terminal, plain lines otherwise)
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProgressMode {
    Auto,
    Bar,
    Plain,
    None,
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").args(["uuid", "user"]).required(true)))]
struct ListenArgs {
    /// The server's device port
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9966")]
    server: String,
    /// Listen as this user (uuid = MD5 of the UTF-8 name)
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Listen as this uuid (32 hex digits)
    #[arg(long, value_name = "HEX32", value_parser = parse_uuid)]
    uuid: Option<Uuid>,
    /// Use TCP instead of UDP
    #[arg(long)]
    tcp: bool,
    /// Heartbeat interval in seconds, counted from the last packet sent
    #[arg(long, value_name = "SECS", default_value_t = 50.0, value_parser = parse_secs)]
    interval: f64,
    /// The appId byte of heartbeats and acks
    #[arg(long, value_name = "N", default_value_t = 1)]
    app_id: u8,
    /// Exit after this many messages
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Be a signed device (PROTOCOL.md 9) with the key in F: the JSON body given to
    /// `PUT /clients/{uuid}/key`, {"key_id": N, "key": "<64 hex digits>"}
    #[arg(long, value_name = "F")]
    key_file: Option<PathBuf>,
    /// With --key-file: how far ahead of this machine's clock the server's may be, in
    /// seconds (at most 60). The device hears nothing for about this long after it starts
    /// (PROTOCOL.md 9.4): set it to the skew this clock really has
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=60))]
    server_ahead: u64,
    /// Also report heartbeats on standard error
    #[arg(short, long)]
    verbose: bool,
}

fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::from_hex(s).ok_or_else(|| "expected 32 hex digits".to_string())
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err("expected a positive number of seconds".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Uuid { name } => {
            println!("{}", Uuid::from_user(&name));
            ExitCode::SUCCESS
        }
        Cmd::Push(args) if args.batch.is_some() => push_batch(args),
        Cmd::Push(args) => push_one(args),
        Cmd::Listen(args) => listen(args),
    }
}

fn usage_error(msg: &str) -> ! {
    let mut cmd = Cli::command();
    let sub = cmd
        .find_subcommand_mut("push")
        .expect("push subcommand")
        .clone();
    sub.bin_name("ddpush push")
        .error(clap::error::ErrorKind::MissingRequiredArgument, msg)
        .exit()
}

fn pusher_config(args: &PushArgs) -> PusherConfig {
    let t = Duration::from_secs_f64(args.timeout);
    PusherConfig {
        connect_timeout: t,
        io_timeout: t,
        window: args.window.max(1),
    }
}

fn push_one(args: PushArgs) -> ExitCode {
    let uuid = match (&args.uuid, &args.user) {
        (Some(u), _) => *u,
        (None, Some(name)) => Uuid::from_user(name),
        (None, None) => usage_error("one of --uuid HEX32 or --user NAME is required"),
    };
    let msg = if args.notify {
        PushMsg::Notify
    } else if let Some(b) = args.bits {
        PushMsg::Bits(b)
    } else if let Some(t) = &args.text {
        match Content::try_from(t.clone()) {
            Ok(c) => PushMsg::Payload(c),
            Err(e) => usage_error(&e.to_string()),
        }
    } else if let Some(f) = &args.data_file {
        match read_input(f.to_str().unwrap_or_default(), f) {
            Ok(d) => match Content::new(d) {
                Ok(c) => PushMsg::Payload(c),
                Err(e) => usage_error(&format!("{}: {e}", f.display())),
            },
            Err(e) => {
                eprintln!("ddpush: cannot read {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    } else {
        usage_error("one of --notify, --bits N, --text STR or --data-file F is required")
    };
    let req = PushRequest {
        app_id: args.app_id,
        uuid,
        msg,
    };
    let mut pusher = Pusher::with_config(args.server.clone(), pusher_config(&args));
    match pusher.push(&req) {
        Ok(outcome) => {
            println!("{outcome}");
            match outcome {
                PushOutcome::Accepted => return ExitCode::SUCCESS,
                PushOutcome::Rejected => eprintln!(
                    "ddpush: the server rejected the request (0x01: malformed, or no room for a new client)"
                ),
                PushOutcome::Failed => {
                    eprintln!("ddpush: the server could not store the request (0xFF)")
                }
                _ => eprintln!(
                    "ddpush: the server closed the connection without a reply (payload over its maximum?)"
                ),
            }
            ExitCode::from(EXIT_NOT_ACCEPTED)
        }
        Err(e) => {
            eprintln!("ddpush: {e}");
            ExitCode::from(EXIT_NETWORK)
        }
    }
}

fn read_input(name: &str, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    if name == "-" {
        let mut v = Vec::new();
        std::io::stdin().read_to_end(&mut v)?;
        Ok(v)
    } else {
        std::fs::read(path)
    }
}

/// Shared counters and the progress display of a batch.
struct Progress {
    total: u64,
    done: AtomicU64,
    counts: [AtomicU64; 4],
    bar: Option<indicatif::ProgressBar>,
    plain: Option<Mutex<Instant>>,
}

impl Progress {
    fn new(total: u64, mode: ProgressMode) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let (bar, plain) = match mode {
            ProgressMode::Bar => (true, false),
            ProgressMode::Plain => (false, true),
            ProgressMode::None => (false, false),
            ProgressMode::Auto => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} pushes, {per_sec}, eta {eta} {msg}",
            ) {
                b.set_style(style);
            }
            b
        });
        Progress {
            total,
            done: AtomicU64::new(0),
            counts: Default::default(),
            bar,
            plain: plain.then(|| Mutex::new(Instant::now())),
        }
    }

    fn index(o: PushOutcome) -> usize {
        match o {
            PushOutcome::Accepted => 0,
            PushOutcome::Rejected => 1,
            PushOutcome::Failed => 2,
            _ => 3,
        }
    }

    fn record(&self, line: usize, o: PushOutcome) {
        self.counts[Self::index(o)].fetch_add(1, Ordering::Relaxed);
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !o.is_accepted() {
            self.println(&format!("line {line}: {o}"));
        }
        if let Some(b) = &self.bar {
            b.inc(1);
        }
        if let Some(p) = &self.plain {
            let mut last = p.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= Duration::from_secs(1) {
                *last = Instant::now();
                eprintln!(
                    "progress: {done}/{} pushes, {} accepted",
                    self.total,
                    self.count(PushOutcome::Accepted)
                );
            }
        }
    }

    fn count(&self, o: PushOutcome) -> u64 {
        self.counts[Self::index(o)].load(Ordering::Relaxed)
    }

    fn println(&self, s: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{s}")),
            None => eprintln!("{s}"),
        }
    }
}

fn push_batch(args: PushArgs) -> ExitCode {
    let name = args.batch.clone().unwrap_or_default();
    let input = match read_input(&name, std::path::Path::new(&name)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ddpush: cannot read {name}: {e}");
            return ExitCode::from(2);
        }
    };
    let (reqs, bad) = batch::parse(&input, args.app_id, args.max_content);
    for b in &bad {
        eprintln!("line {}: {} (skipped)", b.line, b.reason);
    }
    let progress = Arc::new(Progress::new(reqs.len() as u64, args.progress));
    // One uuid always goes over the same connection, so its pushes keep their order (a 0x20
    // replaces the pending payload: the last line must win).
    let n = usize::from(args.connections);
    let mut shards: Vec<Vec<(usize, PushRequest)>> = vec![Vec::new(); n];
    for (line, req) in reqs {
        let h = req
            .uuid
            .0
            .iter()
            .fold(0usize, |h, &b| h.wrapping_mul(31) ^ usize::from(b));
        shards[h % n].push((line, req));
    }
    let config = pusher_config(&args);
    let started = Instant::now();
    let errors: Vec<(PushError, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .into_iter()
            .filter(|sh| !sh.is_empty())
            .map(|shard| {
                let progress = progress.clone();
                let mut pusher = Pusher::with_config(args.server.clone(), config.clone());
                s.spawn(move || {
                    let (lines, reqs): (Vec<usize>, Vec<PushRequest>) = shard.into_iter().unzip();
                    let mut answered = 0u64;
                    let r = pusher.push_many_with(&reqs, |i, o| {
                        answered += 1;
                        progress.record(lines[i], o);
                    });
                    r.err().map(|e| (e, reqs.len() as u64 - answered))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("push thread panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    if let Some(b) = &progress.bar {
        b.finish_and_clear();
    }
    let mut unanswered = 0;
    for (e, left) in &errors {
        eprintln!("ddpush: {e} ({left} pushes on that connection got no verdict)");
        unanswered += left;
    }
    let accepted = progress.count(PushOutcome::Accepted);
    let done = progress.done.load(Ordering::Relaxed);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-6);
    println!(
        "accepted {accepted}, rejected {}, failed {}, closed {}, no verdict {unanswered}, bad lines {}; {done} pushes in {:.3} s ({rate:.0}/s)",
        progress.count(PushOutcome::Rejected),
        progress.count(PushOutcome::Failed),
        progress.count(PushOutcome::Closed),
        bad.len(),
        elapsed.as_secs_f64(),
    );
    if !errors.is_empty() {
        ExitCode::from(EXIT_NETWORK)
    } else if accepted == progress.total && bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_ACCEPTED)
    }
}

fn describe(p: &DownPacket) -> String {
    let app = p.app_id;
    match &p.msg {
        DownMsg::HeartbeatReply => format!("0x00 app={app} heartbeat-reply"),
        DownMsg::Notify => format!("0x10 app={app} notify"),
        DownMsg::Bits(b) => format!("0x11 app={app} bits {b} (0x{b:016x})"),
        DownMsg::Payload(data) => match std::str::from_utf8(data) {
            Ok(t) => format!("0x20 app={app} text {t:?}"),
            Err(_) => {
                let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                format!("0x20 app={app} hex {hex}")
            }
        },
    }
}

fn listen(args: ListenArgs) -> ExitCode {
    let (uuid, who) = match (&args.uuid, &args.user) {
        (Some(u), _) => (*u, String::new()),
        (None, Some(name)) => (Uuid::from_user(name), format!(" (user {name})")),
        (None, None) => unreachable!("clap requires --uuid or --user"),
    };
    let server: SocketAddr = match args.server.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            eprintln!("ddpush: cannot resolve {}", args.server);
            return ExitCode::from(2);
        }
    };
    let mut builder = Device::builder(server, uuid)
        .app_id(args.app_id)
        .interval(Duration::from_secs_f64(args.interval));
    if args.tcp {
        builder = builder.tcp();
    }
    let mut signed = String::new();
    if let Some(path) = &args.key_file {
        let k = match KeyFile::read(path) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("ddpush: {e}");
                return ExitCode::from(2);
            }
        };
        warn_if_readable_by_others(path);
        signed = format!(", signed with key id {}", k.key_id);
        builder = builder
            .key(k.key_id, k.key)
            .server_ahead(Duration::from_secs(args.server_ahead));
    }
    let device = match builder.start() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ddpush: {e}");
            return ExitCode::from(EXIT_NETWORK);
        }
    };
    eprintln!(
        "listening as {uuid}{who} over {} to {server}, heartbeat every {}s{signed}",
        if args.tcp { "tcp" } else { "udp" },
        args.interval
    );
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    loop {
        let Some(event) = device.recv_event(Duration::from_secs(3600)) else {
            continue;
        };
        match event {
            DeviceEvent::Message(p) => {
                let mut out = stdout.lock();
                // A closed stdout (`| head`) ends the listener quietly.
                if writeln!(out, "{}", describe(&p))
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return ExitCode::SUCCESS;
                }
                seen += 1;
                if args.count.is_some_and(|c| seen >= c) {
                    return ExitCode::SUCCESS;
                }
            }
            DeviceEvent::Connected(local) => eprintln!("connected from {local}"),
            DeviceEvent::HeartbeatSent if args.verbose => eprintln!("heartbeat sent"),
            DeviceEvent::Invalid(e) => eprintln!("dropped an invalid packet: {e}"),
            DeviceEvent::Refused(e) => eprintln!("dropped a signed packet: {e}"),
            DeviceEvent::Unsigned => {
                eprintln!("dropped a v1 packet: a signed device accepts only sealed answers")
            }
            DeviceEvent::Error(e) => eprintln!("error: {e}; retrying in 1s"),
            _ => {}
        }
    }
}

/// A key file others can read is a key others may have: say so (it still works).
fn warn_if_readable_by_others(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "ddpush: warning: key file {} is readable by other users (chmod 600 it)",
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
