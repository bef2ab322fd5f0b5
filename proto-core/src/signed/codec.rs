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
//! run one HMAC per packet. The tag is compared in constant time (`subtle`).

use std::fmt;

use bytes::BufMut;
use hmac::{Hmac, Mac};
use sha2::digest::generic_array::GenericArray;
use sha2::Sha256;
use subtle::ConstantTimeEq;

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

/// HMAC-SHA256, as the `hmac` crate computes it: what a [`DeviceKey`] tags with.
type HmacSha256 = Hmac<Sha256>;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-256's block size, and HMAC's pad length.
const BLOCK: usize = 64;

/// The longest message whose SHA-256 padding (0x80 and the 8-byte length) fits its block.
const SHORT: usize = BLOCK - 9;

fn compress(state: &mut [u32; 8], block: &[u8; BLOCK]) {
    // The `sha2` crate's compression function (SHA-NI where the CPU has it).
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

fn state_bytes(state: &[u32; 8], out: &mut [u8]) {
    for (b, w) in out.chunks_exact_mut(4).zip(state) {
        b.copy_from_slice(&w.to_be_bytes());
    }
}

/// HMAC-SHA256 already keyed with a device key: the SHA-256 states after the key's inner and
/// outer pad blocks (64 bytes), so a tag costs the server two SHA-256 compressions for a
/// message that fits one block, instead of four. The keyring keeps one for each uuid's
/// current key; `Debug` shows nothing of it.
///
/// The rest of HMAC (RFC 2104) is done here on stack blocks with `sha2`'s compression
/// function rather than through the `hmac` crate's generic buffers: on a signed heartbeat
/// those cost about 150 ns per tag, more than the two compressions themselves (profiled,
/// docs/BENCHMARKS.md). The bytes are the `hmac` crate's: [`DeviceKey`] tags through it, and
/// the tests compare the two on every message length a packet can have.
#[derive(Clone)]
pub struct KeyedMac {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl KeyedMac {
    /// Keys HMAC-SHA256 with `key`.
    pub fn new(key: &DeviceKey) -> Self {
        // A 32-byte key is shorter than the block: padded with zeros, then XORed with the pads.
        let keyed = |pad: u8| {
            let mut block = [pad; BLOCK];
            for (b, k) in block.iter_mut().zip(key.expose()) {
                *b ^= k;
            }
            let mut state = SHA256_H0;
            compress(&mut state, &block);
            state
        };
        KeyedMac {
            inner: keyed(0x36),
            outer: keyed(0x5c),
        }
    }

    /// A word of the outer state, to fetch its cache line early (see `Keyring::verify`).
    pub(crate) fn outer_word(&self) -> u32 {
        self.outer[0]
    }

    /// HMAC-SHA256 of the concatenation of `parts`.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total <= SHORT {
            return self.mac_short(parts);
        }
        let mut state = self.inner;
        let mut block = [0u8; BLOCK];
        let mut n = 0;
        // Bytes hashed so far, the inner pad block included.
        let mut len = BLOCK as u64;
        for part in parts {
            len += part.len() as u64;
            let mut rest = *part;
            while !rest.is_empty() {
                let take = (BLOCK - n).min(rest.len());
                block[n..n + take].copy_from_slice(&rest[..take]);
                n += take;
                rest = &rest[take..];
                if n == BLOCK {
                    compress(&mut state, &block);
                    n = 0;
                }
            }
        }
        // SHA-256 padding (FIPS 180-4, 5.1.1): 0x80, zeros, the length in bits in 8 bytes.
        block[n] = 0x80;
        block[n + 1..].fill(0);
        if n + 1 > BLOCK - 8 {
            compress(&mut state, &block);
            block = [0; BLOCK];
        }
        block[BLOCK - 8..].copy_from_slice(&(len * 8).to_be_bytes());
        compress(&mut state, &block);
        self.outer(&state)
    }

    /// [`KeyedMac::mac`] of a message of at most [`SHORT`] bytes: one block holds it and its
    /// padding, so the inner hash is one compression of a block built in place (every
    /// upstream packet and every sealed answer but a 0x20 is this short; profiled,
    /// docs/BENCHMARKS.md).
    fn mac_short(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut block = [0u8; BLOCK];
        let mut n = 0;
        for part in parts {
            // In words of 8 then bytes: fixed-size copies stay inline, where a copy of a
            // run-time length calls `memcpy` (profiled: a few per cent of a signed heartbeat).
            let mut words = part.chunks_exact(8);
            for w in &mut words {
                block[n..n + 8].copy_from_slice(w);
                n += 8;
            }
            for &b in words.remainder() {
                block[n] = b;
                n += 1;
            }
        }
        block[n] = 0x80;
        block[BLOCK - 8..].copy_from_slice(&(((BLOCK + n) as u64) * 8).to_be_bytes());
        let mut state = self.inner;
        compress(&mut state, &block);
        self.outer(&state)
    }

    /// The outer hash: the outer pad block (already in `outer`), then the inner digest.
    fn outer(&self, inner: &[u32; 8]) -> [u8; 32] {
        let mut block = [0u8; BLOCK];
        state_bytes(inner, &mut block[..32]);
        block[32] = 0x80;
        block[BLOCK - 8..].copy_from_slice(&((BLOCK as u64 + 32) * 8).to_be_bytes());
        let mut state = self.outer;
        compress(&mut state, &block);
        let mut out = [0u8; 32];
        state_bytes(&state, &mut out);
        out
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

/// What a tag is computed with: a [`DeviceKey`] (keyed anew for each packet by the `hmac`
/// crate: what a device holding one key does) or a [`KeyedMac`] (keyed once: what the server
/// keeps). Both give the same bytes.
pub trait MacKey: sealed::Sealed {
    /// HMAC-SHA256 under this key of the concatenation of `parts`.
    fn hmac_sha256(&self, parts: &[&[u8]]) -> [u8; 32];
}

impl MacKey for DeviceKey {
    fn hmac_sha256(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(self.expose()).expect("HMAC accepts any key");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

impl MacKey for KeyedMac {
    fn hmac_sha256(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts)
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

/// The tag: the leftmost 16 bytes of HMAC-SHA256 under `key` of `label` and `parts`.
fn tag(key: &impl MacKey, label: &[u8; 8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut all: [&[u8]; 4] = [label, &[], &[], &[]];
    all[1..=parts.len()].copy_from_slice(parts);
    let full = key.hmac_sha256(&all[..=parts.len()]);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&full[..TAG_LEN]);
    t
}

fn verify(key: &impl MacKey, label: &[u8; 8], signed: &[u8], tag_got: &[u8]) -> bool {
    let Ok(got) = <[u8; TAG_LEN]>::try_from(tag_got) else {
        return false;
    };
    // Constant-time comparison (`subtle`): how many leading bytes matched must not show. As
    // one 128-bit word: `subtle`'s byte-slice compare passes each of the 16 bytes through its
    // optimisation barrier, which cost more than the compare.
    let want = u128::from_ne_bytes(tag(key, label, &[signed]));
    want.ct_eq(&u128::from_ne_bytes(got)).into()
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
    let t = tag(key, UP_LABEL, &[&buf[..signed]]);
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
        let mut trailer = [0u8; TRAILER_LEN - TAG_LEN];
        seal.write(&mut &mut trailer[..]);
        let tag = tag(key, DOWN_LABEL, &[&head[..n], content, &trailer]);
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
            assert_eq!(d.tag, tag(&key(), DOWN_LABEL, &[&b[..b.len() - TAG_LEN]]));
            assert_eq!(SealedDown::open(&b, |_| Some(key())), Ok(d));
        }
    }

    #[test]
    fn the_keyed_mac_is_the_hmac_crates_at_every_length_around_the_blocks() {
        // Every message length up to three blocks past a 0x20 packet's longest, so that each
        // padding case (room for the length, no room, exact block) is hit many times.
        let msg: Vec<u8> = (0..700u32).map(|i| (i * 31 + 7) as u8).collect();
        for k in [key(), DeviceKey::new([0xff; 32]), DeviceKey::new([0; 32])] {
            let keyed = KeyedMac::new(&k);
            for len in 0..msg.len() {
                let m = &msg[..len];
                assert_eq!(keyed.hmac_sha256(&[m]), k.hmac_sha256(&[m]), "len {len}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_keyed_mac_is_the_hmac_crates_however_the_message_is_split(
            k in proptest::array::uniform32(proptest::num::u8::ANY),
            msg in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            a in 0usize..600,
            b in 0usize..600,
        ) {
            let k = DeviceKey::new(k);
            let (a, b) = (a.min(msg.len()), b.min(msg.len()));
            let (a, b) = (a.min(b), a.max(b));
            let parts = [&msg[..a], &msg[a..b], &msg[b..]];
            proptest::prop_assert_eq!(
                KeyedMac::new(&k).hmac_sha256(&parts),
                k.hmac_sha256(&[&msg])
            );
        }
    }

    #[test]
    fn the_keyed_mac_matches_an_independent_hmac_sha256() {
        // Output of another implementation for a 32-byte key (Python's hmac module:
        // hmac.new(bytes(range(32)), b"ddpush", "sha256").hexdigest()).
        let want = "d342a6ce45e3e95a100a035fe15a545617837bc1aa2df6b8511ab10701c7f267";
        let got = KeyedMac::new(&key()).hmac_sha256(&[b"ddpush"]);
        let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, want);
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
