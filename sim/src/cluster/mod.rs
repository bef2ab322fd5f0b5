//! Cluster mode in the simulator: a store host with the reference per-uuid semantics
//! ([`store`]), three ddpushd hosts running the real [`ddpush_proto::cluster::ClusterNode`]
//! ([`node`]), UDP devices behind an L4 load balancer ([`device`]), app servers pushing to
//! random nodes ([`app`]), and the scenarios of docs/CLUSTER.md ([`scenario`]).

pub mod app;
pub mod device;
pub mod node;
pub mod peer;
pub mod scenario;
pub mod store;
pub mod world;

pub use scenario::{run, Kind, Params, Report};
