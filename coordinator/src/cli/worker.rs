//! `herd worker`: one member of an expert-parallel group.
//!
//! It loads attention, dense layers, shared experts and embeddings, plus only the routed
//! experts its placement assigns it; joins the data plane (TCP, one connection per peer);
//! then runs the lockstep loop, taking commands on stdin and writing reports to stdout as
//! JSON lines. Logs and errors go to stderr.

use super::engine_flags::EngineFlags;
use super::model_arg;
use anyhow::Context;
use herd_worker::control::{CONTROL_VERSION, Command, LayerStats, Report, WorkerStats, read_message, write_message};
use herd_worker::engine::device;
use herd_worker::ep::EpRunner;
use herd_worker::frontend::Frontend;
use herd_worker::lockstep::{self, LockstepConfig};
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::{MoeShape, Placement};
use herd_worker::transport::tcp::{TcpOptions, TcpTransport};
use herd_worker::transport::tls::TlsConfig;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

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
    /// Expert placement: round-robin, skewed, replicated, or a JSON/TOML file.
    #[arg(long, default_value = "round-robin")]
    pub(super) placement: String,
    #[arg(long, default_value = "bf16")]
    pub(super) dtype: ComputeDtype,
    #[command(flatten)]
    pub(super) engine: EngineFlags,
    /// Deadline of each data-plane collective: a peer silent for longer fails the step.
    #[arg(long, default_value_t = 60_000)]
    pub(super) step_timeout_ms: u64,
    /// How long to wait for every peer to connect.
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
    if !args.coordinators.is_empty() {
        return super::worker_agent::run(&args);
    }
    let mut out = std::io::stdout().lock();
    let result = serve(&args, &mut out);
    if let Err(e) = &result {
        let _ = write_message(&mut out, &Report::Fatal { error: format!("{e:#}") });
    }
    result
}

fn serve(args: &WorkerArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let (rank, world) = (args.rank.unwrap_or(0), args.world.unwrap_or(0));
    anyhow::ensure!(world > 0 && rank < world, "--rank {rank} is not in 0..{world}");
    anyhow::ensure!(
        args.peers.is_empty() || args.peers.len() == world,
        "--peers lists {} addresses for a world of {}",
        args.peers.len(),
        world
    );
    let commands = spawn_command_reader();
    let dir = model_arg::resolve(&args.model, args.cache_dir.as_deref())?;
    let frontend = Frontend::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let text = &frontend.config.text;
    let shape = MoeShape {
        moe_layers: (0..text.num_hidden_layers).filter(|&l| text.layers[l].moe).collect(),
        experts: text.num_local_experts,
    };
    let placement = Placement::from_arg(&args.placement, world, &shape)?;
    let local: BTreeMap<usize, Vec<usize>> =
        shape.moe_layers.iter().map(|&l| (l, placement.local_experts(rank, l))).collect();
    let local_experts: usize = local.values().map(Vec::len).sum();

    // Bind before loading weights so the driver can wire the group while we load.
    let listener = TcpListener::bind(args.peers.get(rank).copied().unwrap_or(args.listen))
        .context("binding the data-plane port")?;
    let addr = listener.local_addr()?;
    write_message(out, &Report::Listening { addr, version: CONTROL_VERSION })?;

    let model = frontend.load_model(args.dtype, Some(&local)).context("loading weights")?;
    let weight_bytes = model.weight_bytes();
    let engine_config = args.engine.config()?;
    let mut engine = device::build(
        Arc::new(model),
        Arc::clone(&frontend.tokenizer),
        frontend.eos_ids(),
        engine_config,
        &args.engine.device_options(),
    )
    .with_context(|| format!("starting the engine on --device {}", args.engine.device))?;
    // The vision tower runs on a CPU engine, on the worker that owns an image request's
    // sequence; a GPU engine refuses image prompts.
    if args.engine.device == herd_kernels::device::Device::Cpu
        && let Some((vision, patch)) = frontend.load_vision(args.dtype).context("loading the vision tower")?
    {
        engine.enable_vision(Arc::new(vision), patch);
    }

    let mut early = VecDeque::new();
    let peers = if args.peers.is_empty() { wait_for_peers(&commands, &mut early)? } else { args.peers.clone() };
    anyhow::ensure!(peers.len() == world, "got {} peer addresses for a world of {world}", peers.len());
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsConfig::new(ca.clone(), cert.clone(), key.clone())),
        _ => None,
    };
    let opts = TcpOptions { cluster_token: args.cluster_token.as_bytes().to_vec(), tls, ..TcpOptions::default() };
    let deadline = Instant::now() + Duration::from_secs(args.connect_timeout_s);
    let transport =
        TcpTransport::connect(rank, world, &peers, listener, opts, deadline).context("connecting the data plane")?;
    let mut runner = EpRunner::new(Box::new(transport), placement, Duration::from_millis(args.step_timeout_ms));
    write_message(out, &Report::Ready { rank, world, local_experts, weight_bytes })?;
    eprintln!(
        "[herd worker {}] ready: {} routed experts, {:.1} MiB of weights",
        rank,
        local_experts,
        weight_bytes as f64 / (1 << 20) as f64
    );

    // Commands that arrived before the group formed are replayed first.
    let (replay_tx, replay_rx) = channel();
    for cmd in early {
        let _ = replay_tx.send(cmd);
    }
    std::thread::spawn(move || {
        for cmd in commands {
            if replay_tx.send(cmd).is_err() {
                return;
            }
        }
    });
    let mut report_err = None;
    let mut report = |r: Report| {
        if let Err(e) = write_message(out, &r) {
            report_err.get_or_insert(e);
        }
    };
    // This process runs one engine, so its steps may hold a compute-pool thread.
    let config = LockstepConfig { steps_on_pool: true, ..LockstepConfig::default() };
    let result = lockstep::run(&mut engine, &mut runner, &replay_rx, &mut report, config);
    let stats = runner.transport().stats();
    match result {
        Ok(loop_stats) => {
            let layers = runner
                .traffic()
                .iter()
                .map(|(&layer, t)| LayerStats {
                    layer,
                    collectives: t.collectives,
                    bytes_out: t.bytes_out,
                    exchange_ms: t.exchange.as_secs_f64() * 1e3,
                    compute_ms: t.compute.as_secs_f64() * 1e3,
                    routed_tokens: t.tokens_per_expert.values().sum(),
                })
                .collect();
            report(Report::Stats(WorkerStats {
                rank,
                steps: loop_stats.steps,
                collectives: stats.collectives,
                bytes_sent: stats.bytes_sent,
                bytes_received: stats.bytes_received,
                busy_ms: stats.busy.as_secs_f64() * 1e3,
                peak_rss_bytes: super::sys::peak_rss_bytes().unwrap_or(0),
                layers,
            }));
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("worker {rank} left the group")),
    }
}

/// Read commands from stdin on a thread; the channel closes when stdin does.
fn spawn_command_reader() -> Receiver<Command> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut input = BufReader::new(std::io::stdin());
        loop {
            match read_message::<Command>(&mut input) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        return;
                    }
                }
                Err(herd_worker::control::ControlError::Bad(e)) => eprintln!("[herd worker] ignoring bad command: {e}"),
                Err(_) => return,
            }
        }
    });
    rx
}

/// Wait for the `Peers` command; other commands are kept for later.
fn wait_for_peers(commands: &Receiver<Command>, early: &mut VecDeque<Command>) -> anyhow::Result<Vec<SocketAddr>> {
    loop {
        match commands.recv() {
            Ok(Command::Peers { addrs }) => return Ok(addrs),
            Ok(Command::Shutdown) => anyhow::bail!("shut down before the group formed"),
            Ok(other) => early.push_back(other),
            Err(_) => anyhow::bail!("control channel closed before the peer list arrived"),
        }
    }
}
