//! One lockstep group of one placement epoch, on a thread of its own.
//!
//! [`Group::start`] takes an [`Assignment`] and, on the group's thread, loads the model with
//! the routed experts the placement gives this rank (mapped, so cheap), builds the engine on its
//! device, joins the data plane the assignment names (TCP to the members' data addresses, or
//! NCCL with the unique id rank 0 makes), and runs the lockstep loop ([`super::lockstep`]) until
//! the group drains, leaves, or fails. What happens comes back as [`GroupNote`]s.

use super::host;
use super::lockstep::{self, GroupCommand, LockstepConfig, LoopStats};
use crate::control::{Assignment, DataPlane, FromWorker, LayerStats, NcclId, WorkerStats, WorkerStatus};
use crate::engine::device::{self, DeviceOptions};
use crate::engine::request::{AbortReason, Request, RequestId};
use crate::engine::{EngineConfig, Load};
use crate::ep::EpRunner;
use crate::frontend::Frontend;
use crate::model::weights::ComputeDtype;
use crate::transport::Transport;
use crate::transport::tcp::{TcpOptions, TcpTransport};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What every group of a worker is built from.
pub struct GroupConfig {
    pub frontend: Arc<Frontend>,
    pub dtype: ComputeDtype,
    pub engine: EngineConfig,
    /// The CPU, or the GPU every group's engine runs on (its routed experts uploaded there).
    pub device: DeviceOptions,
    pub tcp: TcpOptions,
    /// The data-plane listener (the worker's registered data address); cloned for every group.
    pub listener: TcpListener,
    /// How long a forming group waits at least for its peers to connect (the assignment's step
    /// timeout counts where it is longer).
    pub setup_timeout: Duration,
}

impl std::fmt::Debug for GroupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConfig").field("device", &self.device).finish_non_exhaustive()
    }
}

/// What a group tells whoever started it.
#[derive(Debug)]
pub enum GroupNote {
    /// A message for the coordinators, as the lockstep loop wrote it (events, refusals).
    Up(FromWorker),
    /// The group of `epoch` is formed and stepping.
    Formed { epoch: u64 },
    /// Rank 0 of an NCCL group made its unique id: it goes to every coordinator.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    NcclId { epoch: u64, id: NcclId },
    /// The group's thread is done: its statistics, or why it failed.
    Ended { epoch: u64, result: Result<WorkerStats, String> },
}

/// A running group: the handle its thread is driven through.
pub struct Group {
    epoch: u64,
    commands: std_mpsc::Sender<GroupCommand>,
    /// Where this epoch's NCCL unique id goes (read only by an NCCL group's ranks other than 0).
    nccl_ids: std_mpsc::Sender<NcclId>,
    thread: std::thread::JoinHandle<()>,
    load: Arc<Mutex<Load>>,
    serving: Arc<AtomicBool>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("epoch", &self.epoch).field("serving", &self.serving()).finish()
    }
}

impl Group {
    /// Start the group of `a` on its own thread. `early_nccl_id` is an id that arrived before
    /// the assignment (coordinators relay independently).
    pub fn start(
        config: Arc<GroupConfig>,
        a: Assignment,
        early_nccl_id: Option<NcclId>,
        notes: mpsc::UnboundedSender<GroupNote>,
    ) -> Self {
        let (commands, rx) = std_mpsc::channel();
        let (nccl_ids, nccl_rx) = std_mpsc::channel();
        if let Some(id) = early_nccl_id {
            let _ = nccl_ids.send(id);
        }
        let load = Arc::new(Mutex::new(Load::default()));
        let serving = Arc::new(AtomicBool::new(false));
        let epoch = a.epoch;
        let (thread_load, thread_serving) = (Arc::clone(&load), Arc::clone(&serving));
        let thread = std::thread::spawn(move || {
            let run = Run { config: &config, a: &a, notes: &notes, serving: &thread_serving };
            let result = run.run(&rx, &nccl_rx, thread_load);
            thread_serving.store(false, Ordering::Release);
            let _ = notes.send(GroupNote::Ended { epoch: a.epoch, result });
        });
        Group { epoch, commands, nccl_ids, thread, load, serving }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the group is formed and stepping.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// The heartbeat of this worker while it runs this group.
    pub fn status(&self) -> WorkerStatus {
        let load = self.load.lock().map(|l| *l).unwrap_or_default();
        WorkerStatus { epoch: self.epoch, serving: self.serving(), load }
    }

    pub fn submit(&self, request: Request) {
        let _ = self.commands.send(GroupCommand::Submit(request));
    }

    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(GroupCommand::Cancel(id));
    }

    /// Finish the running requests, then leave with the other members.
    pub fn drain(&self) {
        let _ = self.commands.send(GroupCommand::Drain);
    }

    /// The group's NCCL unique id, relayed from rank 0.
    pub fn nccl_id(&self, id: NcclId) {
        let _ = self.nccl_ids.send(id);
    }

    /// Leave now (every request ends with `reason`) and wait for the thread, off the async
    /// runtime: heartbeats must keep flowing while it waits out a collective deadline.
    pub async fn leave(self, reason: AbortReason) {
        let _ = self.commands.send(GroupCommand::Leave(reason));
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// The group's thread.
struct Run<'a> {
    config: &'a GroupConfig,
    a: &'a Assignment,
    notes: &'a mpsc::UnboundedSender<GroupNote>,
    serving: &'a AtomicBool,
}

impl Run<'_> {
    fn run(
        &self,
        commands: &std_mpsc::Receiver<GroupCommand>,
        nccl_ids: &std_mpsc::Receiver<NcclId>,
        load: Arc<Mutex<Load>>,
    ) -> Result<WorkerStats, String> {
        let (config, a) = (self.config, self.a);
        let local: BTreeMap<usize, Vec<usize>> =
            a.placement.layers.keys().map(|&l| (l, a.placement.local_experts(a.rank, l))).collect();
        let model =
            config.frontend.load_model(config.dtype, Some(&local)).map_err(|e| format!("loading weights: {e}"))?;
        let (local_experts, weight_bytes) = (local.values().map(Vec::len).sum::<usize>(), model.weight_bytes());
        let mut engine = device::build(
            Arc::new(model),
            Arc::clone(&config.frontend.tokenizer),
            config.frontend.eos_ids(),
            config.engine.clone(),
            &config.device,
        )
        .map_err(|e| format!("starting the engine on {}: {e}", config.device.device))?;
        // The vision tower runs on a CPU engine; a GPU engine refuses image prompts.
        if config.device.device == herd_kernels::device::Device::Cpu
            && let Some((vision, patch)) =
                config.frontend.load_vision(config.dtype).map_err(|e| format!("loading the vision tower: {e}"))?
        {
            engine.enable_vision(Arc::new(vision), patch);
        }
        let setup = config.setup_timeout.max(Duration::from_millis(a.step_timeout_ms));
        let transport = self.data_plane(nccl_ids, Instant::now() + setup)?;
        let mut runner = EpRunner::new(transport, a.placement.clone(), Duration::from_millis(a.step_timeout_ms));
        self.serving.store(true, Ordering::Release);
        let _ = self.notes.send(GroupNote::Formed { epoch: a.epoch });
        tracing::info!(
            epoch = a.epoch,
            rank = a.rank,
            world = a.members.len(),
            local_experts,
            weight_bytes,
            "group formed"
        );
        let mut report = |m: FromWorker| {
            let _ = self.notes.send(GroupNote::Up(m));
        };
        // A worker runs one group at a time (the agent joins the old group's thread first), so
        // its steps may hold a compute-pool thread through the collectives.
        let lockstep_config = LockstepConfig { load: Some(load), steps_on_pool: true, ..LockstepConfig::default() };
        let steps = lockstep::run(&mut engine, &mut runner, commands, &mut report, lockstep_config)
            .map_err(|e| format!("group of epoch {} failed: {e}", a.epoch))?;
        Ok(stats(a.rank, steps, &runner))
    }

    /// The data plane the assignment names, connected by `deadline`.
    fn data_plane(
        &self,
        nccl_ids: &std_mpsc::Receiver<NcclId>,
        deadline: Instant,
    ) -> Result<Box<dyn Transport>, String> {
        let (config, a) = (self.config, self.a);
        match a.data_plane {
            DataPlane::Tcp => {
                let listener = config.listener.try_clone().map_err(|e| format!("data-plane listener: {e}"))?;
                let tcp =
                    TcpTransport::connect(a.rank, a.members.len(), &a.members, listener, config.tcp.clone(), deadline)
                        .map_err(|e| format!("joining the group of epoch {}: {e}", a.epoch))?;
                Ok(Box::new(tcp))
            }
            DataPlane::Nccl => self.nccl(nccl_ids, deadline),
        }
    }

    /// Joins the NCCL group: rank 0 makes the unique id and sends it out through the
    /// coordinators; the others wait for it until `deadline`.
    #[cfg(feature = "cuda")]
    fn nccl(&self, ids: &std_mpsc::Receiver<NcclId>, deadline: Instant) -> Result<Box<dyn Transport>, String> {
        use crate::transport::nccl::NcclTransport;
        let (config, a) = (self.config, self.a);
        let herd_kernels::device::Device::Cuda(ordinal) = config.device.device else {
            return Err(nccl_refusal(a.epoch, "this worker runs on the CPU"));
        };
        let id = if a.rank == 0 {
            let id = NcclId::new().map_err(|e| nccl_refusal(a.epoch, &format!("creating the NCCL unique id: {e}")))?;
            let _ = self.notes.send(GroupNote::NcclId { epoch: a.epoch, id });
            id
        } else {
            ids.recv_timeout(deadline.saturating_duration_since(Instant::now())).map_err(|_| {
                format!("the NCCL unique id of epoch {} did not arrive from rank 0 through the coordinators", a.epoch)
            })?
        };
        let nccl = NcclTransport::connect(a.rank, a.members.len(), &id, ordinal, deadline)
            .map_err(|e| nccl_refusal(a.epoch, &format!("joining over NCCL: {e}")))?;
        tracing::info!(epoch = a.epoch, rank = a.rank, device = ordinal, "NCCL data plane up");
        Ok(Box::new(nccl))
    }

    #[cfg(not(feature = "cuda"))]
    fn nccl(&self, _ids: &std_mpsc::Receiver<NcclId>, _deadline: Instant) -> Result<Box<dyn Transport>, String> {
        Err(nccl_refusal(self.a.epoch, "this herd was built without the `cuda` feature"))
    }
}

/// Why an NCCL group could not form, with the way out.
fn nccl_refusal(epoch: u64, why: &str) -> String {
    format!(
        "the group of epoch {epoch} runs its data plane over NCCL, but {why} \
         (start the coordinators with `--data-plane tcp` to use TCP instead)"
    )
}

/// What this rank measured over the group's life.
fn stats(rank: usize, steps: LoopStats, runner: &EpRunner) -> WorkerStats {
    let transport = runner.transport_stats();
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
    WorkerStats {
        rank,
        steps: steps.steps,
        collectives: transport.collectives,
        bytes_sent: transport.bytes_sent,
        bytes_received: transport.bytes_received,
        busy_ms: transport.busy.as_secs_f64() * 1e3,
        peak_rss_bytes: host::peak_rss_bytes().unwrap_or(0),
        layers,
    }
}
