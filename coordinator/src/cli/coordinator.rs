//! `herd coordinator`: one member of the Raft-replicated coordinator tier. This module only
//! turns flags into a [`NodeConfig`]; `herd_coordinator::node` starts and stops the node.

use super::model_arg;
use anyhow::Context;
use herd_coordinator::api::ApiConfig;
use herd_coordinator::data_plane::DataPlanePolicy;
use herd_coordinator::node::{self, NodeConfig};
use herd_net::TlsFiles;
use herd_worker::frontend::Frontend;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// This coordinator's id (non-zero, unique).
    #[arg(long)]
    id: u64,
    /// Where the Raft log, hard state and snapshots are kept.
    #[arg(long)]
    data_dir: PathBuf,
    /// Every founding coordinator's Raft address: `1=HOST:PORT,2=HOST:PORT,...` (this one included).
    /// With --join: the current members' addresses.
    #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
    peers: Vec<(u64, SocketAddr)>,
    /// Join a running cluster instead of founding one. The node waits, without voting, until
    /// an admin adds it (`herd admin add-coordinator`); only then does the leader send it the
    /// state. Ignored once --data-dir holds Raft state.
    #[arg(long)]
    join: bool,
    /// Raft traffic (QUIC).
    #[arg(long)]
    raft_listen: SocketAddr,
    /// Worker control channels (QUIC).
    #[arg(long)]
    control_listen: SocketAddr,
    /// The OpenAI-compatible API (HTTP).
    #[arg(long, default_value = "127.0.0.1:8000")]
    api_listen: SocketAddr,
    /// The admin API (HTTP).
    #[arg(long, default_value = "127.0.0.1:8001")]
    admin_listen: SocketAddr,
    /// Checkpoint directory, or a synth preset (the coordinator reads config and tokenizer only).
    #[arg(long)]
    model: String,
    /// The model id clients name (default: the --model argument's last component).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Directory with the cluster CA and this node's certificate (`herd ca init`).
    #[arg(long)]
    tls_dir: PathBuf,
    /// Which certificate in --tls-dir is this node's.
    #[arg(long, default_value = "node")]
    tls_name: String,
    /// Require `Authorization: Bearer KEY` on the OpenAI API.
    #[arg(long)]
    api_key: Option<String>,
    /// Require `Authorization: Bearer KEY` on the admin API.
    #[arg(long)]
    admin_key: Option<String>,
    /// Live workers needed before the first placement epoch forms.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Deadline of each data-plane collective between workers.
    #[arg(long, default_value_t = 60_000)]
    step_timeout_ms: u64,
    /// The groups' data plane: `auto` runs NCCL when every member drives a GPU of its own
    /// (TCP otherwise); `tcp` always uses TCP. Every coordinator must be given the same.
    #[arg(long, value_enum, default_value_t = DataPlanePolicy::Auto)]
    data_plane: DataPlanePolicy,
    /// A worker silent this long is suspect (gets no new requests).
    #[arg(long, default_value_t = 1500)]
    suspect_after_ms: u64,
    /// A worker silent this long is dead (removed at the next placement epoch).
    #[arg(long, default_value_t = 4000)]
    dead_after_ms: u64,
    /// Length of one Raft tick (elections after 10–20 ticks).
    #[arg(long, default_value_t = 100)]
    raft_tick_ms: u64,
    /// Directory where presets are synthesised (default ~/.cache/herd).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Prompt plus completion tokens one request may use (default: the model's
    /// `max_position_embeddings`); also the cap on `max_tokens`.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Largest API request body in bytes.
    #[arg(long, default_value_t = ApiConfig::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    #[command(flatten)]
    images: super::image_flags::ImageFlags,
}

fn parse_peer(s: &str) -> Result<(u64, SocketAddr), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=HOST:PORT"))?;
    let id = id.trim().parse().map_err(|_| format!("{id:?} is not a coordinator id"))?;
    let addr = addr.trim().parse().map_err(|e| format!("{addr:?}: {e}"))?;
    Ok((id, addr))
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.id > 0, "--id must be non-zero");
    let peers: BTreeMap<u64, SocketAddr> = args.peers.iter().copied().collect();
    if args.join {
        anyhow::ensure!(!peers.is_empty(), "--join needs --peers with the current members' Raft addresses");
    } else {
        anyhow::ensure!(peers.contains_key(&args.id), "--peers must include this coordinator ({})", args.id);
    }
    let dir = model_arg::resolve(&args.model, args.cache_dir.as_deref())?;
    let frontend = Arc::new(Frontend::load(&dir).with_context(|| format!("loading {}", dir.display()))?);
    let tls = TlsFiles::load(&args.tls_dir, &args.tls_name).context("loading TLS files")?;
    let config = node_config(args, peers, frontend, tls)?;
    let me = config.id;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let node = node::start(config).await?;
        let info = node.info();
        eprintln!(
            "[herd coordinator {me}] raft {} control {} api http://{} admin http://{}",
            info.raft_addr, info.control_addr, info.api_addr, info.admin_addr
        );
        shutdown_signal().await;
        node.shutdown().await;
        Ok(())
    })
}

fn node_config(
    args: CoordinatorArgs,
    peers: BTreeMap<u64, SocketAddr>,
    frontend: Arc<Frontend>,
    tls: TlsFiles,
) -> anyhow::Result<NodeConfig> {
    let mut api = ApiConfig::for_model(&frontend);
    api.served_model_name = args.served_model_name.clone().unwrap_or_else(|| {
        std::path::Path::new(&args.model).file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    api.api_key = args.api_key.clone();
    api.max_body_bytes = args.max_body_bytes;
    args.images.apply(&mut api);
    if let Some(len) = args.max_model_len {
        anyhow::ensure!(len > 0, "--max-model-len must be at least 1");
        let model_len = frontend.config.text.max_position_embeddings;
        anyhow::ensure!(
            len <= model_len,
            "--max-model-len {len} exceeds the model's max_position_embeddings ({model_len})"
        );
        api.max_model_len = len;
        api.max_prompt_tokens = len;
        api.max_tokens = len;
    }
    Ok(NodeConfig {
        id: args.id,
        data_dir: args.data_dir,
        peers,
        join: args.join,
        raft_listen: args.raft_listen,
        control_listen: args.control_listen,
        api_listen: args.api_listen,
        admin_listen: args.admin_listen,
        frontend,
        tls,
        api,
        admin_key: args.admin_key,
        min_workers: args.min_workers,
        step_timeout: Duration::from_millis(args.step_timeout_ms),
        data_plane: args.data_plane,
        suspect_after: Duration::from_millis(args.suspect_after_ms),
        dead_after: Duration::from_millis(args.dead_after_ms),
        raft_tick: Duration::from_millis(args.raft_tick_ms),
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
