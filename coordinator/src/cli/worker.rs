//! `herd worker`: one member of an expert-parallel group, in either mode.
//!
//! Both modes run the same agent (`herd_worker::runtime`), which loads attention, dense layers,
//! shared experts and embeddings plus only the routed experts its assignment gives it, joins
//! the data plane, and runs the lockstep loop. They differ only in who drives it:
//! - `--coordinators`: the coordinator tier, over QUIC control channels (`worker_agent`);
//! - `--rank/--world` (a static group): the process that started it, in JSON lines of the same
//!   messages on stdin/stdout. With `--peers` the worker assigns itself; without, the driver's
//!   assignment (rank, members, placement) arrives on stdin.
//!
//! Logs and errors go to stderr.

use super::engine_flags::EngineFlags;
use super::model_arg;
use anyhow::Context;
use herd_worker::control::{
    Assignment, CONTROL_VERSION, DataPlane, FromWorker, ToWorker, WorkerDevice, WorkerHello, read_message,
    write_message,
};
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::{MoeShape, Placement};
use herd_worker::runtime::{AgentConfig, GroupConfig, Inbox, Lifetime, Link, agent, host};
use herd_worker::transport::tcp::TcpOptions;
use herd_worker::transport::tls::TlsConfig;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    // Fields are read by the coordinator-managed mode in `worker_agent`.
    /// Join a coordinator-managed cluster: every coordinator's control address, comma-separated.
    /// The coordinators then assign rank, placement and peers. Without it the worker forms a
    /// static group from --rank/--world/--peers and takes commands on stdin.
    #[arg(long, value_delimiter = ',')]
    pub(super) coordinators: Vec<SocketAddr>,
    /// With --coordinators: the directory with the cluster CA and this node's certificate.
    #[arg(long, requires = "coordinators")]
    pub(super) tls_dir: Option<PathBuf>,
    /// Which certificate in --tls-dir is this node's.
    #[arg(long, default_value = "node")]
    pub(super) tls_name: String,
    /// With --coordinators: this worker's name in the cluster (default: worker-<data port>).
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Static group: this worker's rank, 0..world.
    #[arg(long, required_unless_present = "coordinators")]
    pub(super) rank: Option<usize>,
    /// Static group: number of workers.
    #[arg(long, required_unless_present = "coordinators")]
    pub(super) world: Option<usize>,
    /// Data-plane address of every rank, comma-separated, in rank order. Without it the
    /// worker binds --listen, reports the address, and waits for the list on its control channel.
    #[arg(long, value_delimiter = ',')]
    pub(super) peers: Vec<SocketAddr>,
    /// Where to listen when --peers is not given.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(super) listen: SocketAddr,
    /// Checkpoint directory, or a synth preset.
    #[arg(long)]
    pub(super) model: String,
    /// Static group with --peers: expert placement (round-robin, skewed, replicated, or a
    /// JSON/TOML file). Otherwise the assignment carries it.
    #[arg(long, default_value = "round-robin")]
    pub(super) placement: String,
    #[arg(long, default_value = "bf16")]
    pub(super) dtype: ComputeDtype,
    #[command(flatten)]
    pub(super) engine: EngineFlags,
    /// Static group with --peers: deadline of each data-plane collective (a peer silent for
    /// longer fails the step). Otherwise the assignment carries it.
    #[arg(long, default_value_t = 60_000)]
    pub(super) step_timeout_ms: u64,
    /// Static group: how long to wait for every peer to connect.
    #[arg(long, default_value_t = 120)]
    pub(super) connect_timeout_s: u64,
    /// Shared by the group's members; a connection with another token is refused.
    #[arg(long, default_value = "herd")]
    pub(super) cluster_token: String,
    /// Encrypt the data plane with mutual TLS: the cluster CA certificate (PEM). Needs
    /// --tls-cert and --tls-key; every worker of the group must use TLS.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub(super) tls_ca: Option<PathBuf>,
    /// This worker's certificate, signed by the cluster CA (PEM).
    #[arg(long, requires = "tls_ca")]
    pub(super) tls_cert: Option<PathBuf>,
    /// This worker's private key (PEM).
    #[arg(long, requires = "tls_ca")]
    pub(super) tls_key: Option<PathBuf>,
    /// Directory where presets are synthesised (default ~/.cache/herd).
    #[arg(long)]
    pub(super) cache_dir: Option<PathBuf>,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    super::device::check(args.engine.device)?; // before any model is loaded
    let dir = model_arg::resolve(&args.model, args.cache_dir.as_deref())?;
    let frontend = Arc::new(Frontend::load(&dir).with_context(|| format!("loading {}", dir.display()))?);
    if !args.coordinators.is_empty() {
        return super::worker_agent::run(&args, frontend);
    }
    let (rank, world) = (args.rank.unwrap_or(0), args.world.unwrap_or(0));
    anyhow::ensure!(world > 0 && rank < world, "--rank {rank} is not in 0..{world}");
    anyhow::ensure!(
        args.peers.is_empty() || args.peers.len() == world,
        "--peers lists {} addresses for a world of {}",
        args.peers.len(),
        world
    );
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsConfig::new(ca.clone(), cert.clone(), key.clone())),
        _ => None,
    };
    let tcp = TcpOptions { cluster_token: args.cluster_token.as_bytes().to_vec(), tls, ..TcpOptions::default() };
    // Bind before loading weights, so that the driver can wire the group while we load.
    let listener = TcpListener::bind(args.peers.get(rank).copied().unwrap_or(args.listen))
        .context("binding the data-plane port")?;
    let own = match args.peers.is_empty() {
        true => None,
        false => {
            let text = &frontend.config.text;
            let shape = MoeShape { moe_layers: text.moe_layers(), experts: text.num_local_experts };
            Some(Assignment {
                epoch: 1,
                rank,
                members: args.peers.clone(),
                placement: Placement::from_arg(&args.placement, world, &shape)?,
                step_timeout_ms: args.step_timeout_ms,
                data_plane: DataPlane::Tcp,
            })
        }
    };
    let config = agent_config(&args, frontend, listener, tcp, format!("worker-{rank}"), Lifetime::OneGroup)?;
    serve_stdio(config, own, (rank, world))
}

/// The agent's settings, shared by both modes.
pub(super) fn agent_config(
    args: &WorkerArgs,
    frontend: Arc<Frontend>,
    listener: TcpListener,
    tcp: TcpOptions,
    default_name: String,
    lifetime: Lifetime,
) -> anyhow::Result<AgentConfig> {
    let data_addr = listener.local_addr()?;
    let hello = WorkerHello {
        name: args.name.clone().unwrap_or(default_name),
        data_addr,
        memory_bytes: host::total_memory_bytes().unwrap_or(0),
        device: WorkerDevice::probe(args.engine.device),
        fingerprint: frontend.fingerprint(),
        version: CONTROL_VERSION,
    };
    let setup_timeout = match lifetime {
        Lifetime::OneGroup => Duration::from_secs(args.connect_timeout_s),
        // A managed group that cannot form soon is re-planned by the leader.
        Lifetime::FollowEpochs => Duration::from_secs(10),
    };
    let group = GroupConfig {
        frontend,
        dtype: args.dtype,
        engine: args.engine.config()?,
        device: args.engine.device_options(),
        tcp,
        listener,
        setup_timeout,
    };
    Ok(AgentConfig { hello, group, heartbeat: Duration::from_millis(250), lifetime })
}

/// A static group's worker: the agent with one link, this process's stdin and stdout.
fn serve_stdio(config: AgentConfig, own: Option<Assignment>, (rank, world): (usize, usize)) -> anyhow::Result<()> {
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    let (up_tx, up) = mpsc::unbounded_channel::<FromWorker>();
    let writer = std::thread::spawn(move || write_stdout(up));
    let _ = inbox_tx.send(Inbox::Connected { index: 0, link: Link { to_coordinator: up_tx } });
    if let Some(a) = own {
        let _ = inbox_tx.send(Inbox::Message { index: 0, message: ToWorker::Assign(a) });
    }
    std::thread::spawn(move || read_stdin(inbox_tx, rank, world));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = runtime.block_on(agent::run(config, inbox));
    // The agent has dropped its links: the writer ends once it has written everything left,
    // the group's failure or statistics included.
    let _ = writer.join();
    result.map_err(|e| anyhow::anyhow!("worker {rank} left the group: {e}"))
}

/// The driver's messages into the agent. Closing stdin means the driver is done: the group
/// drains and leaves.
fn read_stdin(inbox: mpsc::UnboundedSender<Inbox>, rank: usize, world: usize) {
    let mut input = BufReader::new(std::io::stdin());
    loop {
        match read_message::<ToWorker>(&mut input) {
            Ok(ToWorker::Assign(a)) if a.rank != rank || a.members.len() != world => {
                eprintln!(
                    "error: the driver assigned rank {} of {}, but this worker was started as --rank {rank} --world {world}",
                    a.rank,
                    a.members.len()
                );
                std::process::exit(1);
            }
            Ok(message) => {
                if inbox.send(Inbox::Message { index: 0, message }).is_err() {
                    return;
                }
            }
            Err(herd_worker::control::ControlError::Bad(e)) => eprintln!("[herd worker] ignoring a bad message: {e}"),
            Err(_) => return,
        }
    }
}

fn write_stdout(mut up: mpsc::UnboundedReceiver<FromWorker>) {
    let mut out = std::io::stdout().lock();
    while let Some(msg) = up.blocking_recv() {
        if write_message(&mut out, &msg).is_err() {
            return;
        }
    }
}
