//! Where a uuid lives in Redis: its bucket (the hash tag), its keys and their cluster slot.

use ddpush_proto::cluster::NodeId;
use ddpush_proto::Uuid;

use super::store::BUCKETS;

/// The bucket of a uuid (its hash tag): FNV-1a of all 16 bytes, so that uuids spread over
/// the buckets whatever their form (the SDKs' MD5 sums, or sequential ids with a common
/// prefix).
pub fn bucket(uuid: &Uuid) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in uuid.0 {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    ((h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) as usize) % BUCKETS
}

/// The key of a uuid's record.
pub fn record_key(uuid: &Uuid) -> String {
    format!("ddp:{{{:02x}}}:r:{}", bucket(uuid), uuid.to_hex())
}

pub(super) fn node_key(node: &NodeId) -> String {
    format!("ddp:n:{}", node.0)
}

pub(super) fn dirty_prefix(uuid: &Uuid) -> String {
    format!("ddp:{{{:02x}}}:d:", bucket(uuid))
}

/// The cluster slot of a uuid's keys: CRC16 (XMODEM) of the hash tag, mod 16384, as Redis
/// computes it.
pub fn slot(uuid: &Uuid) -> u16 {
    bucket_slot(bucket(uuid))
}

/// The cluster slot of bucket `b`'s keys.
pub(super) fn bucket_slot(b: usize) -> u16 {
    let tag = format!("{b:02x}");
    let mut crc: u16 = 0;
    for b in tag.bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}
