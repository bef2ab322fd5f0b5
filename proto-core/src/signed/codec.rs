//! The bytes of signed packets, both directions (PROTOCOL.md section 9).
//!
//! A signed packet is the v1 packet with version byte `0x02` and a fixed 25-byte trailer:
//! key id (u8), timestamp (u32 seconds), nonce (u32), then the first 16 bytes of
//! HMAC-SHA256 under the device key of a direction label followed by every byte before the tag.
//! The label (`ddpush2u` towards the server, `ddpush2d` towards the device) means a packet of
//! one direction never verifies as a packet of the other, whatever its length.
//!
//! Parsing is split from verifying: [`SignedFrame::parse`] checks only the shape (the same
//! strict rules as v1 for the header and content), so the keyring can pick the key by id and
//! run one HMAC per packet. The tag is compared in constant time by the `hmac` crate.

use std::fmt;

use bytes::BufMut;
use hmac::digest::core_api::CoreWrapper;
use hmac::{Hmac, HmacCore, Mac};
use sha2::Sha256;

use crate::codec::{
    DeviceMsg, DevicePacket, DownMsg, DownPacket, UpHeader, DOWN_HEADER_LEN, UP_HEADER_LEN,
    VERSION as V1,
};

use super::keys::DeviceKey;
use super::SignedDrop;

/// The version byte of signed packets.
pub const VERSION: u8 = 0x02;
/// Bytes of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 16;
/// Bytes after the v1 content: key id, timestamp, nonce, tag.
pub const TRAILER_LEN: usize = 1 + 4 + 4 + TAG_LEN;
/// The shortest signed device packet (a heartbeat or a 0x10/0x20 ack).
pub const SIGNED_DEVICE_MIN: usize = UP_HEADER_LEN + TRAILER_LEN;
/// The longest signed device packet (a 0x11 ack).
pub const SIGNED_DEVICE_MAX: usize = UP_HEADER_LEN + 8 + TRAILER_LEN;

/// MAC domain label of device -> server packets.
const UP_LABEL: &[u8; 8] = b"ddpush2u";
/// MAC domain label of server -> device packets.
const DOWN_LABEL: &[u8; 8] = b"ddpush2d";

/// HMAC-SHA256, as the `hmac` crate computes it.
pub type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 already keyed with a device key: the key's inner and outer pad blocks hashed
/// once (80 bytes of SHA-256 state), so a tag costs two SHA-256 compressions instead of four.
/// The keyring keeps one for each uuid's current key; `Debug` shows nothing of it.
#[derive(Clone)]
pub struct KeyedMac(HmacCore<Sha256>);

impl KeyedMac {
    /// Keys HMAC-SHA256 with `key`.
    pub fn new(key: &DeviceKey) -> Self {
        // HMAC takes keys of any length; ours are always 32 bytes.
        KeyedMac(
            <HmacCore<Sha256> as hmac::digest::KeyInit>::new_from_slice(key.expose())
                .expect("HMAC accepts any key"),
        )
    }
}

impl fmt::Debug for KeyedMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedMac(<redacted>)")
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::DeviceKey {}
    impl Sealed for super::KeyedMac {}
}

/// What a tag is computed with: a [`DeviceKey`] (keyed anew for each packet: what a device
/// holding one key does) or a [`KeyedMac`] (keyed once: what the server keeps).
pub trait MacKey: sealed::Sealed {
    /// HMAC-SHA256 keyed with this key, ready for a message.
    fn hmac(&self) -> HmacSha256;
}

impl MacKey for DeviceKey {
    fn hmac(&self) -> HmacSha256 {
        <HmacSha256 as Mac>::new_from_slice(self.expose()).expect("HMAC accepts any key")
    }
}

impl MacKey for KeyedMac {
    fn hmac(&self) -> HmacSha256 {
        CoreWrapper::from_core(self.0.clone())
    }
}

/// The non-secret fields of the trailer: which key, when, and a value never repeated under
/// one key within the replay window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Seal {
    /// Identifies the key (current or previous) among the uuid's keys.
    pub key_id: u8,
    /// Seconds since the Unix epoch on the sender's clock.
    pub ts: u32,
    /// Chosen by the sender; the pair `(ts, nonce)` must not repeat under one key.
    pub nonce: u32,
}

impl Seal {
    fn write<B: BufMut>(&self, out: &mut B) {
        out.put_u8(self.key_id);
        out.put_u32(self.ts);
        out.put_u32(self.nonce);
    }

    fn read(b: &[u8]) -> Seal {
        Seal {
            key_id: b[0],
            ts: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
            nonce: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
        }
    }
}

fn tag(key: &impl MacKey, label: &[u8; 8], signed: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = mac(key, label);
    mac.update(signed);
    truncate(mac)
}

fn truncate(mac: HmacSha256) -> [u8; TAG_LEN] {
    let full = mac.finalize().into_bytes();
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&full[..TAG_LEN]);
    t
}

fn mac(key: &impl MacKey, label: &[u8; 8]) -> HmacSha256 {
    let mut mac = key.hmac();
    mac.update(label);
    mac
}

fn verify(key: &impl MacKey, label: &[u8; 8], signed: &[u8], tag: &[u8]) -> bool {
    let mut mac = mac(key, label);
    mac.update(signed);
    // Constant-time comparison of the leftmost 16 bytes (the `hmac` crate uses `subtle`).
    mac.verify_truncated_left(tag).is_ok()
}

/// A signed device packet whose shape is valid and whose tag is not yet checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedFrame<'a> {
    /// The packet as v1 would carry it.
    pub packet: DevicePacket,
    /// Key id, timestamp and nonce.
    pub seal: Seal,
    signed: &'a [u8],
    tag: &'a [u8],
}

impl<'a> SignedFrame<'a> {
    /// Checks the shape of one whole signed device packet (UDP datagram or delimited TCP
    /// frame): version 2, a valid v1 command and content length, exactly the 25-byte trailer.
    pub fn parse(buf: &'a [u8]) -> Result<Self, SignedDrop> {
        let h = UpHeader::parse(buf).ok_or(SignedDrop::Length)?;
        if h.version != VERSION {
            return Err(SignedDrop::Length);
        }
        let content_end = UP_HEADER_LEN + usize::from(h.len);
        if buf.len() != content_end + TRAILER_LEN {
            return Err(SignedDrop::Length);
        }
        let v1 = UpHeader { version: V1, ..h };
        let packet = DevicePacket::from_parts(&v1, &buf[UP_HEADER_LEN..content_end]).map_err(
            |e| match e {
                crate::codec::InvalidPacket::Command => SignedDrop::Command,
                _ => SignedDrop::Length,
            },
        )?;
        let tag_at = buf.len() - TAG_LEN;
        Ok(SignedFrame {
            packet,
            seal: Seal::read(&buf[content_end..tag_at]),
            signed: &buf[..tag_at],
            tag: &buf[tag_at..],
        })
    }

    /// Whether the tag is the one `key` gives (constant time).
    pub fn verify(&self, key: &impl MacKey) -> bool {
        verify(key, UP_LABEL, self.signed, self.tag)
    }
}

/// Encodes a signed device packet: what a signed device sends.
pub fn encode_device<B: BufMut>(p: &DevicePacket, seal: Seal, key: &impl MacKey, out: &mut B) {
    let mut buf = [0u8; SIGNED_DEVICE_MAX];
    let n = p.encoded_len();
    {
        let mut w = &mut buf[..];
        p.encode(&mut w);
    }
    buf[0] = VERSION;
    {
        let mut w = &mut buf[n..];
        seal.write(&mut w);
    }
    let signed = n + TRAILER_LEN - TAG_LEN;
    let t = tag(key, UP_LABEL, &buf[..signed]);
    out.put_slice(&buf[..signed]);
    out.put_slice(&t);
}

/// A signed device packet as a fresh vector.
pub fn device_to_vec(p: &DevicePacket, seal: Seal, key: &impl MacKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(p.encoded_len() + TRAILER_LEN);
    encode_device(p, seal, key, &mut v);
    v
}

/// A server -> device packet sealed for a signed device: the v1 packet with version 2, the
/// server's seal and the tag, computed when the node queues it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedDown {
    /// The packet as v1 would carry it.
    pub packet: DownPacket,
    /// The server's key id (the one the device last used), timestamp and nonce.
    pub seal: Seal,
    /// The tag over the label and every byte before it.
    pub tag: [u8; TAG_LEN],
}

impl SealedDown {
    /// Seals `packet` under `key`. The MAC reads the packet's parts where they are (the
    /// payload from its shared buffer): nothing is allocated or copied for it.
    pub fn new(packet: DownPacket, seal: Seal, key: &impl MacKey) -> Self {
        let mut mac = mac(key, DOWN_LABEL);
        // Everything before the tag but a 0x20 payload's content fits here.
        let mut head = [0u8; DOWN_HEADER_LEN + 8];
        let mut w = &mut head[..];
        w.put_u8(VERSION);
        w.put_u8(packet.app_id);
        let content: &[u8] = match &packet.msg {
            DownMsg::Payload(p) => {
                w.put_u8(crate::codec::cmd::PAYLOAD);
                w.put_u16(p.len_u16());
                p
            }
            m => {
                m.encode_body(&mut w);
                &[]
            }
        };
        let n = DOWN_HEADER_LEN + 8 - w.remaining_mut();
        mac.update(&head[..n]);
        mac.update(content);
        let mut trailer = [0u8; TRAILER_LEN - TAG_LEN];
        seal.write(&mut &mut trailer[..]);
        mac.update(&trailer);
        let tag = truncate(mac);
        SealedDown { packet, seal, tag }
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.packet.encoded_len() + TRAILER_LEN
    }

    /// Encodes the whole packet.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        write_down_unsigned(&self.packet, self.seal, out);
        out.put_slice(&self.tag);
    }

    /// Encodes into a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }

    /// Decodes and verifies one whole signed downstream packet, as a signed device does.
    /// Freshness (timestamp window, nonce memory) is the device's to check afterwards.
    pub fn open(buf: &[u8], key_of: impl Fn(u8) -> Option<DeviceKey>) -> Result<Self, SignedDrop> {
        let h = buf.get(..DOWN_HEADER_LEN).ok_or(SignedDrop::Length)?;
        if h[0] != VERSION {
            return Err(SignedDrop::Length);
        }
        let content_end = DOWN_HEADER_LEN + usize::from(u16::from_be_bytes([h[3], h[4]]));
        if buf.len() != content_end + TRAILER_LEN {
            return Err(SignedDrop::Length);
        }
        let mut v1 = buf[..content_end].to_vec();
        v1[0] = V1;
        let packet = DownPacket::decode(&v1).map_err(|e| match e {
            crate::codec::InvalidPacket::Command => SignedDrop::Command,
            _ => SignedDrop::Length,
        })?;
        let tag_at = buf.len() - TAG_LEN;
        let seal = Seal::read(&buf[content_end..tag_at]);
        let key = key_of(seal.key_id).ok_or(SignedDrop::UnknownKey)?;
        if !verify(&key, DOWN_LABEL, &buf[..tag_at], &buf[tag_at..]) {
            return Err(SignedDrop::Tag);
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&buf[tag_at..]);
        Ok(SealedDown { packet, seal, tag })
    }
}

fn write_down_unsigned<B: BufMut>(p: &DownPacket, seal: Seal, out: &mut B) {
    out.put_u8(VERSION);
    out.put_u8(p.app_id);
    p.msg.encode_body(out);
    seal.write(out);
}

/// Bytes a signed device packet for `msg` takes on the wire.
pub fn device_len(msg: DeviceMsg) -> usize {
    match msg {
        DeviceMsg::AckBits(_) => SIGNED_DEVICE_MAX,
        _ => SIGNED_DEVICE_MIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Uuid;

    fn key() -> DeviceKey {
        DeviceKey::new(std::array::from_fn(|i| i as u8))
    }

    fn seal() -> Seal {
        Seal {
            key_id: 1,
            ts: 1_767_225_600,
            nonce: 7,
        }
    }

    #[test]
    fn device_packet_round_trips_and_verifies() {
        for msg in [
            DeviceMsg::Heartbeat,
            DeviceMsg::AckNotify,
            DeviceMsg::AckBits(5),
            DeviceMsg::AckPayload,
        ] {
            let p = DevicePacket {
                app_id: 3,
                uuid: Uuid([9; 16]),
                msg,
            };
            let b = device_to_vec(&p, seal(), &key());
            assert_eq!(b.len(), device_len(msg));
            let f = SignedFrame::parse(&b).unwrap();
            assert_eq!(f.packet, p);
            assert_eq!(f.seal, seal());
            assert!(f.verify(&key()));
            assert!(!f.verify(&DeviceKey::new([0; 32])));
        }
    }

    #[test]
    fn every_flipped_bit_fails_the_tag_or_the_shape() {
        let p = DevicePacket {
            app_id: 3,
            uuid: Uuid([9; 16]),
            msg: DeviceMsg::AckBits(5),
        };
        let b = device_to_vec(&p, seal(), &key());
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            if let Ok(f) = SignedFrame::parse(&c) {
                assert!(!f.verify(&key()), "bit {i} flipped still verifies");
            }
        }
    }

    #[test]
    fn keyed_and_unkeyed_macs_give_the_same_tags_for_every_kind() {
        let keyed = KeyedMac::new(&key());
        let p = DevicePacket {
            app_id: 3,
            uuid: Uuid([9; 16]),
            msg: DeviceMsg::AckBits(5),
        };
        assert_eq!(
            device_to_vec(&p, seal(), &keyed),
            device_to_vec(&p, seal(), &key())
        );
        for msg in [
            DownMsg::HeartbeatReply,
            DownMsg::Notify,
            DownMsg::Bits(0x0102_0304_0506_0708),
            DownMsg::Payload(crate::codec::Content::from_static(b"hello, device")),
        ] {
            let packet = DownPacket { app_id: 2, msg };
            let d = SealedDown::new(packet.clone(), seal(), &keyed);
            assert_eq!(d, SealedDown::new(packet, seal(), &key()));
            // The tag is over the encoded bytes, as a device checks it.
            let b = d.to_vec();
            assert_eq!(d.tag, tag(&key(), DOWN_LABEL, &b[..b.len() - TAG_LEN]));
            assert_eq!(SealedDown::open(&b, |_| Some(key())), Ok(d));
        }
    }

    #[test]
    fn a_downstream_packet_never_verifies_upstream() {
        // Same key, bytes that parse both ways: the labels keep the directions apart.
        let d = SealedDown::new(
            DownPacket {
                app_id: 1,
                msg: DownMsg::Notify,
            },
            seal(),
            &key(),
        );
        let b = d.to_vec();
        assert_eq!(SealedDown::open(&b, |_| Some(key())).unwrap(), d);
        assert_eq!(
            SealedDown::open(&b, |_| Some(DeviceKey::new([1; 32]))),
            Err(SignedDrop::Tag)
        );
        assert_eq!(SealedDown::open(&b, |_| None), Err(SignedDrop::UnknownKey));
    }
}
