//! Cluster mode (`--cluster-redis`): the core's [`ddpush_proto::cluster::ClusterNode`] bound
//! to a real Redis Cluster ([`store`]) and to real node-to-node links ([`peer`]).
//!
//! Every cluster rule (ownership, epochs, which ack clears what, when to poke, when to drain)
//! lives in the core; this module only executes the core's store operations on Redis, carries
//! its peer messages over TCP, and moves bytes and time. See docs/CLUSTER.md.

mod admin;
mod drain;
mod event_loop;
mod import;
mod keys;
mod lanes;
mod limit;
mod options;
pub mod peer;
mod reply;
mod status;
pub mod store;

pub use event_loop::run;
pub use import::{import, Imported};

pub use options::ClusterOptions;
