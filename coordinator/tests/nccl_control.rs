//! NCCL's unique id over the real control channel: a cluster CA on disk, mutual TLS over QUIC on
//! 127.0.0.1, the coordinator's framing, and the id inside a `ToWorker::NcclId` message.
//!
//! `ncclGetUniqueId` needs libnccl but no GPU. Without the library the test prints
//! `SKIPPED <name>: <why>` and passes; `.ci/run` installs the wheel, adds the `libnccl.so`
//! symlink and sets `HERD_REQUIRE_NCCL=1`, so in CI a missing library is a failure.
#![cfg(feature = "cuda")]

use std::time::Duration;

use herd_net::quic;
use herd_net::{Channel, FrameCodec, TlsFiles};
use herd_worker::control::{FromWorker, ToWorker, WorkerHello};
use herd_worker::transport::nccl::NcclId;

const TEST: &str = "nccl_unique_id_crosses_the_control_channel";

#[test]
fn nccl_unique_id_crosses_the_control_channel() {
    if std::env::var_os("NCCL_SOCKET_IFNAME").is_none() {
        // The id holds the address of the bootstrap root NCCL starts; keep it on loopback.
        // SAFETY: set before any other thread of this test binary reads the environment.
        unsafe { std::env::set_var("NCCL_SOCKET_IFNAME", "lo") };
    }
    let id = match NcclId::new() {
        Ok(id) => id,
        Err(e) => {
            assert!(std::env::var_os("HERD_REQUIRE_NCCL").is_none(), "HERD_REQUIRE_NCCL is set, but: {e}");
            println!("SKIPPED {TEST}: {e}");
            return;
        }
    };
    assert!(!id.is_zero(), "ncclGetUniqueId returned an all-zero id");
    assert_ne!(NcclId::new().expect("a second id"), id, "two ids for two groups must differ");

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let received =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(30), carry(id)).await }).expect("timed out");
    match received {
        ToWorker::NcclId { epoch, id: got } => {
            assert_eq!(epoch, 5);
            assert_eq!(got, id, "the id changed on the way");
            assert!(!got.is_zero());
        }
        other => panic!("expected the NCCL id, got {other:?}"),
    }
}

/// A fresh CA with one certificate per name (for 127.0.0.1), loaded.
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

/// The coordinator's end sends `id` to a worker that registered, as the relay of an epoch's id
/// would; returns what the worker's end received.
async fn carry(id: NcclId) -> ToWorker {
    let (_dir, files) = cluster(&["coord-1", "worker-1"]);
    // The coordinator's control-channel frame limit (coordinator/src/control_server.rs).
    let codec = FrameCodec::new(64 << 20);
    let endpoint = quic::server_endpoint("127.0.0.1:0".parse().expect("addr"), &files[0]).expect("server endpoint");
    let addr = endpoint.local_addr().expect("local addr");

    let coordinator = tokio::spawn(async move {
        let conn = quic::accept(&endpoint).await.expect("endpoint open").expect("handshake");
        assert_eq!(herd_net::peer_identity(&conn).expect("identity"), "worker-1");
        let mut ch = Channel::<ToWorker, FromWorker>::accept(&conn, codec).await.expect("accept channel");
        match ch.recv().await.expect("recv") {
            Some(FromWorker::Hello(h)) => assert_eq!(h.name, "worker-1"),
            other => panic!("expected a hello, got {other:?}"),
        }
        ch.send(&ToWorker::NcclId { epoch: 5, id }).await.expect("send id");
        // Hold the connection until the worker has read the id and hung up.
        assert!(ch.recv().await.map(|m| m.is_none()).unwrap_or(true));
    });

    let client = quic::client_endpoint(&files[1]).expect("client endpoint");
    let conn = quic::connect(&client, addr, "coord-1").await.expect("connect");
    let mut ch = Channel::<FromWorker, ToWorker>::open(&conn, codec).await.expect("open channel");
    let hello = WorkerHello {
        name: "worker-1".into(),
        data_addr: "127.0.0.1:1".parse().expect("addr"),
        memory_bytes: 0,
        device: herd_worker::control::WorkerDevice::Cuda { ordinal: 0, name: String::new() },
        fingerprint: String::new(),
        version: herd_worker::control::CONTROL_VERSION,
    };
    ch.send(&FromWorker::Hello(hello)).await.expect("send hello");
    let received = ch.recv().await.expect("recv").expect("a message before the end of the stream");
    let (mut tx, _rx) = ch.split();
    tx.finish().expect("finish");
    coordinator.await.expect("coordinator task");
    conn.close(0u32.into(), b"done");
    received
}
