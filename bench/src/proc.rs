//! The processes under test: spawning `ddpushd` or the responder, reading their memory and
//! CPU time from /proc, and stopping them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running server or responder and the addresses it printed.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// Device UDP address.
    pub udp: SocketAddr,
    /// Push TCP address (ddpushd only).
    pub push: Option<SocketAddr>,
    /// Admin HTTP address, when enabled.
    pub admin: Option<SocketAddr>,
    /// When it was spawned.
    pub spawned: Instant,
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// Spawns `cmd` and waits (up to `timeout`) for its "listening" line on stderr.
pub fn spawn(mut cmd: Command, timeout: Duration) -> Result<Server, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    let spawned = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("listening") {
                let _ = tx.send(line);
                sent = true;
            } else if line.contains("ERROR") || line.starts_with("error") {
                eprintln!("server: {line}");
            }
        }
    });
    let line = match rx.recv_timeout(timeout) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} printed no listening line"));
        }
    };
    let udp = field(&line, "udp=").ok_or_else(|| format!("no udp= in {line:?}"))?;
    Ok(Server {
        child,
        udp,
        push: field(&line, "push="),
        admin: field(&line, "admin="),
        spawned,
    })
}

impl Server {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    pub fn terminate(mut self, timeout: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        while t.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                if !st.success() {
                    return Err(format!("server exited with {st}"));
                }
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(format!("server did not exit within {timeout:?} of SIGTERM"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident set size of `pid` in bytes (VmRSS).
pub fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of `pid` (all threads), in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// CPU time `pid` spent on a CPU, all its threads, in nanoseconds: the first field of each
/// `/proc/PID/task/*/schedstat` (the scheduler's run time, nanosecond resolution), so a short
/// round is not rounded to the 10 ms ticks of [`cpu_secs`]. Threads that exited during the
/// round are missed; ddpushd's threads live as long as it does.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let s = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// This process's own CPU time (user + system, all threads), in nanoseconds.
pub fn self_cpu_ns() -> u64 {
    cpu_ns(std::process::id()).unwrap_or(0)
}

/// The whole machine's steal time so far (the hypervisor running someone else while this VM
/// wanted its CPUs), in clock ticks summed over CPUs: the `cpu` line of /proc/stat, field 8.
pub fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let l = s.lines().next()?.to_string();
            l.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn cpu_set(cpu: usize) -> Result<libc::cpu_set_t, String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("cpu {cpu} is out of range"));
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    Ok(set)
}

/// Pins the calling thread (and the threads and processes it starts from now on) to `cpu`.
pub fn pin_self(cpu: usize) -> Result<(), String> {
    let set = cpu_set(cpu)?;
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r != 0 {
        return Err(format!(
            "sched_setaffinity(cpu {cpu}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Makes `cmd` start pinned to `cpu` (every thread it starts inherits it).
pub fn pin_command(cmd: &mut Command, cpu: usize) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let set = cpu_set(cpu)?;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // sched_setaffinity(2), which is async-signal-safe, on a set built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Datagrams the kernel dropped at the UDP socket bound to `port` (receive buffer full),
/// from /proc/net/udp{,6}.
pub fn udp_drops(port: u16) -> u64 {
    let want = format!(":{port:04X}");
    let mut total = 0;
    for f in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(s) = std::fs::read_to_string(f) else {
            continue;
        };
        for l in s.lines().skip(1) {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.get(1).is_some_and(|a| a.ends_with(&want)) {
                total += w.last().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

/// GET /metrics from an admin endpoint and return the value of one sample.
pub fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        // The address as Host: without a token the admin port takes only IP or localhost.
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// The ddpushd command line used for every benchmark run.
pub fn ddpushd_cmd(bin: &Path, data: &Path, listen: &str, push: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--listen",
        listen,
        "--push-listen",
        push,
        "--heartbeat-reply",
        "always",
        // Abuse limits would throttle a generator that sends everything from one IP.
        "--limits",
        "false",
        "--device-tcp",
        "false",
        "--data-dir",
    ]);
    c.arg(data);
    c.args(extra);
    if !extra.contains(&"--admin-listen") {
        c.args(["--admin-listen", "none"]);
    }
    c
}
