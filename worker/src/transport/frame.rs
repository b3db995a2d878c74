//! The TCP data plane's wire format: a fixed 24-byte little-endian header, then the payload.
//!
//! ```text
//! offset  size  field
//!  0      4     magic   b"HERD"
//!  4      2     version u16 = 1
//!  6      1     kind    1 hello, 2 all_to_all_v data, 3 barrier, 4 reject
//!  7      1     flags   must be 0 (room for later use without a version bump)
//!  8      8     seq     u64, collective sequence number (0 during the handshake, then 1, 2, ...)
//! 16      8     len     u64, payload bytes that follow
//! ```
//!
//! Every field is checked before anything is allocated, so a stray or hostile peer can at most
//! make a receiver allocate `max_len` bytes, and only by actually sending them.
//!
//! The handshake payload ([`Hello`]) is `world u32, rank u32, token_len u32, token` and is
//! exchanged once per connection, the connecting (higher) rank first. A rejected connection gets
//! a `reject` frame whose payload is the reason in UTF-8, then is closed.

use std::fmt;

use super::Collective;

pub const MAGIC: [u8; 4] = *b"HERD";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
/// Longest cluster token a [`Hello`] may carry.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Largest handshake payload (a hello or a reject reason): what setup reads before it trusts the
/// peer.
pub const MAX_HANDSHAKE_BYTES: u64 = 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Data = 2,
    Barrier = 3,
    Reject = 4,
}

impl FrameKind {
    fn from_u8(byte: u8) -> Option<FrameKind> {
        match byte {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Data),
            3 => Some(FrameKind::Barrier),
            4 => Some(FrameKind::Reject),
            _ => None,
        }
    }

    /// The collective a data-plane frame belongs to; `None` for handshake frames.
    pub fn collective(self) -> Option<Collective> {
        match self {
            FrameKind::Data => Some(Collective::AllToAll),
            FrameKind::Barrier => Some(Collective::Barrier),
            FrameKind::Hello | FrameKind::Reject => None,
        }
    }

    pub fn for_collective(op: Collective) -> FrameKind {
        match op {
            Collective::AllToAll => FrameKind::Data,
            Collective::Barrier => FrameKind::Barrier,
        }
    }
}

/// A decoded, validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub seq: u64,
    pub len: u64,
}

/// Why a header was refused. The receiver turns it into [`super::TransportError::Malformed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic([u8; 4]),
    BadVersion(u16),
    BadKind(u8),
    BadFlags(u8),
    TooLong { len: u64, max: u64 },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::BadMagic(m) => write!(f, "bad magic {m:02x?} (expected {MAGIC:02x?}, \"HERD\")"),
            HeaderError::BadVersion(v) => write!(f, "protocol version {v}, this build speaks {VERSION}"),
            HeaderError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            HeaderError::BadFlags(x) => write!(f, "reserved flags byte is {x:#04x}, must be 0"),
            HeaderError::TooLong { len, max } => write!(f, "payload of {len} bytes exceeds the limit of {max}"),
        }
    }
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[7] = 0;
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Parses and checks a header; `max_len` bounds the payload length.
    pub fn decode(bytes: &[u8; HEADER_LEN], max_len: u64) -> Result<FrameHeader, HeaderError> {
        let [m0, m1, m2, m3, v0, v1, kind, flags, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3, l4, l5, l6, l7] =
            *bytes;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version != VERSION {
            return Err(HeaderError::BadVersion(version));
        }
        let kind = FrameKind::from_u8(kind).ok_or(HeaderError::BadKind(kind))?;
        if flags != 0 {
            return Err(HeaderError::BadFlags(flags));
        }
        let seq = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let len = u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]);
        if len > max_len {
            return Err(HeaderError::TooLong { len, max: max_len });
        }
        Ok(FrameHeader { kind, seq, len })
    }
}

/// The handshake: who is connecting, to which group.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub world: u32,
    pub rank: u32,
    pub token: Vec<u8>,
}

impl fmt::Debug for Hello {
    // The token may be a shared secret; keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("world", &self.world)
            .field("rank", &self.rank)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .finish()
    }
}

impl Hello {
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.token.len());
        out.extend_from_slice(&self.world.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&(self.token.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.token);
        out
    }

    /// Header and payload, ready to write.
    pub fn encode_frame(&self) -> Vec<u8> {
        let payload = self.encode_payload();
        let mut out = FrameHeader { kind: FrameKind::Hello, seq: 0, len: payload.len() as u64 }.encode().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    pub fn decode_payload(payload: &[u8]) -> Result<Hello, String> {
        let word = |at: usize| -> Result<u32, String> {
            payload
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| format!("hello of {} bytes is too short", payload.len()))
        };
        let (world, rank, token_len) = (word(0)?, word(4)?, word(8)? as usize);
        if token_len > MAX_TOKEN_BYTES {
            return Err(format!("hello token of {token_len} bytes exceeds {MAX_TOKEN_BYTES}"));
        }
        if payload.len() != 12 + token_len {
            return Err(format!(
                "hello of {} bytes, expected {} for a {token_len}-byte token",
                payload.len(),
                12 + token_len
            ));
        }
        Ok(Hello { world, rank, token: payload[12..].to_vec() })
    }
}

/// A reject frame carrying `reason`, cut to fit [`MAX_HANDSHAKE_BYTES`].
pub fn encode_reject(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_HANDSHAKE_BYTES as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let payload = &reason.as_bytes()[..end];
    let mut out = FrameHeader { kind: FrameKind::Reject, seq: 0, len: payload.len() as u64 }.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Compares two tokens in time that depends only on their lengths, so that a prober cannot
/// find a secret token byte by byte.
pub fn tokens_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: FrameKind, seq: u64, len: u64) -> [u8; HEADER_LEN] {
        FrameHeader { kind, seq, len }.encode()
    }

    #[test]
    fn header_round_trips_in_the_documented_layout() {
        let bytes = header(FrameKind::Barrier, 0x0102_0304_0506_0708, 42);
        assert_eq!(&bytes[0..4], b"HERD");
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(bytes[6], 3);
        assert_eq!(bytes[7], 0);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[16..24], &[42, 0, 0, 0, 0, 0, 0, 0]);
        let back = FrameHeader::decode(&bytes, 42).expect("valid");
        assert_eq!(back, FrameHeader { kind: FrameKind::Barrier, seq: 0x0102_0304_0506_0708, len: 42 });
    }

    #[test]
    fn every_bad_field_is_named() {
        let good = header(FrameKind::Data, 1, 10);
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(FrameHeader::decode(&bad, 100), Err(HeaderError::BadMagic(_))));
        let mut bad = good;
        bad[4] = 2;
        assert_eq!(FrameHeader::decode(&bad, 100), Err(HeaderError::BadVersion(2)));
        let mut bad = good;
        bad[6] = 9;
        assert_eq!(FrameHeader::decode(&bad, 100), Err(HeaderError::BadKind(9)));
        let mut bad = good;
        bad[6] = 0;
        assert_eq!(FrameHeader::decode(&bad, 100), Err(HeaderError::BadKind(0)));
        let mut bad = good;
        bad[7] = 1;
        assert_eq!(FrameHeader::decode(&bad, 100), Err(HeaderError::BadFlags(1)));
        assert_eq!(FrameHeader::decode(&good, 9), Err(HeaderError::TooLong { len: 10, max: 9 }));
        let huge = header(FrameKind::Data, 1, u64::MAX);
        assert!(FrameHeader::decode(&huge, 1 << 30).expect_err("too long").to_string().contains("exceeds"));
    }

    #[test]
    fn kinds_map_to_collectives() {
        for op in [Collective::AllToAll, Collective::Barrier] {
            assert_eq!(FrameKind::for_collective(op).collective(), Some(op));
        }
        assert_eq!(FrameKind::Hello.collective(), None);
        assert_eq!(FrameKind::Reject.collective(), None);
    }

    #[test]
    fn hello_round_trips_and_rejects_bad_lengths() {
        let hello = Hello { world: 4, rank: 3, token: b"cluster-a".to_vec() };
        let frame = hello.encode_frame();
        let head = FrameHeader::decode(&frame[..HEADER_LEN].try_into().expect("24 bytes"), MAX_HANDSHAKE_BYTES)
            .expect("valid header");
        assert_eq!(head, FrameHeader { kind: FrameKind::Hello, seq: 0, len: 21 });
        assert_eq!(Hello::decode_payload(&frame[HEADER_LEN..]), Ok(hello.clone()));
        let payload = hello.encode_payload();
        assert!(Hello::decode_payload(&payload[..7]).is_err());
        assert!(Hello::decode_payload(&payload[..payload.len() - 1]).is_err());
        let mut long = payload.clone();
        long.push(0);
        assert!(Hello::decode_payload(&long).is_err());
        let mut huge_token = payload;
        huge_token[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Hello::decode_payload(&huge_token).expect_err("token too long").contains("exceeds"));
        assert!(!format!("{hello:?}").contains("cluster-a"), "the token stays out of Debug");
    }

    #[test]
    fn reject_reason_is_bounded_and_valid_utf8() {
        let reason = "é".repeat(1000);
        let frame = encode_reject(&reason);
        let payload = &frame[HEADER_LEN..];
        assert!(payload.len() <= MAX_HANDSHAKE_BYTES as usize);
        assert!(std::str::from_utf8(payload).is_ok());
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"abc", b"abc"));
        assert!(tokens_match(b"", b""));
        assert!(!tokens_match(b"abc", b"abd"));
        assert!(!tokens_match(b"abc", b"abcd"));
    }
}
