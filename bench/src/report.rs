//! Turns a suite's JSON into the table and charts of docs/BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::Args;

const BEGIN: &str = "<!-- BEGIN GENERATED: bench/run.sh rewrites this part -->";
const END: &str = "<!-- END GENERATED -->";

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn fmt_rate(x: f64) -> String {
    if x.is_nan() {
        "n/a".into()
    } else {
        format!("{:.0}/s", x)
    }
}

/// The markdown table of every figure.
pub fn table(r: &Value) -> String {
    let g = &r["figures"];
    let x = |k: &str| num(&g[k]);
    let ok = |pass: bool| if pass { "met" } else { "**unmet**" };
    let mut s = String::new();
    s.push_str(
        "| figure | target | measured | do-nothing responder | verdict |\n|---|---|---|---|---|\n",
    );
    let mut row = |a: &str, b: &str, c: String, d: String, e: &str| {
        let _ = writeln!(s, "| {a} | {b} | {c} | {d} | {e} |");
    };
    row(
        "resident memory per idle UDP client (RSS, marginal 100k->1M)",
        "<= 100 B",
        format!("{:.1} B", x("bytes_per_idle_client")),
        "-".into(),
        ok(x("bytes_per_idle_client") <= 100.0),
    );
    row(
        "heartbeats answered/s, closed loop, policy always",
        ">= 0.95 x responder",
        format!(
            "{} ({:.3} x, loss {:.4})",
            fmt_rate(x("heartbeats_per_s")),
            x("heartbeat_ratio"),
            x("heartbeat_loss")
        ),
        fmt_rate(x("responder_heartbeats_per_s")),
        ok(x("heartbeat_ratio") >= 0.95),
    );
    row(
        "server CPU per answered heartbeat at 100k/s offered",
        "<= 1.1 x responder",
        format!(
            "{:.2} us ({:.2} x)",
            x("cpu_us_per_heartbeat"),
            x("cpu_ratio")
        ),
        format!("{:.2} us", x("responder_cpu_us_per_heartbeat")),
        ok(x("cpu_ratio") <= 1.1),
    );
    row(
        "pushes/s, 1 pipelined connection (window 64), delivered + acked",
        ">= 100,000/s",
        fmt_rate(x("pushes_per_s_pipelined_1x64")),
        "-".into(),
        ok(x("pushes_per_s_pipelined_1x64") >= 100_000.0),
    );
    row(
        "pushes/s, 1 connection waiting for each reply",
        ">= 15,000/s",
        fmt_rate(x("pushes_per_s_serial_1")),
        "-".into(),
        ok(x("pushes_per_s_serial_1") >= 15_000.0),
    );
    row(
        "pushes/s, 16 such connections",
        ">= 60,000/s",
        fmt_rate(x("pushes_per_s_serial_16")),
        "-".into(),
        ok(x("pushes_per_s_serial_16") >= 60_000.0),
    );
    row(
        "push -> UDP delivery latency, 16 one-at-a-time connections",
        "p99 <= 1 ms",
        format!(
            "p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us",
            x("latency_p50_us_serial_16"),
            x("latency_p99_us_serial_16"),
            x("latency_p999_us_serial_16")
        ),
        "-".into(),
        ok(x("latency_p99_us_serial_16") <= 1000.0),
    );
    row(
        "start with 1,000,000 clients (spawn until a heartbeat is answered)",
        "<= 1 s",
        format!("{:.3} s", x("startup_s")),
        "-".into(),
        ok(x("startup_s") <= 1.0),
    );
    row(
        "SIGTERM to exit with 1,000,000 clients (snapshot written)",
        "<= 2 s",
        format!("{:.3} s", x("shutdown_s")),
        "-".into(),
        ok(x("shutdown_s") <= 2.0),
    );
    row(
        "overload (open loop, as fast as the generator sends)",
        "memory bounded; excess dropped and counted",
        format!(
            "offered {}, answered {}, kernel drops {}, RSS growth {:.1} MiB",
            fmt_rate(x("overload_offered_per_s")),
            fmt_rate(x("overload_answered_per_s")),
            x("overload_kernel_drops"),
            x("overload_rss_growth") / 1048576.0
        ),
        "-".into(),
        ok(x("overload_rss_growth") < 64.0 * 1048576.0),
    );
    row(
        "pushes/s, --fsync always, 64 pipelined connections (window 16)",
        "report; group commit",
        format!(
            "{} ({:.1} pushes per fsync)",
            fmt_rate(x("pushes_per_s_fsync_always")),
            x("pushes_per_fsync")
        ),
        "-".into(),
        "reported",
    );
    let n = x("tcp_conns");
    let at = if g["tcp_conns_clamped_by_fd_limit"].as_bool() == Some(true) {
        format!("{n:.0} (the fd hard limit stops it there)")
    } else {
        format!("{n:.0}")
    };
    row(
        &format!("resident memory per idle TCP device connection (RSS / connections, at {at})"),
        "<= 2,048 B at 100,000",
        format!(
            "{:.0} B (marginal {:.0} B)",
            x("tcp_bytes_per_idle_conn"),
            x("tcp_bytes_per_idle_conn_marginal")
        ),
        "-".into(),
        if x("tcp_bytes_per_idle_conn") > 2048.0 {
            "**unmet**"
        } else if n >= 100_000.0 {
            "met"
        } else {
            "met below 100k; **100k not measured**"
        },
    );
    row(
        "resident memory per idle push connection (port 9999)",
        "report",
        format!("{:.0} B", x("push_bytes_per_idle_conn")),
        "-".into(),
        "reported",
    );
    row(
        "TCP device connections opened and registered per second",
        "report",
        fmt_rate(x("tcp_connect_per_s")),
        "-".into(),
        "reported",
    );
    row(
        "heartbeats/s over TCP, all connections (server count); UDP on the same server",
        "report, next to UDP",
        format!(
            "TCP {} ({:.2} us CPU each); UDP {} ({:.2} us CPU each)",
            fmt_rate(x("tcp_heartbeats_per_s")),
            x("tcp_cpu_us_per_heartbeat"),
            fmt_rate(x("udp_heartbeats_per_s_same_run")),
            x("udp_cpu_us_per_heartbeat_same_run")
        ),
        "-".into(),
        "reported",
    );
    row(
        "push -> delivery latency with the TCP devices connected, 16x1",
        "report, next to UDP",
        format!(
            "TCP p50 {:.0} us, p99 {:.0} us; UDP p50 {:.0} us, p99 {:.0} us",
            x("tcp_push_latency_p50_us"),
            x("tcp_push_latency_p99_us"),
            x("udp_push_latency_p50_us_same_run"),
            x("udp_push_latency_p99_us_same_run")
        ),
        "-".into(),
        "reported",
    );
    s
}

/// A bar chart of the push latency percentiles of each push run.
pub fn latency_svg(r: &Value) -> String {
    let runs = [
        ("1 conn, window 64", &r["push"]["pipelined_1x64"]["latency"]),
        ("1 conn, one at a time", &r["push"]["serial_1"]["latency"]),
        (
            "16 conns, one at a time",
            &r["push"]["serial_16"]["latency"],
        ),
    ];
    let keys = [
        ("p50_us", "p50"),
        ("p90_us", "p90"),
        ("p99_us", "p99"),
        ("p999_us", "p99.9"),
    ];
    let colors = ["#4e79a7", "#f28e2b", "#59a14f"];
    let max = runs
        .iter()
        .flat_map(|(_, l)| keys.iter().map(move |(k, _)| num(&l[*k])))
        .filter(|v| v.is_finite())
        .fold(1000.0f64, f64::max);
    let (w, h, left, top, bottom) = (640.0, 360.0, 60.0, 40.0, 50.0);
    let ph = h - top - bottom;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">push -> UDP delivery latency (us)</text>"#,
        w / 2.0
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = top + ph - ph * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
            w - 10.0,
            left - 5.0,
            y + 4.0
        );
    }
    // The 1 ms target.
    let ty = top + ph - ph * 1000.0 / max;
    let _ = write!(
        s,
        r#"<line x1="{left}" x2="{}" y1="{ty}" y2="{ty}" stroke="red" stroke-dasharray="4"/><text x="{}" y="{}" fill="red" text-anchor="end">1 ms target (p99)</text>"#,
        w - 10.0,
        w - 12.0,
        ty - 4.0
    );
    let group = (w - left - 20.0) / keys.len() as f64;
    let bw = group / (runs.len() as f64 + 1.0);
    for (ki, (k, label)) in keys.iter().enumerate() {
        let gx = left + 10.0 + group * ki as f64;
        for (ri, (_, l)) in runs.iter().enumerate() {
            let v = num(&l[*k]);
            if !v.is_finite() {
                continue;
            }
            let bh = ph * v / max;
            let _ = write!(
                s,
                r#"<rect x="{}" y="{}" width="{}" height="{bh}" fill="{}"><title>{v} us</title></rect>"#,
                gx + bw * ri as f64,
                top + ph - bh,
                bw - 2.0,
                colors[ri]
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
            gx + group / 2.0 - bw / 2.0,
            h - bottom + 16.0
        );
    }
    for (ri, (name, _)) in runs.iter().enumerate() {
        let x = left + 10.0 + 190.0 * ri as f64;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            h - 18.0,
            colors[ri],
            x + 14.0,
            h - 9.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Resident memory against client count.
pub fn memory_svg(r: &Value) -> String {
    let pts: Vec<(f64, f64)> = r["memory"]["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| (num(&p["clients"]), num(&p["rss"]) / 1048576.0))
                .filter(|(c, m)| c.is_finite() && m.is_finite())
                .collect()
        })
        .unwrap_or_default();
    let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let (w, h, left, top, bottom) = (640.0, 360.0, 60.0, 40.0, 50.0);
    let (pw, ph) = (w - left - 20.0, h - top - bottom);
    let px = |c: f64| left + pw * c / xmax;
    let py = |m: f64| top + ph - ph * m / ymax;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">ddpushd resident memory (MiB) against registered clients</text>"#,
        w / 2.0
    );
    for i in 0..=4 {
        let m = ymax * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{m:.0}</text>"##,
            w - 20.0,
            left - 5.0,
            py(m) + 4.0,
            y = py(m)
        );
    }
    // 100 B per client above the first point: the target's slope.
    if let Some(&(c0, m0)) = pts.first() {
        let m1 = m0 + (xmax - c0) * 100.0 / 1048576.0;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="red" stroke-dasharray="4"/><text x="{}" y="{}" fill="red" text-anchor="end">100 B/client target slope</text>"#,
            px(c0),
            py(m0),
            px(xmax),
            py(m1),
            px(xmax) - 4.0,
            py(m1) - 6.0
        );
    }
    let path: Vec<String> = pts
        .iter()
        .map(|(c, m)| format!("{},{}", px(*c), py(*m)))
        .collect();
    let _ = write!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#4e79a7" stroke-width="2"/>"##,
        path.join(" ")
    );
    for (c, m) in &pts {
        let _ = write!(
            s,
            r##"<circle cx="{}" cy="{}" r="4" fill="#4e79a7"/><text x="{}" y="{}" text-anchor="middle">{:.0}k: {m:.1}</text>"##,
            px(*c),
            py(*m),
            px(*c),
            py(*m) - 10.0,
            c / 1000.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">clients</text></svg>"#,
        w / 2.0,
        h - 10.0
    );
    s.push('\n');
    s
}

/// `report --in results.json --doc docs/BENCHMARKS.md --charts docs/bench [--command CMD]`
pub fn run(a: &Args) -> Result<Value, String> {
    let input: PathBuf = a.need("in")?;
    let doc: PathBuf = a.need("doc")?;
    let charts: PathBuf = a.need("charts")?;
    let text = std::fs::read_to_string(&input).map_err(|e| format!("{}: {e}", input.display()))?;
    let r: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or("no JSON line in the input")?;
    std::fs::create_dir_all(&charts).map_err(|e| e.to_string())?;
    std::fs::write(charts.join("latency.svg"), latency_svg(&r)).map_err(|e| e.to_string())?;
    std::fs::write(charts.join("memory.svg"), memory_svg(&r)).map_err(|e| e.to_string())?;
    let m = &r["machine"];
    let rel = |f: &str| {
        let dir = doc.parent().unwrap_or(std::path::Path::new("."));
        charts
            .join(f)
            .strip_prefix(dir)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| charts.join(f).display().to_string())
    };
    let mut g = String::new();
    let _ = writeln!(g, "{BEGIN}\n");
    let _ = writeln!(
        g,
        "Run: `{}` on {} ({} cores, kernel {}), {} (unix time {}), suite took {:.0} s.\n",
        a.0.get("command")
            .map(String::as_str)
            .unwrap_or("bench/run.sh"),
        m["cpu"].as_str().unwrap_or("?"),
        m["nproc"],
        m["kernel"].as_str().unwrap_or("?"),
        a.0.get("date")
            .map(String::as_str)
            .unwrap_or("date not given"),
        m["unix_time"],
        num(&r["secs"])
    );
    g.push_str(&table(&r));
    let _ = writeln!(
        g,
        "\n![push latency percentiles]({})\n\n![memory against client count]({})\n",
        rel("latency.svg"),
        rel("memory.svg")
    );
    let _ = writeln!(
        g,
        "Raw figures (the suite's final JSON line, `figures` object):\n\n```json\n{}\n```\n",
        serde_json::to_string_pretty(&r["figures"]).unwrap_or_default()
    );
    g.push_str(END);
    let old = std::fs::read_to_string(&doc).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], g, &old[e + END.len()..]),
        _ => format!("{old}\n{g}\n"),
    };
    std::fs::write(&doc, new).map_err(|e| e.to_string())?;
    Ok(json!({ "mode": "report", "doc": doc.display().to_string() }))
}
