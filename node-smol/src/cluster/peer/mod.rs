//! Node-to-node links: the latency path of pokes (the dirty marks in the store are the
//! guarantee, so a poke that cannot be sent is dropped and counted, never waited for).
//!
//! One outbound link per peer, dialed when the first message for it is queued, at the address
//! the peer registered in the store (`--peer-advertise`); after a failure it is dialed again
//! with exponential back-off (100 ms doubling to 5 s, with jitter). Inbound links are accepted
//! on `--peer-listen`. Both sides report a link that went down, so that the core drains its
//! dirty marks at once; TCP keepalive and `TCP_USER_TIMEOUT` break a link to a peer that
//! stopped answering within about 5 s. The wire format is in [`wire`]. The simulator's link
//! (`sim/src/cluster/peer.rs`) behaves the same way.

pub mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender, TrySendError};
use async_io::{Async, Timer};
use ddpush_proto::cluster::{NodeId, PeerMsg};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::store::RedisStore;
use crate::server::Executor;
use wire::{Hello, Session, WireError};

/// Messages queued for one peer while its link is (re)connecting; beyond, pokes are dropped.
const LINK_QUEUE: usize = 1024;
/// A handshake must complete within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A link whose peer stopped answering breaks within about this long (keepalive probes after
/// 2 s idle, every second, 3 of them; unacknowledged data for this long, `TCP_USER_TIMEOUT`).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const DEAD_PEER: Duration = Duration::from_secs(5);

/// What the links tell the event loop.
#[derive(Debug)]
pub enum PeerEvent {
    /// A message from another node.
    Msg(PeerMsg),
    /// A link (either direction) came up.
    Up(NodeId),
    /// A link went down: pokes may have been lost.
    Lost(NodeId),
    /// A connection on the peer port was refused (garbage, wrong secret, other version).
    Refused,
}

/// This node's side of every link.
pub struct PeerConfig {
    /// This node.
    pub me: NodeId,
    /// `--cluster-secret`.
    pub secret: Option<Vec<u8>>,
}

/// Where peers are found: the store's node registry (absent while the store is not
/// connected).
pub type Directory = Arc<Mutex<Option<RedisStore>>>;

/// The outbound links, owned by the event loop.
pub struct Peers {
    ex: Executor,
    cfg: Arc<PeerConfig>,
    dir: Directory,
    tx: Sender<PeerEvent>,
    links: HashMap<NodeId, Sender<PeerMsg>>,
}

impl Peers {
    /// No links yet; `tx` receives the links' events.
    pub fn new(ex: Executor, cfg: Arc<PeerConfig>, dir: Directory, tx: Sender<PeerEvent>) -> Self {
        Peers {
            ex,
            cfg,
            dir,
            tx,
            links: HashMap::new(),
        }
    }

    /// Queues `msg` for `to`, dialing it if there is no link yet. False if it was dropped
    /// (the link's queue is full: the peer is down or slow; its dirty marks cover it).
    pub fn send(&mut self, to: NodeId, msg: PeerMsg) -> bool {
        if to == self.cfg.me {
            return false;
        }
        let link = self.links.entry(to.clone()).or_insert_with(|| {
            let (tx, rx) = async_channel::bounded(LINK_QUEUE);
            self.ex
                .spawn(dial(
                    to,
                    rx,
                    self.cfg.clone(),
                    self.dir.clone(),
                    self.tx.clone(),
                ))
                .detach();
            tx
        });
        match link.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => false,
        }
    }
}

/// Why a link attempt ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not registered in the store (has it ever started?)")]
    Unknown,
    #[error("the store is not connected, so the peer's address is unknown")]
    NoStore,
    #[error("handshake timed out")]
    Timeout,
    #[error("the peer says it is {0:?}")]
    WrongNode(String),
}

async fn dial(
    node: NodeId,
    rx: Receiver<PeerMsg>,
    cfg: Arc<PeerConfig>,
    dir: Directory,
    tx: Sender<PeerEvent>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut pending: Option<PeerMsg> = None;
    loop {
        // Dial only when there is something to say.
        let first = match pending.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        let started = Instant::now();
        let mut up = false;
        let r = link_out(&node, first, &rx, &cfg, &dir, &tx, &mut up).await;
        match r {
            Ok(()) => return,
            Err(e) => {
                if up {
                    warn!(peer = %node, error = %e, "peer link lost; pokes go by dirty marks until it is back");
                    let _ = tx.send(PeerEvent::Lost(node.clone())).await;
                    if started.elapsed() > BACKOFF_MAX {
                        backoff = BACKOFF_MIN;
                    }
                } else {
                    warn!(peer = %node, error = %e, retry_ms = backoff.as_millis() as u64, "peer link failed");
                }
            }
        }
        Timer::after(backoff + jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        // Messages that queued up meanwhile are sent on the next link; the first of them
        // triggers the dial.
        pending = rx.try_recv().ok();
    }
}

async fn link_out(
    node: &NodeId,
    first: PeerMsg,
    rx: &Receiver<PeerMsg>,
    cfg: &PeerConfig,
    dir: &Directory,
    tx: &Sender<PeerEvent>,
    up: &mut bool,
) -> Result<(), LinkError> {
    let store = dir
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .ok_or(LinkError::NoStore)?;
    let addr = store
        .lookup_node(node)
        .await
        .map_err(|e| LinkError::Io(std::io::Error::other(e)))?
        .ok_or(LinkError::Unknown)?;
    let (stream, session) = within(HANDSHAKE_TIMEOUT, async {
        let stream = Async::<TcpStream>::connect(addr).await?;
        let _ = stream.get_ref().set_nodelay(true);
        detect_dead_peer(stream.get_ref());
        let session = handshake(&stream, cfg, true, Some(node)).await?.0;
        Ok::<_, LinkError>((stream, session))
    })
    .await?;
    *up = true;
    info!(peer = %node, %addr, "peer link up");
    let _ = tx.send(PeerEvent::Up(node.clone())).await;
    let mut seq = 0u64;
    let mut msg = first;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut body = Vec::new();
        ciborium::into_writer(&msg, &mut body)
            .map_err(|e| LinkError::Io(std::io::Error::other(e.to_string())))?;
        let seal = session.seal(seq, &body);
        wire::frame(&mut buf, wire::MSG, &body, seal.as_ref());
        seq += 1;
        // Batch what is queued into one write.
        while let Ok(m) = rx.try_recv() {
            body.clear();
            ciborium::into_writer(&m, &mut body)
                .map_err(|e| LinkError::Io(std::io::Error::other(e.to_string())))?;
            let seal = session.seal(seq, &body);
            wire::frame(&mut buf, wire::MSG, &body, seal.as_ref());
            seq += 1;
            if buf.len() > 64 * 1024 {
                break;
            }
        }
        (&stream).write_all(&buf).await?;
        msg = match rx.recv().await {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
    }
}

/// Accepts inbound links on `--peer-listen` and forwards their messages to the loop.
pub async fn listen(
    ex: Executor,
    l: Async<TcpListener>,
    cfg: Arc<PeerConfig>,
    tx: Sender<PeerEvent>,
) {
    loop {
        let Ok((stream, from)) = l.accept().await else {
            Timer::after(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.get_ref().set_nodelay(true);
        detect_dead_peer(stream.get_ref());
        ex.spawn(link_in(stream, from, cfg.clone(), tx.clone()))
            .detach();
    }
}

async fn link_in(
    stream: Async<TcpStream>,
    from: SocketAddr,
    cfg: Arc<PeerConfig>,
    tx: Sender<PeerEvent>,
) {
    let hs = within(HANDSHAKE_TIMEOUT, handshake(&stream, &cfg, false, None)).await;
    let (session, peer) = match hs {
        Ok(x) => x,
        Err(e) => {
            warn!(%from, error = %e, "peer connection refused");
            let mut out = Vec::new();
            wire::frame(&mut out, wire::REFUSE, e.to_string().as_bytes(), None);
            let _ = (&stream).write_all(&out).await;
            let _ = tx.send(PeerEvent::Refused).await;
            return;
        }
    };
    let peer = NodeId(peer);
    info!(peer = %peer, %from, "peer link accepted");
    let _ = tx.send(PeerEvent::Up(peer.clone())).await;
    let mut seq = 0u64;
    let end: Result<(), LinkError> = async {
        loop {
            let (ty, content) = read_frame(&stream).await?;
            if ty != wire::MSG {
                return Err(WireError::Unexpected(ty).into());
            }
            let body = session.open(seq, &content)?;
            seq += 1;
            let msg: PeerMsg = ciborium::from_reader(body)
                .map_err(|_| LinkError::Wire(WireError::Malformed("MSG")))?;
            if tx.send(PeerEvent::Msg(msg)).await.is_err() {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = end {
        let eof = matches!(&e, LinkError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
        if !eof {
            warn!(peer = %peer, %from, error = %e, "peer link closed on bad input");
        }
    }
    let _ = tx.send(PeerEvent::Lost(peer)).await;
}

/// Both directions of the handshake (module docs of [`wire`]). Returns the session and the
/// peer's node id.
async fn handshake(
    stream: &Async<TcpStream>,
    cfg: &PeerConfig,
    dialer: bool,
    expect: Option<&NodeId>,
) -> Result<(Session, String), LinkError> {
    let mine = Hello {
        secret: cfg.secret.is_some(),
        nonce: nonce(),
        node: cfg.me.0.clone(),
    };
    let mut out = wire::preamble().to_vec();
    wire::frame(&mut out, wire::HELLO, &wire::encode_hello(&mine), None);
    (&*stream).write_all(&out).await?;
    let mut pre = [0u8; 5];
    (&*stream).read_exact(&mut pre).await?;
    wire::check_preamble(&pre)?;
    let theirs = match read_frame(stream).await? {
        (wire::HELLO, b) => wire::decode_hello(&b)?,
        (wire::REFUSE, b) => {
            return Err(WireError::Refused(String::from_utf8_lossy(&b).into()).into())
        }
        (t, _) => return Err(WireError::Unexpected(t).into()),
    };
    if let Some(want) = expect {
        if theirs.node != want.0 {
            return Err(LinkError::WrongNode(theirs.node));
        }
    }
    if theirs.node == cfg.me.0 {
        return Err(LinkError::WrongNode(format!(
            "{} (the same --node-id as this node)",
            theirs.node
        )));
    }
    let (d, l) = if dialer {
        (&mine, &theirs)
    } else {
        (&theirs, &mine)
    };
    let session = Session::new(cfg.secret.as_deref(), d, l)?;
    // The dialer proves first; the listener answers only a valid proof.
    if dialer {
        let mut out = Vec::new();
        wire::frame(&mut out, wire::AUTH, &session.proof(true), None);
        (&*stream).write_all(&out).await?;
    }
    match read_frame(stream).await? {
        (wire::AUTH, b) => session.verify(!dialer, &b)?,
        (wire::REFUSE, b) => {
            return Err(WireError::Refused(String::from_utf8_lossy(&b).into()).into())
        }
        (t, _) => return Err(WireError::Unexpected(t).into()),
    }
    if !dialer {
        let mut out = Vec::new();
        wire::frame(&mut out, wire::AUTH, &session.proof(false), None);
        (&*stream).write_all(&out).await?;
    }
    Ok((session, theirs.node))
}

async fn read_frame(stream: &Async<TcpStream>) -> Result<(u8, Vec<u8>), LinkError> {
    let mut len = [0u8; 4];
    (&*stream).read_exact(&mut len).await?;
    let n = wire::check_len(u32::from_be_bytes(len))?;
    let mut b = vec![0u8; n];
    (&*stream).read_exact(&mut b).await?;
    let ty = b[0];
    b.remove(0);
    Ok((ty, b))
}

async fn within<T>(
    t: Duration,
    f: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    future::or(f, async {
        Timer::after(t).await;
        Err(LinkError::Timeout)
    })
    .await
}

/// Lets the kernel break a link whose peer host died, froze or was cut off, within about
/// [`DEAD_PEER`]. Without it such a link hangs until the kernel gives up retransmitting (about
/// 15 minutes), and an idle inbound link is never noticed at all: its pokes queue up and are
/// dropped, and the node never drains at once. A broken link is reported as lost by its
/// reader at once and by its writer at its next write, and the node drains.
fn detect_dead_peer(s: &TcpStream) {
    let s = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(2));
    #[cfg(target_os = "linux")]
    let ka = ka.with_interval(Duration::from_secs(1)).with_retries(3);
    let _ = s.set_tcp_keepalive(&ka);
    #[cfg(target_os = "linux")]
    let _ = s.set_tcp_user_timeout(Some(DEAD_PEER));
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // Without OS randomness the nonce still differs per connection by time; a secret-less
    // link does not depend on it at all.
    if getrandom::getrandom(&mut n).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        n = t.to_be_bytes();
    }
    n
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    d.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 4.0)
}
