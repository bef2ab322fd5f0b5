//! The batch format of `ddpush push --batch`: one push per line.
//!
//! ```text
//! # comments and blank lines are skipped
//! TARGET<TAB>TYPE[<TAB>DATA]
//! ```
//!
//! - `TARGET`: 32 hex digits are a uuid; `user:NAME` is the uuid of user NAME (MD5 of its
//!   UTF-8 bytes, as the SDKs derive it); anything else is taken as a user name.
//! - `TYPE` and `DATA`:
//!   - `notify` (or `0x10`): no data;
//!   - `bits` (or `0x11`): a u64, decimal or `0x`-prefixed hex;
//!   - `text` (or `0x20`): the rest of the line, as is (it may contain tabs), 1 to
//!     `max_content` bytes of UTF-8;
//!   - `hex`: a payload given as hex digits, 1 to `max_content` bytes.
//! - A trailing `\r` is ignored, so files with CRLF line ends work.
//!
//! ```
//! use ddpush_client::batch::parse;
//! use ddpush_client::{PushMsg, Uuid};
//!
//! let text = "# demo\nalice\ttext\thello world\n2e72361924ef37a6166e0b228d1cbbb0\tbits\t0x5\nbob\tfrobnicate\n";
//! let (ok, bad) = parse(text.as_bytes(), 1, 500);
//! assert_eq!(ok.len(), 2);
//! assert_eq!(ok[0].0, 2); // line numbers start at 1
//! assert_eq!(ok[0].1.uuid, Uuid::from_user("alice"));
//! assert_eq!(ok[1].1.msg, PushMsg::Bits(5));
//! assert_eq!(bad[0].line, 4);
//! ```

use ddpush_proto::{check_payload_len, Content, PushMsg, PushRequest, Uuid};

/// A line that could not be turned into a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses a whole batch: the pushes with their line numbers, and the bad lines.
pub fn parse(
    input: &[u8],
    app_id: u8,
    max_content: u16,
) -> (Vec<(usize, PushRequest)>, Vec<BadLine>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    let mut lines = input.split(|&b| b == b'\n').enumerate().peekable();
    while let Some((i, raw)) = lines.next() {
        // The empty piece after a final newline is not a line.
        if raw.is_empty() && lines.peek().is_none() {
            break;
        }
        let line = i + 1;
        let parsed = std::str::from_utf8(raw)
            .map_err(|_| "not valid UTF-8".to_string())
            .and_then(|s| parse_line(s, app_id, max_content));
        match parsed {
            Ok(Some(req)) => ok.push((line, req)),
            Ok(None) => {}
            Err(reason) => bad.push(BadLine { line, reason }),
        }
    }
    (ok, bad)
}

/// Parses one line; `Ok(None)` for a blank line or a comment.
pub fn parse_line(line: &str, app_id: u8, max_content: u16) -> Result<Option<PushRequest>, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut parts = line.splitn(3, '\t');
    let target = parts.next().unwrap_or_default();
    let kind = parts.next().ok_or("expected TARGET<TAB>TYPE[<TAB>DATA]")?;
    let data = parts.next();
    let uuid = parse_target(target)?;
    let msg = match kind.trim() {
        "notify" | "0x10" => match data {
            None | Some("") => PushMsg::Notify,
            Some(_) => return Err("notify takes no data".into()),
        },
        "bits" | "0x11" => PushMsg::Bits(parse_bits(data.ok_or("bits needs a number")?.trim())?),
        "text" | "0x20" => {
            let text = data.unwrap_or_default();
            PushMsg::Payload(checked(text.as_bytes().to_vec(), max_content)?)
        }
        "hex" => {
            let bytes = parse_hex(data.unwrap_or_default().trim())?;
            PushMsg::Payload(checked(bytes, max_content)?)
        }
        other => {
            return Err(format!(
                "unknown type {other:?} (expected notify, bits, text or hex)"
            ))
        }
    };
    Ok(Some(PushRequest { app_id, uuid, msg }))
}

/// The core's payload-length rule, so a batch line the server would refuse is reported here.
fn checked(b: Vec<u8>, max: u16) -> Result<Content, String> {
    check_payload_len(b.len(), max).map_err(|e| e.to_string())?;
    Content::new(b).map_err(|e| e.to_string())
}

/// A batch target: 32 hex digits, `user:NAME`, or a user name.
pub fn parse_target(s: &str) -> Result<Uuid, String> {
    if let Some(name) = s.strip_prefix("user:") {
        return Ok(Uuid::from_user(name));
    }
    if s.is_empty() {
        return Err("empty target".into());
    }
    Ok(Uuid::from_hex(s).unwrap_or_else(|| Uuid::from_user(s)))
}

/// A u64 in decimal or `0x`-prefixed hex.
pub fn parse_bits(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("bad bits {s:?} (a u64, decimal or 0x-hex)"))
}

/// Bytes from hex digits (either case, even count).
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("bad hex {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let u = Uuid::from_user("alice");
        let l = |s| parse_line(s, 1, 10);
        assert_eq!(l("alice\tnotify").unwrap().unwrap().msg, PushMsg::Notify);
        assert_eq!(l("alice\tnotify\t").unwrap().unwrap().uuid, u);
        assert_eq!(
            l("user:alice\t0x11\t7\r").unwrap().unwrap().msg,
            PushMsg::Bits(7)
        );
        assert_eq!(
            l("alice\ttext\ta\tb").unwrap().unwrap().msg,
            PushMsg::Payload(Content::from_static(b"a\tb"))
        );
        assert_eq!(
            l("alice\thex\t00ff").unwrap().unwrap().msg,
            PushMsg::Payload(Content::from_static(&[0, 0xff]))
        );
        assert_eq!(l("  ").unwrap(), None);
        assert_eq!(l("# x").unwrap(), None);
        assert!(l("alice").is_err());
        assert!(l("alice\tbits\tx").is_err());
        assert!(l("alice\ttext").is_err());
        assert!(l("alice\ttext\t01234567890").is_err());
        assert!(l("alice\thex\t0").is_err());
        assert!(l("alice\tnotify\tx").is_err());
        assert_eq!(
            parse_target("2E72361924EF37A6166E0B228D1CBBB0").unwrap(),
            Uuid::from_user("user100001")
        );
    }

    #[test]
    fn invalid_utf8_is_a_bad_line() {
        let (ok, bad) = parse(b"a\tnotify\n\xff\tnotify\nb\tnotify", 1, 500);
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].0, 3);
        assert_eq!(bad[0].line, 2);
    }
}
