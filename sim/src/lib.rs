//! Deterministic `turmoil` simulation of ddpush-rs under loss, reordering, duplication, NAT
//! rebinds, partitions and crashes.
//!
//! The real protocol core ([`ddpush_proto::Node`]) runs behind a thin turmoil adapter
//! ([`server`]); simulated device SDKs ([`device`]) and an app server ([`app`]) speak the real
//! wire format through the core's codecs; UDP devices sit behind NATs ([`net`]). [`scenario`] builds a world from a seed, injects
//! faults at seeded moments and checks the guarantees users rely on. See docs/SIMULATION.md.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod app;
pub mod attacker;
pub mod cluster;
pub mod device;
pub mod net;
pub mod scenario;
pub mod server;
pub mod world;

pub use scenario::{run, Kind, Params, Report};
