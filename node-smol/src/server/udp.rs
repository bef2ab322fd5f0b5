//! Batched UDP I/O on the device socket (Linux `recvmmsg`/`sendmmsg`).

use std::io;
use std::net::SocketAddr;

/// Datagrams per `recvmmsg`/`sendmmsg` call. Batching only pays when datagrams queue up
/// (under load); an idle server sees batches of one and costs the same as `recv_from`.
pub(super) const MMSG: usize = 64;
/// Receive buffer per datagram: larger than any valid device packet, so an oversized one is
/// still seen whole enough to be refused for what it is.
const MMSG_BUF: usize = 2048;

/// Batched UDP I/O on the device socket (Linux `recvmmsg`/`sendmmsg`).
pub(super) struct UdpBatch {
    rx: Vec<[u8; MMSG_BUF]>,
    rx_addr: Vec<libc::sockaddr_storage>,
    /// Encoded datagrams of this turn, back to back, and (address, end offset) of each.
    pub(super) tx: Vec<u8>,
    pub(super) tx_dest: Vec<(socket2::SockAddr, usize)>,
}

impl UdpBatch {
    pub(super) fn new() -> Self {
        UdpBatch {
            rx: vec![[0u8; MMSG_BUF]; MMSG],
            // SAFETY: all-zero is a valid (empty) sockaddr_storage.
            rx_addr: vec![unsafe { std::mem::zeroed() }; MMSG],
            tx: Vec::with_capacity(MMSG * 32),
            tx_dest: Vec::with_capacity(MMSG),
        }
    }

    /// Reads up to [`MMSG`] datagrams; calls `f` with each. Returns how many, or the error.
    pub(super) fn recv(
        &mut self,
        fd: std::os::fd::RawFd,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr arrays are valid; each header points at one iovec over
        // our own buffer and at our own address slot, all alive across the call.
        let mut iov: [libc::iovec; MMSG] = unsafe { std::mem::zeroed() };
        let mut hdr: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
        for i in 0..MMSG {
            iov[i].iov_base = self.rx[i].as_mut_ptr().cast();
            iov[i].iov_len = MMSG_BUF;
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
            hdr[i].msg_hdr.msg_name = (&mut self.rx_addr[i] as *mut libc::sockaddr_storage).cast();
            hdr[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
        }
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdr.as_mut_ptr(),
                MMSG as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdr.iter().enumerate().take(n) {
            let len = (h.msg_len as usize).min(MMSG_BUF);
            // SAFETY: the kernel filled `rx_addr[i]` and wrote its length into msg_namelen.
            let addr = unsafe { socket2::SockAddr::new(self.rx_addr[i], h.msg_hdr.msg_namelen) };
            if let Some(a) = addr.as_socket() {
                f(a, &self.rx[i][..len]);
            }
        }
        Ok(n)
    }

    /// Sends the queued datagrams; returns how many the kernel refused.
    pub(super) fn flush(&mut self, fd: std::os::fd::RawFd) -> u64 {
        let mut failed = 0u64;
        let mut first = 0;
        while first < self.tx_dest.len() {
            let n = (self.tx_dest.len() - first).min(MMSG);
            // SAFETY: as in `recv`; every pointer targets `self.tx` or `self.tx_dest`, which
            // are not touched until the call returns.
            let mut iov: [libc::iovec; MMSG] = unsafe { std::mem::zeroed() };
            let mut hdr: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
            for k in 0..n {
                let i = first + k;
                let start = if i == 0 { 0 } else { self.tx_dest[i - 1].1 };
                let (addr, end) = &self.tx_dest[i];
                iov[k].iov_base = self.tx[start..].as_ptr() as *mut libc::c_void;
                iov[k].iov_len = end - start;
                hdr[k].msg_hdr.msg_iov = &mut iov[k];
                hdr[k].msg_hdr.msg_iovlen = 1;
                hdr[k].msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                hdr[k].msg_hdr.msg_namelen = addr.len();
            }
            let r = unsafe {
                libc::sendmmsg(fd, hdr.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if r <= 0 {
                // The datagram at the head failed (full buffer, unreachable): skip it. UDP
                // is lossy by contract: the item stays pending and goes out again on the
                // next heartbeat.
                failed += 1;
                first += 1;
            } else {
                first += r as usize;
            }
        }
        self.tx.clear();
        self.tx_dest.clear();
        failed
    }
}
