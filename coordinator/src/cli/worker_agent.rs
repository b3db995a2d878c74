//! `herd worker --coordinators ...`: a worker managed by the coordinator tier.
//!
//! The agent (`herd_worker::runtime::agent`) only sees channels; this module connects one QUIC
//! control channel (mutual TLS) to every coordinator, reconnecting after failures, and pumps
//! frames between those channels and the agent.

use super::worker::{WorkerArgs, agent_config};
use anyhow::Context;
use herd_net::{Channel, TlsFiles};
use herd_worker::control::{FromWorker, ToWorker};
use herd_worker::frontend::Frontend;
use herd_worker::runtime::{Inbox, Lifetime, Link, agent};
use herd_worker::transport::tcp::TcpOptions;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub fn run(args: &WorkerArgs, frontend: Arc<Frontend>) -> anyhow::Result<()> {
    let tls_dir =
        args.tls_dir.as_ref().context("--coordinators needs --tls-dir (the cluster CA and this node's certificate)")?;
    let tls = TlsFiles::load(tls_dir, &args.tls_name).context("loading TLS files")?;
    let listener = TcpListener::bind(args.listen).context("binding the data-plane port (--listen)")?;
    let data_addr = listener.local_addr()?;
    let tcp = TcpOptions { cluster_token: args.cluster_token.as_bytes().to_vec(), ..TcpOptions::default() };
    let name = format!("worker-{}", data_addr.port());
    let config = agent_config(args, frontend, listener, tcp, name, Lifetime::FollowEpochs)?;
    eprintln!(
        "[herd worker {}] data plane {data_addr}, joining coordinators {:?}",
        config.hello.name, args.coordinators
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let endpoint = herd_net::quic::client_endpoint(&tls).context("creating the QUIC endpoint")?;
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        for (index, &addr) in args.coordinators.iter().enumerate() {
            tokio::spawn(link(index, addr, endpoint.clone(), inbox_tx.clone()));
        }
        drop(inbox_tx);
        agent::run(config, inbox).await.context("worker stopped")
    })
}

/// Keep a control channel to one coordinator, reconnecting with a short back-off.
async fn link(index: usize, addr: SocketAddr, endpoint: quinn::Endpoint, inbox: mpsc::UnboundedSender<Inbox>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if inbox.is_closed() {
            return;
        }
        match connect_once(index, addr, &endpoint, &inbox).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!(%addr, "coordinator link: {e}"),
        }
        let _ = inbox.send(Inbox::Disconnected { index });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn connect_once(
    index: usize,
    addr: SocketAddr,
    endpoint: &quinn::Endpoint,
    inbox: &mpsc::UnboundedSender<Inbox>,
) -> anyhow::Result<()> {
    let conn = herd_net::quic::connect(endpoint, addr, &addr.ip().to_string()).await?;
    let ch = Channel::<FromWorker, ToWorker>::open(&conn, herd_coordinator::control_server::codec()).await?;
    let (mut tx, mut rx) = ch.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<FromWorker>();
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if tx.send(&msg).await.is_err() {
                break;
            }
        }
    });
    let _ = inbox.send(Inbox::Connected { index, link: Link { to_coordinator: out_tx } });
    let result = loop {
        match rx.recv().await {
            Ok(Some(message)) => {
                if inbox.send(Inbox::Message { index, message }).is_err() {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    writer.abort();
    result
}
