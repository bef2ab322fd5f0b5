//! The web console in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! against the real `ddpushd`. Ignored by default because a fresh machine has no Chromium;
//! `.ci/run` installs `chromium` and `chromium-driver` and runs it with `-- --ignored`.
//!
//! Screenshots of every view land in `target/console-screenshots/` (a CI artifact); the ones
//! in `docs/` are copies of them.

#[path = "server.rs"]
mod server;
#[path = "webdriver.rs"]
mod webdriver;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use server::*;
use webdriver::{ChromeDriver, Session};

/// `target/console-screenshots/`, next to the binary under test.
fn shots() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_BIN_EXE_ddpushd"))
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .expect("the binary lives in target/<profile>/");
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

/// A heartbeat of `uuid`, appId 1.
fn heartbeat_of(uuid: [u8; 16]) -> Vec<u8> {
    let mut hb = vec![1u8, 1, 0x00];
    hb.extend_from_slice(&uuid);
    hb.extend_from_slice(&[0, 0]);
    hb
}

/// A test device: its own UDP socket, after its first heartbeat with `uuid`.
fn device(srv: &Server, uuid: [u8; 16]) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.connect(srv.udp).unwrap();
    s.send(&heartbeat_of(uuid)).unwrap();
    s
}

/// Everything one test needs: a server, a chromedriver, a browser. Dropped in reverse order:
/// the browser is closed, then chromedriver and ddpushd are stopped by their PIDs.
struct Rig {
    browser: Session,
    _driver: ChromeDriver,
    /// `None` only while [`Rig::restart`] runs.
    srv: Option<Server>,
    args: Vec<String>,
    base: String,
    _profile: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl Rig {
    fn srv(&self) -> &Server {
        self.srv.as_ref().expect("a running server")
    }

    /// SIGTERM (the server snapshots and exits), then the same flags and data directory again.
    fn restart(&mut self) {
        if let Some(old) = self.srv.take() {
            let (status, _) = old.terminate(Duration::from_secs(10));
            assert!(status.success(), "{status:?}");
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.srv = Some(Server::start(self.data.path(), &args));
    }
}

/// A server with `extra` flags (admin on a port of its own unless they say otherwise), a
/// chromedriver and a 1280x1000 browser.
fn rig(name: &str, extra: &[&str]) -> Rig {
    let data = tempfile::tempdir().unwrap();
    // Devices here are UDP only; no device TCP port that could collide with the UDP one's.
    let mut args = vec!["--device-tcp", "false"];
    if !extra.contains(&"--admin-listen") {
        args.extend(["--admin-listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    let srv = Server::start(data.path(), &args);
    let admin: SocketAddr = srv.admin.expect("admin address");
    let profile = tempfile::tempdir().unwrap();
    let driver = ChromeDriver::start(&shots().join(format!("chromedriver-{name}.log")));
    let browser = driver.session(profile.path());
    browser.window(1280, 1000);
    Rig {
        browser,
        _driver: driver,
        srv: Some(srv),
        args: args.iter().map(|a| a.to_string()).collect(),
        base: format!("http://{admin}"),
        _profile: profile,
        data,
    }
}

/// No script, style or connection was refused by the Content-Security-Policy, and no error
/// but the `expected` answers (the browser logs every 4xx as an error).
fn assert_clean_log(b: &Session, expected: &[&str]) {
    let bad: Vec<_> = b
        .browser_log()
        .into_iter()
        .filter(|(level, msg)| {
            level == "SEVERE"
                || msg.contains("Content Security Policy")
                || msg.contains("Refused to")
        })
        .filter(|(_, msg)| !expected.iter().any(|e| msg.contains(e)))
        .collect();
    assert!(bad.is_empty(), "browser console: {bad:?}");
}

const OTHER_A: [u8; 16] = [0xa1; 16];
const OTHER_B: [u8; 16] = [0xb2; 16];

#[test]
#[ignore = "needs chromium and chromedriver; .ci/run runs it"]
fn console_overview_push_lookup_remove_and_cluster_in_chromium() {
    let r = rig("main", &[]);
    let b = &r.browser;
    let dir = shots();
    // Three devices heartbeat; user100001's uuid is MD5("user100001") (PROTOCOL.md example).
    let d = device(r.srv(), uuid());
    let a = device(r.srv(), OTHER_A);
    let c = device(r.srv(), OTHER_B);

    b.goto(&format!("{}/", r.base));
    b.wait_text("#ov-clients", |t| t == "3");
    assert_eq!(b.wait_text("#ov-online", |t| t == "3"), "3");
    assert!(!b.displayed("#login"), "no token configured: no login");
    // The charts fill from the 2-second samples: two devices keep heartbeating until the
    // heartbeat chart has two points.
    b.wait("two heartbeat chart points", || {
        a.send(&heartbeat_of(OTHER_A)).unwrap();
        c.send(&heartbeat_of(OTHER_B)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let pts = b.script(
            "return document.getElementById('line-heartbeats-0').getAttribute('points') || ''",
        );
        (pts.as_str()?.split(' ').filter(|p| !p.is_empty()).count() >= 2).then_some(())
    });
    assert_eq!(b.wait_text("#ov-storage", |t| !t.is_empty()), "OK");
    // The version as `ddpushd --version` names it: crate version and commit.
    let version = b.text(&b.el("#ov-version"));
    assert_eq!(version, env!("DDPUSH_VERSION"));
    assert!(version.starts_with(env!("CARGO_PKG_VERSION")), "{version}");
    assert_eq!(b.text(&b.el("#ov-p50")), "no acks");

    // A push from the form reaches the device at once.
    b.click("#nav-push");
    assert!(b.displayed("#view-push") && !b.displayed("#view-overview"));
    b.fill("#push-target", "user100001");
    b.fill("#push-text", "hello from the console");
    b.click("#push-submit");
    let result = b.wait_text("#push-result", |t| t.starts_with("Accepted"));
    assert!(result.contains(UUID_HEX), "{result}");
    let text = b"hello from the console";
    let want = format!("010020{:04x}{}", text.len(), hex::encode(text));
    assert_eq!(recv_n(&d, 1), vec![want]);
    b.screenshot(&dir.join("push.png"));

    // 0x11 with the top bit: the 64-bit mask survives the page's JSON.
    b.script("document.getElementById('push-type').value = 'bits'; document.getElementById('push-type').dispatchEvent(new Event('change'))");
    b.fill("#push-bits", "0x8000000000000001");
    b.click("#push-submit");
    b.wait_text("#push-result", |t| t.starts_with("Accepted: 0x11"));
    let mut want = "010011".to_string();
    want.push_str("0008");
    want.push_str("8000000000000001");
    assert_eq!(recv_n(&d, 1), vec![want]);

    // The lookup by user name shows the payload still pending (the device never acked).
    b.click("#nav-clients");
    b.fill("#lookup-q", "user100001");
    b.click("#lookup-submit");
    let pending = b.wait_text("#lookup-pending", |t| t.contains("hello from the console"));
    assert!(pending.contains("0x20 payload"), "{pending}");
    assert!(pending.contains("0x8000000000000001"), "{pending}");
    let facts = b.text(&b.el("#lookup-facts"));
    assert!(
        facts.contains(UUID_HEX) && facts.contains("ONLINE"),
        "{facts}"
    );
    b.screenshot(&dir.join("clients.png"));

    // The device acks the payload: the overview's push->ack percentiles get their sample.
    d.send(&up(1, 1, 0x20, &[])).unwrap();
    b.click("#nav-overview");
    let p50 = b.wait_text("#ov-p50", |t| t.ends_with(" ms") || t.ends_with(" s"));
    assert_eq!(b.text(&b.el("#ov-p99")), p50, "one sample: p50 = p99");
    b.click("#nav-clients");

    // Removal asks first, then removes.
    b.click("#remove");
    assert!(b.displayed("#remove-confirm"));
    b.click("#remove-no");
    assert!(!b.displayed("#remove-confirm"));
    b.click("#remove");
    b.screenshot(&dir.join("clients-remove.png"));
    b.click("#remove-yes");
    b.wait_text("#remove-result", |t| t.starts_with("Removed the record of"));
    b.fill("#lookup-q", UUID_HEX);
    b.click("#lookup-submit");
    b.wait_text("#lookup-error", |t| t.starts_with("No record for uuid"));
    b.click("#nav-overview");
    b.wait_text("#ov-clients", |t| t == "2");

    // A user name goes to the server exactly as typed, UTF-8: the uuid is MD5 of its bytes
    // (computed independently: python3 -c 'import hashlib; print(hashlib.md5("zoë 7".encode()).hexdigest())').
    b.click("#nav-push");
    b.click("#push-to-user");
    b.script("document.getElementById('push-type').value = 'notify'; document.getElementById('push-type').dispatchEvent(new Event('change'))");
    b.fill("#push-target", "zoë 7");
    b.click("#push-submit");
    let result = b.wait_text("#push-result", |t| t.starts_with("Accepted: 0x10"));
    assert!(
        result.contains("2dd87ee67920d39decd4219cacf7eefb"),
        "{result}"
    );

    b.click("#nav-cluster");
    assert_eq!(
        b.wait_text("#cluster-mode", |t| !t.is_empty()),
        "single node"
    );
    b.screenshot(&dir.join("cluster.png"));

    // The overview again, with the pushes and the ack in it.
    b.click("#nav-overview");
    let totals = b.wait_text("#ov-totals", |t| t.contains("3 pushes accepted"));
    assert!(totals.contains("1 acks"), "{totals}");
    b.screenshot(&dir.join("overview.png"));

    // A phone-sized window: the same overview, one chart per row.
    b.window(390, 844);
    b.click("#nav-overview");
    b.wait_text("#ov-clients", |t| t == "3");
    std::thread::sleep(Duration::from_millis(300));
    b.screenshot(&dir.join("overview-phone.png"));
    let width = b.script("return document.documentElement.scrollWidth <= window.innerWidth");
    assert_eq!(width, true, "no horizontal scrolling on a phone");
    // Every other view fits the phone too (the lookup with its long uuid included).
    b.click("#nav-clients");
    b.fill("#lookup-q", "zoë 7");
    b.click("#lookup-submit");
    b.wait_text("#lookup-facts", |t| {
        t.contains("2dd87ee67920d39decd4219cacf7eefb")
    });
    for view in ["clients", "push", "cluster"] {
        b.click(&format!("#nav-{view}"));
        assert!(b.displayed(&format!("#view-{view}")));
        let width = b.script("return document.documentElement.scrollWidth <= window.innerWidth");
        assert_eq!(width, true, "{view}: no horizontal scrolling on a phone");
    }
    b.click("#nav-clients");
    b.screenshot(&dir.join("clients-phone.png"));

    // The one 4xx: the lookup after the removal.
    assert_clean_log(
        b,
        &["/console/lookup - Failed to load resource: the server responded with a status of 404"],
    );
}

#[test]
#[ignore = "needs chromium and chromedriver; .ci/run runs it"]
fn with_a_token_the_console_shows_only_the_login_until_given_it() {
    let token = "console-test-token";
    let r = rig("token", &["--admin-token", token]);
    let b = &r.browser;
    let _d = device(r.srv(), uuid());

    b.goto(&format!("{}/", r.base));
    b.wait("the login view", || b.displayed("#login").then_some(()));
    for view in [
        "#nav",
        "#view-overview",
        "#view-clients",
        "#view-push",
        "#view-cluster",
    ] {
        assert!(!b.displayed(view), "{view} shown without the token");
    }
    // No data in the page at all, not merely hidden: every figure is still the placeholder.
    let figures = b.script(
        "return Array.from(document.querySelectorAll('.card dd, .facts td')).map(e => e.textContent)",
    );
    let figures = figures.as_array().unwrap();
    assert!(!figures.is_empty());
    assert!(figures.iter().all(|f| f == "–"), "{figures:?}");
    b.screenshot(&shots().join("login.png"));

    b.fill("#token", "wrong");
    b.click("#login-submit");
    b.wait_text("#login-error", |t| t.contains("refused"));
    assert!(!b.displayed("#view-overview"));

    b.fill("#token", token);
    b.click("#login-submit");
    b.wait_text("#ov-clients", |t| t == "1");
    assert!(!b.displayed("#login"));
    // The token is in no URL and no cookie.
    assert!(!b.url().contains(token));
    assert_eq!(b.script("return document.cookie"), "");

    // Asked once: a reload in the same tab goes straight to the data.
    b.goto(&format!("{}/#overview", r.base));
    b.wait_text("#ov-clients", |t| t == "1");
    assert!(!b.displayed("#login"));
    // The 4xx here: the console asking without a token, and the wrong token.
    assert_clean_log(
        b,
        &["the server responded with a status of 401 (Unauthorized)"],
    );
}

/// Seconds of an uptime as the console writes it ("7 s", "2 min 5 s").
fn uptime_s(text: &str) -> u64 {
    let mut total = 0;
    let words: Vec<&str> = text.split(' ').collect();
    for pair in words.chunks(2) {
        let n: u64 = pair[0]
            .parse()
            .unwrap_or_else(|_| panic!("uptime {text:?}"));
        total += match pair.get(1) {
            Some(&"s") => n,
            Some(&"min") => n * 60,
            Some(&"h") => n * 3600,
            _ => panic!("uptime {text:?}"),
        };
    }
    total
}

/// Points in a chart's first line.
fn chart_points(b: &Session, chart: &str) -> usize {
    let js =
        format!("return document.getElementById('line-{chart}-0').getAttribute('points') || ''");
    let pts = b.script(&js);
    pts.as_str()
        .unwrap_or_default()
        .split(' ')
        .filter(|p| !p.is_empty())
        .count()
}

#[test]
#[ignore = "needs chromium and chromedriver; .ci/run runs it"]
fn the_console_follows_a_server_restart() {
    let admin = format!("127.0.0.1:{}", webdriver::free_port());
    let mut r = rig("restart", &["--admin-listen", &admin]);
    let d = device(r.srv(), uuid());
    r.browser.goto(&format!("{}/", r.base));
    let b = &r.browser;
    b.wait_text("#ov-clients", |t| t == "1");
    // Six points (about 12 s of history) on the old process's numbering.
    b.wait_for("six chart points", Duration::from_secs(30), || {
        (chart_points(b, "heartbeats") >= 6).then_some(())
    });
    let before = uptime_s(&b.text(&b.el("#ov-uptime")));
    drop(d);

    r.restart();
    let b = &r.browser;
    // The page notices the new process (its uptime went back) and starts the charts over
    // from the new history, rather than keeping the old process's points.
    let after = b.wait("the new process's uptime", || {
        let t = uptime_s(&b.text(&b.el("#ov-uptime")));
        (t < before).then_some(t)
    });
    let n = chart_points(b, "heartbeats");
    // A sample every ~2 s since the start, plus the start itself.
    assert!(
        (n as u64) <= after / 2 + 2 && n < 6,
        "{n} points at uptime {after} s after a restart"
    );
    // The record survived the restart (snapshot on SIGTERM).
    assert_eq!(b.text(&b.el("#ov-clients")), "1");
    b.wait_text("#live", |t| t.starts_with("live"));
    let _d = device(r.srv(), uuid());
    b.wait_text("#ov-online", |t| t == "1");
}
