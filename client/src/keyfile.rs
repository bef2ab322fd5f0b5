//! The key file of a signed device: `ddpush listen --key-file F`.
//!
//! The file is the JSON body the admin API's `PUT /clients/{uuid}/key` takes, so the app
//! server can write one document and use it for both ends:
//!
//! ```json
//! {"key_id": 1, "key": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}
//! ```
//!
//! `key_id` is 0 to 255, `key` exactly 64 hex digits (32 bytes). `grace_s`, the server's
//! rotation grace period, may be present and is ignored here; any other field is refused, as
//! the server refuses it. Errors name the field and the problem, never the key's value.

use std::path::{Path, PathBuf};

use ddpush_proto::signed::DeviceKey;
use serde_json::Value;

/// A signed device's key, as read from a key file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    /// The key id the server knows the key by.
    pub key_id: u8,
    /// The key (`Debug` shows no bytes).
    pub key: DeviceKey,
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid key file.
    #[error(
        "key file {path}: {problem}; expected JSON {{\"key_id\": 0-255, \"key\": \"<64 hex digits>\"}}, \
         the body of PUT /clients/{{uuid}}/key"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

impl KeyFile {
    /// Reads and checks a key file.
    pub fn read(path: &Path) -> Result<KeyFile, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        KeyFile::parse(&text).map_err(|problem| KeyFileError::Format {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Checks the text of a key file; the error says which field is wrong and how.
    pub fn parse(text: &str) -> Result<KeyFile, String> {
        // serde_json's syntax errors give a line and column, never the text around them.
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        let Value::Object(map) = v else {
            return Err("not a JSON object".into());
        };
        if let Some(other) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "key_id" | "key" | "grace_s"))
        {
            return Err(format!("unknown field {other:?}"));
        }
        let key_id = match map.get("key_id") {
            None => return Err("missing field \"key_id\"".into()),
            Some(id) => id
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or("\"key_id\" must be an integer from 0 to 255")?,
        };
        let key = match map.get("key") {
            None => return Err("missing field \"key\"".into()),
            Some(Value::String(hex)) => {
                DeviceKey::from_hex(hex.trim()).ok_or("\"key\" must be 64 hex digits (32 bytes)")?
            }
            Some(_) => return Err("\"key\" must be a string of 64 hex digits".into()),
        };
        if map.get("grace_s").is_some_and(|g| g.as_u64().is_none()) {
            return Err("\"grace_s\" must be a whole number of seconds".into());
        }
        Ok(KeyFile { key_id, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn the_admin_put_body_is_a_key_file() {
        let k = KeyFile::parse(&format!(
            r#"{{"key_id": 7, "key": "{HEX}", "grace_s": 86400}}"#
        ))
        .unwrap();
        assert_eq!(k.key_id, 7);
        assert_eq!(k.key.to_hex(), HEX);
        let k = KeyFile::parse(&format!(
            "{{\"key\":\"{}\",\"key_id\":0}}\n",
            HEX.to_uppercase()
        ))
        .unwrap();
        assert_eq!((k.key_id, k.key.to_hex()), (0, HEX.to_string()));
    }

    #[test]
    fn each_problem_is_named_and_the_key_never_echoed() {
        let secret = "ab".repeat(31) + "zz"; // 64 characters, not hex
        for (text, problem) in [
            ("", "not JSON"),
            ("[1, 2]", "not a JSON object"),
            (r#"{"key": "00"}"#, "missing field \"key_id\""),
            (r#"{"key_id": 1}"#, "missing field \"key\""),
            (
                &format!(r#"{{"key_id": 256, "key": "{HEX}"}}"#),
                "from 0 to 255",
            ),
            (
                &format!(r#"{{"key_id": -1, "key": "{HEX}"}}"#),
                "from 0 to 255",
            ),
            (
                &format!(r#"{{"key_id": "1", "key": "{HEX}"}}"#),
                "from 0 to 255",
            ),
            (
                &format!(r#"{{"key_id": 1, "key": "{}"}}"#, &HEX[..62]),
                "64 hex digits",
            ),
            (
                &format!(r#"{{"key_id": 1, "key": "{secret}"}}"#),
                "64 hex digits",
            ),
            (r#"{"key_id": 1, "key": 5}"#, "must be a string"),
            (
                &format!(r#"{{"key_id": 1, "key": "{HEX}", "uuid": "x"}}"#),
                "unknown field \"uuid\"",
            ),
            (
                &format!(r#"{{"key_id": 1, "key": "{HEX}", "grace_s": -5}}"#),
                "grace_s",
            ),
        ] {
            let e = KeyFile::parse(text).expect_err(text);
            assert!(e.contains(problem), "{text}: {e}");
            assert!(!e.contains(&secret) && !e.contains(HEX), "{e}");
        }
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let e = KeyFile::read(Path::new("/nonexistent/ddpush.key")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ddpush.key"), "{e}");
    }
}
