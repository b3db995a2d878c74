//! Frame encoding and every way a frame can be wrong, over in-memory readers.

use std::collections::BTreeMap;
use std::io::Cursor;

use serde::Deserialize;

use super::*;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Msg {
    Ping(u64),
    Text { id: u32, body: String },
    Blob(Vec<u8>),
    Map(BTreeMap<String, Vec<f32>>),
}

fn frame_bytes(codec: &FrameCodec, msg: &Msg) -> Vec<u8> {
    codec.encode(msg).expect("encode")
}

/// A reader that counts what was taken from it.
struct Counting<R> {
    inner: R,
    taken: usize,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.taken += n;
        Ok(n)
    }
}

#[test]
fn frames_round_trip_in_order_then_end_cleanly() {
    let codec = FrameCodec::default();
    let msgs = vec![
        Msg::Ping(7),
        Msg::Text { id: 1, body: "héllo".into() },
        Msg::Blob(vec![0xab; 100_000]),
        Msg::Map(BTreeMap::from([("a".into(), vec![1.5, -2.0]), ("b".into(), vec![])])),
    ];
    let mut wire = Vec::new();
    for msg in &msgs {
        codec.write_frame_sync(&mut wire, msg).expect("write");
    }
    assert_eq!(&wire[..4], b"HRDC");
    assert_eq!(u16::from_be_bytes([wire[4], wire[5]]), PROTOCOL_VERSION);
    let mut input = Cursor::new(wire);
    for msg in &msgs {
        assert_eq!(codec.read_frame_sync::<Msg, _>(&mut input).expect("read").as_ref(), Some(msg));
    }
    assert_eq!(codec.read_frame_sync::<Msg, _>(&mut input).expect("end"), None);
}

#[test]
fn a_version_mismatch_names_both_versions() {
    let codec = FrameCodec::default();
    let mut wire = frame_bytes(&codec, &Msg::Ping(1));
    wire[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(wire)).expect_err("version");
    assert!(matches!(err, NetError::Version { ours: PROTOCOL_VERSION, theirs } if theirs == PROTOCOL_VERSION + 1));
}

#[test]
fn bad_magic_is_refused() {
    let codec = FrameCodec::default();
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(b"GET / HTTP/1.1\r\n".to_vec())).expect_err("magic");
    assert!(matches!(err, NetError::BadMagic { found } if &found == b"GET "), "{err}");
}

#[test]
fn an_over_long_length_is_refused_before_reading_or_allocating_the_payload() {
    let codec = FrameCodec::new(1 << 20);
    let mut header = Vec::from(MAGIC);
    header.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    header.extend_from_slice(&[0; 64]);
    let mut input = Counting { inner: Cursor::new(header), taken: 0 };
    let err = codec.read_frame_sync::<Msg, _>(&mut input).expect_err("too long");
    assert!(matches!(err, NetError::TooLong { len, max } if len == u64::from(u32::MAX) && max == 1 << 20), "{err}");
    assert_eq!(input.taken, HEADER_LEN, "nothing past the header was read");

    // The sender refuses to emit such a frame in the first place.
    let err = FrameCodec::new(1000).encode(&Msg::Blob(vec![0; 1000])).expect_err("encode too long");
    assert!(matches!(err, NetError::TooLong { max: 1000, .. }), "{err}");
    assert_eq!(FrameCodec::new(u32::MAX).max_len(), MAX_FRAME_LEN);
}

#[test]
fn truncated_frames_are_errors_not_clean_ends() {
    let codec = FrameCodec::default();
    let wire = frame_bytes(&codec, &Msg::Text { id: 3, body: "truncate me".into() });
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(&wire[..4])).expect_err("short header");
    assert!(matches!(err, NetError::Truncated { expected: HEADER_LEN, got: 4 }), "{err}");
    let cut = wire.len() - 3;
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(&wire[..cut])).expect_err("short payload");
    assert!(matches!(err, NetError::Truncated { expected, got } if expected == wire.len() && got == cut), "{err}");
}

#[test]
fn undecodable_payloads_are_errors() {
    let codec = FrameCodec::default();
    let with_payload = |payload: &[u8]| {
        let mut wire = Vec::from(MAGIC);
        wire.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        wire.extend_from_slice(payload);
        wire
    };
    // An unknown enum variant.
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(with_payload(&[9]))).expect_err("variant");
    assert!(matches!(err, NetError::Decode(_)), "{err}");
    // Bytes left over after a complete message.
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(with_payload(&[0, 7, 0]))).expect_err("trailing");
    assert!(matches!(err, NetError::Decode(ref m) if m.contains("left over")), "{err}");
    // A string that claims 2^40 bytes: refused by the decode limit, not by the allocator.
    let huge = [1, 1, 0xfd, 0, 0, 0, 0, 0, 1, 0, 0];
    let err = codec.read_frame_sync::<Msg, _>(&mut Cursor::new(with_payload(&huge))).expect_err("huge string");
    assert!(matches!(err, NetError::Decode(_)), "{err}");
    // An empty payload is a valid `()`, the opening frame of a channel.
    assert_eq!(codec.read_frame_sync::<(), _>(&mut Cursor::new(with_payload(&[]))).expect("unit"), Some(()));
}
