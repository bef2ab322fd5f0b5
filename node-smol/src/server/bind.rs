//! Binding the listening sockets, with the options that must be set before `bind`.

use std::net::{SocketAddr, TcpListener, UdpSocket};

use super::ServerError;

pub(super) fn bind_udp(addr: SocketAddr, buf: usize) -> Result<UdpSocket, ServerError> {
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
