//! App servers pushing to random nodes: one request at a time per pusher, a connection per
//! node kept open, a reply time-out; a push that got no `0x00` is retried at another random
//! node (the first attempt may still have been stored: the checks allow for it).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::{PushMsg, PushRequest};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

use super::world::{Attempt, World};
use crate::server::PUSH_PORT;
use crate::world::now_ms;

/// One planned push.
#[derive(Clone, Debug)]
pub struct Planned {
    /// When (ms).
    pub at: u64,
    /// Target device.
    pub device: usize,
    /// What.
    pub msg: PushMsg,
    /// The node of the first attempt, if the scenario picks it (retries go to random nodes).
    pub node: Option<usize>,
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(500);
/// Attempts per push before giving up.
const TRIES: usize = 4;

/// One pusher: runs its pushes in order (`plan` holds (index, push)).
pub async fn run(w: Rc<World>, plan: Vec<(usize, Planned)>, seed: u64) -> turmoil::Result {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut conns: BTreeMap<usize, TcpStream> = BTreeMap::new();
    for (k, p) in plan {
        tokio::time::sleep(Duration::from_millis(p.at.saturating_sub(now_ms()))).await;
        for t in 0..TRIES {
            let drawn = rng.random_range(0..w.nodes);
            let node = match p.node {
                Some(n) if t == 0 => n,
                _ => drawn,
            };
            let sent_at = now_ms();
            let reply = attempt(&w, &mut conns, node, &p).await;
            w.attempts.borrow_mut().push(Attempt {
                push: k,
                device: p.device,
                msg: p.msg.clone(),
                node,
                sent_at,
                reply,
            });
            if reply == Some(0) {
                break;
            }
            tokio::time::sleep(RETRY).await;
        }
    }
    Ok(())
}

async fn attempt(
    w: &World,
    conns: &mut BTreeMap<usize, TcpStream>,
    node: usize,
    p: &Planned,
) -> Option<u8> {
    let s = match conns.entry(node) {
        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::btree_map::Entry::Vacant(e) => {
            let addr = (w.node_addrs.borrow()[node].ip(), PUSH_PORT);
            let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            e.insert(s)
        }
    };
    let req = PushRequest {
        app_id: 1,
        uuid: w.uuids[p.device],
        msg: p.msg.clone(),
    }
    .to_vec();
    let mut b = [0u8; 1];
    let ok = s.write_all(&req).await.is_ok()
        && matches!(
            tokio::time::timeout(REPLY_TIMEOUT, s.read(&mut b)).await,
            Ok(Ok(1))
        );
    if ok {
        Some(b[0])
    } else {
        // A late reply would desynchronise this connection: start a new one next time.
        conns.remove(&node);
        None
    }
}
