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
        match bind_tcp(
            "device TCP",
            SocketAddr::new(addr.ip(), port),
            Some(DEVICE_BUFFERS),
        ) {
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

/// Kernel buffer sizes for the accepted sockets of one listener (set on the listener before
/// `listen`, so every accepted socket inherits them and the window scale is negotiated to
/// match). Linux doubles each value for its bookkeeping and charges memory only for bytes
/// actually queued: an idle connection costs none of it. Setting them turns off autotuning,
/// which is the point: they bound what one slow or hostile peer can pin in kernel memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcpBuffers {
    /// `SO_RCVBUF`.
    pub(crate) recv: usize,
    /// `SO_SNDBUF`.
    pub(crate) send: usize,
}

/// Device streams carry 21..29-byte packets up and a few packets of at most 505 bytes down
/// per heartbeat: 4 KiB in, 16 KiB out (8 KiB and 32 KiB as the kernel counts) are far more
/// than a device ever has in flight, and cap a peer that floods or stops reading.
const DEVICE_BUFFERS: TcpBuffers = TcpBuffers {
    recv: 4 * 1024,
    send: 16 * 1024,
};

/// Push streams: a pipelining app server keeps a window of requests (at most 521 bytes each)
/// in flight and reads one byte per request back.
pub(super) const PUSH_BUFFERS: TcpBuffers = TcpBuffers {
    recv: 64 * 1024,
    send: 16 * 1024,
};

/// Pending connections the kernel queues before `accept`: a fleet reconnecting at once after a
/// restart arrives in bursts (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

pub(crate) fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
    buffers: Option<TcpBuffers>,
) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { what, addr, source };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    if let Some(b) = buffers {
        s.set_recv_buffer_size(b.recv).map_err(err)?;
        s.set_send_buffer_size(b.send).map_err(err)?;
    }
    s.bind(&addr.into()).map_err(err)?;
    s.listen(BACKLOG).map_err(err)?;
    Ok(s.into())
}
