//! Log lines on stderr, where the service manager or container runtime collects them, in the
//! format of `--log-format`: `text` for people, `json` for log shippers.
//!
//! In json mode *every* line ddpushd writes to stderr is one JSON object with the same four
//! keys (`timestamp`, `level`, `fields` with `message`, `target`): the `tracing` lines, a
//! refusal to start (a bad flag or config, written by [`fatal`] before or without the
//! subscriber), the final error of a run, and a panic's report (the hook [`init`] installs).
//! A log shipper never meets a line it cannot parse.

use std::time::SystemTime;

use crate::settings::LogFormat;

/// Installs the subscriber (`RUST_LOG` filters, `info` by default) and, in json mode, a panic
/// hook that reports through it; then logs the start line with the version and the pid.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            builder.json().with_current_span(false).init();
            // The default hook writes plain text; this one writes a log line like the others.
            std::panic::set_hook(Box::new(|info| {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a panic without a message)".to_string());
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let thread = std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_string();
                tracing::error!(panic = %msg, %location, %thread, "ddpushd panicked");
            }));
        }
    }
    tracing::info!(
        version = env!("DDPUSH_VERSION"),
        pid = std::process::id(),
        "ddpushd starting"
    );
}

/// Writes why ddpushd cannot start, or why a run ended in an error: the plain line for
/// people in text mode; in json mode the same text as one object shaped like every other
/// line (level `ERROR`), so this line parses too. Works with or without [`init`].
pub fn fatal(format: LogFormat, msg: &str) {
    match format {
        LogFormat::Text => eprintln!("{msg}"),
        LogFormat::Json => eprintln!("{}", json_line("ERROR", msg)),
    }
}

/// One log line in the JSON layer's shape, for the lines written without the subscriber.
fn json_line(level: &str, msg: &str) -> String {
    serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        "level": level,
        "fields": { "message": msg },
        "target": "ddpushd",
    })
    .to_string()
}

/// The format asked for by `--log-format json`/`text` (or `--log-format=...`) among arguments
/// that clap refused, so that the refusal is written in it. The last one wins, as in clap;
/// `text` if none.
pub fn format_in_args(args: impl IntoIterator<Item = String>) -> LogFormat {
    let mut format = LogFormat::Text;
    let mut value_next = false;
    for a in args {
        let value = if value_next {
            Some(a.as_str())
        } else {
            a.strip_prefix("--log-format=")
        };
        value_next = a == "--log-format";
        match value {
            Some("json") => format = LogFormat::Json,
            Some("text") => format = LogFormat::Text,
            _ => {}
        }
    }
    format
}

/// The `log-format` of a config file that failed to load, if that key can still be read, so
/// the refusal is written in the format the file asks for.
pub fn format_in_file(path: &std::path::Path) -> Option<LogFormat> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = text.parse().ok()?;
    match table.get("log-format")?.as_str()? {
        "json" => Some(LogFormat::Json),
        "text" => Some(LogFormat::Text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_format_of_refused_arguments_is_found_in_both_spellings() {
        use LogFormat::*;
        assert_eq!(format_in_args(args(&["--bogus"])), Text);
        assert_eq!(format_in_args(args(&["--log-format", "json", "--x"])), Json);
        assert_eq!(format_in_args(args(&["--x", "--log-format=json"])), Json);
        assert_eq!(
            format_in_args(args(&["--log-format", "json", "--log-format", "text"])),
            Text
        );
        // A flag's value that merely looks like the word is not the format.
        assert_eq!(format_in_args(args(&["--node-id", "json"])), Text);
    }

    #[test]
    fn a_line_written_without_the_subscriber_has_the_json_layers_keys() {
        let line = json_line("ERROR", "error: config file x: unknown field `lisen`");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["target"], "ddpushd");
        assert_eq!(
            v["fields"]["message"],
            "error: config file x: unknown field `lisen`"
        );
        let ts = v["timestamp"].as_str().expect("timestamp");
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_broken_file_still_names_its_format_when_the_key_is_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "log-format = \"json\"\nlisen = \"0.0.0.0:1\"\n").expect("write");
        assert_eq!(format_in_file(&p), Some(LogFormat::Json));
        std::fs::write(&p, "log-format = \"json\"\nlisten = ").expect("write");
        assert_eq!(format_in_file(&p), None, "not TOML at all");
    }
}
