//! State shared between the simulated hosts and the test driver.
//!
//! Everything lives on turmoil's single thread, so `Rc<RefCell<..>>` is enough. The durable
//! store lives here, outside the server host, so it survives a crash of that host.

use std::cell::RefCell;
use std::rc::Rc;

use ddpush_proto::signed::{DeviceKey, KeyState, SignedDrop, Unsigned};
use ddpush_proto::{Change, Counters, DownMsg, Event, Node, Pending, PushMsg, RecordState, Uuid};

use crate::attacker::{AttackStats, Capture};

/// The in-memory stand-in for the server's data dir, with the same contract: a snapshot plus
/// the journal of every change since. A new snapshot is written aside (`staging`) and replaces
/// the old one atomically, as a rename would; a crash while writing leaves the old snapshot and
/// its journal valid.
#[derive(Default)]
pub struct Store {
    /// The last complete snapshot.
    pub snapshot: Vec<RecordState>,
    /// The keys of signed-only uuids in that snapshot.
    pub keys: Vec<(Uuid, KeyState)>,
    /// The removal floors in that snapshot (uuids whose key was removed less than a window
    /// before it; `Node::removal_floors`, ddpushd's `removed` chunks).
    pub floors: Vec<(Uuid, u32)>,
    /// Changes since that snapshot, in order.
    pub journal: Vec<Change>,
    /// A snapshot being written; discarded at restart.
    pub staging: Option<Vec<RecordState>>,
    /// The keys of the snapshot being written.
    pub staging_keys: Vec<(Uuid, KeyState)>,
    /// The removal floors of the snapshot being written.
    pub staging_floors: Vec<(Uuid, u32)>,
    /// Snapshots completed.
    pub snapshots: u64,
    /// Snapshots abandoned by a crash.
    pub torn: u64,
    /// Journal writes and snapshots that failed on a full disk.
    pub failed_writes: u64,
}

/// Crash hooks the driver arms, and what the server reports back.
#[derive(Default)]
pub struct Faults {
    /// Halt right after journaling a turn that accepted a push, before its reply is sent.
    pub crash_after_journal: bool,
    /// Halt half-way through writing a snapshot.
    pub crash_in_snapshot: bool,
    /// The server halted at a hook and waits to be crashed.
    pub halted: bool,
    /// Set by the driver before a restart: the server stores its restored state here.
    pub want_restored: bool,
    /// The pending state right after restore + replay.
    pub restored: Option<Vec<Pending>>,
    /// Device-side loss is switched off (the final clean phase).
    pub loss_off: bool,
    /// The disk is full: every journal write and snapshot fails until it is cleared.
    pub disk_full: bool,
}

/// One datagram or frame a device accepted.
#[derive(Clone, Debug)]
pub struct Rx {
    /// Sim time in ms.
    pub at: u64,
    /// What.
    pub msg: DownMsg,
}

/// What a simulated device saw and did.
pub struct DeviceLog {
    /// The device's uuid.
    pub uuid: Uuid,
    /// Times (ms) of every heartbeat it sent (including ones its link then lost).
    pub heartbeats: Vec<u64>,
    /// Everything it received and acked.
    pub rx: Vec<Rx>,
    /// Time of its last packet sent before each away period, and the period `(from, back)`:
    /// `back` is the first heartbeat on the new socket or connection.
    pub away: Vec<Away>,
    /// Packets that arrived while it was away (not acked, not counted in `rx`).
    pub rx_away: Vec<u64>,
    /// Socket resets (UDP) or reconnects (TCP).
    pub resets: u32,
    /// Signed devices: server packets dropped unacked (not sealed under its key, stale, or
    /// a pair seen before, such as a NAT's duplicate).
    pub refused: u64,
    /// When it restarted (new session, new socket), if it did.
    pub restarts: Vec<u64>,
    /// Answers the attacker captured before a restart and injected after it: refused, and
    /// accepted (must stay 0), and of those accepted the 0x20 payloads.
    pub replays_refused: u64,
    /// Captured answers accepted after a restart (must stay 0).
    pub replays_accepted: u64,
    /// Captured 0x20 payloads accepted after a restart: an old payload shown again (must
    /// stay 0).
    pub replayed_payloads: u64,
}

/// One period a device was unreachable.
#[derive(Clone, Copy, Debug)]
pub struct Away {
    /// Its last packet sent before going away (ms).
    pub last_sent: u64,
    /// When it went away (ms).
    pub from: u64,
    /// Its first heartbeat after returning (ms); `u64::MAX` if it never returned.
    pub back: u64,
}

/// One push the app server got an answer to.
#[derive(Clone, Debug)]
pub struct Answered {
    /// Index of the target device.
    pub device: usize,
    /// The message.
    pub msg: PushMsg,
    /// First time it was sent (ms).
    pub sent_at: u64,
    /// When the reply arrived (ms).
    pub replied_at: u64,
    /// The reply byte.
    pub reply: u8,
}

/// What the app server saw.
#[derive(Default)]
pub struct AppLog {
    /// Answers in the order received.
    pub answered: Vec<Answered>,
    /// Pushes never answered when the run ended.
    pub unanswered: usize,
    /// Connections made.
    pub connects: u32,
    /// When connections were abandoned (timeout, reset) and remade (ms): each one re-sends
    /// every request still unanswered, a new push of the same bytes as far as the server knows.
    pub reconnects: Vec<u64>,
}

/// A node event with its time.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Sim time in ms.
    pub at: u64,
    /// The event.
    pub event: Event,
}

/// FNV-1a over every byte on the wire and every decision: equal seeds give equal hashes.
pub struct Trace {
    hash: u64,
    /// Items hashed.
    pub items: u64,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            hash: 0xcbf2_9ce4_8422_2325,
            items: 0,
        }
    }
}

impl Trace {
    /// Adds a tagged record.
    pub fn add(&mut self, tag: u8, at: u64, bytes: &[u8]) {
        self.items += 1;
        for b in [tag].iter().chain(&at.to_be_bytes()).chain(bytes) {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn hash(&self) -> u64 {
        self.hash
    }
}

/// Everything shared in one simulation.
pub struct Shared {
    /// The durable store.
    pub store: RefCell<Store>,
    /// The live node (None while the server host is down); the driver reads it at crashes.
    pub node: RefCell<Option<Node>>,
    /// Crash hooks.
    pub faults: RefCell<Faults>,
    /// The trace hash.
    pub trace: RefCell<Trace>,
    /// Online, Offline and PushAccepted events of the node.
    pub events: RefCell<Vec<Logged>>,
    /// One log per device, by index.
    pub devices: Vec<RefCell<DeviceLog>>,
    /// The app server's log.
    pub app: RefCell<AppLog>,
    /// What the NATs did.
    pub net: RefCell<crate::net::NetStats>,
    /// Keys the app server provisions before the devices start: (uuid, key id, key).
    pub provision: RefCell<Vec<(Uuid, u8, DeviceKey)>>,
    /// Packets the attacker copied off the server's link.
    pub capture: RefCell<Capture>,
    /// What the attacker did and got.
    pub attack: RefCell<AttackStats>,
    /// The server's signed-device counters, summed over restarts.
    pub signed: RefCell<SignedCounts>,
    /// Wakes the server host when the attacker queued datagrams for it to inject.
    pub inject_wake: tokio::sync::Notify,
}

/// The server's signed-device counters, summed over every run of the node.
#[derive(Clone, Debug, Default)]
pub struct SignedCounts {
    /// Signed packets that passed every check.
    pub accepted: u64,
    /// Signed packets dropped, by reason.
    pub dropped: Counters<SignedDrop, 6>,
    /// v1 packets naming a signed-only uuid, by kind.
    pub unsigned: Counters<Unsigned, 2>,
}

impl SignedCounts {
    /// Adds a node's counters (at a crash, and at the end).
    pub fn add(&mut self, node: &Node) {
        let st = node.stats();
        self.accepted += st.signed_accepted;
        for (k, v) in st.signed_dropped.iter() {
            self.dropped.add(k, v);
        }
        for (k, v) in st.unsigned_refused.iter() {
            self.unsigned.add(k, v);
        }
    }
}

impl Shared {
    /// A world for `n` devices.
    pub fn new(uuids: Vec<Uuid>) -> Rc<Self> {
        Rc::new(Shared {
            store: RefCell::default(),
            node: RefCell::default(),
            faults: RefCell::default(),
            trace: RefCell::default(),
            events: RefCell::default(),
            devices: uuids
                .into_iter()
                .map(|uuid| {
                    RefCell::new(DeviceLog {
                        uuid,
                        heartbeats: Vec::new(),
                        rx: Vec::new(),
                        away: Vec::new(),
                        rx_away: Vec::new(),
                        resets: 0,
                        refused: 0,
                        restarts: Vec::new(),
                        replays_refused: 0,
                        replays_accepted: 0,
                        replayed_payloads: 0,
                    })
                })
                .collect(),
            app: RefCell::default(),
            net: RefCell::default(),
            provision: RefCell::default(),
            capture: RefCell::default(),
            attack: RefCell::default(),
            signed: RefCell::default(),
            inject_wake: tokio::sync::Notify::new(),
        })
    }
}

/// Sim time in ms, from any host.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed()
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The uuid of device `i` (SDKs use an MD5; any 16 bytes will do).
pub fn device_uuid(i: usize) -> Uuid {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(b"dev!");
    b[8..].copy_from_slice(&(i as u64).to_be_bytes());
    Uuid(b)
}
