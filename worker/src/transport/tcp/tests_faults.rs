//! A real rank 0 against a hand-driven rank 1 (a raw socket): malformed frames, wrong
//! sequence numbers, truncation, and handshakes that must be refused.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::tests::{group, group_with, in_secs};
use super::*;
use crate::transport::Transport;
use crate::transport::frame::{FrameHeader, FrameKind, HEADER_LEN, Hello, MAGIC};

const TOKEN: &[u8] = b"cluster-a";

fn opts() -> TcpOptions {
    TcpOptions { cluster_token: TOKEN.to_vec(), max_frame_bytes: 1 << 20, ..TcpOptions::default() }
}

/// Starts rank 0 of a world-2 group in a thread; returns it and its address.
fn start_rank0(opts: TcpOptions, deadline: Instant) -> (JoinHandle<Result<TcpTransport, TransportError>>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Rank 1's address is never dialed: rank 0 only accepts.
    let peers = vec![addr, "127.0.0.1:9".parse().expect("addr")];
    (thread::spawn(move || TcpTransport::connect(0, 2, &peers, listener, opts, deadline)), addr)
}

/// Sends `hello` on a fresh connection to `addr`; returns the socket and the reply frame.
fn raw_hello(addr: SocketAddr, hello: &Hello) -> (TcpStream, FrameHeader, Vec<u8>) {
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    sock.write_all(&hello.encode_frame()).expect("send hello");
    let (header, payload) = read_frame(&mut sock);
    (sock, header, payload)
}

fn read_frame(sock: &mut TcpStream) -> (FrameHeader, Vec<u8>) {
    let mut head = [0u8; HEADER_LEN];
    sock.read_exact(&mut head).expect("reply header");
    let header = FrameHeader::decode(&head, 1 << 20).expect("valid reply");
    let mut payload = vec![0u8; header.len as usize];
    sock.read_exact(&mut payload).expect("reply payload");
    (header, payload)
}

/// A connected (real rank 0, raw rank 1) pair.
fn real_and_raw() -> (TcpTransport, TcpStream) {
    let (rank0, addr) = start_rank0(opts(), in_secs(10));
    let (sock, header, payload) = raw_hello(addr, &Hello { world: 2, rank: 1, token: TOKEN.to_vec() });
    assert_eq!(header.kind, FrameKind::Hello);
    assert_eq!(Hello::decode_payload(&payload), Ok(Hello { world: 2, rank: 0, token: TOKEN.to_vec() }));
    (rank0.join().expect("rank 0 thread").expect("rank 0 setup"), sock)
}

/// Rank 1 sends `bytes` (and closes if `close`); returns what rank 0's next all_to_all_v says
/// and how long it took, after checking that the transport is poisoned afterwards.
fn rank0_after(bytes: &[u8], close: bool) -> (TransportError, Duration) {
    let (mut rank0, mut sock) = real_and_raw();
    sock.write_all(bytes).expect("raw send");
    thread::spawn(move || {
        if close {
            // Take rank 0's frame first: closing with unread data would reset the connection,
            // and the reset could overtake the bytes we mean rank 0 to see.
            let _ = read_frame(&mut sock);
        } else {
            // Keep the socket open until rank 0 has judged the frame.
            thread::sleep(Duration::from_secs(3));
        }
        drop(sock);
    });
    let started = Instant::now();
    let err = rank0.all_to_all_v(vec![vec![1, 2, 3], vec![4, 5]], in_secs(10)).expect_err("rank 1 misbehaves");
    let took = started.elapsed();
    let again = rank0.barrier(in_secs(10)).expect_err("poisoned");
    assert_eq!(again, TransportError::Poisoned(Box::new(err.clone())));
    (err, took)
}

fn header(kind: FrameKind, seq: u64, len: u64) -> Vec<u8> {
    FrameHeader { kind, seq, len }.encode().to_vec()
}

#[test]
fn bad_magic_is_malformed() {
    let mut bytes = header(FrameKind::Data, 1, 0);
    bytes[..4].copy_from_slice(b"GET ");
    let (err, took) = rank0_after(&bytes, false);
    assert!(matches!(&err, TransportError::Malformed { peer: 1, reason } if reason.contains("bad magic")), "{err}");
    assert!(took < Duration::from_secs(2));
    assert_ne!(&bytes[..4], &MAGIC);
}

#[test]
fn frame_longer_than_the_limit_is_malformed_before_allocation() {
    for len in [(1 << 20) + 1, u64::MAX] {
        let (err, _) = rank0_after(&header(FrameKind::Data, 1, len), false);
        assert!(matches!(&err, TransportError::Malformed { peer: 1, reason } if reason.contains("exceeds")), "{err}");
    }
}

#[test]
fn truncated_payload_then_close_is_peer_lost_with_the_count() {
    let mut bytes = header(FrameKind::Data, 1, 1000);
    bytes.extend_from_slice(&[7u8; 500]);
    let (err, took) = rank0_after(&bytes, true);
    match &err {
        TransportError::PeerLost { peer: 1, reason } => {
            assert!(reason.contains("500 of 1000 payload bytes") && reason.contains("truncated"), "{reason}")
        }
        other => panic!("expected PeerLost, got {other}"),
    }
    assert!(took < Duration::from_secs(2));
}

#[test]
fn truncated_header_then_close_is_peer_lost() {
    let bytes = &header(FrameKind::Data, 1, 8)[..10];
    let (err, _) = rank0_after(bytes, true);
    assert!(
        matches!(&err, TransportError::PeerLost { peer: 1, reason } if reason.contains("10 of 24 header")),
        "{err}"
    );
}

#[test]
fn wrong_sequence_number_is_desync() {
    let (err, _) = rank0_after(&header(FrameKind::Data, 2, 0), false);
    let want = TransportError::Desync {
        peer: 1,
        expected: Collective::AllToAll,
        expected_seq: 1,
        got: Collective::AllToAll,
        got_seq: 2,
    };
    assert_eq!(err, want);
}

#[test]
fn barrier_frame_during_all_to_all_is_desync() {
    let (err, _) = rank0_after(&header(FrameKind::Barrier, 1, 0), false);
    assert!(matches!(err, TransportError::Desync { peer: 1, got: Collective::Barrier, .. }), "{err}");
}

#[test]
fn unknown_kind_version_flags_and_stray_hello_are_malformed() {
    let good = header(FrameKind::Data, 1, 0);
    let mut kind = good.clone();
    kind[6] = 77;
    let mut version = good.clone();
    version[4] = 9;
    let mut flags = good.clone();
    flags[7] = 1;
    let hello = Hello { world: 2, rank: 1, token: TOKEN.to_vec() }.encode_frame();
    for (bytes, needle) in [(kind, "kind"), (version, "version"), (flags, "flags"), (hello, "Hello")] {
        let (err, _) = rank0_after(&bytes, false);
        assert!(matches!(&err, TransportError::Malformed { peer: 1, reason } if reason.contains(needle)), "{err}");
    }
}

#[test]
fn good_raw_frames_are_accepted() {
    // The raw peer speaks the documented format by hand: the layout is the contract.
    let (mut rank0, mut sock) = real_and_raw();
    let mut bytes = header(FrameKind::Data, 1, 3);
    bytes.extend_from_slice(b"abc");
    bytes.extend_from_slice(&header(FrameKind::Barrier, 2, 0));
    sock.write_all(&bytes).expect("send");
    let recv = rank0.all_to_all_v(vec![Vec::new(), b"xyz!".to_vec()], in_secs(10)).expect("exchange");
    assert_eq!(recv, vec![Vec::new(), b"abc".to_vec()]);
    rank0.barrier(in_secs(10)).expect("barrier");
    let (h, payload) = read_frame(&mut sock);
    assert_eq!((h.kind, h.seq, payload.as_slice()), (FrameKind::Data, 1, b"xyz!".as_slice()));
    let (h, payload) = read_frame(&mut sock);
    assert_eq!((h.kind, h.seq, payload.len()), (FrameKind::Barrier, 2, 0));
}

#[test]
fn strays_are_refused_and_setup_goes_on() {
    let (rank0, addr) =
        start_rank0(TcpOptions { handshake_timeout: Duration::from_millis(300), ..opts() }, in_secs(10));
    // Garbage: refused with the reason.
    let mut garbage = TcpStream::connect(addr).expect("connect");
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let (h, reason) = read_frame(&mut garbage);
    assert_eq!(h.kind, FrameKind::Reject);
    assert!(String::from_utf8_lossy(&reason).contains("bad magic"), "{}", String::from_utf8_lossy(&reason));
    // Wrong token, wrong world, a rank that must not dial rank 0: each refused.
    for (hello, needle) in [
        (Hello { world: 2, rank: 1, token: b"cluster-b".to_vec() }, "wrong cluster token"),
        (Hello { world: 3, rank: 1, token: TOKEN.to_vec() }, "group of 3"),
        (Hello { world: 2, rank: 0, token: TOKEN.to_vec() }, "may not dial"),
    ] {
        let (_sock, h, reason) = raw_hello(addr, &hello);
        assert_eq!(h.kind, FrameKind::Reject);
        assert!(String::from_utf8_lossy(&reason).contains(needle), "{}", String::from_utf8_lossy(&reason));
    }
    // A silent stray holds setup up for the handshake timeout only.
    let _silent = TcpStream::connect(addr).expect("connect");
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let (_sock, h, _) = raw_hello(addr, &Hello { world: 2, rank: 1, token: TOKEN.to_vec() });
    assert_eq!(h.kind, FrameKind::Hello);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    rank0.join().expect("rank 0 thread").expect("the real rank 1 got in");
}

#[test]
fn wrong_token_fails_both_sides() {
    let deadline = Instant::now() + Duration::from_millis(1500);
    let listeners: Vec<_> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let peers = peers.clone();
            let token = if rank == 0 { TOKEN.to_vec() } else { b"cluster-b".to_vec() };
            let opts = TcpOptions { cluster_token: token, ..TcpOptions::default() };
            thread::spawn(move || TcpTransport::connect(rank, 2, &peers, listener, opts, deadline))
        })
        .collect();
    let mut results = handles.into_iter().map(|h| h.join().expect("thread"));
    let zero = results.next().expect("rank 0").expect_err("rank 0 never gets a valid rank 1");
    let one = results.next().expect("rank 1").expect_err("rank 1 is refused");
    assert!(
        matches!(&zero, TransportError::Setup { peer: Some(1), reason } if reason.contains("wrong cluster token")),
        "{zero}"
    );
    assert!(
        matches!(&one, TransportError::Setup { peer: Some(0), reason } if reason.contains("refused by the peer")),
        "{one}"
    );
}

#[test]
fn dialer_checks_the_acceptors_reply() {
    // A fake rank 0 that answers with another cluster's token.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let peers = vec![listener.local_addr().expect("addr"), "127.0.0.1:0".parse().expect("addr")];
    let fake = thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        let mut head = [0u8; HEADER_LEN];
        sock.read_exact(&mut head).expect("hello header");
        let h = FrameHeader::decode(&head, 1024).expect("hello");
        let mut payload = vec![0u8; h.len as usize];
        sock.read_exact(&mut payload).expect("hello payload");
        sock.write_all(&Hello { world: 2, rank: 0, token: b"other".to_vec() }.encode_frame()).expect("reply");
        sock
    });
    let mine = TcpListener::bind("127.0.0.1:0").expect("bind");
    let err = TcpTransport::connect(1, 2, &peers, mine, opts(), in_secs(5)).expect_err("wrong reply");
    assert!(
        matches!(&err, TransportError::Setup { peer: Some(0), reason } if reason.contains("different cluster token"))
    );
    drop(fake.join().expect("fake rank 0"));
}

#[test]
fn groups_with_matching_tokens_work() {
    let mut g = group_with(2, |_| opts());
    let mut one = g.pop().expect("rank 1");
    let mut zero = g.pop().expect("rank 0");
    let t = thread::spawn(move || zero.all_to_all_v(vec![Vec::new(), vec![9]], in_secs(10)));
    assert_eq!(one.all_to_all_v(vec![vec![8], Vec::new()], in_secs(10)).expect("exchange")[0], vec![9]);
    assert_eq!(t.join().expect("rank 0").expect("exchange")[1], vec![8]);
    drop(group(1, opts()));
}
