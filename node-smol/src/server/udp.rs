//! Batched datagram I/O on the device socket.
//!
//! Where the system has `recvmmsg`/`sendmmsg` (Linux, Android, FreeBSD, NetBSD) one call moves
//! up to [`MMSG`] datagrams, through nix's safe wrappers; elsewhere (macOS) the same interface
//! falls back to one `recv_from`/`send_to` per datagram. Batching only pays when datagrams
//! queue up (under load); an idle server sees batches of one and costs the same either way.

use std::io;
use std::net::{SocketAddr, UdpSocket};

/// Datagrams per batch (one `recvmmsg`/`sendmmsg` call).
pub(super) const MMSG: usize = 64;
/// Fills the unused part of a receive batch.
const NO_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));
/// Receive buffer per datagram: larger than any valid device packet, so an oversized one is
/// still seen whole enough to be refused for what it is.
const MMSG_BUF: usize = 2048;

/// Receive buffers and the datagrams queued for sending in this turn.
pub(super) struct UdpBatch {
    rx: Vec<[u8; MMSG_BUF]>,
    /// Encoded datagrams of this turn, back to back, and the end offset of each.
    tx: Vec<u8>,
    tx_end: Vec<usize>,
    tx_addr: Vec<SocketAddr>,
    sys: imp::Headers,
}

impl UdpBatch {
    pub(super) fn new() -> Self {
        UdpBatch {
            rx: vec![[0u8; MMSG_BUF]; MMSG],
            tx: Vec::with_capacity(MMSG * 32),
            tx_end: Vec::with_capacity(MMSG),
            tx_addr: Vec::with_capacity(MMSG),
            sys: imp::Headers::new(),
        }
    }

    /// Queues one datagram to `to`, written by `encode`; returns true when a batch is full
    /// and should be flushed.
    pub(super) fn push(&mut self, to: SocketAddr, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        encode(&mut self.tx);
        self.tx_end.push(self.tx.len());
        self.tx_addr.push(to);
        self.tx_end.len() >= MMSG
    }

    /// Reads up to [`MMSG`] datagrams without blocking; calls `f` once with all of them and
    /// their sources, in order (the core looks up their keys together:
    /// `Node::handle_udp_batch`). Returns how many were read, or the error (`WouldBlock` when
    /// none was waiting).
    pub(super) fn recv(
        &mut self,
        sock: &UdpSocket,
        f: impl FnOnce(&[(SocketAddr, &[u8])]),
    ) -> io::Result<usize> {
        imp::recv(&mut self.sys, &mut self.rx, sock, f)
    }

    /// Sends the queued datagrams; returns how many the kernel refused. UDP is lossy by
    /// contract: a refused datagram (full buffer, unreachable) is skipped, its item stays
    /// pending and goes out again on the next heartbeat.
    pub(super) fn flush(&mut self, sock: &UdpSocket) -> u64 {
        let mut failed = 0u64;
        let mut first = 0;
        while first < self.tx_end.len() {
            let start = if first == 0 {
                0
            } else {
                self.tx_end[first - 1]
            };
            let sent = imp::send(
                &mut self.sys,
                sock,
                &self.tx,
                start,
                &self.tx_end[first..],
                &self.tx_addr[first..],
            );
            if sent == 0 {
                // The datagram at the head failed: skip it.
                failed += 1;
                first += 1;
            } else {
                first += sent;
            }
        }
        self.tx.clear();
        self.tx_end.clear();
        self.tx_addr.clear();
        failed
    }
}

#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd"
))]
use mmsg as imp;
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd"
)))]
use portable as imp;

#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd"
))]
mod mmsg {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

    use super::{MMSG, MMSG_BUF, NO_ADDR};

    /// The `mmsghdr` arrays, allocated once, and the destination addresses of one send.
    pub(super) struct Headers {
        rx: MultiHeaders<SockaddrStorage>,
        tx: MultiHeaders<SockaddrStorage>,
        tx_addr: Vec<Option<SockaddrStorage>>,
    }

    impl Headers {
        pub(super) fn new() -> Self {
            Headers {
                rx: MultiHeaders::preallocate(MMSG, None),
                tx: MultiHeaders::preallocate(MMSG, None),
                tx_addr: Vec::with_capacity(MMSG),
            }
        }
    }

    pub(super) fn recv(
        h: &mut Headers,
        bufs: &mut [[u8; MMSG_BUF]],
        sock: &UdpSocket,
        f: impl FnOnce(&[(SocketAddr, &[u8])]),
    ) -> io::Result<usize> {
        let mut it = bufs.iter_mut();
        let mut iov: [[IoSliceMut<'_>; 1]; MMSG] =
            std::array::from_fn(|_| [IoSliceMut::new(it.next().map_or(&mut [], |b| &mut b[..]))]);
        let got = recvmmsg(
            sock.as_raw_fd(),
            &mut h.rx,
            iov.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        let mut n = 0;
        let mut batch = [(NO_ADDR, &[][..]); MMSG];
        let mut kept = 0;
        for m in got {
            n += 1;
            let from = m.address.and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| SocketAddr::V4((*v4).into()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
            });
            let data = m.iovs().next().unwrap_or(&[]);
            if let (Some(from), Some(slot)) = (from, batch.get_mut(kept)) {
                *slot = (from, &data[..m.bytes.min(data.len())]);
                kept += 1;
            }
        }
        f(&batch[..kept]);
        Ok(n)
    }

    /// Sends datagrams `start..ends[0]`, `ends[0]..ends[1]`, ... (at most [`MMSG`]); returns
    /// how many the kernel took (0 when the first one failed).
    pub(super) fn send(
        h: &mut Headers,
        sock: &UdpSocket,
        tx: &[u8],
        start: usize,
        ends: &[usize],
        addrs: &[SocketAddr],
    ) -> usize {
        let n = ends.len().min(MMSG);
        h.tx_addr.clear();
        h.tx_addr
            .extend(addrs[..n].iter().map(|a| Some(SockaddrStorage::from(*a))));
        let mut from = start;
        let mut ends = ends[..n].iter();
        let iov: [[IoSlice<'_>; 1]; MMSG] = std::array::from_fn(|_| {
            let s = match ends.next() {
                Some(&end) => &tx[from..end],
                None => &[],
            };
            from += s.len();
            [IoSlice::new(s)]
        });
        match sendmmsg(
            sock.as_raw_fd(),
            &mut h.tx,
            iov[..n].iter(),
            &h.tx_addr,
            [],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(sent) => sent.count(),
            Err(_) => 0,
        }
    }
}

/// The fallback, compiled (and tested) everywhere so it cannot rot where it is not used.
#[cfg_attr(
    any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "netbsd"
    ),
    allow(dead_code)
)]
mod portable {
    use std::io;
    use std::net::{SocketAddr, UdpSocket};

    use super::{MMSG, MMSG_BUF, NO_ADDR};

    /// Nothing to keep between calls without `mmsghdr`s.
    pub(super) struct Headers;

    impl Headers {
        pub(super) fn new() -> Self {
            Headers
        }
    }

    /// One `recv_from` per datagram, up to [`MMSG`]. The socket is non-blocking (async-io).
    pub(super) fn recv(
        _: &mut Headers,
        bufs: &mut [[u8; MMSG_BUF]],
        sock: &UdpSocket,
        f: impl FnOnce(&[(SocketAddr, &[u8])]),
    ) -> io::Result<usize> {
        let mut got = [(NO_ADDR, 0); MMSG];
        let mut n = 0;
        for (buf, g) in bufs.iter_mut().zip(&mut got) {
            match sock.recv_from(buf) {
                Ok((len, from)) => {
                    n += 1;
                    *g = (from, len);
                }
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        let mut batch = [(NO_ADDR, &[][..]); MMSG];
        for ((b, buf), &(from, len)) in batch.iter_mut().zip(bufs.iter()).zip(&got[..n]) {
            *b = (from, &buf[..len]);
        }
        f(&batch[..n]);
        Ok(n)
    }

    /// One `send_to` per datagram; stops at the first refusal (the caller skips it).
    pub(super) fn send(
        _: &mut Headers,
        sock: &UdpSocket,
        tx: &[u8],
        start: usize,
        ends: &[usize],
        addrs: &[SocketAddr],
    ) -> usize {
        let mut from = start;
        for (i, (&end, addr)) in ends.iter().zip(addrs).take(MMSG).enumerate() {
            if sock.send_to(&tx[from..end], addr).is_err() {
                return i;
            }
            from = end;
        }
        ends.len().min(MMSG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (a, b)
    }

    /// Reads what `flush` sent, one datagram at a time.
    fn drain(b: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 64];
        (0..n)
            .map(|_| {
                let (len, _) = b.recv_from(&mut buf).expect("datagram");
                buf[..len].to_vec()
            })
            .collect()
    }

    #[test]
    fn flush_sends_every_queued_datagram_in_order_across_batches() {
        let (a, b) = pair();
        let to = b.local_addr().expect("addr");
        let mut batch = UdpBatch::new();
        let total = MMSG + 3;
        for i in 0..total {
            if batch.push(to, |buf| buf.extend_from_slice(&(i as u32).to_be_bytes())) {
                assert_eq!(batch.flush(&a), 0);
            }
        }
        assert_eq!(batch.flush(&a), 0);
        let got = drain(&b, total);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &(i as u32).to_be_bytes());
        }
    }

    #[test]
    fn a_refused_datagram_is_counted_and_skipped() {
        let (a, b) = pair();
        let to = b.local_addr().expect("addr");
        let mut batch = UdpBatch::new();
        batch.push(to, |buf| buf.push(1));
        // An IPv6 destination on an IPv4 socket: the kernel refuses it.
        batch.push("[::1]:9".parse().expect("v6"), |buf| buf.push(2));
        batch.push(to, |buf| buf.push(3));
        assert_eq!(batch.flush(&a), 1);
        assert_eq!(drain(&b, 2), vec![vec![1], vec![3]]);
    }

    #[test]
    fn recv_reads_a_burst_with_sources_and_then_would_block() {
        let (a, b) = pair();
        b.set_nonblocking(true).expect("nonblocking");
        let to = b.local_addr().expect("addr");
        for i in 0..5u8 {
            a.send_to(&[i; 3], to).expect("send");
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut batch = UdpBatch::new();
        let mut got = Vec::new();
        let n = batch
            .recv(&b, |all| {
                got.extend(all.iter().map(|(from, d)| (*from, d.to_vec())));
            })
            .expect("recv");
        assert_eq!(n, 5);
        let src = a.local_addr().expect("addr");
        assert_eq!(got, (0..5u8).map(|i| (src, vec![i; 3])).collect::<Vec<_>>());
        let e = batch.recv(&b, |_| {}).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    /// The fallback used where `recvmmsg`/`sendmmsg` do not exist, exercised here too.
    #[test]
    fn the_portable_fallback_sends_and_receives_the_same() {
        let (a, b) = pair();
        let to = b.local_addr().expect("addr");
        let mut h = portable::Headers::new();
        let tx = [1u8, 2, 3, 4, 5];
        let v6: SocketAddr = "[::1]:9".parse().expect("v6");
        assert_eq!(portable::send(&mut h, &a, &tx, 0, &[2, 5], &[to, to]), 2);
        assert_eq!(portable::send(&mut h, &a, &tx, 0, &[2, 5], &[v6, to]), 0);
        assert_eq!(drain(&b, 2), vec![vec![1, 2], vec![3, 4, 5]]);
        b.set_nonblocking(true).expect("nonblocking");
        a.send_to(&[9, 9], to).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        a.send_to(&[8], to).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        let mut bufs = vec![[0u8; MMSG_BUF]; 3];
        let mut got = Vec::new();
        let n = portable::recv(&mut h, &mut bufs, &b, |all| {
            got.extend(all.iter().map(|(f, d)| (*f, d.to_vec())));
        })
        .expect("recv");
        assert_eq!(n, 2);
        let src = a.local_addr().expect("addr");
        assert_eq!(got, vec![(src, vec![9, 9]), (src, vec![8])]);
        let e = portable::recv(&mut h, &mut bufs, &b, |_| {}).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
