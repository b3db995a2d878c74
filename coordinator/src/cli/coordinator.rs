//! `herd coordinator`: one member of the Raft-replicated coordinator tier.
//!
//! It runs, on one tokio runtime:
//! - the Raft node (`raft`) over QUIC with mutual TLS (`raft_quic`), replicating the cluster
//!   state machine (`cluster`, `state_machine`);
//! - the control server for worker channels (`control_server`) and the scheduler
//!   (`scheduler`), fed with every applied state;
//! - the leader duties (`leader`): worker verdicts and placement epochs;
//! - the OpenAI API (`api`) and the admin API (`admin`).

use super::model_arg;
use anyhow::Context;
use herd_coordinator::admin::{self, AdminState};
use herd_coordinator::api::{self, ApiConfig, ApiState};
use herd_coordinator::cluster::{ClusterCommand, CoordinatorInfo, ModelSpec, Outcome};
use herd_coordinator::data_plane::DataPlanePolicy;
use herd_coordinator::leader::{self, LeaderConfig};
use herd_coordinator::raft::{RaftConfig, RaftNode};
use herd_coordinator::raft_quic::{self, QuicRaftTransport};
use herd_coordinator::scheduler::{ClusterService, Scheduler};
use herd_coordinator::state_machine::{ClusterMachine, decode_outcome, encode_command};
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
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args, peers, frontend, tls))
}

async fn serve(
    args: CoordinatorArgs,
    peers: BTreeMap<u64, SocketAddr>,
    frontend: Arc<Frontend>,
    tls: TlsFiles,
) -> anyhow::Result<()> {
    let me = args.id;
    let served = args.served_model_name.clone().unwrap_or_else(|| {
        std::path::Path::new(&args.model).file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let text = &frontend.config.text;
    let model = ModelSpec {
        name: served.clone(),
        fingerprint: frontend.fingerprint(),
        moe_layers: (0..text.num_hidden_layers).filter(|&l| text.layers[l].moe).collect(),
        experts: text.num_local_experts,
    };

    // Raft over QUIC.
    let raft_endpoint = herd_net::quic::server_endpoint(args.raft_listen, &tls).context("binding --raft-listen")?;
    let others: BTreeMap<u64, SocketAddr> = peers.iter().filter(|(id, _)| **id != me).map(|(i, a)| (*i, *a)).collect();
    let transport =
        Arc::new(QuicRaftTransport::start(me, others, raft_endpoint.clone(), &tokio::runtime::Handle::current()));
    let founders = if args.join { Vec::new() } else { peers.keys().copied().collect() };
    let mut raft_config = RaftConfig::new(me, founders, args.data_dir.join("raft"));
    raft_config.tick = Duration::from_millis(args.raft_tick_ms);
    let (machine, mut applied) = ClusterMachine::new();
    let (_node, raft) =
        RaftNode::spawn(raft_config, machine, Arc::clone(&transport)).context("starting the raft node")?;
    tokio::spawn(raft_quic::serve(raft_endpoint, raft.mailbox()));

    // Scheduler and Raft peer addresses, fed with every applied state (a coordinator added
    // later becomes reachable once its address is in the log).
    let scheduler = Scheduler::new(me, args.step_timeout_ms, args.data_plane);
    {
        let (raft, scheduler) = (raft.clone(), Arc::clone(&scheduler));
        let on_state = move |state: &herd_coordinator::cluster::ClusterState| {
            scheduler.set_state(state);
            for c in state.coordinators.values() {
                transport.set_peer(c.id, c.raft_addr);
            }
        };
        on_state(&raft.read(|m| m.state().clone()));
        tokio::spawn(async move {
            while applied.changed().await.is_ok() {
                on_state(&raft.read(|m| m.state().clone()));
            }
        });
    }

    // Worker control channels.
    let control = herd_net::quic::server_endpoint(args.control_listen, &tls).context("binding --control-listen")?;
    tokio::spawn(herd_coordinator::control_server::serve(control, raft.clone(), Arc::clone(&scheduler), me));

    // Leader duties.
    let leader_config = LeaderConfig {
        me,
        model,
        min_workers: args.min_workers,
        suspect_after: Duration::from_millis(args.suspect_after_ms),
        dead_after: Duration::from_millis(args.dead_after_ms),
        interval: Duration::from_millis(250),
    };
    tokio::spawn(leader::run(leader_config, raft.clone(), Arc::clone(&scheduler)));

    // Announce this coordinator's addresses through the log (retried until a leader exists).
    let info = CoordinatorInfo {
        id: me,
        raft_addr: args.raft_listen,
        control_addr: args.control_listen,
        api_addr: args.api_listen,
        admin_addr: args.admin_listen,
    };
    {
        let (raft, info) = (raft.clone(), info.clone());
        tokio::spawn(async move {
            loop {
                match raft.propose(encode_command(&ClusterCommand::AddCoordinator(info.clone()))).await {
                    Ok(b) if matches!(decode_outcome(&b), Outcome::Done | Outcome::Unchanged) => return,
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
    }

    // Admin API.
    let admin_state = AdminState {
        raft: raft.clone(),
        scheduler: Arc::clone(&scheduler),
        admin_key: args.admin_key.clone(),
        this: info.clone(),
    };
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen).await.context("binding --admin-listen")?;
    tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin::router(admin_state)).await;
    });

    // OpenAI API.
    let mut api_config = ApiConfig::for_model(&frontend);
    api_config.served_model_name = served;
    api_config.api_key = args.api_key.clone();
    api_config.max_body_bytes = args.max_body_bytes;
    args.images.apply(&mut api_config);
    if let Some(len) = args.max_model_len {
        anyhow::ensure!(len > 0, "--max-model-len must be at least 1");
        let model_len = frontend.config.text.max_position_embeddings;
        anyhow::ensure!(
            len <= model_len,
            "--max-model-len {len} exceeds the model's max_position_embeddings ({model_len})"
        );
        api_config.max_model_len = len;
        api_config.max_prompt_tokens = len;
        api_config.max_tokens = len;
    }
    let state = ApiState::new(api_config, Arc::clone(&frontend), Arc::new(ClusterService(Arc::clone(&scheduler))))
        .context("registering metrics")?;
    let api_listener = tokio::net::TcpListener::bind(args.api_listen).await.context("binding --api-listen")?;
    eprintln!(
        "[herd coordinator {me}] raft {} control {} api http://{} admin http://{}",
        args.raft_listen, args.control_listen, args.api_listen, args.admin_listen
    );
    api::serve(api_listener, state, shutdown_signal()).await.context("serving the API")?;
    raft.shutdown().await;
    Ok(())
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
