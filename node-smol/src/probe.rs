//! `ddpushd probe`: asks a running ddpushd's admin endpoint whether it is ready, for container
//! `HEALTHCHECK`s and scripts on hosts without curl. It uses the same configuration as the
//! server (flags, `--config`, `DDPUSHD_ADMIN_TOKEN`), so it probes the address the server was
//! told to listen on, with the token the server was given.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::settings::{AdminListen, ServerConfig};

/// Why a probe failed; each maps to exit status 1 with one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The admin endpoint is disabled in the configuration.
    #[error("the admin endpoint is disabled (admin-listen = \"none\"): nothing to probe")]
    Disabled,
    /// Connecting, writing or reading failed.
    #[error("{addr}: {source}")]
    Io {
        /// Probed address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("{addr}: not an HTTP answer")]
    NotHttp {
        /// Probed address.
        addr: SocketAddr,
    },
    /// The server answered, but not 200.
    #[error("{addr}{path}: HTTP {status}: {body}")]
    NotOk {
        /// Probed address.
        addr: SocketAddr,
        /// Probed path.
        path: String,
        /// Status code.
        status: u16,
        /// Response body (the reason, as JSON).
        body: String,
    },
}

/// `GET path` on the configured admin address; `Ok(body)` on HTTP 200.
pub fn probe(cfg: &ServerConfig, path: &str, timeout: Duration) -> Result<String, ProbeError> {
    let AdminListen::Addr(mut addr) = cfg.admin_listen else {
        return Err(ProbeError::Disabled);
    };
    // A server listening on every interface is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let io = |source| ProbeError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let auth = cfg
        .admin_token
        .as_deref()
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut answer = Vec::new();
    // The admin endpoint closes after one answer; its answers are small.
    s.take(1 << 20).read_to_end(&mut answer).map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or(ProbeError::NotHttp { addr })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    if status == 200 {
        Ok(body)
    } else {
        Err(ProbeError::NotOk {
            addr,
            path: path.to_string(),
            status,
            body,
        })
    }
}
