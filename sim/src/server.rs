//! The turmoil binding of the core: a second, small adapter next to node-smol.
//!
//! It only moves bytes and time through the core's [`Driver`], the same turn the server runs:
//! read sockets, call `handle_*`, commit the turn's changes to the simulated store, then send,
//! close, log events, sleep until the next input or `poll_timeout`. Recovery after a crash is
//! the core's [`Recovery`]. No protocol rule lives here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::{Change, Config, ConnId, Dest, Driver, Event, Node, Port, Recovery, Time};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use turmoil::net::{TcpListener, TcpStream, UdpSocket};

use crate::world::{now_ms, Logged, Shared};

/// Device port (UDP and TCP).
pub const DEVICE_PORT: u16 = 9966;
/// App server port.
pub const PUSH_PORT: u16 = 9999;

/// How often a snapshot is written, and how many records each simulated write step holds.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(45);
const SNAPSHOT_CHUNK: usize = 256;
/// Rotation grace of provisioned keys (the admin API's default).
const KEY_GRACE: Duration = Duration::from_secs(24 * 3600);

/// What a connection's reader task hands its host's main loop (here and in the cluster's
/// node host).
pub(crate) enum Input {
    Data(ConnId, Vec<u8>),
    Closed(ConnId),
}

/// Spawns the reader task of connection `id`: each chunk read is shown to `tap`, then goes to
/// the main loop, and so does the end of the stream.
pub(crate) fn spawn_reader(
    mut rd: OwnedReadHalf,
    id: ConnId,
    tx: mpsc::UnboundedSender<Input>,
    tap: impl Fn(&[u8]) + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Input::Closed(id));
                    return;
                }
                Ok(n) => {
                    tap(&buf[..n]);
                    let _ = tx.send(Input::Data(id, buf[..n].to_vec()));
                }
            }
        }
    })
}

fn now() -> Time {
    Time::from_millis(now_ms())
}

/// Builds the node from the store at `at`: restore the snapshot (records, keys, removal
/// floors), then replay the journal.
fn restore(sh: &Shared, cfg: &Config, at: Time) -> Node {
    let mut rec = Recovery::new(cfg.clone(), at).expect("valid config");
    let mut store = sh.store.borrow_mut();
    if store.staging.take().is_some() {
        store.torn += 1;
    }
    for st in store.snapshot.iter().cloned() {
        rec.record(st);
    }
    for (uuid, keys) in store.keys.iter().cloned() {
        rec.key(uuid, keys);
    }
    for &(uuid, until) in &store.floors {
        rec.removal_floor(uuid, until);
    }
    for c in &store.journal {
        rec.change(c);
    }
    rec.finish()
}

/// The server host's software; turmoil calls it again on every restart.
pub async fn run(sh: Rc<Shared>, cfg: Config) -> turmoil::Result {
    let any = Ipv4Addr::UNSPECIFIED;
    let udp = Rc::new(UdpSocket::bind((any, DEVICE_PORT)).await?);
    let dev_l = TcpListener::bind((any, DEVICE_PORT)).await?;
    let push_l = TcpListener::bind((any, PUSH_PORT)).await?;

    let node = restore(&sh, &cfg, now());
    {
        let mut f = sh.faults.borrow_mut();
        if f.want_restored {
            f.want_restored = false;
            f.restored = Some(node.pending());
        }
    }
    *sh.node.borrow_mut() = Some(node);

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let mut writers: BTreeMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    let mut next_conn: ConnId = 1;
    let mut next_snapshot = now_ms() + SNAPSHOT_EVERY.as_millis() as u64;
    let snapshot_busy = Rc::new(std::cell::Cell::new(false));
    let mut buf = vec![0u8; 2048];
    let mut driver = Driver::new();

    // The app server provisions signed devices' keys before they start (the admin API's
    // PUT /clients/{uuid}/key); on a restart they are already in the store.
    let provision = sh.provision.borrow().clone();
    if !provision.is_empty() {
        with_node(&sh, |node| {
            for (uuid, id, key) in provision {
                if node.key_state(&uuid).is_none() {
                    let _ = node.set_key(now(), uuid, id, key, KEY_GRACE);
                }
            }
        });
        flush(&sh, &mut driver, &udp, &mut writers).await;
    }

    loop {
        let deadline = sh.node.borrow().as_ref().and_then(Node::poll_timeout);
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            Duration::from_millis(d.as_millis().saturating_sub(now_ms()).max(1))
        });
        tokio::select! {
            biased;
            r = udp.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    sh.trace.borrow_mut().add(b'u', now_ms(), &buf[..n]);
                    crate::attacker::tap(&sh, from, false, &buf[..n]);
                    with_node(&sh, |node| node.handle_udp(now(), from, &buf[..n]));
                }
            }
            r = dev_l.accept() => {
                if let Ok((s, peer)) = r {
                    open(&sh, s, peer, Port::Device, &mut next_conn, &tx, &mut writers);
                }
            }
            r = push_l.accept() => {
                if let Ok((s, peer)) = r {
                    open(&sh, s, peer, Port::Push, &mut next_conn, &tx, &mut writers);
                }
            }
            Some(input) = rx.recv() => match input {
                Input::Data(id, data) => {
                    sh.trace.borrow_mut().add(b't', now_ms(), &data);
                    with_node(&sh, |node| node.handle_tcp_data(now(), id, &data));
                }
                Input::Closed(id) => {
                    if let Some((_, reader)) = writers.remove(&id) {
                        reader.abort();
                        with_node(&sh, |node| node.handle_tcp_close(now(), id));
                    }
                }
            },
            _ = sh.inject_wake.notified() => {
                // The attacker's datagrams, sent with this host's address (sim/src/attacker.rs).
                let due = std::mem::take(&mut sh.capture.borrow_mut().inject);
                for (to, bytes) in due {
                    sh.trace.borrow_mut().add(b'i', now_ms(), &bytes);
                    let _ = udp.send_to(&bytes, to).await;
                }
                continue;
            }
            _ = tokio::time::sleep(wait) => {
                with_node(&sh, |node| node.handle_timeout(now()));
            }
        }
        flush(&sh, &mut driver, &udp, &mut writers).await;

        if now_ms() >= next_snapshot && !snapshot_busy.get() {
            next_snapshot = now_ms() + SNAPSHOT_EVERY.as_millis() as u64;
            let (records, mark) = begin_snapshot(&sh);
            snapshot_busy.set(true);
            tokio::task::spawn_local(write_snapshot(
                sh.clone(),
                records,
                mark,
                snapshot_busy.clone(),
            ));
        }
    }
}

fn with_node<R>(sh: &Shared, f: impl FnOnce(&mut Node) -> R) -> R {
    f(sh.node.borrow_mut().as_mut().expect("node is up"))
}

fn open(
    sh: &Rc<Shared>,
    s: TcpStream,
    peer: SocketAddr,
    port: Port,
    next_conn: &mut ConnId,
    tx: &mpsc::UnboundedSender<Input>,
    writers: &mut BTreeMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)>,
) {
    let id = *next_conn;
    *next_conn += 1;
    if !with_node(sh, |node| node.handle_tcp_open(now(), id, port, peer)) {
        return; // refused: dropping the stream closes it
    }
    let (rd, wr) = s.into_split();
    let sh = sh.clone();
    let reader = spawn_reader(rd, id, tx.clone(), move |bytes| {
        if port == Port::Device {
            crate::attacker::tap(&sh, peer, true, bytes);
        }
    });
    writers.insert(id, (wr, reader));
}

/// One turn's outputs through the driver: commit first (the durability promise), then
/// transmits, closes, events.
async fn flush(
    sh: &Shared,
    driver: &mut Driver,
    udp: &UdpSocket,
    writers: &mut BTreeMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)>,
) {
    let mut pushed = false;
    let mut out = Vec::new();
    let mut closes = Vec::new();
    {
        let mut guard = sh.node.borrow_mut();
        let node = guard.as_mut().expect("node is up");
        let mut store = sh.store.borrow_mut();
        // On a full disk the write fails and the driver takes the turn's pushes back.
        let full = sh.faults.borrow().disk_full;
        let _ = driver.commit(node, |changes| {
            if full {
                store.failed_writes += 1;
                return Err(());
            }
            pushed = changes.iter().any(|c| matches!(c, Change::Pushed { .. }));
            store.journal.extend_from_slice(changes);
            Ok(())
        });
        while let Some(t) = node.poll_transmit() {
            let mut bytes = Vec::with_capacity(t.len());
            t.encode(&mut bytes);
            out.push((t.dest, bytes));
        }
        while let Some(id) = node.poll_close() {
            closes.push(id);
        }
        let at = now_ms();
        let mut events = sh.events.borrow_mut();
        while let Some(e) = node.poll_event() {
            if matches!(
                e,
                Event::Online { .. } | Event::Offline { .. } | Event::PushAccepted { .. }
            ) {
                events.push(Logged { at, event: e });
            }
        }
    }
    if pushed && sh.faults.borrow().crash_after_journal {
        // The turn is journaled but no reply has left: the driver crashes us here.
        sh.faults.borrow_mut().halted = true;
        std::future::pending::<()>().await;
    }
    for (dest, bytes) in out {
        sh.trace.borrow_mut().add(b'o', now_ms(), &bytes);
        match dest {
            Dest::Udp(a) => {
                crate::attacker::tap_down(sh, a, &bytes);
                let _ = udp.send_to(&bytes, a).await;
            }
            Dest::Tcp(id) => {
                if let Some((w, _)) = writers.get_mut(&id) {
                    // A failed write surfaces as a close from the reader.
                    let _ = w.write_all(&bytes).await;
                }
            }
        }
    }
    for id in closes {
        if let Some((w, reader)) = writers.remove(&id) {
            reader.abort();
            drop(w);
        }
    }
}

/// What a snapshot holds, read from the live node: its records (returned, written in chunks),
/// keys and removal floors (staged at once), and the journal length it covers.
fn begin_snapshot(sh: &Shared) -> (Vec<ddpush_proto::RecordState>, usize) {
    let node = sh.node.borrow();
    let node = node.as_ref().expect("node");
    let mut store = sh.store.borrow_mut();
    store.staging_keys = node.key_states();
    store.staging_floors = node.removal_floors();
    (node.records().collect(), store.journal.len())
}

/// The rename: the staged snapshot replaces the old one and the journal prefix it covers goes.
fn install_snapshot(
    store: &mut crate::world::Store,
    staged: Vec<ddpush_proto::RecordState>,
    mark: usize,
) {
    store.snapshot = staged;
    store.keys = std::mem::take(&mut store.staging_keys);
    store.floors = std::mem::take(&mut store.staging_floors);
    store.journal.drain(..mark);
    store.snapshots += 1;
}

/// Writes a snapshot aside in chunks (taking sim time), then swaps it in atomically and drops
/// the journal prefix it covers.
async fn write_snapshot(
    sh: Rc<Shared>,
    records: Vec<ddpush_proto::RecordState>,
    mark: usize,
    busy: Rc<std::cell::Cell<bool>>,
) {
    sh.store.borrow_mut().staging = Some(Vec::with_capacity(records.len()));
    let chunks: Vec<_> = records.chunks(SNAPSHOT_CHUNK).collect();
    let half = chunks.len() / 2;
    for (i, chunk) in chunks.into_iter().enumerate() {
        if i == half && sh.faults.borrow().crash_in_snapshot {
            sh.faults.borrow_mut().halted = true;
            std::future::pending::<()>().await;
        }
        if let Some(s) = sh.store.borrow_mut().staging.as_mut() {
            s.extend_from_slice(chunk);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let full = sh.faults.borrow().disk_full;
    let mut store = sh.store.borrow_mut();
    if let Some(s) = store.staging.take() {
        if full {
            // The rename never happens: the old snapshot and its journal stay.
            store.failed_writes += 1;
        } else {
            install_snapshot(&mut store, s, mark);
        }
    }
    busy.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpush_proto::signed::{DeviceKey, SignedDrop};
    use ddpush_proto::testing::signed_heartbeat;
    use ddpush_proto::Uuid;

    /// The turn's changes into the simulated journal, as the host's `flush` does.
    fn commit(sh: &Shared, node: &mut Node) {
        let mut store = sh.store.borrow_mut();
        let _ = Driver::new().commit(node, |changes| {
            store.journal.extend_from_slice(changes);
            Ok::<(), ()>(())
        });
    }

    /// The simulated server's snapshot keeps removal floors as ddpushd's does (78d3190): a key
    /// removed, a snapshot taken (the removal's journal entry goes with it), a restart, the
    /// same key bytes provisioned again: a packet captured before the removal, stamped above
    /// the restart second by a device 20 s ahead, is refused as a replay.
    #[test]
    fn a_removal_floor_survives_a_simulated_snapshot_and_restart() {
        let t = Time::from_secs;
        let cfg = Config::default();
        let (u, key) = (Uuid([7; 16]), DeviceKey::new([7; 32]));
        let from: SocketAddr = "192.0.2.1:4000".parse().expect("address");
        let hb = |ts: u32, nonce: u32| signed_heartbeat(u, &key, 1, ts, nonce);
        let sh = Shared::new(Vec::new());
        let mut node = restore(&sh, &cfg, t(10_000));
        node.set_key(t(10_000), u, 1, key.clone(), KEY_GRACE)
            .expect("key");
        let captured = hb(10_020, 1);
        node.handle_udp(t(10_000), from, &captured);
        assert_eq!(node.stats().signed_accepted, 1);
        commit(&sh, &mut node);
        assert!(node.remove_key(t(10_001), &u));
        commit(&sh, &mut node);
        assert_eq!(node.removal_floors(), vec![(u, 10_021)]);
        // A snapshot after the removal: no key, the journal (with the removal) dropped.
        *sh.node.borrow_mut() = Some(node);
        let (records, mark) = begin_snapshot(&sh);
        install_snapshot(&mut sh.store.borrow_mut(), records, mark);
        assert!(sh.store.borrow().journal.is_empty() && sh.store.borrow().keys.is_empty());
        assert_eq!(sh.store.borrow().floors, vec![(u, 10_021)]);
        // The crash and the restart at 10_002; the app server provisions the same key again.
        *sh.node.borrow_mut() = None;
        let mut again = restore(&sh, &cfg, t(10_002));
        again
            .set_key(t(10_002), u, 1, key.clone(), KEY_GRACE)
            .expect("key");
        again.handle_udp(t(10_003), from, &captured);
        assert_eq!(again.stats().signed_accepted, 0, "a replay was accepted");
        assert_eq!(again.stats().signed_dropped.get(SignedDrop::Replayed), 1);
        again.handle_udp(t(10_003), from, &hb(10_021, 2));
        assert_eq!(again.stats().signed_accepted, 0);
        // Above the floor: the device is heard again.
        again.handle_udp(t(10_003), from, &hb(10_022, 3));
        assert_eq!(again.stats().signed_accepted, 1);
    }
}
