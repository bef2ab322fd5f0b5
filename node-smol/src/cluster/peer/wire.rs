//! The node-to-node wire format, as pure functions (no sockets): a preamble, then
//! length-prefixed frames.
//!
//! ```text
//! preamble   "DDPK" version(1)                       5 bytes, each side, first
//! frame      len(u32 BE) type(u8) body [mac(16)]     len counts type, body and mac
//!   HELLO  1 flags(u8: bit 0 = a secret is configured) nonce(16) id_len(u8) id
//!   AUTH   2 mac(32) = HMAC-SHA256(secret, role || transcript)
//!   MSG    3 CBOR of a PeerMsg; sealed with HMAC-SHA256(session, dir || seq || body)[..16]
//!           when a secret is in use
//!   REFUSE 4 a UTF-8 reason, then the sender closes
//! ```
//!
//! The transcript binds both nonces and both node ids, so an AUTH cannot be replayed into
//! another connection; the per-frame seal with a sequence number stops injection, replay and
//! reordering of messages after the handshake. Nothing is encrypted: pokes carry uuids and
//! payloads, so links beyond one host belong on a private network (docs/CLUSTER.md).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The four bytes every link starts with.
pub const MAGIC: [u8; 4] = *b"DDPK";
/// The protocol version this node speaks.
pub const VERSION: u8 = 1;
/// Largest frame accepted (a poke with a 500-byte payload is well under 1 KiB).
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes of a frame seal.
pub const SEAL: usize = 16;

/// Frame types.
pub const HELLO: u8 = 1;
/// See the module docs.
pub const AUTH: u8 = 2;
/// See the module docs.
pub const MSG: u8 = 3;
/// See the module docs.
pub const REFUSE: u8 = 4;

type HmacSha256 = Hmac<Sha256>;

/// Why a link was refused or broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first bytes are not a ddpushd peer preamble.
    #[error("not a ddpushd peer link (bad preamble {0:02x?})")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("peer speaks link protocol version {0}, this node speaks {VERSION}")]
    Version(u8),
    /// A frame longer than [`MAX_FRAME`] or shorter than its type byte.
    #[error("bad frame length {0}")]
    Length(usize),
    /// A frame that does not parse.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// An unexpected frame type at this point.
    #[error("unexpected frame type {0}")]
    Unexpected(u8),
    /// Exactly one side has a secret.
    #[error(
        "only one side has a --cluster-secret (dialing node: {dialer}, listening node: {listener})"
    )]
    SecretMismatch {
        /// The dialing node has one.
        dialer: bool,
        /// The listening node has one.
        listener: bool,
    },
    /// The peer's proof does not match our secret.
    #[error("wrong --cluster-secret")]
    BadProof,
    /// A sealed frame failed its check (tampered, replayed or reordered).
    #[error("frame seal check failed")]
    BadSeal,
    /// The peer refused us.
    #[error("refused by the peer: {0}")]
    Refused(String),
}

/// The HELLO of one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// A secret is configured on this side.
    pub secret: bool,
    /// Fresh per connection.
    pub nonce: [u8; 16],
    /// The node id.
    pub node: String,
}

/// The preamble.
pub fn preamble() -> [u8; 5] {
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION]
}

/// Checks a received preamble.
pub fn check_preamble(p: &[u8; 5]) -> Result<(), WireError> {
    let magic = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if p[4] != VERSION {
        return Err(WireError::Version(p[4]));
    }
    Ok(())
}

/// Appends one frame (`type`, `body`, optional seal) to `out`.
pub fn frame(out: &mut Vec<u8>, ty: u8, body: &[u8], seal: Option<&[u8; SEAL]>) {
    let len = 1 + body.len() + seal.map_or(0, |s| s.len());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(ty);
    out.extend_from_slice(body);
    if let Some(s) = seal {
        out.extend_from_slice(s);
    }
}

/// Validates a frame length read from the wire.
pub fn check_len(len: u32) -> Result<usize, WireError> {
    let len = len as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::Length(len));
    }
    Ok(len)
}

/// HELLO's body.
pub fn encode_hello(h: &Hello) -> Vec<u8> {
    let id = h.node.as_bytes();
    let mut b = Vec::with_capacity(18 + id.len());
    b.push(u8::from(h.secret));
    b.extend_from_slice(&h.nonce);
    b.push(id.len() as u8);
    b.extend_from_slice(id);
    b
}

/// Parses HELLO's body.
pub fn decode_hello(b: &[u8]) -> Result<Hello, WireError> {
    let bad = WireError::Malformed("HELLO");
    if b.len() < 18 || b[0] > 1 {
        return Err(bad);
    }
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&b[1..17]);
    let n = usize::from(b[17]);
    if b.len() != 18 + n || n == 0 {
        return Err(bad);
    }
    let node = std::str::from_utf8(&b[18..]).map_err(|_| WireError::Malformed("HELLO"))?;
    Ok(Hello {
        secret: b[0] == 1,
        nonce,
        node: node.to_string(),
    })
}

/// What both sides agree on after the HELLOs: the transcript and, with a secret, the keys.
pub struct Session {
    transcript: Vec<u8>,
    secret: Option<Vec<u8>>,
    seal_key: Option<Vec<u8>>,
}

impl Session {
    /// From the dialer's and the listener's HELLO. Refuses a link where only one side has a
    /// secret: one side would otherwise accept unauthenticated pokes.
    pub fn new(secret: Option<&[u8]>, dialer: &Hello, listener: &Hello) -> Result<Self, WireError> {
        // Our own flag is in our own HELLO, so the two flags say everything.
        if dialer.secret != listener.secret {
            return Err(WireError::SecretMismatch {
                dialer: dialer.secret,
                listener: listener.secret,
            });
        }
        let mut t = b"ddpush-peer-1".to_vec();
        t.extend_from_slice(&dialer.nonce);
        t.extend_from_slice(&listener.nonce);
        for id in [&dialer.node, &listener.node] {
            t.push(id.len() as u8);
            t.extend_from_slice(id.as_bytes());
        }
        let seal_key = secret.map(|s| mac(s, &[b"session", t.as_slice()]).to_vec());
        Ok(Session {
            transcript: t,
            secret: secret.map(<[u8]>::to_vec),
            seal_key,
        })
    }

    /// This side's AUTH body (32 zero bytes when no secret is in use).
    pub fn proof(&self, dialer: bool) -> [u8; 32] {
        match &self.secret {
            None => [0; 32],
            Some(s) => mac(s, &[role(dialer), &self.transcript]),
        }
    }

    /// Checks the other side's AUTH body, in constant time.
    pub fn verify(&self, dialer: bool, body: &[u8]) -> Result<(), WireError> {
        let Some(s) = &self.secret else {
            return if body.len() == 32 {
                Ok(())
            } else {
                Err(WireError::Malformed("AUTH"))
            };
        };
        let mut m = HmacSha256::new_from_slice(s).map_err(|_| WireError::BadProof)?;
        m.update(role(dialer));
        m.update(&self.transcript);
        m.verify_slice(body).map_err(|_| WireError::BadProof)
    }

    /// The seal of message `seq` from the dialer (the only direction messages travel).
    pub fn seal(&self, seq: u64, body: &[u8]) -> Option<[u8; SEAL]> {
        let k = self.seal_key.as_ref()?;
        let full = mac(k, &[b"d", &seq.to_be_bytes(), body]);
        let mut s = [0u8; SEAL];
        s.copy_from_slice(&full[..SEAL]);
        Some(s)
    }

    /// Splits a received MSG frame's content into body and checks its seal.
    pub fn open<'a>(&self, seq: u64, content: &'a [u8]) -> Result<&'a [u8], WireError> {
        let Some(k) = &self.seal_key else {
            return Ok(content);
        };
        if content.len() < SEAL {
            return Err(WireError::BadSeal);
        }
        let (body, seal) = content.split_at(content.len() - SEAL);
        let mut m = HmacSha256::new_from_slice(k).map_err(|_| WireError::BadSeal)?;
        m.update(b"d");
        m.update(&seq.to_be_bytes());
        m.update(body);
        m.verify_truncated_left(seal)
            .map_err(|_| WireError::BadSeal)?;
        Ok(body)
    }
}

fn role(dialer: bool) -> &'static [u8] {
    if dialer {
        b"dialer"
    } else {
        b"listener"
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(secret: bool, n: u8, node: &str) -> Hello {
        Hello {
            secret,
            nonce: [n; 16],
            node: node.into(),
        }
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = hello(true, 7, "node-a");
        assert_eq!(decode_hello(&encode_hello(&h)), Ok(h));
        assert!(decode_hello(b"").is_err());
        assert!(decode_hello(&[2; 30]).is_err());
        let mut b = encode_hello(&hello(false, 1, "x"));
        b.push(0);
        assert!(decode_hello(&b).is_err(), "trailing bytes");
    }

    #[test]
    fn preamble_names_what_is_wrong() {
        assert_eq!(check_preamble(&preamble()), Ok(()));
        assert_eq!(check_preamble(b"GET /"), Err(WireError::BadMagic(*b"GET ")));
        assert_eq!(check_preamble(b"DDPK\x02"), Err(WireError::Version(2)));
        assert!(check_len(0).is_err());
        assert!(check_len(MAX_FRAME as u32 + 1).is_err());
    }

    #[test]
    fn the_right_secret_proves_itself_and_a_wrong_one_does_not() {
        let (d, l) = (hello(true, 1, "a"), hello(true, 2, "b"));
        let sd = Session::new(Some(b"s3cret"), &d, &l).expect("session");
        let sl = Session::new(Some(b"s3cret"), &d, &l).expect("session");
        assert_eq!(sl.verify(true, &sd.proof(true)), Ok(()));
        assert_eq!(sd.verify(false, &sl.proof(false)), Ok(()));
        // A dialer's proof is no listener's proof (no reflection).
        assert_eq!(sd.verify(false, &sd.proof(true)), Err(WireError::BadProof));
        let wrong = Session::new(Some(b"other"), &d, &l).expect("session");
        assert_eq!(
            sl.verify(true, &wrong.proof(true)),
            Err(WireError::BadProof)
        );
        // Another connection (other nonces) does not accept this one's proof.
        let other = Session::new(Some(b"s3cret"), &hello(true, 9, "a"), &l).expect("session");
        assert_eq!(
            other.verify(true, &sd.proof(true)),
            Err(WireError::BadProof)
        );
    }

    #[test]
    fn only_one_side_with_a_secret_is_refused() {
        let r = Session::new(Some(b"s"), &hello(false, 1, "a"), &hello(true, 2, "b"));
        assert!(matches!(r, Err(WireError::SecretMismatch { .. })));
        let r = Session::new(None, &hello(false, 1, "a"), &hello(true, 2, "b"));
        assert_eq!(
            r.err(),
            Some(WireError::SecretMismatch {
                dialer: false,
                listener: true
            })
        );
        assert!(Session::new(None, &hello(false, 1, "a"), &hello(false, 2, "b")).is_ok());
    }

    #[test]
    fn seals_stop_tampering_replay_and_reordering() {
        let (d, l) = (hello(true, 1, "a"), hello(true, 2, "b"));
        let s = Session::new(Some(b"k"), &d, &l).expect("session");
        let mut c = b"poke".to_vec();
        c.extend_from_slice(&s.seal(0, b"poke").expect("sealed"));
        assert_eq!(s.open(0, &c), Ok(&b"poke"[..]));
        assert_eq!(
            s.open(1, &c),
            Err(WireError::BadSeal),
            "replayed as the next"
        );
        c[0] ^= 1;
        assert_eq!(s.open(0, &c), Err(WireError::BadSeal), "tampered");
        let plain =
            Session::new(None, &hello(false, 1, "a"), &hello(false, 2, "b")).expect("session");
        assert_eq!(plain.seal(0, b"x"), None);
        assert_eq!(plain.open(5, b"x"), Ok(&b"x"[..]));
    }
}
