//! DDPush v1 clients: an app server's [`Pusher`] (blocking) and [`AsyncPusher`] (smol), and a
//! [`Device`] that behaves like the real device SDKs. The `ddpush` command-line tool is built on
//! them.
//!
//! Every byte on the wire goes through the codecs of [`ddpush_proto`] (the core the server
//! uses): requests are encoded with [`PushRequest::encode`], acks and heartbeats with
//! [`DevicePacket::encode`](ddpush_proto::DevicePacket::encode), and messages to a device are
//! decoded with [`DownPacket::decode`]; a device's TCP stream is delimited by the core's
//! [`DownStreamDecoder`].
//!
//! # Pushing
//!
//! ```no_run
//! use ddpush_client::{Pusher, PushOutcome, PushRequest, PushRequestExt, Uuid};
//!
//! let mut pusher = Pusher::new("127.0.0.1:9999");
//! let req = PushRequest::text(Uuid::from_user("alice"), "hello")?;
//! match pusher.push(&req)? {
//!     PushOutcome::Accepted => println!("stored"),
//!     other => println!("not stored: {other}"),
//! }
//! # Ok::<(), ddpush_client::PushError>(())
//! ```
//!
//! # Receiving, as a device does
//!
//! ```no_run
//! use std::time::Duration;
//! use ddpush_client::{Device, Uuid};
//!
//! let device = Device::builder("127.0.0.1:9966".parse().unwrap(), Uuid::from_user("alice"))
//!     .start()?;
//! if let Some(msg) = device.recv(Duration::from_secs(5)) {
//!     println!("got {:?}", msg.msg); // already acked
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Result semantics
//!
//! The server answers every push request with one byte, in order. [`PushOutcome::Accepted`] is
//! returned only for a `0x00` byte actually read; a connection that closes before the reply
//! gives [`PushOutcome::Closed`] (the Java `Pusher` reported success there). Network failures
//! (refused connection, timeout) are [`PushError`]s.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod async_pusher;
pub mod batch;
mod device;
pub mod keyfile;
mod pipeline;
mod pusher;

pub use async_pusher::AsyncPusher;
pub use ddpush_proto::DownStreamDecoder;
pub use device::{Device, DeviceBuilder, DeviceEvent, Transport};
pub use keyfile::{KeyFile, KeyFileError};
pub use pusher::{PushError, PushOutcome, PushRequestExt, Pusher, PusherConfig};

pub use ddpush_proto::{Content, ContentTooLong, DownMsg, DownPacket, PushMsg, PushRequest, Uuid};

/// Re-exported so callers need not depend on `ddpush-proto` for one trait.
pub use ddpush_proto;
