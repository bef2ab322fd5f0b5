//! The server: binds the sockets, loads the state, and runs the event loop on one thread.
//!
//! Modules, by what they hold:
//! - `bind`: listening sockets and the options set before `bind`;
//! - `state`: loading the data directory, upstream imports, snapshots on demand;
//! - `clock`: the wall clock the core's `Time` comes from;
//! - `udp`: batched datagram I/O on the device socket;
//! - `conn`: accept, read and write tasks of TCP connections;
//! - `sockets`: the socket layer built of those two, shared with cluster mode through the
//!   [`sockets::SocketCore`] trait;
//! - `event_loop`: the loop that owns the node and the store, and its turn.

mod bind;
mod clock;
mod conn;
mod event_loop;
pub(crate) mod sockets;
mod state;
mod udp;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use async_io::Async;
use ddpush_proto::{upstream, ConnId, Port};
use futures_lite::StreamExt;
use tracing::info;

use crate::admin::{self, AdminRequest};
use crate::persist::{Disk, OsDisk, PersistError};
use crate::settings::ServerConfig;
pub(crate) use bind::bind_tcp;
pub(crate) use clock::Clock;
use event_loop::Loop;
use sockets::Listeners;
pub use state::import;
use state::load;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be bound.
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// State could not be loaded or saved.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// Other I/O.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Bad upstream file.
    #[error("{file}: {source}")]
    Import {
        /// The file.
        file: String,
        /// The error.
        source: upstream::UpstreamError,
    },
}

/// Messages from socket tasks to the loop.
pub(crate) enum Msg {
    Open {
        conn: ConnId,
        port: Port,
        peer: SocketAddr,
        stream: Async<TcpStream>,
    },
    SnapshotDone {
        gen: u64,
        /// Bytes of the snapshot (what a failed one needed free).
        size: usize,
        result: Result<Duration, PersistError>,
    },
    Admin(AdminRequest),
}

/// Addresses actually bound (port 0 resolved), printed at start for tests and operators.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Device UDP.
    pub udp: SocketAddr,
    /// Device TCP, if enabled.
    pub tcp: Option<SocketAddr>,
    /// Push TCP.
    pub push: SocketAddr,
    /// Admin HTTP, if enabled.
    pub admin: Option<SocketAddr>,
}

/// How a server run ends, for [`Control`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// As on SIGTERM: last turn, snapshot, exit.
    Graceful,
    /// As on `kill -9` between two turns: nothing more is written.
    Crash,
}

/// In-process control of a server run (tests): where it listens, and a way to stop it.
pub struct Control {
    /// Receives the bound addresses once the server listens.
    pub bound: async_channel::Sender<Bound>,
    /// Stops the server.
    pub stop: async_channel::Receiver<Stop>,
}

/// Runs the server until SIGTERM or SIGINT, then writes a snapshot and returns.
pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    run_with(cfg, Arc::new(OsDisk), None)
}

/// [`run`] with the data directory's writes going through `disk` and, for tests, `ctl`.
pub fn run_with(
    cfg: ServerConfig,
    disk: Arc<dyn Disk>,
    ctl: Option<Control>,
) -> Result<(), ServerError> {
    let clock = Clock::new();
    let mut listeners = Listeners::bind(&cfg)?;
    // Signals are registered before loading so a SIGTERM during a long load is not lost.
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    // SIGXFSZ (a file-size limit hit) would kill the process mid-write; handled, the write
    // fails with EFBIG instead and the server degrades like on a full disk.
    let mut xfsz = async_signal::Signals::new([async_signal::Signal::Xfsz])?;
    let (node, store) = load(&cfg, &clock, disk)?;
    let bound = Bound {
        udp: listeners.udp.local_addr()?,
        tcp: listeners.tcp.as_ref().map(|l| l.local_addr()).transpose()?,
        push: listeners.push.local_addr()?,
        admin: listeners
            .admin
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?,
    };
    info!(
        udp = %bound.udp,
        tcp = %bound.tcp.map_or("off".to_string(), |a| a.to_string()),
        push = %bound.push,
        admin = %bound.admin.map_or("off".to_string(), |a| a.to_string()),
        data_dir = %cfg.data_dir.display(),
        fsync = ?cfg.fsync,
        clients = node.len(),
        "ddpushd listening"
    );
    // Everything runs on this one thread: the loop, the accept, read and write tasks. Handing a
    // request from a reader to the loop to a writer is then a local wake-up, not a cross-thread
    // one, which is what a one-request-at-a-time pusher waits for; the other core is left to
    // the kernel's network stack.
    let ex: Executor = Rc::new(smol::LocalExecutor::new());
    let admin_l = listeners.admin.take();
    let (mut lp, rx, mut tasks) =
        Loop::new(ex.clone(), node, store, clock, cfg.clone(), listeners)?;
    let tx = lp.sender();
    if let Some(l) = admin_l {
        tasks.push(ex.spawn(admin::serve(
            ex.clone(),
            Async::new(l)?,
            tx.clone(),
            cfg.admin_token.clone(),
        )));
    }
    tasks.push(ex.spawn(async move {
        while xfsz.next().await.is_some() {
            tracing::debug!("SIGXFSZ: a file size limit was hit; the write fails with EFBIG");
        }
    }));
    let stop = ctl.map(|c| {
        let _ = c.bound.try_send(bound.clone());
        c.stop
    });
    let how = smol::block_on(ex.run(lp.run(rx, signals, stop)));
    drop(tasks);
    match how {
        Stop::Graceful => lp.shutdown(),
        Stop::Crash => Ok(()),
    }
}

/// The single-threaded executor every task of the server runs on.
pub(crate) type Executor = Rc<smol::LocalExecutor<'static>>;
