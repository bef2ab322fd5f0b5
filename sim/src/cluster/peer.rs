//! The node-to-node link of a simulated node: framed TCP with the behaviour of ddpushd's
//! (`node-smol/src/cluster/peer/`), so that partitions, kills and freezes break links and the
//! core's recovery path (`handle_peer_lost`, then a drain at once) runs in the simulator.
//!
//! As in ddpushd: one outbound link per peer, dialed when the first poke for it is queued;
//! at most [`LINK_QUEUE`] pokes wait per link, beyond that they are dropped and counted (the
//! dirty marks cover them); a dial or handshake gives up after [`HANDSHAKE_TIMEOUT`]; a failed
//! link is dialed again with back-off (100 ms doubling to 5 s, jittered, reset after a link
//! that lived longer than the maximum), and the poke that was being sent when it failed is
//! lost, the ones queued behind it go out on the next link. Both ends of a link that was up
//! report its loss, and the node calls `handle_peer_lost`. Authentication and sealing are
//! left out (ddpushd's tests cover them): a link opens with a HELLO naming the dialer.
//!
//! **Liveness.** turmoil's TCP drops the segments a partition cuts and never retransmits them,
//! so a link that lost one would hang for ever. A kernel does retransmit, and ddpushd's peer
//! sockets set TCP keepalive and `TCP_USER_TIMEOUT` so that a link whose peer stopped
//! answering breaks within about [`SILENCE`]. The simulator stands in for those kernel timers
//! with frames: each end sends a KEEPALIVE when it has sent nothing for [`KEEPALIVE_EVERY`],
//! and a link on which nothing arrived for [`SILENCE`] is broken. As in ddpushd, the listener
//! (which reads) reports that at once; the dialer (which only writes) finds out at its next
//! write, and the poke of that write is lost with the link.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::cluster::PeerMsg;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use turmoil::net::TcpStream;

use super::store::{decode, encode};
use super::world::{node_name, LinkDown, World};
use crate::world::now_ms;

/// Node-to-node port.
pub const PEER_PORT: u16 = 7100;
/// Pokes queued per link while it (re)connects; beyond, they are dropped.
pub const LINK_QUEUE: usize = 1024;
/// A dial and its HELLO must complete within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A link end that sent nothing for this long sends a KEEPALIVE (the kernel's keepalive probe).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// A link on which nothing arrived for this long is broken (keepalive and `TCP_USER_TIMEOUT`).
pub const SILENCE: Duration = Duration::from_secs(5);
/// The largest frame a link accepts.
const MAX_FRAME: usize = 1 << 20;

const HELLO: u8 = 1;
const MSG: u8 = 2;
const KEEPALIVE: u8 = 3;

/// What the links tell the node's loop.
#[derive(Debug)]
pub enum PeerEvent {
    /// A poke from another node.
    Msg(PeerMsg),
    /// A link (either direction) to this peer that was up went down: pokes may have been lost.
    Lost(usize),
}

/// The outbound links of one node incarnation.
pub struct Peers {
    w: Rc<World>,
    me: usize,
    tx: mpsc::UnboundedSender<PeerEvent>,
    links: BTreeMap<usize, mpsc::Sender<PeerMsg>>,
    seed: u64,
}

impl Peers {
    /// No links yet; `tx` receives the links' events. `seed` makes the back-off jitter a pure
    /// function of the run.
    pub fn new(w: Rc<World>, me: usize, tx: mpsc::UnboundedSender<PeerEvent>, seed: u64) -> Self {
        Peers {
            w,
            me,
            tx,
            links: BTreeMap::new(),
            seed,
        }
    }

    /// Queues `msg` for node `to`, dialing it if there is no link yet. False if it was dropped
    /// (the queue is full: the peer is down or slow; its dirty marks cover it).
    pub fn send(&mut self, to: usize, msg: PeerMsg) -> bool {
        if to == self.me || to >= self.w.nodes {
            return false;
        }
        let link = self.links.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let rng = SmallRng::seed_from_u64(
                self.seed ^ (self.me as u64) << 32 ^ (to as u64) << 40 ^ now_ms(),
            );
            tokio::task::spawn_local(dial(self.w.clone(), self.me, to, rx, self.tx.clone(), rng));
            tx
        });
        link.try_send(msg).is_ok()
    }
}

/// Why a link ended.
#[derive(Debug)]
enum LinkEnd {
    /// The node's loop is gone (the host is shutting down): stop quietly.
    Closed,
    /// The connection broke, timed out or went silent.
    Broken,
}

/// The outbound link to `to`: dial when there is something to say, send, re-dial with back-off.
async fn dial(
    w: Rc<World>,
    me: usize,
    to: usize,
    mut rx: mpsc::Receiver<PeerMsg>,
    tx: mpsc::UnboundedSender<PeerEvent>,
    mut rng: SmallRng,
) {
    let mut backoff = BACKOFF_MIN;
    let mut pending: Option<PeerMsg> = None;
    loop {
        let first = match pending.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        let started = now_ms();
        match connect(me, to).await {
            Some((rd, wr)) => {
                w.link_up(me, to, now_ms());
                let end = run_link(rd, wr, Some((first, &mut rx)), None).await;
                if matches!(end, LinkEnd::Closed) {
                    return;
                }
                w.link_down(me, to, now_ms());
                // Only the loss of a link that was up is reported, as in ddpushd.
                if tx.send(PeerEvent::Lost(to)).is_err() {
                    return;
                }
                if now_ms() - started > BACKOFF_MAX.as_millis() as u64 {
                    backoff = BACKOFF_MIN;
                }
            }
            // The poke that triggered the dial is lost with it (the dirty mark covers it).
            None => w.link_down(me, to, now_ms()),
        }
        let jitter = backoff.mul_f64(rng.random_range(0.0..0.25));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        pending = rx.try_recv().ok();
    }
}

/// Connects to node `to` and says HELLO, within [`HANDSHAKE_TIMEOUT`].
async fn connect(me: usize, to: usize) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let addr: SocketAddr = (turmoil::lookup(node_name(to)), PEER_PORT).into();
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let s = TcpStream::connect(addr).await.ok()?;
        let (rd, mut wr) = s.into_split();
        write_frame(&mut wr, HELLO, &encode(&(me as u64)))
            .await
            .ok()?;
        Some((rd, wr))
    })
    .await
    .ok()
    .flatten()
}

/// An inbound link: its HELLO, then pokes to the node until it breaks; its loss is reported.
pub async fn accept(s: TcpStream, tx: mpsc::UnboundedSender<PeerEvent>) {
    let (mut rd, wr) = s.into_split();
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd)).await;
    let Ok(Ok((HELLO, body))) = hello else {
        return; // never up: nothing to report
    };
    let Some(peer) = decode::<u64>(&body) else {
        return;
    };
    let end = run_link(rd, wr, None, Some(&tx)).await;
    if matches!(end, LinkEnd::Broken) {
        let _ = tx.send(PeerEvent::Lost(peer as usize));
    }
}

/// Runs one established link: sends what `out` queues (the dialer; the first message is
/// given), hands pokes that arrive to `to_node` (the listener), keeps it alive and breaks it
/// when it goes silent. The connection is closed when this returns.
async fn run_link(
    rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut out: Option<(PeerMsg, &mut mpsc::Receiver<PeerMsg>)>,
    to_node: Option<&mpsc::UnboundedSender<PeerEvent>>,
) -> LinkEnd {
    // A reader task, so that a frame is never cut in half by the select below.
    let (ftx, mut frames) = mpsc::unbounded_channel::<(u8, Vec<u8>)>();
    let reader = tokio::task::spawn_local(async move {
        let mut rd = rd;
        while let Ok(f) = read_frame(&mut rd).await {
            if ftx.send(f).is_err() {
                return;
            }
        }
    });
    let mut heard = now_ms();
    let mut said = now_ms();
    // A dialer only writes (as ddpushd's): it finds its link broken at its next write.
    let dialer = out.is_some();
    let mut dead = false;
    let mut queued: Vec<PeerMsg> = Vec::new();
    if let Some((first, _)) = out.as_mut() {
        queued.push(first.clone());
    }
    let end = loop {
        if !queued.is_empty() {
            if dead {
                break LinkEnd::Broken; // what was to be written is lost with the link
            }
            let mut buf = Vec::new();
            for m in queued.drain(..) {
                frame(&mut buf, MSG, &encode(&m));
            }
            if !write_within(&mut wr, &buf).await {
                break LinkEnd::Broken;
            }
            said = now_ms();
        }
        let keepalive_in = (said + KEEPALIVE_EVERY.as_millis() as u64).saturating_sub(now_ms());
        let silent_in = (heard + SILENCE.as_millis() as u64).saturating_sub(now_ms());
        tokio::select! {
            biased;
            f = frames.recv(), if !dead => match f {
                // The peer closed or reset the link.
                None if dialer => dead = true,
                None => break LinkEnd::Broken,
                Some((ty, body)) => {
                    heard = now_ms();
                    match ty {
                        MSG => {
                            let (Some(tx), Some(msg)) = (to_node, decode::<PeerMsg>(&body)) else {
                                break LinkEnd::Broken; // garbage, or a poke to the dialer
                            };
                            if tx.send(PeerEvent::Msg(msg)).is_err() {
                                break LinkEnd::Closed;
                            }
                        }
                        KEEPALIVE => {}
                        _ => break LinkEnd::Broken,
                    }
                }
            },
            m = next(&mut out) => match m {
                Some(m) => {
                    queued.push(m);
                    // Batch what is queued into one write, as ddpushd does.
                    if let Some((_, rx)) = out.as_mut() {
                        while let Ok(m) = rx.try_recv() {
                            queued.push(m);
                        }
                    }
                }
                None => break LinkEnd::Closed,
            },
            _ = tokio::time::sleep(Duration::from_millis(silent_in.max(1))), if !dead => {
                if now_ms() >= heard + SILENCE.as_millis() as u64 {
                    if !dialer {
                        break LinkEnd::Broken;
                    }
                    dead = true;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(keepalive_in.max(1))), if !dead => {
                // The kernel's probe: its failure shows at the dialer's next write.
                let mut buf = Vec::new();
                frame(&mut buf, KEEPALIVE, &[]);
                if !write_within(&mut wr, &buf).await {
                    if !dialer {
                        break LinkEnd::Broken;
                    }
                    dead = true;
                }
                said = now_ms();
            }
        }
    };
    reader.abort();
    end
}

/// The next message to send on a dialer's link; never, on a listener's.
async fn next(out: &mut Option<(PeerMsg, &mut mpsc::Receiver<PeerMsg>)>) -> Option<PeerMsg> {
    match out {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `len u32 | type u8 | body`, as ddpushd frames its link.
fn frame(out: &mut Vec<u8>, ty: u8, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    out.push(ty);
    out.extend_from_slice(body);
}

async fn write_frame(wr: &mut OwnedWriteHalf, ty: u8, body: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    frame(&mut buf, ty, body);
    wr.write_all(&buf).await
}

/// A write that does not finish within [`SILENCE`] breaks the link (`TCP_USER_TIMEOUT`).
async fn write_within(wr: &mut OwnedWriteHalf, buf: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(SILENCE, wr.write_all(buf)).await,
        Ok(Ok(()))
    )
}

async fn read_frame(rd: &mut OwnedReadHalf) -> std::io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await?;
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(std::io::Error::other("bad frame length"));
    }
    let mut b = vec![0u8; n];
    rd.read_exact(&mut b).await?;
    let ty = b.remove(0);
    Ok((ty, b))
}

/// The down intervals of node `me`'s outbound links, for the checks.
impl World {
    /// The link `me -> to` is up (closes an open down interval).
    pub fn link_up(&self, me: usize, to: usize, at: u64) {
        self.links_up.borrow_mut().push((at, me, to));
        let mut d = self.links_down.borrow_mut();
        if let Some(l) = d
            .iter_mut()
            .rev()
            .find(|l| l.from == me && l.to == to && l.until.is_none())
        {
            l.until = Some(at);
        }
    }

    /// The link `me -> to` broke or could not be established (opens a down interval).
    pub fn link_down(&self, me: usize, to: usize, at: u64) {
        let mut d = self.links_down.borrow_mut();
        if !d
            .iter()
            .any(|l| l.from == me && l.to == to && l.until.is_none())
        {
            d.push(LinkDown {
                from: me,
                to,
                since: at,
                until: None,
            });
        }
    }
}
