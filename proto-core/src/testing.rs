//! An in-process driver for a [`Node`] with a fake clock, for tests and the simulator.
//!
//! Like quinn-proto's `tests/util.rs` `Pair`, [`Harness`] owns the node and the current
//! [`Time`], feeds inputs, and after every input runs the turn through the same [`Driver`]
//! every adapter uses: commit the changes (into [`Harness::changes`], or failing while
//! [`Harness::fail_writes`] is set), then drain transmits, closes and events. Time only moves when a
//! test calls [`Harness::advance`] or [`Harness::advance_to`], which on the way calls
//! [`Node::handle_timeout`] at every deadline [`Node::poll_timeout`] reports, exactly as an
//! adapter sleeping on that deadline would.
//!
//! No I/O, no randomness: the same calls always give the same outputs.
//!
//! Test support only (no adapter's production path calls anything here): besides the
//! harness, [`signed_heartbeat`] and [`signed_packet`] build the signed device packets the
//! tests of every crate send, so that each test says only which key, time and nonce.

use std::net::SocketAddr;
use std::time::Duration;

use crate::codec::{DeviceMsg, DevicePacket, PushMsg, PushReply, PushRequest, Uuid};
use crate::config::{Config, ConfigError};
use crate::driver::{Commit, Driver};
use crate::node::{Node, Port};
use crate::output::{Dest, Event, Transmit};
use crate::signed::{device_to_vec, MacKey, Seal};
use crate::state::Change;
use crate::time::Time;
use crate::ConnId;

/// A signed device packet (PROTOCOL.md 9) of app id 1 carrying `msg` from `uuid`, sealed
/// with `(key_id, ts, nonce)` under `key`: the bytes a signed device sends.
pub fn signed_packet(
    uuid: Uuid,
    msg: DeviceMsg,
    key: &impl MacKey,
    key_id: u8,
    ts: u32,
    nonce: u32,
) -> Vec<u8> {
    let p = DevicePacket {
        app_id: 1,
        uuid,
        msg,
    };
    device_to_vec(&p, Seal { key_id, ts, nonce }, key)
}

/// A signed heartbeat of app id 1 from `uuid` ([`signed_packet`] with
/// [`DeviceMsg::Heartbeat`]).
pub fn signed_heartbeat(uuid: Uuid, key: &impl MacKey, key_id: u8, ts: u32, nonce: u32) -> Vec<u8> {
    signed_packet(uuid, DeviceMsg::Heartbeat, key, key_id, ts, nonce)
}

/// One output of the node, in the order it was drained (see [`Harness::trace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A journaled change.
    Change(Change),
    /// A datagram, TCP bytes or a push reply.
    Transmit(Transmit),
    /// A connection the node closed.
    Close(ConnId),
    /// A log event.
    Event(Event),
}

/// A [`Node`] plus a fake clock and collectors for everything it outputs.
///
/// Outputs accumulate in the public vectors until a test takes them (the `take_*` methods
/// remove what they return, so each assertion sees only what is new).
pub struct Harness {
    /// The node under test.
    pub node: Node,
    now: Time,
    next_conn: ConnId,
    /// Transmits not yet taken, in send order.
    pub transmits: Vec<Transmit>,
    /// Connections the node closed, not yet taken.
    pub closes: Vec<ConnId>,
    /// Events not yet taken.
    pub events: Vec<Event>,
    /// Changes not yet taken.
    pub changes: Vec<Change>,
    /// Every output with the time it was drained, if enabled with [`Harness::with_trace`].
    pub trace: Option<Vec<(Time, Output)>>,
    /// The turn driver (storage health, front-end push tickets).
    pub driver: Driver,
    /// While set, every commit fails, as a full disk would make it.
    pub fail_writes: bool,
    /// Turns whose write failed.
    pub failed_turns: u64,
}

impl Harness {
    /// A harness around a new node, at time zero.
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        Ok(Harness {
            node: Node::new(cfg)?,
            now: Time::ZERO,
            next_conn: 1,
            transmits: Vec::new(),
            closes: Vec::new(),
            events: Vec::new(),
            changes: Vec::new(),
            trace: None,
            driver: Driver::new(),
            fail_writes: false,
            failed_turns: 0,
        })
    }

    /// A harness around an existing node (for example one rebuilt by restore and replay).
    pub fn with_node(node: Node, now: Time) -> Self {
        Harness {
            node,
            now,
            next_conn: 1,
            transmits: Vec::new(),
            closes: Vec::new(),
            events: Vec::new(),
            changes: Vec::new(),
            trace: None,
            driver: Driver::new(),
            fail_writes: false,
            failed_turns: 0,
        }
    }

    /// Also keeps every output, with its time, in [`Harness::trace`] (for determinism checks).
    pub fn with_trace(mut self) -> Self {
        self.trace = Some(Vec::new());
        self
    }

    /// The fake clock.
    pub fn now(&self) -> Time {
        self.now
    }

    // ---------------------------------------------------------------------------------------
    // Inputs: each one is a loop turn, drained right after.
    // ---------------------------------------------------------------------------------------

    /// Delivers raw bytes as one datagram on the device UDP port.
    pub fn udp(&mut self, from: SocketAddr, data: &[u8]) {
        self.node.handle_udp(self.now, from, data);
        self.drain();
    }

    /// Delivers a device packet over UDP.
    pub fn device(&mut self, from: SocketAddr, p: DevicePacket) {
        let mut buf = Vec::with_capacity(p.encoded_len());
        p.encode(&mut buf);
        self.udp(from, &buf);
    }

    /// A UDP heartbeat.
    pub fn heartbeat(&mut self, from: SocketAddr, app_id: u8, uuid: Uuid) {
        self.device(
            from,
            DevicePacket {
                app_id,
                uuid,
                msg: DeviceMsg::Heartbeat,
            },
        );
    }

    /// A UDP ack (`msg` is one of the `Ack*` variants).
    pub fn ack(&mut self, from: SocketAddr, app_id: u8, uuid: Uuid, msg: DeviceMsg) {
        self.device(from, DevicePacket { app_id, uuid, msg });
    }

    /// A push through [`Driver::handle_push`] (app id 1), as the admin API makes one;
    /// returns the reply once its turn is committed.
    pub fn push(&mut self, uuid: Uuid, msg: PushMsg) -> PushReply {
        let t = self.driver.handle_push(
            &mut self.node,
            self.now,
            PushRequest {
                app_id: 1,
                uuid,
                msg,
            },
        );
        self.drain();
        let mut reply = PushReply::Failed;
        while let Some((got, r)) = self.driver.poll_reply() {
            if got == t {
                reply = r;
            }
        }
        reply
    }

    /// An operator's removal ([`Node::remove`], the admin API's `POST /clients/{uuid}/clear`)
    /// as its own turn; returns whether it removed a record and its turn's write succeeded.
    pub fn remove(&mut self, uuid: Uuid) -> bool {
        let removed = self.node.remove(self.now, &uuid);
        let failed = self.failed_turns;
        self.drain();
        removed && self.failed_turns == failed
    }

    /// Opens a TCP connection with a fresh id; `None` if the node refused it.
    pub fn tcp_open(&mut self, port: Port, peer: SocketAddr) -> Option<ConnId> {
        let conn = self.next_conn;
        self.next_conn += 1;
        let ok = self.node.handle_tcp_open(self.now, conn, port, peer);
        self.drain();
        ok.then_some(conn)
    }

    /// Bytes arriving on a TCP connection.
    pub fn tcp_data(&mut self, conn: ConnId, data: &[u8]) {
        self.node.handle_tcp_data(self.now, conn, data);
        self.drain();
    }

    /// The peer closed a TCP connection.
    pub fn tcp_close(&mut self, conn: ConnId) {
        self.node.handle_tcp_close(self.now, conn);
        self.drain();
    }

    // ---------------------------------------------------------------------------------------
    // Time
    // ---------------------------------------------------------------------------------------

    /// Moves the clock forward by `d`.
    pub fn advance(&mut self, d: Duration) {
        let to = self.now + d;
        self.advance_to(to);
    }

    /// Moves the clock to `to` (never backwards), calling [`Node::handle_timeout`] at every
    /// deadline on the way and once at `to`.
    ///
    /// # Panics
    /// If a deadline does not move after its timeout was handled (a node bug).
    pub fn advance_to(&mut self, to: Time) {
        while let Some(t) = self.node.poll_timeout() {
            if t > to {
                break;
            }
            let at = self.now.max(t);
            self.now = at;
            self.node.handle_timeout(at);
            self.drain();
            if let Some(next) = self.node.poll_timeout() {
                assert!(
                    next > at,
                    "poll_timeout stays at {next:?} after handle_timeout({at:?})"
                );
            }
        }
        self.now = self.now.max(to);
        self.node.handle_timeout(self.now);
        self.drain();
    }

    // ---------------------------------------------------------------------------------------
    // Outputs
    // ---------------------------------------------------------------------------------------

    /// Ends the turn in the documented order: commit the changes, then drain transmits,
    /// closes, events.
    pub fn drain(&mut self) {
        let fail = self.fail_writes;
        let mut written = Vec::new();
        let outcome = self.driver.commit(&mut self.node, |changes| {
            if fail {
                return Err(());
            }
            written.extend_from_slice(changes);
            Ok(())
        });
        if let Commit::Failed { .. } = outcome {
            self.failed_turns += 1;
        }
        for c in written {
            self.log(Output::Change(c.clone()));
            self.changes.push(c);
        }
        while let Some(t) = self.node.poll_transmit() {
            self.log(Output::Transmit(t.clone()));
            self.transmits.push(t);
        }
        while let Some(c) = self.node.poll_close() {
            self.log(Output::Close(c));
            self.closes.push(c);
        }
        while let Some(e) = self.node.poll_event() {
            self.log(Output::Event(e.clone()));
            self.events.push(e);
        }
    }

    fn log(&mut self, o: Output) {
        if let Some(t) = &mut self.trace {
            t.push((self.now, o));
        }
    }

    /// Takes every pending transmit.
    pub fn take_transmits(&mut self) -> Vec<Transmit> {
        std::mem::take(&mut self.transmits)
    }

    /// Takes the datagrams sent to `to`, each encoded, in order.
    pub fn take_udp(&mut self, to: SocketAddr) -> Vec<Vec<u8>> {
        self.take_to(Dest::Udp(to))
            .into_iter()
            .map(|t| {
                let mut v = Vec::with_capacity(t.len());
                t.encode(&mut v);
                v
            })
            .collect()
    }

    /// Takes the bytes written to a TCP connection, concatenated as the stream carries them.
    pub fn take_tcp(&mut self, conn: ConnId) -> Vec<u8> {
        let mut v = Vec::new();
        for t in self.take_to(Dest::Tcp(conn)) {
            t.encode(&mut v);
        }
        v
    }

    fn take_to(&mut self, dest: Dest) -> Vec<Transmit> {
        let (mine, rest) = std::mem::take(&mut self.transmits)
            .into_iter()
            .partition(|t| t.dest == dest);
        self.transmits = rest;
        mine
    }

    /// Takes every pending event.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Takes every pending change.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Takes every pending close.
    pub fn take_closes(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.closes)
    }
}
