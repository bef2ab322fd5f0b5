//! The DDPush v1 protocol core: deterministic, no I/O, no clock, no randomness, no threads.
//!
//! Everything ddpush-rs knows about the protocol lives here: the wire codecs ([`codec`]), TCP
//! framing ([`stream`]) and the [`Node`] state machine that owns every client record. The
//! server (`node-smol`) and the simulator (`sim`) are thin adapters that move bytes and time in
//! and out; the same inputs always give the same outputs, so tests, fuzzers and the simulator
//! drive it faster than real time.
//!
//! # Call order for an adapter
//!
//! The sequence is written once, in [`driver`]; every adapter (the server, the simulator, the
//! fuzz targets, [`testing::Harness`]) follows it through a [`Driver`]:
//!
//! 1. Rebuild the node with [`Recovery`]: every snapshot record, then every journaled change.
//! 2. Feed every input with the current [`Time`]: [`Node::handle_udp`] for datagrams (or
//!    [`Node::handle_udp_batch`] for those read together, which loads their keys ahead),
//!    [`Node::handle_tcp_open`] / [`Node::handle_tcp_data`] / [`Node::handle_tcp_close`] for
//!    both TCP ports, [`Driver::handle_push`] for pushes from other front ends, and
//!    [`Node::handle_timeout`] when the deadline from [`Node::poll_timeout`] passes.
//! 3. After a batch of inputs (one loop turn), [`Driver::commit`] with a function that writes
//!    the turn's changes as the fsync policy requires. Its outcome decides every push of the
//!    turn: written, they are accepted; not written, they are taken back and answered `0xFF`
//!    (a debug build panics if a transmit is polled before this step).
//! 4. Drain, in this order: [`Node::poll_transmit`] (datagrams and TCP bytes, in order: per
//!    connection order is what keeps pipelined push replies in request order),
//!    [`Node::poll_close`] (connections to close once their queued bytes are flushed),
//!    [`Driver::poll_reply`] (replies to front-end pushes) and [`Node::poll_event`] for logs;
//!    counters are in [`Node::stats`].
//! 5. Sleep until the next input or [`Node::poll_timeout`], then go to 2.
//!
//! Snapshots come from [`Node::records`]; replaying the changes written after a snapshot on
//! top of it reproduces every pending item ([`Node::pending`] compares them).
//!
//! Cluster mode (N nodes over a shared store) is a separate state machine,
//! [`cluster::ClusterNode`], run by the same [`Driver`] and the same turn: step 1 is skipped
//! (it starts empty), step 3 is [`Driver::end_turn`] with [`driver::StoreConfirmed`] (a push is
//! accepted once the store confirmed it) instead of the journal write, and step 4 also drains
//! its store operations and node-to-node messages; see [`cluster`] and docs/CLUSTER.md.
//!
//! The client side of the protocol is here too, in the same style: [`session`] holds a device
//! SDK's session and an app server's push pipeline, which the `ddpush` client, the simulator
//! and the load generator drive. Counters per variant are [`Counters`] tables; every
//! variable-length content is a [`Content`], so no encoder can write a length that does not
//! match its bytes.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod ack;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod counters;
pub mod driver;
mod idle;
pub mod limits;
mod node;
pub mod output;
mod record;
mod registry;
pub mod session;
pub mod signed;
pub mod state;
pub mod stream;
pub mod testing;
pub mod time;
pub mod upstream;
mod wheel;

pub use codec::{
    check_payload_len, Content, ContentTooLong, DeviceMsg, DevicePacket, DownMsg, DownPacket,
    InvalidPacket, Kind, PayloadLenError, PushMsg, PushReject, PushReply, PushRequest, Uuid,
};
pub use config::{Config, ConfigError, ReplyPolicy};
pub use counters::{CounterKey, Counters};
pub use driver::{Commit, Driver, Recovery, Ticket};
pub use limits::{Limited, Limits};
pub use node::{Node, Port};
pub use output::{CloseReason, Dest, Event, Payload, Stats, Transmit, Transport};
pub use state::{Change, Pending, RecordState};
pub use stream::{Decoded, DownStreamDecoder, Frame, FramingError, StreamDecoder};
pub use time::Time;

/// Identifies a TCP connection; chosen by the adapter, unique for the life of the node.
pub type ConnId = u64;

/// Size of one client record in bytes (the inline part; payloads live out of line).
pub const RECORD_SIZE: usize = std::mem::size_of::<record::Record>();
