//! ddpushd: the production adapter of ddpush-rs. It binds the sans-io core
//! ([`ddpush_proto::Node`]) to real sockets on smol, persists state crash-safely
//! ([`persist`]), and exposes configuration ([`settings`]), metrics and an admin API.
//!
//! All protocol decisions are made by the core; this crate only moves bytes and time.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod admin;
pub mod cluster;
mod console;
pub mod log;
pub mod metrics;
pub mod persist;
pub mod probe;
pub mod server;
pub mod settings;
