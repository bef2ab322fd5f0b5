//! A small blocking WebDriver (W3C) client for the browser test: just the commands it needs,
//! over a plain HTTP/1.1 connection per command to a chromedriver on loopback.
//!
//! Why not a crate: the WebDriver crates (fantoccini, thirtyfour) are async and bring tokio
//! and hyper into a workspace that has neither; the protocol is a handful of JSON requests,
//! and serde_json is already here.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest wait for any single command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback port that was free a moment ago (chromedriver has no `--port=0`).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe socket");
    l.local_addr().expect("probe address").port()
}

/// One HTTP request to chromedriver; returns the decoded JSON body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(COMMAND_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open despite `connection: close`: read the head,
    // then exactly the body its content-length (or chunked encoding) announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let (split, head) = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (i, String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase());
        }
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!("{method} {path}: closed before the header end"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: bad status line"))?;
    let length = head.lines().find_map(|l| {
        let v = l.strip_prefix("content-length:")?;
        v.trim().parse::<usize>().ok()
    });
    let chunked =
        head.contains("transfer-encoding: chunked") || head.contains("transfer-encoding:chunked");
    let done = |b: &[u8]| match length {
        Some(n) => b.len() >= n,
        None if chunked => b.ends_with(b"0\r\n\r\n"),
        None => false,
    };
    let mut content = raw.split_off(split + 4);
    while !done(&content) {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            break;
        }
        content.extend_from_slice(&buf[..n]);
    }
    if chunked {
        content = dechunk(&content)?;
    }
    let v = if content.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&content).map_err(|e| format!("{method} {path}: JSON: {e}"))?
    };
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or("short chunk")?);
        b = b.get(size + 2..).ok_or("short chunk")?;
    }
}

/// A running chromedriver, stopped by its PID when dropped.
pub struct ChromeDriver {
    child: Child,
    addr: SocketAddr,
}

impl ChromeDriver {
    /// Starts chromedriver on a free loopback port and waits until it is ready. The port was
    /// free a moment before; if another process took it meanwhile, chromedriver exits and the
    /// next of three attempts uses another.
    pub fn start(log: &Path) -> ChromeDriver {
        for _ in 0..3 {
            let port = free_port();
            let log_file = std::fs::File::create(log).expect("chromedriver log file");
            let child = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log handle"))
                .stderr(log_file)
                .spawn()
                .expect(
                    "chromedriver must be installed (apt-get install chromium chromium-driver)",
                );
            let mut d = ChromeDriver {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok((200, v)) = http(d.addr, "GET", "/status", None) {
                    if v["value"]["ready"] == true {
                        return d;
                    }
                }
                if d.child.try_wait().ok().flatten().is_some() {
                    break; // exited: most likely the port was taken
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("chromedriver did not become ready (see {})", log.display());
    }

    /// Opens a headless Chromium with a fresh profile in `profile`.
    pub fn session(&self, profile: &Path) -> Session {
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-default-apps".into(),
            "--disable-extensions".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--hide-scrollbars".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "args": args, "binary": chromium_binary() },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let (status, v) = http(self.addr, "POST", "/session", Some(&caps)).expect("new session");
        assert_eq!(status, 200, "new session: {v}");
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_string();
        Session {
            addr: self.addr,
            id,
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium_binary() -> &'static str {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or("chromium")
}

/// One browser; closed when dropped.
pub struct Session {
    addr: SocketAddr,
    id: String,
}

/// An element of the current page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let full = format!("/session/{}{path}", self.id);
        let (status, v) = http(self.addr, method, &full, body.as_ref())?;
        if status != 200 {
            return Err(format!("{method} {path}: {status} {v}"));
        }
        Ok(v["value"].clone())
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.cmd(method, path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Loads a page.
    pub fn goto(&self, url: &str) {
        self.ok("POST", "/url", Some(json!({ "url": url })));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.ok("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Resizes the window (the viewport is a little smaller in headful mode, not here).
    pub fn window(&self, width: u32, height: u32) {
        self.ok(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// The first element matching a CSS selector, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .ok()?;
        v[ELEMENT].as_str().map(|s| Element(s.to_string()))
    }

    /// The element, waiting up to 10 s for it to exist.
    pub fn el(&self, css: &str) -> Element {
        self.wait(&format!("element {css}"), || self.find(css))
    }

    /// Rendered text of an element ("" when it is not displayed).
    pub fn text(&self, e: &Element) -> String {
        self.cmd("GET", &format!("/element/{}/text", e.0), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Whether an element is displayed.
    pub fn displayed(&self, css: &str) -> bool {
        self.find(css).is_some_and(|e| {
            self.cmd("GET", &format!("/element/{}/displayed", e.0), None)
                .is_ok_and(|v| v == true)
        })
    }

    /// Clicks an element.
    pub fn click(&self, css: &str) {
        let e = self.el(css);
        self.ok("POST", &format!("/element/{}/click", e.0), Some(json!({})));
    }

    /// Replaces an input's content with `text`.
    pub fn fill(&self, css: &str, text: &str) {
        let e = self.el(css);
        self.ok("POST", &format!("/element/{}/clear", e.0), Some(json!({})));
        self.ok(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        );
    }

    /// Runs a script in the page and returns its result.
    pub fn script(&self, js: &str) -> Value {
        self.ok(
            "POST",
            "/execute/sync",
            Some(json!({ "script": js, "args": [] })),
        )
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.ok("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// The browser's console log since the last call (level and message of each entry).
    pub fn browser_log(&self) -> Vec<(String, String)> {
        let v = self.ok("POST", "/se/log", Some(json!({ "type": "browser" })));
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["level"].as_str().unwrap_or_default().to_string(),
                            e["message"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The URL, the browser's console log and the start of the page, for a failure message.
    fn diagnosis(&self) -> String {
        let url = self.cmd("GET", "/url", None).unwrap_or_default();
        let log = self.cmd("POST", "/se/log", Some(json!({ "type": "browser" })));
        let source = self.cmd("GET", "/source", None).unwrap_or_default();
        let source: String = source
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(3000)
            .collect();
        format!("\nurl: {url}\nbrowser log: {log:?}\npage: {source}")
    }

    /// Polls `f` every 100 ms until it gives a value; panics after 10 s naming `what`.
    pub fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        self.wait_for(what, Duration::from_secs(10), f)
    }

    /// [`Session::wait`] with another limit.
    pub fn wait_for<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("waited {limit:?} for {what}{}", self.diagnosis());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the text of `css` satisfies `pred`; returns the text.
    pub fn wait_text(&self, css: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.find(css) {
                last = self.text(&e);
                if pred(&last) {
                    return last;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited 10 s on the text of {css}; last: {last:?}{}",
                    self.diagnosis()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closes the browser; chromedriver itself is stopped by its own guard.
        let _ = http(self.addr, "DELETE", &format!("/session/{}", self.id), None);
    }
}
