//! Cluster mode: N nodes over one shared store, as a deterministic state machine.
//!
//! Single-node mode ([`crate::Node`] with its journal) is the default and is not touched by
//! anything here. In cluster mode a [`ClusterNode`] keeps the sockets and the node-local part
//! of each client (last heartbeat, UDP address, TCP attachment, online state), while the store
//! is authoritative for pending items and ownership ([`store::StoredRecord`], one per uuid).
//! See docs/CLUSTER.md for the design, the guarantees and the simulator's figures.
//!
//! * **Heartbeats never touch the store** while the device stays online at its owner: the node
//!   answers them from its copy of the record. A heartbeat for a uuid it holds no copy of (first
//!   contact, the device moved, or it was offline here) is a [`store::StoreOp::Bind`]: owner =
//!   this node, epoch + 1, the pending items come back in the same operation.
//! * **Every push and every ack is one atomic per-uuid store operation**, an output with an
//!   [`store::OpId`]; its result comes back as an input ([`ClusterNode::handle_store`]). A push
//!   is answered `0x00` only once the store confirmed it; an error or a time-out answers `0xFF`.
//!   The node does not decide this itself: the driver's acceptance step does
//!   ([`crate::driver::StoreConfirmed`], the cluster's counterpart of the journal write).
//! * **A push at any node reaches the owner**: the push result names the owner; the pushing
//!   node pokes it ([`PeerMsg::Poke`], a latency path only), and the same store operation
//!   marked the uuid dirty for the owner, which drains its marks periodically and after a lost
//!   link ([`store::StoreOp::Drain`]).
//! * **Acks** of 0x10/0x20 are attributed to a send by the single node's rule, in one place
//!   ([`crate::ack::SendLedger`], one ledger per item, keyed by the store's generations): fenced
//!   by every heartbeat, forgotten on a path change, taken only from the path the sends went
//!   to, superseded when the copy is dropped. They clear in the store only if the attributed
//!   generation is still the record's (the `Ack` op compares), and only if the acking node
//!   still owns the record at the epoch it bound under. A copy is dropped when the device goes
//!   offline here, when the store says the node is stale, or when a store reply, drain or poke
//!   shows another owner.
//!
//! # Call order for an adapter
//!
//! The single node's turn, through the same [`crate::Driver`], without a journal (the store is
//! the durability):
//! 1. Feed inputs with the current time: [`ClusterNode::handle_udp`], the TCP handlers,
//!    [`ClusterNode::handle_store`] for every store result, [`ClusterNode::handle_peer`] for
//!    every message from another node, [`ClusterNode::handle_peer_lost`] when a node-to-node
//!    link broke, [`ClusterNode::handle_timeout`] at [`ClusterNode::poll_timeout`]; pushes from
//!    other front ends through [`crate::Driver::handle_push`].
//! 2. End the turn with [`crate::Driver::end_turn`] and [`crate::driver::StoreConfirmed`]: the
//!    acceptance step decides every push whose store result came in (`0x00` only if the store
//!    confirmed it; a debug build panics if a transmit is polled before this step).
//! 3. Drain [`ClusterNode::poll_store`] (send each op to the store; a missing reply is the
//!    core's business: it times ops out itself), [`ClusterNode::poll_peer`],
//!    [`ClusterNode::poll_transmit`], [`ClusterNode::poll_close`], [`ClusterNode::poll_event`]
//!    and [`crate::Driver::poll_reply`].
//! 4. Sleep until the next input or [`ClusterNode::poll_timeout`].

mod node;
pub mod store;

use serde::{Deserialize, Serialize};

pub use node::{ClusterConfig, ClusterEvent, ClusterNode, ClusterStats, Confirmation};
pub use store::{
    Gen, Mark, MemStore, OpId, StoreError, StoreOp, StoreReply, StoreResult, StoredRecord,
};

use crate::codec::Uuid;

/// A node's name in the cluster: unique and stable across restarts (`--node-id`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.to_owned())
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message on the node-to-node link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// "A push for a device you own was stored": the record as the push left it, so the owner
    /// can send at once without a store read. Only a latency path: the push also marked the
    /// uuid dirty for the owner.
    Poke {
        /// The client.
        uuid: Uuid,
        /// The record right after the push.
        record: StoredRecord,
    },
}
