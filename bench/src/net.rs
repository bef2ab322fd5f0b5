//! Batched UDP I/O for the generator: `sendmmsg`/`recvmmsg` on connected sockets, so that one
//! generator core can outpace one server core.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Datagrams per batched call.
pub const BATCH: usize = 64;
/// Largest datagram the generator reads (a 0x20 delivery is at most 505 bytes).
const RECV_SIZE: usize = 600;

/// A UDP socket on loopback connected to `target`, non-blocking, with large buffers.
pub fn connected_socket(target: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    let local: SocketAddr = if target.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    s.bind(&local.into())?;
    s.connect(&target.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Sends up to `n` datagrams of `size` bytes each, laid out back to back in `buf`.
/// Returns how many the kernel took (0 when its buffer is full).
pub fn send_many(sock: &UdpSocket, buf: &[u8], size: usize, n: usize) -> usize {
    let n = n.min(BATCH).min(buf.len() / size);
    if n == 0 {
        return 0;
    }
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut hdr: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iov[i] = libc::iovec {
            iov_base: buf[i * size..].as_ptr() as *mut libc::c_void,
            iov_len: size,
        };
        hdr[i].msg_hdr.msg_iov = &mut iov[i];
        hdr[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at one live iovec over `buf`, which outlives the call.
    let r = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            hdr.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        0
    } else {
        r as usize
    }
}

/// Receive buffers for [`Receiver::recv`].
pub struct Receiver {
    bufs: Vec<[u8; RECV_SIZE]>,
    lens: [usize; BATCH],
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            bufs: vec![[0u8; RECV_SIZE]; BATCH],
            lens: [0; BATCH],
        }
    }
}

impl Receiver {
    /// Reads up to [`BATCH`] datagrams without blocking; returns how many.
    pub fn recv(&mut self, sock: &UdpSocket) -> usize {
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdr: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, b) in self.bufs.iter_mut().enumerate() {
            iov[i] = libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: RECV_SIZE,
            };
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one live iovec over our own buffers.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdr.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        let n = r as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdr).take(n) {
            *len = h.msg_len as usize;
        }
        n
    }

    /// The `i`-th datagram of the last [`Receiver::recv`].
    pub fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }
}

/// Waits until one of `socks` is readable or `timeout` passes.
pub fn wait_readable(socks: &[UdpSocket], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a live array of `fds.len()` pollfds.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis().min(1000) as libc::c_int,
        );
    }
}
