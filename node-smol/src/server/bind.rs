//! Binding the listening sockets, with the options that must be set before `bind`.

use std::net::{SocketAddr, TcpListener, UdpSocket};

use super::ServerError;

/// Attempts at finding a port number free for both UDP and TCP when the configuration says
/// port 0 (tests, ad-hoc runs): the kernel picks the UDP port, and another process may hold
/// the same number on TCP.
const EPHEMERAL_ATTEMPTS: usize = 64;

/// The device sockets: UDP and, if enabled, TCP on the same port number, as both share 9966 in
/// production. With port 0 the TCP port follows the UDP one the kernel picked; if that number is
/// taken on TCP, another UDP port is tried, so a busy machine never fails a start that asked for
/// "any port".
pub(super) fn bind_device(
    addr: SocketAddr,
    buf: usize,
    tcp: bool,
) -> Result<(UdpSocket, Option<TcpListener>), ServerError> {
    let mut attempt = 0;
    loop {
        let udp = bind_udp(addr, buf)?;
        if !tcp {
            return Ok((udp, None));
        }
        let port = udp.local_addr().map_err(ServerError::Io)?.port();
        match bind_tcp("device TCP", SocketAddr::new(addr.ip(), port)) {
            Ok(l) => return Ok((udp, Some(l))),
            Err(ServerError::Bind { source, .. })
                if addr.port() == 0
                    && source.kind() == std::io::ErrorKind::AddrInUse
                    && attempt + 1 < EPHEMERAL_ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn bind_udp(addr: SocketAddr, buf: usize) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind {
        what: "UDP",
        addr,
        source,
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err)?;
    // Large buffers absorb bursts; the kernel caps them at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.bind(&addr.into()).map_err(err)?;
    Ok(s.into())
}

pub(super) fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { what, addr, source };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(1024).map_err(err)?;
    Ok(s.into())
}
