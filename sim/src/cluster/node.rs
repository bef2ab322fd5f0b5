//! A ddpushd host in cluster mode: the real [`ClusterNode`] behind a thin turmoil adapter,
//! driven by the core's [`Driver`] like the single-node host (`crate::server`) and ddpushd.
//!
//! It only moves bytes and time in the driver's turn order: read sockets (device UDP and TCP
//! 9966, push TCP 9999, store replies, pokes and lost links from the node-to-node links of
//! [`super::peer`]), call `handle_*` (`handle_peer_lost` when a link broke), end the turn with the
//! cluster's acceptance step ([`StoreConfirmed`]: a push is `0x00` only once the store
//! confirmed it), then drain `poll_store` to the store host, `poll_peer` to the other nodes,
//! `poll_transmit`, `poll_close`, `poll_event`, and sleep until the next input or
//! `poll_timeout`. No protocol rule lives here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::cluster::{
    ClusterConfig, ClusterNode, NodeId, OpId, PeerMsg, StoreOp, StoreResult,
};
use ddpush_proto::driver::StoreConfirmed;
use ddpush_proto::{Config, ConnId, Dest, Driver, Port, Time};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use turmoil::net::tcp::OwnedWriteHalf;
use turmoil::net::{TcpListener, TcpStream, UdpSocket};

use super::peer::{self, PeerEvent, Peers, PEER_PORT};
use super::store::{decode, encode, STORE_PORT};
use super::world::{node_name, Logged, NodeCounts, World};
use crate::server::{spawn_reader, Input, DEVICE_PORT, PUSH_PORT};
use crate::world::now_ms;

/// The port a node talks to the store from.
const STORE_CLIENT_PORT: u16 = 7200;

/// What this incarnation's node-to-node links did.
#[derive(Default)]
struct LinkCounts {
    /// Pokes dropped at a full link queue.
    dropped: u64,
}

fn now() -> Time {
    Time::from_millis(now_ms())
}

/// Node `idx`'s software; turmoil calls it again on every restart (with empty state: in
/// cluster mode everything durable is in the store).
pub async fn run(w: Rc<World>, idx: usize, cfg: Config, cc: ClusterConfig) -> turmoil::Result {
    {
        // A new incarnation: fold the counters of the previous one.
        let mut live = w.live.borrow_mut();
        let mut past = w.past.borrow_mut();
        let l = std::mem::take(&mut live[idx]);
        past[idx].add(&l);
    }
    let any = Ipv4Addr::UNSPECIFIED;
    let udp = UdpSocket::bind((any, DEVICE_PORT)).await?;
    let push_l = TcpListener::bind((any, PUSH_PORT)).await?;
    let dev_l = TcpListener::bind((any, DEVICE_PORT)).await?;
    let peer_l = TcpListener::bind((any, PEER_PORT)).await?;
    let store = UdpSocket::bind((any, STORE_CLIENT_PORT)).await?;
    let store_addr: SocketAddr = (turmoil::lookup("store"), STORE_PORT).into();
    let cfg_seed = cfg.hash_seed;
    let mut node = ClusterNode::new(cfg, cc).expect("valid config");
    let mut driver = Driver::new();
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel::<PeerEvent>();
    let mut peers = Peers::new(w.clone(), idx, peer_tx.clone(), cfg_seed);
    // This incarnation's link counters (the core does not see the links).
    let mut links = LinkCounts::default();

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let mut writers: BTreeMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    let mut next_conn: ConnId = 1;
    let mut sbuf = vec![0u8; 1 << 16];
    let mut buf = vec![0u8; 2048];
    loop {
        let wait = node.poll_timeout().map_or(Duration::from_secs(3600), |d| {
            Duration::from_millis(d.as_millis().saturating_sub(now_ms()).max(1))
        });
        tokio::select! {
            biased;
            r = store.recv_from(&mut sbuf) => {
                if let Ok((n, _)) = r {
                    if let Some((id, res)) = decode::<(OpId, StoreResult)>(&sbuf[..n]) {
                        node.handle_store(now(), id, res);
                    }
                }
            }
            Some(ev) = peer_rx.recv() => match ev {
                PeerEvent::Msg(msg) => node.handle_peer(now(), msg),
                PeerEvent::Lost(from) => {
                    w.peer_lost.borrow_mut().push((now_ms(), idx, from));
                    node.handle_peer_lost(now());
                }
            },
            r = peer_l.accept() => {
                if let Ok((s, _)) = r {
                    tokio::task::spawn_local(peer::accept(s, peer_tx.clone()));
                }
            }
            r = udp.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    node.handle_udp(now(), from, &buf[..n]);
                }
            }
            r = push_l.accept() => {
                if let Ok((s, peer)) = r {
                    accept(&mut node, &mut next_conn, &mut writers, &tx, s, peer, Port::Push);
                }
            }
            r = dev_l.accept() => {
                if let Ok((s, peer)) = r {
                    accept(&mut node, &mut next_conn, &mut writers, &tx, s, peer, Port::Device);
                }
            }
            Some(input) = rx.recv() => match input {
                Input::Data(id, data) => node.handle_tcp_data(now(), id, &data),
                Input::Closed(id) => {
                    if let Some((_, reader)) = writers.remove(&id) {
                        reader.abort();
                        node.handle_tcp_close(now(), id);
                    }
                }
            },
            _ = tokio::time::sleep(wait) => node.handle_timeout(now()),
        }
        flush(
            &w,
            idx,
            &mut node,
            &mut driver,
            &udp,
            &mut peers,
            &mut links,
            &store,
            store_addr,
            &mut writers,
        )
        .await;
    }
}

/// A connection accepted on `port`: a new connection id for the core, and (unless the core
/// refuses it) a reader task that hands its bytes and its end to the main loop.
fn accept(
    node: &mut ClusterNode,
    next_conn: &mut ConnId,
    writers: &mut BTreeMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)>,
    tx: &mpsc::UnboundedSender<Input>,
    s: TcpStream,
    peer: SocketAddr,
    port: Port,
) {
    let id = *next_conn;
    *next_conn += 1;
    if !node.handle_tcp_open(now(), id, port, peer) {
        return; // refused by the core's connection bounds: dropping the stream closes it
    }
    let (rd, wr) = s.into_split();
    let reader = spawn_reader(rd, id, tx.clone(), |_| {});
    writers.insert(id, (wr, reader));
}

#[allow(clippy::too_many_arguments)]
async fn flush(
    w: &World,
    idx: usize,
    node: &mut ClusterNode,
    driver: &mut Driver,
    udp: &UdpSocket,
    peers: &mut Peers,
    links: &mut LinkCounts,
    store: &UdpSocket,
    store_addr: SocketAddr,
    writers: &mut BTreeMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)>,
) {
    // The acceptance step first: the pushes whose store results came in this turn are
    // decided before any output leaves.
    let _ = driver.end_turn(node, StoreConfirmed::default());
    let mut ops: Vec<(OpId, StoreOp)> = Vec::new();
    while let Some(op) = node.poll_store() {
        ops.push(op);
    }
    let mut pokes: Vec<(NodeId, PeerMsg)> = Vec::new();
    while let Some(p) = node.poll_peer() {
        pokes.push(p);
    }
    let mut out = Vec::new();
    while let Some(t) = node.poll_transmit() {
        let mut bytes = Vec::with_capacity(t.len());
        t.encode(&mut bytes);
        out.push((t.dest, bytes));
    }
    let mut closes = Vec::new();
    while let Some(id) = node.poll_close() {
        closes.push(id);
    }
    {
        let at = now_ms();
        let mut ev = w.events.borrow_mut();
        while let Some(event) = node.poll_event() {
            ev.push(Logged {
                at,
                node: idx,
                event,
            });
        }
        let s = node.stats();
        w.live.borrow_mut()[idx] = NodeCounts {
            store_ops: s.store_ops,
            heartbeats: s.heartbeats,
            pokes: s.pokes,
            store_failures: s.store_errors + s.store_timeouts,
            unattributed: s.acks_unattributed,
            pokes_dropped: links.dropped,
        };
    }
    for op in ops {
        let _ = store.send_to(&encode(&op), store_addr).await;
    }
    for (to, msg) in pokes {
        if let Some(i) = (0..w.nodes).find(|&i| node_name(i) == to.0) {
            if !peers.send(i, msg) {
                links.dropped += 1;
            }
        }
    }
    for (dest, bytes) in out {
        match dest {
            Dest::Udp(a) => {
                let _ = udp.send_to(&bytes, a).await;
            }
            Dest::Tcp(id) => {
                if let Some((wr, _)) = writers.get_mut(&id) {
                    let _ = wr.write_all(&bytes).await;
                }
            }
        }
    }
    for id in closes {
        if let Some((wr, reader)) = writers.remove(&id) {
            reader.abort();
            drop(wr);
        }
    }
}
