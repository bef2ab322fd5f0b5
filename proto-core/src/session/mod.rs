//! The client side of the protocol, sans-io: a device SDK's session and an app server's push
//! pipeline.
//!
//! What real DDPush clients do (PROTOCOL.md 4.8, 2.2) is written here once; the `ddpush`
//! client library, the simulator's devices and app server, and the load generator all drive
//! these types instead of keeping their own copy. They follow the node's style: inputs are
//! `handle_*` calls that take the current [`Time`](crate::Time), outputs are drained with
//! `poll_*`, and the next timer is [`poll_timeout`](DeviceSession::poll_timeout). They open
//! no socket and read no clock.
//!
//! They live in the core rather than in a crate of their own because they are made of the
//! core's codecs and constants (the 50 s heartbeat interval is
//! [`HEARTBEAT_INTERVAL`](crate::config::HEARTBEAT_INTERVAL), shared with [`Config`]; the
//! payload rule is [`check_payload_len`](crate::check_payload_len)), and because the core
//! already promises what a sans-io session needs: no I/O, no clock, no randomness. The server
//! does not use them.
//!
//! - [`DeviceSession`]: heartbeats, acks, reconnects; for a signed device (PROTOCOL.md 9) the
//!   sealing of what it sends and the checks of what it receives.
//! - [`PushSession`]: request/reply matching, what a closed connection means, the retry rule.
//!
//! [`Config`]: crate::Config

pub mod device;
pub mod pusher;

pub use device::{
    ack_for, DeviceConfig, DeviceEvent, DeviceSession, DeviceSigning, DeviceTransmit, RETRY_DELAY,
};
pub use pusher::{PushConfig, PushOutcome, PushSession, ReplyError, RequestId};
