//! Install and deploy, end to end: the example configuration in `deploy/`, the health probes,
//! `ddpushd probe`, `--version` and `--log-format`, against the real binary on loopback.

#[path = "server.rs"]
mod server;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::{Args, CommandFactory};
use ddpushd::settings::{Cli, Settings};
use server::*;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ddpushd.toml")
}

/// Every long flag of the server's settings (each is also a config key).
fn setting_keys() -> BTreeSet<String> {
    Settings::augment_args(clap::Command::new("keys"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// `ServerConfig` printed without the random hash seed, for comparing two resolutions.
/// With `cluster`, the flags turn cluster mode on (a seed and a node id, nothing else), so
/// the cluster keys' values are resolved and compared too.
fn resolved(cluster: bool, file: Settings) -> String {
    let mut s = Settings::default();
    if cluster {
        s.cluster_redis = Some("redis://127.0.0.1:7001".into());
        s.node_id = Some("node-1".into());
    }
    let cfg = s.resolve(file).expect("resolves");
    let text = format!("{cfg:?}");
    let at = text.find("hash_seed: ").expect("hash_seed printed");
    let end = at + text[at..].find(',').expect("field ends");
    format!("{}{}", &text[..at], &text[end..])
}

#[test]
fn example_config_names_every_key_and_sets_each_to_its_default() {
    let text = std::fs::read_to_string(example()).expect("deploy/ddpushd.toml");
    // Keys set in the file, and keys shown commented out (those without a default value).
    let mut listed = BTreeSet::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some((k, _)) = l.split_once(" = ") {
            if k.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                listed.insert(k.to_string());
            }
        }
    }
    let keys = setting_keys();
    let missing: Vec<_> = keys.difference(&listed).collect();
    assert!(missing.is_empty(), "deploy/ddpushd.toml lacks {missing:?}");
    let unknown: Vec<_> = listed.difference(&keys).collect();
    assert!(
        unknown.is_empty(),
        "deploy/ddpushd.toml names unknown keys {unknown:?}"
    );
    // Every value written in the file is the default: resolving the file gives exactly what
    // resolving nothing gives, in single-node mode and (for the cluster keys, which a single
    // node does not resolve) in cluster mode.
    for cluster in [false, true] {
        let file = Settings::from_file(&example()).expect("the example parses");
        let with_file = resolved(cluster, file);
        assert!(
            with_file.contains("cluster: Some(") == cluster,
            "{with_file}"
        );
        assert_eq!(
            with_file,
            resolved(cluster, Settings::default()),
            "a value in deploy/ddpushd.toml is not the default (cluster mode: {cluster})"
        );
    }
}

#[test]
fn the_help_states_the_defaults_the_example_sets() {
    // `ddpushd --help` and the example are the two places an operator reads a default: for
    // every key the example sets, the flag's `[default: ...]` says the same value.
    let text = std::fs::read_to_string(example()).expect("deploy/ddpushd.toml");
    let mut set = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.split_once(" = ") {
            set.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    assert!(set.len() > 30, "{set:?}");
    let cmd = Settings::augment_args(clap::Command::new("keys"));
    let mut checked = 0;
    for arg in cmd.get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        let Some(value) = set.get(key) else { continue };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let stated = help
            .rsplit_once("[default: ")
            .and_then(|(_, d)| d.split_once(']'))
            .map(|(d, _)| d.to_string())
            .unwrap_or_else(|| panic!("--{key}: no [default: ...] in its help {help:?}"));
        assert_eq!(
            &stated, value,
            "--{key}: help and deploy/ddpushd.toml differ"
        );
        checked += 1;
    }
    assert_eq!(checked, set.len(), "every key the example sets is a flag");
}

#[test]
fn server_runs_on_the_example_config_and_answers_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    let token = "s3cret-token";
    let srv = Server::start(
        dir.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-token",
            token,
        ],
    );
    let admin = srv.admin.expect("admin address in the listening line");
    // The example's settings are in force and the server serves: a push reaches a device.
    let mut p = srv.pusher();
    assert_eq!(push(&mut p, &up(1, 1, 0x20, b"hello")), Some(0x00));
    let dev = srv.device();
    dev.send(&heartbeat(1)).unwrap();
    assert_eq!(recv_n(&dev, 1), vec!["010120000568656c6c6f".to_string()]);

    // On a loopback admin port the probes need no token; everything else still does.
    let (code, body) = http(admin, "GET", "/healthz", None, "");
    assert_eq!((code, body.as_str()), (200, r#"{"status":"alive"}"#));
    let (code, body) = http(admin, "GET", "/readyz", None, "");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["storage_writable"], true);
    assert_eq!(http(admin, "GET", "/status", None, "").0, 401);
    assert_eq!(http(admin, "GET", "/status", Some(token), "").0, 200);
    // The probes are GET only.
    assert_eq!(http(admin, "POST", "/readyz", None, "").0, 401);
    assert_eq!(http(admin, "POST", "/readyz", Some(token), "").0, 405);

    // `ddpushd probe` reads the same configuration and asks the configured address.
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--admin-listen", &admin.to_string(), "probe"])
        .env("DDPUSHD_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""ready":true"#));
    let out = Command::new(bin())
        .args([
            "--admin-listen",
            &admin.to_string(),
            "probe",
            "--path",
            "/healthz",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let (status, _) = srv.terminate(Duration::from_secs(10));
    assert!(status.success());
    // Nothing listens any more: the probe fails, exit 1, naming the address.
    let out = Command::new(bin())
        .args([
            "--admin-listen",
            &admin.to_string(),
            "probe",
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("probe failed: ") && err.contains(&admin.to_string()),
        "{err}"
    );
}

#[test]
fn probe_of_a_disabled_admin_endpoint_says_so() {
    let out = Command::new(bin())
        .args(["--admin-listen", "none", "probe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin endpoint is disabled"));
}

#[test]
fn version_names_the_crate_version_and_the_commit() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let want = format!("ddpushd {} (", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    // Built from a checkout (as every test run is, unless from a source tarball): the commit.
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&repo)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        // The binary may predate the newest commit only if nothing was rebuilt since; the
        // build script reruns whenever HEAD moves, so they agree.
        Some(h) => assert_eq!(text, format!("{want}git {h})")),
        None => assert!(text.ends_with("(not built from a git checkout)"), "{text}"),
    }
}

/// Runs the server with `--log-format FORMAT` until it has logged its listening line, stops it
/// with SIGTERM and returns every stderr line.
fn lines_of_a_run(format: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["--listen", "127.0.0.1:0", "--push-listen", "127.0.0.1:0"])
        .args([
            "--admin-listen",
            "none",
            "--log-format",
            format,
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut r = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 {
        let done = line.contains("ddpushd listening");
        lines.push(std::mem::take(&mut line).trim_end().to_string());
        if done {
            break;
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    for l in r.lines() {
        lines.push(l.unwrap());
    }
    assert!(child.wait().unwrap().success());
    lines
}

/// Field names of the line whose message is `msg`, read from either format.
fn fields(lines: &[String], msg: &str, json: bool) -> BTreeSet<String> {
    let line = lines
        .iter()
        .find(|l| l.contains(msg))
        .unwrap_or_else(|| panic!("no {msg:?} line in {lines:#?}"));
    if json {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["fields"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "message")
            .cloned()
            .collect()
    } else {
        line.split_whitespace()
            .filter_map(|w| w.split_once('=').map(|(k, _)| k.to_string()))
            .collect()
    }
}

#[test]
fn json_logs_are_one_object_per_line_with_the_fields_of_the_text_logs() {
    let json = lines_of_a_run("json");
    for l in &json {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
    }
    let text = lines_of_a_run("text");
    for msg in ["ddpushd starting", "ddpushd listening", "ddpushd stopped"] {
        let j = fields(&json, msg, true);
        let t = fields(&text, msg, false);
        assert!(!j.is_empty(), "{msg}: no fields");
        assert_eq!(j, t, "{msg}: text and json carry different fields");
    }
    assert!(fields(&json, "ddpushd starting", true).contains("version"));
}

#[test]
fn a_bad_log_format_is_refused_by_name() {
    let out = Command::new(bin())
        .args(["--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format"));
}

#[test]
fn the_cli_parses_as_documented() {
    // Catches a broken clap definition (conflicting names, bad defaults) with a clear message.
    Cli::command().debug_assert();
}

/// Every stderr line of a refused start in json mode is a JSON object of the JSON layer's
/// shape; returns the messages.
fn json_refusal(args: &[&str], dir: &std::path::Path) -> Vec<String> {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.trim().is_empty(), "says nothing: {out:?}");
    err.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert_eq!(v["level"], "ERROR", "{l}");
            assert!(v["timestamp"].is_string() && v["target"].is_string(), "{l}");
            v["fields"]["message"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn in_json_mode_refusals_to_start_are_json_lines_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // A bad flag (clap's refusal), in either spelling of the format flag.
    let m = json_refusal(
        &["--log-format", "json", "--lisen", "0.0.0.0:1"],
        dir.path(),
    );
    assert!(m.len() == 1 && m[0].contains("--lisen"), "{m:?}");
    let m = json_refusal(&["--log-format=json", "--max-clients", "many"], dir.path());
    assert!(m.len() == 1 && m[0].contains("--max-clients"), "{m:?}");
    // A bad key in a file that asks for json.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "log-format = \"json\"\nlisen = \"0.0.0.0:1\"\n").unwrap();
    let m = json_refusal(&["--config", cfg.to_str().unwrap()], dir.path());
    assert!(m.len() == 1 && m[0].contains("lisen"), "{m:?}");
    // A refused combination (resolution).
    let m = json_refusal(
        &["--log-format", "json", "--admin-listen", "0.0.0.0:0"],
        dir.path(),
    );
    assert!(m.len() == 1 && m[0].contains("--admin-token"), "{m:?}");
    // Text mode stays a plain line for people.
    let out = Command::new(bin()).arg("--lisen").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("--lisen"),
        "{err}"
    );
}

#[test]
fn in_json_mode_a_run_that_fails_ends_with_a_json_line() {
    // The push port is taken: the server logs its start, then fails to bind, exit 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["--log-format", "json", "--listen", "127.0.0.1:0"])
        .args([
            "--push-listen",
            &port,
            "--admin-listen",
            "none",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{err}");
    assert_eq!(lines[0]["fields"]["message"], "ddpushd starting");
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{err}");
    assert!(
        last["fields"]["message"].as_str().unwrap().contains(&port),
        "names the address: {err}"
    );
}

/// Set in the child run of the test below: that run installs the JSON logging and panics.
const PANIC_CHILD: &str = "DDPUSH_TEST_PANIC_CHILD";

#[test]
fn in_json_mode_a_panic_is_reported_as_a_json_line() {
    if std::env::var_os(PANIC_CHILD).is_some() {
        ddpushd::log::init(ddpushd::settings::LogFormat::Json);
        let _ = std::thread::Builder::new()
            .name("worker".into())
            .spawn(|| panic!("boom at {}", 42))
            .unwrap()
            .join();
        return;
    }
    // This test again, in a child process of its own (the hook is process-wide).
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "in_json_mode_a_panic_is_reported_as_a_json_line",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PANIC_CHILD, "1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let panic = lines
        .iter()
        .find(|v| v["fields"]["message"] == "ddpushd panicked")
        .unwrap_or_else(|| panic!("no panic line in {err}"));
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["fields"]["panic"], "boom at 42");
    assert_eq!(panic["fields"]["thread"], "worker");
    assert!(
        panic["fields"]["location"]
            .as_str()
            .unwrap()
            .contains("deploy.rs:"),
        "{panic}"
    );
}

/// A 0x20 push of 400 bytes to uuid `i`.
fn big_push(i: u32) -> Vec<u8> {
    let mut v = vec![1u8, 1, 0x20];
    let mut u = [0x5au8; 16];
    u[..4].copy_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&u);
    v.extend_from_slice(&400u16.to_be_bytes());
    v.extend_from_slice(&[b'x'; 400]);
    v
}

/// Sets `RLIMIT_FSIZE` of a running process (the test's "disk full" and "space is back").
#[cfg(target_os = "linux")]
fn set_fsize(pid: u32, limit: u64) {
    let r = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `r` and writes nothing (null old-limit pointer).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &r,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[cfg(target_os = "linux")]
#[test]
fn readyz_turns_unready_while_storage_fails_and_ready_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--fsync",
            "always",
            "--snapshot-interval",
            "1h",
        ],
    );
    let admin = srv.admin.expect("admin address");
    let ready = || {
        let (code, body) = http(admin, "GET", "/readyz", None, "");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], code == 200, "{body}");
        assert_eq!(v["storage_writable"], code == 200, "{body}");
        code
    };
    assert_eq!(ready(), 200);
    // "The disk is full": files may not grow past what they hold now plus a little.
    set_fsize(srv.child.id(), 16 * 1024);
    let mut p = srv.pusher();
    let mut i = 0;
    while push(&mut p, &big_push(i)) == Some(0x00) {
        i += 1;
        assert!(i < 1000, "pushes still accepted past the file-size limit");
    }
    // A refused write: not ready (a load balancer stops sending pushes here), still alive.
    assert_eq!(ready(), 503);
    let (code, body) = http(admin, "GET", "/healthz", None, "");
    assert_eq!((code, body.as_str()), (200, r#"{"status":"alive"}"#));
    let (code, _) = probe_exit(admin);
    assert_eq!(code, Some(1), "ddpushd probe fails while not ready");

    // Space is back. Nothing else arrives (the balancer sends no pushes to an unready node),
    // so the server must find out by itself that writes succeed again.
    set_fsize(srv.child.id(), libc::RLIM_INFINITY);
    let t = std::time::Instant::now();
    while ready() != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still unready 10 s after space came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(push(&mut p, &big_push(i + 1)), Some(0x00));
    assert_eq!(probe_exit(admin).0, Some(0));
}

/// `ddpushd probe` against `admin`: its exit code and stdout.
#[cfg(target_os = "linux")]
fn probe_exit(admin: std::net::SocketAddr) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["--admin-listen", &admin.to_string(), "probe"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}
