//! Length-bounded, version-tagged message frames over QUIC streams (and any `Read`/`Write`).
//!
//! A frame is a fixed 10-byte header followed by the payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `b"HRDC"` |
//! | 4..6 | protocol version, u16 big-endian ([`PROTOCOL_VERSION`]) |
//! | 6..10 | payload length in bytes, u32 big-endian |
//! | 10.. | the message, bincode 2 serde encoding with `config::standard()` |
//!
//! The reader checks the magic, then the version (a mismatch is [`NetError::Version`]), then the
//! length against the codec's `max_len` *before* allocating anything, so a hostile or confused
//! peer can make it allocate at most `max_len` bytes for the payload. Inside the payload, bincode
//! runs with a decode limit ([`DECODE_LIMIT`]) so a forged length prefix of a string cannot make
//! it reserve gigabytes either; a payload must decode to exactly one message, with no bytes left
//! over. A stream that ends cleanly between frames reads as `None`; one that ends inside a frame
//! is [`NetError::Truncated`]. Nothing here panics on bad input.

use std::io::{ErrorKind, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::NetError;

/// The start of every frame.
pub const MAGIC: [u8; 4] = *b"HRDC";
/// The version of herd's message protocol. Bump it when any message type changes shape.
pub const PROTOCOL_VERSION: u16 = 3;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 10;
/// The default payload limit: ample for control messages.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 16 << 20;
/// The largest payload limit a codec accepts.
pub const MAX_FRAME_LEN: u32 = 256 << 20;
/// The most bytes bincode may claim while decoding one payload (strings, sequences, fields).
pub const DECODE_LIMIT: usize = 1 << 30;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes and decodes frames with a payload limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCodec {
    max_len: u32,
}

impl Default for FrameCodec {
    fn default() -> FrameCodec {
        FrameCodec { max_len: DEFAULT_MAX_FRAME_LEN }
    }
}

impl FrameCodec {
    /// A codec whose frames carry at most `max_len` payload bytes (clamped to [`MAX_FRAME_LEN`]).
    pub const fn new(max_len: u32) -> FrameCodec {
        FrameCodec { max_len: if max_len > MAX_FRAME_LEN { MAX_FRAME_LEN } else { max_len } }
    }

    /// The payload limit.
    pub const fn max_len(&self) -> u32 {
        self.max_len
    }

    /// One whole frame (header and payload) for `msg`. A message whose encoding exceeds the limit
    /// is refused here, so a sender never emits a frame its peer would reject.
    pub fn encode<T: Serialize + ?Sized>(&self, msg: &T) -> Result<Vec<u8>, NetError> {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0; HEADER_LEN]);
        bincode::serde::encode_into_std_write(msg, &mut buf, bincode_config())?;
        let len = buf.len() - HEADER_LEN;
        let len32 = u32::try_from(len)
            .ok()
            .filter(|&l| l <= self.max_len)
            .ok_or(NetError::TooLong { len: len as u64, max: self.max_len })?;
        buf[..4].copy_from_slice(&MAGIC);
        buf[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        buf[6..10].copy_from_slice(&len32.to_be_bytes());
        Ok(buf)
    }

    /// Checks a header and returns its payload length.
    pub fn parse_header(&self, header: &[u8; HEADER_LEN]) -> Result<usize, NetError> {
        let [m0, m1, m2, m3, v0, v1, l0, l1, l2, l3] = *header;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(NetError::BadMagic { found: [m0, m1, m2, m3] });
        }
        let version = u16::from_be_bytes([v0, v1]);
        if version != PROTOCOL_VERSION {
            return Err(NetError::Version { ours: PROTOCOL_VERSION, theirs: version });
        }
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        if len > self.max_len {
            return Err(NetError::TooLong { len: u64::from(len), max: self.max_len });
        }
        Ok(len as usize)
    }

    /// Decodes one message that must fill `payload` exactly.
    pub fn decode<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, NetError> {
        let (msg, used) = bincode::serde::decode_from_slice(payload, bincode_config())?;
        if used != payload.len() {
            return Err(NetError::Decode(format!("{} bytes left over after the message", payload.len() - used)));
        }
        Ok(msg)
    }

    /// Writes one frame to a QUIC stream.
    pub async fn write_frame<T: Serialize + ?Sized>(
        &self,
        send: &mut quinn::SendStream,
        msg: &T,
    ) -> Result<(), NetError> {
        let frame = self.encode(msg)?;
        send.write_all(&frame).await?;
        Ok(())
    }

    /// Reads one frame from a QUIC stream; `None` when the stream finished between frames.
    pub async fn read_frame<T: DeserializeOwned>(&self, recv: &mut quinn::RecvStream) -> Result<Option<T>, NetError> {
        let mut header = [0u8; HEADER_LEN];
        match recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(got)) => {
                return Err(NetError::Truncated { expected: HEADER_LEN, got });
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let len = self.parse_header(&header)?;
        let mut payload = vec![0u8; len];
        match recv.read_exact(&mut payload).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(got)) => {
                return Err(NetError::Truncated { expected: HEADER_LEN + len, got: HEADER_LEN + got });
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        self.decode(&payload).map(Some)
    }

    /// Writes one frame to a blocking writer (pipes, files, tests).
    pub fn write_frame_sync<T: Serialize + ?Sized, W: Write>(&self, out: &mut W, msg: &T) -> Result<(), NetError> {
        out.write_all(&self.encode(msg)?)?;
        Ok(())
    }

    /// Reads one frame from a blocking reader; `None` at a clean end of input between frames.
    pub fn read_frame_sync<T: DeserializeOwned, R: Read>(&self, input: &mut R) -> Result<Option<T>, NetError> {
        let mut header = [0u8; HEADER_LEN];
        match read_full(input, &mut header)? {
            0 => return Ok(None),
            HEADER_LEN => {}
            got => return Err(NetError::Truncated { expected: HEADER_LEN, got }),
        }
        let len = self.parse_header(&header)?;
        let mut payload = vec![0u8; len];
        let got = read_full(input, &mut payload)?;
        if got < len {
            return Err(NetError::Truncated { expected: HEADER_LEN + len, got: HEADER_LEN + got });
        }
        self.decode(&payload).map(Some)
    }
}

/// Fills `buf` unless the input ends first; returns how many bytes were read.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<usize, NetError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
