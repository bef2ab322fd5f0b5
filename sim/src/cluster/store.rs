//! The simulated store host: one UDP port, every op applied atomically with
//! `MemStore::apply` (the reference semantics the Redis scripts must match), a replica that
//! trails by a configurable lag, and, when the world asks for it, replies held until the write
//! reached the replica (Redis `WAIT`).

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::cluster::{OpId, StoreOp, StoreResult};
use turmoil::net::UdpSocket;

use super::world::{Applied, World};
use crate::world::now_ms;

/// The store's port.
pub const STORE_PORT: u16 = 7000;

/// Encodes a message for a simulated link (CBOR, as node-smol writes its state).
pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = ciborium::into_writer(v, &mut out);
    out
}

/// Decodes a message from a simulated link; garbage is dropped by the caller.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Option<T> {
    ciborium::from_reader(b).ok()
}

/// The store host's software (restarted by turmoil after a crash; the state lives in `World`).
pub async fn run(w: Rc<World>) -> turmoil::Result {
    let sock = Rc::new(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, STORE_PORT)).await?);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let Some((id, op)) = decode::<(OpId, StoreOp)>(&buf[..n]) else {
            continue;
        };
        let now = now_ms();
        let reply = {
            let mut st = w.store.borrow_mut();
            st.catch_up(now);
            let reply = st.primary.apply(&op);
            let i = st.log.len();
            st.log.push(Applied {
                at: now,
                op: op.clone(),
                reply: reply.clone(),
                lost: false,
            });
            st.unreplicated.push_back((now, i, op));
            reply
        };
        let bytes = encode(&(id, StoreResult::Ok(reply)));
        if w.wait_replica {
            let lag = w.store.borrow().lag;
            let sock = sock.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(lag)).await;
                let _ = sock.send_to(&bytes, from).await;
            });
        } else {
            let _ = sock.send_to(&bytes, from).await;
        }
    }
}
