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
//! 1. Build the node with [`Node::new`]; restore a snapshot with [`Node::restore`] and replay
//!    the journal with [`Node::apply`].
//! 2. Feed every input with the current [`Time`]: [`Node::handle_udp`] for datagrams,
//!    [`Node::handle_tcp_open`] / [`Node::handle_tcp_data`] / [`Node::handle_tcp_close`] for
//!    both TCP ports, [`Node::handle_push`] for pushes from other front ends, and
//!    [`Node::handle_timeout`] when the deadline from [`Node::poll_timeout`] passes.
//! 3. After a batch of inputs (one loop turn), drain in this order:
//!    1. [`Node::poll_change`] into the journal, and make it as durable as the fsync policy
//!       says. A push's `0x00` reply is a promise that it survives a crash, so no transmit
//!       of the turn may leave before its changes are written.
//!    2. [`Node::poll_transmit`]: datagrams and TCP bytes, in order (per connection order is
//!       what keeps pipelined push replies in request order).
//!    3. [`Node::poll_close`]: connections to close once their queued bytes are flushed.
//!    4. [`Node::poll_event`] for logs; counters are in [`Node::stats`].
//! 4. Sleep until the next input or [`Node::poll_timeout`], then go to 2.
//!
//! Snapshots come from [`Node::records`]; replaying the changes written after a snapshot on
//! top of it reproduces every pending item ([`Node::pending`] compares them).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
pub mod counters;
pub mod limits;
mod node;
pub mod output;
mod record;
mod registry;
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
