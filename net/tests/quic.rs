//! herd-net end to end on 127.0.0.1: a CA on disk, mutual TLS over QUIC, framed channels.
//!
//! Every endpoint binds port 0. Each test bounds its waits, so a regression fails instead of
//! hanging.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_net::frame::{HEADER_LEN, MAGIC};
use herd_net::quic::{self, QuicOptions};
use herd_net::{Channel, FrameCodec, NetError, PROTOCOL_VERSION, TlsFiles, tls};
use serde::{Deserialize, Serialize};

const MAX_LEN: u32 = 1 << 20;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum ToCoord {
    Register { name: String, experts: Vec<(u16, u16)> },
    Tokens { seq: u64, ids: Vec<u32> },
    Blob { seq: u64, bytes: Vec<u8> },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum ToWorker {
    Welcome { epoch: u64 },
    Step { seq: u64, logits: Vec<f32> },
    Blob { seq: u64, bytes: Vec<u8> },
}

/// A fresh CA with one certificate per name (for 127.0.0.1 and localhost), loaded.
fn cluster(names: &[&str]) -> (tempfile::TempDir, Vec<TlsFiles>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    herd_net::init_ca(dir.path(), &hosts).expect("init CA");
    let files = names
        .iter()
        .map(|name| {
            herd_net::issue(dir.path(), name, &hosts).expect("issue");
            TlsFiles::load(dir.path(), name).expect("load")
        })
        .collect();
    (dir, files)
}

fn server(files: &TlsFiles) -> (quinn::Endpoint, SocketAddr) {
    let endpoint = quic::server_endpoint("127.0.0.1:0".parse().expect("addr"), files).expect("server endpoint");
    let addr = endpoint.local_addr().expect("local addr");
    (endpoint, addr)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), fut).await.unwrap_or_else(|_| panic!("{what} timed out"))
}

/// A blob whose encoded message is just under `MAX_LEN`.
fn big_blob(seq: u64) -> Vec<u8> {
    (0..MAX_LEN as usize - 32).map(|i| (i as u64 ^ seq) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_channel_carries_typed_messages_in_order_both_ways() {
    let (_dir, files) = cluster(&["coord-1", "worker-1"]);
    let (endpoint, addr) = server(&files[0]);
    let codec = FrameCodec::new(MAX_LEN);
    const N: u64 = 200;

    let server_task = tokio::spawn(async move {
        let conn = quic::accept(&endpoint).await.expect("endpoint open").expect("handshake");
        assert_eq!(herd_net::peer_identity(&conn).expect("identity"), "worker-1");
        let channel: Channel<ToWorker, ToCoord> = Channel::accept(&conn, codec).await.expect("accept channel");
        let (mut tx, mut rx) = channel.split();
        // Speak first, and concurrently with receiving.
        let sender = tokio::spawn(async move {
            tx.send(&ToWorker::Welcome { epoch: 3 }).await.expect("send");
            for seq in 0..N {
                tx.send(&ToWorker::Step { seq, logits: vec![seq as f32; 8] }).await.expect("send");
            }
            tx.send(&ToWorker::Blob { seq: N, bytes: big_blob(N) }).await.expect("send blob");
            tx.finish().expect("finish");
        });
        let mut got = Vec::new();
        while let Some(msg) = rx.recv().await.expect("recv") {
            got.push(msg);
        }
        sender.await.expect("sender task");
        // Keep the connection until the client has read everything: dropping the last handle
        // closes it at once, unsent data and all.
        (got, conn)
    });

    let client = quic::client_endpoint(&files[1]).expect("client endpoint");
    let conn = within("connect", quic::connect(&client, addr, "coord-1")).await.expect("connect");
    assert_eq!(herd_net::peer_identity(&conn).expect("identity"), "coord-1");
    let channel: Channel<ToCoord, ToWorker> = Channel::open(&conn, codec).await.expect("open channel");
    let (mut tx, mut rx) = channel.split();
    let mut sent = vec![ToCoord::Register { name: "worker-1".into(), experts: vec![(0, 1), (47, 127)] }];
    sent.extend((0..N).map(|seq| ToCoord::Tokens { seq, ids: (0..seq as u32 % 17).collect() }));
    sent.push(ToCoord::Blob { seq: N, bytes: big_blob(N + 1) });
    let to_send = sent.clone();
    let sender = tokio::spawn(async move {
        for msg in &to_send {
            tx.send(msg).await.expect("send");
        }
        tx.finish().expect("finish");
    });
    let mut received = Vec::new();
    while let Some(msg) = within("recv", rx.recv()).await.expect("recv") {
        received.push(msg);
    }
    within("client sender", sender).await.expect("sender task");

    assert_eq!(received.len(), N as usize + 2);
    assert_eq!(received[0], ToWorker::Welcome { epoch: 3 });
    for (seq, msg) in received[1..=N as usize].iter().enumerate() {
        assert_eq!(msg, &ToWorker::Step { seq: seq as u64, logits: vec![seq as f32; 8] });
    }
    assert_eq!(received[N as usize + 1], ToWorker::Blob { seq: N, bytes: big_blob(N) });

    let (got, _server_conn) = within("server", server_task).await.expect("server task");
    assert_eq!(got, sent);
    conn.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_refused_by_the_sender() {
    let (_dir, files) = cluster(&["coord-1", "worker-1"]);
    let (endpoint, addr) = server(&files[0]);
    let accept = tokio::spawn(async move { quic::accept(&endpoint).await.expect("open").expect("handshake") });
    let client = quic::client_endpoint(&files[1]).expect("client endpoint");
    let conn = within("connect", quic::connect(&client, addr, "127.0.0.1")).await.expect("connect by IP");
    let mut channel: Channel<Vec<u8>, ()> = Channel::open(&conn, FrameCodec::new(1024)).await.expect("open");
    let err = channel.send(&vec![0u8; 1024]).await.expect_err("too long");
    assert!(matches!(err, NetError::TooLong { max: 1024, .. }), "{err}");
    channel.send(&vec![0u8; 1000]).await.expect("fits");
    drop(within("accept", accept).await);
}

/// Starts a server with `server_files`, dials it with `dial`, and returns whether the client got
/// an answer to one message over a channel, and the server's verdict on the handshake.
async fn attempt(
    server_files: &TlsFiles,
    dial: impl FnOnce(SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = Result<quinn::Connection, NetError>> + Send>>,
) -> (Result<(), NetError>, Result<quinn::Connection, NetError>) {
    let (endpoint, addr) = server(server_files);
    let accept = tokio::spawn(async move {
        let verdict = quic::accept(&endpoint).await.expect("endpoint open");
        if let Ok(conn) = &verdict {
            // Would serve: answer one message.
            if let Ok(mut ch) = Channel::<u32, u32>::accept(conn, FrameCodec::default()).await
                && let Ok(Some(n)) = ch.recv().await
            {
                let _ = ch.send(&(n + 1)).await;
            }
        }
        verdict
    });
    async fn ask(conn: Result<quinn::Connection, NetError>) -> Result<(), NetError> {
        let conn = conn?;
        let mut ch = Channel::<u32, u32>::open(&conn, FrameCodec::default()).await?;
        ch.send(&41).await?;
        match ch.recv().await? {
            Some(42) => Ok(()),
            other => panic!("unexpected reply {other:?}"),
        }
    }
    let client_result = within("client", async { ask(dial(addr).await).await }).await;
    let server_verdict = within("server", accept).await.expect("accept task");
    (client_result, server_verdict)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_certificate_from_another_ca_is_rejected() {
    let (_a, ours) = cluster(&["coord-1"]);
    let (_b, theirs) = cluster(&["intruder"]);
    // The intruder trusts our CA (so it accepts our server) but holds a certificate from its own:
    // only the server's check of the client certificate stands in the way.
    let intruder = TlsFiles { ca: ours[0].ca.clone(), ..theirs[0].clone() };
    let (client, server) = attempt(&ours[0], move |addr| {
        Box::pin(async move {
            let endpoint = quic::client_endpoint(&intruder)?;
            quic::connect(&endpoint, addr, "coord-1").await
        })
    })
    .await;
    let server_err = server.expect_err("the server must refuse the intruder");
    let client_err = client.expect_err("the intruder must get nothing");
    assert!(!server_err.to_string().contains("aborted by peer"), "the server decided: {server_err}");
    assert!(server_err.to_string().contains("UnknownIssuer"), "{server_err}");
    println!("server: {server_err}\nclient: {client_err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_rejected() {
    let (_dir, files) = cluster(&["coord-1"]);
    let ca = files[0].clone();
    let (client, server) = attempt(&files[0], move |addr| {
        Box::pin(async move {
            // Trusts the right CA, presents nothing.
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.ca[0].clone()).expect("root");
            let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![tls::ALPN.to_vec()];
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic crypto");
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
            let connecting = endpoint
                .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "coord-1")
                .map_err(|source| NetError::Connect { addr, source })?;
            Ok(connecting.await?)
        })
    })
    .await;
    let server_err = server.expect_err("the server must require a certificate");
    let client_err = client.expect_err("an anonymous client must get nothing");
    println!("server: {server_err}\nclient: {client_err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_certificate_from_another_ca_is_rejected_by_the_client() {
    let (_a, ours) = cluster(&["worker-1"]);
    let (_b, theirs) = cluster(&["coord-1"]);
    let worker = ours[0].clone();
    let (client, server) = attempt(&theirs[0], move |addr| {
        Box::pin(async move {
            let endpoint = quic::client_endpoint(&worker)?;
            quic::connect(&endpoint, addr, "coord-1").await
        })
    })
    .await;
    let client_err = client.expect_err("the client must refuse an impostor server");
    assert!(matches!(client_err, NetError::Connection(_)), "refused during the handshake: {client_err}");
    assert!(client_err.to_string().contains("UnknownIssuer"), "{client_err}");
    assert!(!client_err.to_string().contains("aborted by peer"), "the client decided: {client_err}");
    assert!(server.is_err(), "the handshake failed on both sides");
    println!("client: {client_err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_is_checked_against_the_name_dialled() {
    let (_dir, files) = cluster(&["coord-1", "coord-2", "worker-1"]);
    let worker = files[2].clone();
    let (client, _server) = attempt(&files[0], move |addr| {
        Box::pin(async move {
            let endpoint = quic::client_endpoint(&worker)?;
            quic::connect(&endpoint, addr, "coord-2").await
        })
    })
    .await;
    let err = client.expect_err("coord-1 is not coord-2");
    assert!(matches!(err, NetError::Connection(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_over_quic_are_clean_errors() {
    let (_dir, files) = cluster(&["coord-1", "worker-1"]);
    let (endpoint, addr) = server(&files[0]);
    let client = quic::client_endpoint(&files[1]).expect("client endpoint");
    let (conn, server_conn) = within("connect", async {
        let accept = tokio::spawn(async move { quic::accept(&endpoint).await.expect("open").expect("handshake") });
        let conn = quic::connect(&client, addr, "coord-1").await.expect("connect");
        (conn, accept.await.expect("accept task"))
    })
    .await;
    let codec = FrameCodec::new(MAX_LEN);
    let header = |version: u16, len: u32| {
        let mut h = Vec::from(MAGIC);
        h.extend_from_slice(&version.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    };
    let good = codec.encode(&ToCoord::Tokens { seq: 9, ids: vec![1, 2, 3] }).expect("encode");

    // Each case: raw bytes on a fresh stream, then the stream is finished.
    let mut wrong_version = good.clone();
    wrong_version[4..6].copy_from_slice(&7u16.to_be_bytes());
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 2);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("version", wrong_version),
        ("magic", b"SSH-2.0-OpenSSH\r\n".to_vec()),
        ("too long", [header(PROTOCOL_VERSION, MAX_LEN + 1), vec![0; 100]].concat()),
        ("truncated", truncated),
        ("short header", good[..HEADER_LEN - 1].to_vec()),
        ("clean end", good.clone()),
    ];
    for (what, bytes) in cases {
        let (mut send, _recv) = conn.open_bi().await.expect("open stream");
        send.write_all(&bytes).await.expect("write");
        send.finish().expect("finish");
        let (_send, mut recv) = within(what, server_conn.accept_bi()).await.expect("accept stream");
        let first = within(what, codec.read_frame::<ToCoord>(&mut recv)).await;
        match (what, first) {
            ("version", Err(NetError::Version { ours: PROTOCOL_VERSION, theirs: 7 })) => {}
            ("magic", Err(NetError::BadMagic { found })) => assert_eq!(&found, b"SSH-"),
            ("too long", Err(NetError::TooLong { len, max: MAX_LEN })) => assert_eq!(len, u64::from(MAX_LEN) + 1),
            ("truncated", Err(NetError::Truncated { expected, got })) => {
                assert_eq!((expected, got), (good.len(), good.len() - 2));
            }
            ("short header", Err(NetError::Truncated { expected: HEADER_LEN, got })) => assert_eq!(got, HEADER_LEN - 1),
            ("clean end", Ok(Some(msg))) => {
                assert_eq!(msg, ToCoord::Tokens { seq: 9, ids: vec![1, 2, 3] });
                assert!(codec.read_frame::<ToCoord>(&mut recv).await.expect("end").is_none());
            }
            (what, other) => panic!("{what}: unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_hold_an_idle_channel_open_past_the_idle_timeout() {
    let (_dir, files) = cluster(&["coord-1", "worker-1"]);
    let options = QuicOptions { idle_timeout: Duration::from_millis(800), keep_alive: Duration::from_millis(200) };
    let endpoint =
        quic::server_endpoint_with("127.0.0.1:0".parse().expect("addr"), &files[0], &options).expect("server endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let server_task = tokio::spawn(async move {
        let conn = quic::accept(&endpoint).await.expect("open").expect("handshake");
        let mut ch = Channel::<u64, u64>::accept(&conn, FrameCodec::default()).await.expect("accept");
        while let Some(n) = ch.recv().await.expect("recv") {
            ch.send(&(n * 2)).await.expect("send");
        }
        conn
    });
    let client = quic::client_endpoint_with("127.0.0.1:0".parse().expect("addr"), &files[1], &options).expect("client");
    let conn = within("connect", quic::connect(&client, addr, "coord-1")).await.expect("connect");
    let mut ch = Channel::<u64, u64>::open(&conn, FrameCodec::default()).await.expect("open");
    ch.send(&1).await.expect("send");
    assert_eq!(within("reply", ch.recv()).await.expect("recv"), Some(2));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ch.send(&21).await.expect("send after idling");
    assert_eq!(within("reply", ch.recv()).await.expect("recv after idling"), Some(42));

    let bad = QuicOptions { idle_timeout: Duration::from_secs(1), keep_alive: Duration::from_secs(1) };
    let err = quic::client_endpoint_with("127.0.0.1:0".parse().expect("addr"), &files[1], &bad).expect_err("bad");
    assert!(matches!(err, NetError::Config(_)), "{err}");
    drop(ch); // finishes our direction: the server's loop ends
    within("server", server_task).await.expect("server task");
    conn.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_latency_of_a_small_message() {
    let (_dir, files) = cluster(&["coord-1", "worker-1"]);
    let (endpoint, addr) = server(&files[0]);
    let server_task = tokio::spawn(async move {
        let conn = quic::accept(&endpoint).await.expect("open").expect("handshake");
        let mut ch = Channel::<ToWorker, ToCoord>::accept(&conn, FrameCodec::default()).await.expect("accept");
        while let Some(ToCoord::Tokens { seq, .. }) = ch.recv().await.expect("recv") {
            ch.send(&ToWorker::Step { seq, logits: vec![] }).await.expect("send");
        }
        conn
    });
    let client = quic::client_endpoint(&files[1]).expect("client endpoint");
    let conn = within("connect", quic::connect(&client, addr, "coord-1")).await.expect("connect");
    let mut ch = Channel::<ToCoord, ToWorker>::open(&conn, FrameCodec::default()).await.expect("open");
    const WARMUP: u64 = 100;
    const ROUNDS: u64 = 1000;
    let mut rtts = Vec::with_capacity(ROUNDS as usize);
    for seq in 0..WARMUP + ROUNDS {
        let started = Instant::now();
        ch.send(&ToCoord::Tokens { seq, ids: vec![128_000, 9_906] }).await.expect("send");
        let reply = within("reply", ch.recv()).await.expect("recv");
        assert_eq!(reply, Some(ToWorker::Step { seq, logits: vec![] }));
        if seq >= WARMUP {
            rtts.push(started.elapsed());
        }
    }
    rtts.sort();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    println!(
        "QUIC mTLS channel round trip, small message, {ROUNDS} rounds on 127.0.0.1: median {:?}, p90 {:?}, p99 {:?}, min {:?}",
        pct(50),
        pct(90),
        pct(99),
        rtts[0]
    );
    drop(ch);
    within("server", server_task).await.expect("server task");
    conn.close(0u32.into(), b"done");
}
