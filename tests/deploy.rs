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
fn resolved(s: Settings, file: Settings) -> String {
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
    // resolving nothing gives.
    let file = Settings::from_file(&example()).expect("the example parses");
    assert_eq!(
        resolved(Settings::default(), file),
        resolved(Settings::default(), Settings::default()),
        "a value in deploy/ddpushd.toml is not the default"
    );
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
