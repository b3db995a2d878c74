//! A coordinator started in process through `node::start` on ports the OS picks: it elects
//! itself, answers on both HTTP APIs, and `shutdown` closes every listener and returns.

use herd_coordinator::api::ApiConfig;
use herd_coordinator::data_plane::DataPlanePolicy;
use herd_coordinator::node::{self, NodeConfig};
use herd_net::TlsFiles;
use herd_worker::frontend::Frontend;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over plain HTTP/1.1; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((code, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_on_chosen_ports_serves_and_shuts_down() {
    let dir = tempfile::tempdir().expect("tmp");
    let tls_dir = dir.path().join("tls");
    herd_net::init_ca(&tls_dir, &["127.0.0.1".into()]).expect("CA");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/maverick/model");
    let frontend = Arc::new(Frontend::load(&model).expect("golden checkpoint"));
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut api = ApiConfig::for_model(&frontend);
    api.served_model_name = "golden".into();
    let config = NodeConfig {
        id: 1,
        data_dir: dir.path().join("coordinator-1"),
        peers: BTreeMap::from([(1, any)]),
        join: false,
        raft_listen: any,
        control_listen: any,
        api_listen: any,
        admin_listen: any,
        frontend,
        tls: TlsFiles::load(&tls_dir, "node").expect("TLS files"),
        api,
        admin_key: None,
        min_workers: 1,
        step_timeout: Duration::from_secs(5),
        data_plane: DataPlanePolicy::Tcp,
        suspect_after: Duration::from_millis(1500),
        dead_after: Duration::from_millis(4000),
        raft_tick: Duration::from_millis(20),
    };
    let node = node::start(config).await.expect("start");
    let info = node.info().clone();
    for addr in [info.raft_addr, info.control_addr, info.api_addr, info.admin_addr] {
        assert_ne!(addr.port(), 0, "the node reports the ports it was given: {info:?}");
    }
    let started = Instant::now();
    while node.raft().status().leader != Some(1) {
        assert!(started.elapsed() < Duration::from_secs(10), "a single coordinator elects itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No workers yet: the API is up but unhealthy; the admin API knows this node.
    let (code, body) = get(info.api_addr, "/health").await.expect("API answers");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no placement epoch yet"), "{body}");
    let (code, body) = get(info.admin_addr, "/admin/self").await.expect("admin answers");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&info.api_addr.to_string()), "{body}");

    tokio::time::timeout(Duration::from_secs(20), node.shutdown()).await.expect("shutdown returns");
    for addr in [info.api_addr, info.admin_addr] {
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "{addr} still accepts after shutdown");
    }
}
