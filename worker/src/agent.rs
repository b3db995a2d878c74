//! A worker's side of the coordinator tier: register with every coordinator, heartbeat,
//! follow placement epochs, and carry requests between coordinators and the lockstep group.
//!
//! The agent only sees channels ([`Link`]s), one per coordinator; the binary pumps them over
//! QUIC. Each coordinator can submit requests; request ids carry the coordinator's id in
//! their top bits ([`request_coordinator`]), so events go back to whoever asked.
//!
//! An `Assign` with a newer epoch re-forms the group: the current lockstep loop is told to
//! leave (its requests end with an error), the model is reloaded with the experts the new
//! placement gives this rank (mapped, so cheap), the data plane reconnects, and a fresh
//! engine starts stepping.

use crate::control::{
    Assignment, Command, FromWorker, Report, ToWorker, WorkerHello, WorkerStatus, request_coordinator,
};
use crate::engine::device::{self, DeviceOptions};
use crate::engine::request::{Event, Rejection};
use crate::engine::scheduler::EngineConfig;
use crate::ep::EpRunner;
use crate::frontend::Frontend;
use crate::lockstep::{self, Load, LockstepConfig};
use crate::model::weights::ComputeDtype;
use crate::transport::tcp::{TcpOptions, TcpTransport};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One coordinator connection, as channels.
#[derive(Debug)]
pub struct Link {
    pub to_coordinator: mpsc::UnboundedSender<FromWorker>,
}

/// What arrives at the agent.
#[derive(Debug)]
pub enum Inbox {
    /// Link `index` is (re)connected; the agent greets it.
    Connected {
        index: usize,
        link: Link,
    },
    Disconnected {
        index: usize,
    },
    Message {
        index: usize,
        message: ToWorker,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("coordinator refused this worker: {0}")]
    Refused(String),
}

/// Everything the agent needs to build groups.
pub struct AgentConfig {
    pub hello: WorkerHello,
    pub frontend: Arc<Frontend>,
    pub dtype: ComputeDtype,
    pub engine: EngineConfig,
    /// The CPU, or the GPU every group's engine runs on (its routed experts uploaded there).
    pub device: DeviceOptions,
    pub tcp: TcpOptions,
    /// The data-plane listener (its address is `hello.data_addr`); cloned for every group.
    pub listener: TcpListener,
    pub heartbeat: Duration,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig").field("hello", &self.hello).finish_non_exhaustive()
    }
}

/// A running lockstep group.
struct Group {
    epoch: u64,
    commands: std_mpsc::Sender<Command>,
    thread: std::thread::JoinHandle<()>,
    load: Arc<Mutex<Load>>,
    serving: Arc<std::sync::atomic::AtomicBool>,
}

/// What the group thread tells the agent.
enum GroupNote {
    Report(Report),
    Ended { epoch: u64, error: Option<String> },
}

/// Run the agent until a coordinator refuses the worker (Err) or every link is gone and the
/// inbox closes (Ok).
pub async fn run(config: AgentConfig, mut inbox: mpsc::UnboundedReceiver<Inbox>) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let mut links: BTreeMap<usize, (Option<u64>, mpsc::UnboundedSender<FromWorker>)> = BTreeMap::new();
    let mut group: Option<Group> = None;
    let mut latest: Option<Assignment> = None;
    let (note_tx, mut notes) = mpsc::unbounded_channel::<GroupNote>();
    let mut beat = tokio::time::interval(config.heartbeat);
    loop {
        tokio::select! {
            msg = inbox.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    Inbox::Connected { index, link } => {
                        let _ = link.to_coordinator.send(FromWorker::Hello(config.hello.clone()));
                        links.insert(index, (None, link.to_coordinator));
                    }
                    Inbox::Disconnected { index } => {
                        links.remove(&index);
                    }
                    Inbox::Message { index, message } => match message {
                        ToWorker::Welcome { coordinator_id, .. } => {
                            if let Some(l) = links.get_mut(&index) {
                                l.0 = Some(coordinator_id);
                            }
                        }
                        ToWorker::Refused { reason } => return Err(AgentError::Refused(reason)),
                        ToWorker::Assign(a) => {
                            let current = group.as_ref().map_or(0, |g| g.epoch).max(latest.as_ref().map_or(0, |l| l.epoch));
                            if a.epoch > current {
                                if let Some(g) = group.take() {
                                    // Never block this loop on the old group: heartbeats must keep
                                    // flowing while its thread waits out a collective deadline.
                                    tokio::spawn(leave(g, a.epoch));
                                }
                                latest = Some(a.clone());
                                group = Some(start_group(Arc::clone(&config), a, note_tx.clone()));
                            }
                        }
                        ToWorker::Submit(req) => {
                            let id = req.id;
                            match &group {
                                Some(g) if g.serving.load(std::sync::atomic::Ordering::Acquire) => {
                                    let _ = g.commands.send(Command::Submit(req));
                                }
                                _ => send_to(&links, index, FromWorker::Rejected { id, reason: Rejection::NotServing }),
                            }
                        }
                        ToWorker::Cancel { id } => {
                            if let Some(g) = &group {
                                let _ = g.commands.send(Command::Cancel { id });
                            }
                        }
                        // The group's data plane is TCP; nothing consumes an NCCL id yet (see
                        // `transport::nccl` for what wiring it needs).
                        ToWorker::NcclId { epoch, .. } => {
                            tracing::debug!(epoch, "ignoring an NCCL unique id: this worker's data plane is TCP");
                        }
                    },
                }
            }
            note = notes.recv() => {
                let Some(note) = note else { continue };
                match note {
                    GroupNote::Report(Report::Event(e)) => route(&links, FromWorker::Event(e)),
                    GroupNote::Report(Report::Rejected { id, reason }) => route(&links, FromWorker::Rejected { id, reason }),
                    GroupNote::Report(_) => {}
                    GroupNote::Ended { epoch, error } => {
                        if group.as_ref().is_some_and(|g| g.epoch == epoch) {
                            group = None;
                        }
                        if let Some(error) = error {
                            for (_, tx) in links.values() {
                                let _ = tx.send(FromWorker::GroupFailed { epoch, error: error.clone() });
                            }
                        }
                    }
                }
            }
            _ = beat.tick() => {
                let status = match &group {
                    Some(g) => {
                        let load = g.load.lock().map(|l| *l).unwrap_or_default();
                        WorkerStatus {
                            epoch: g.epoch,
                            serving: g.serving.load(std::sync::atomic::Ordering::Acquire),
                            running: load.running,
                            waiting: load.waiting,
                            kv_usage: load.kv_usage,
                        }
                    }
                    None => WorkerStatus::default(),
                };
                for (_, tx) in links.values() {
                    let _ = tx.send(FromWorker::Status(status.clone()));
                }
            }
        }
    }
    if let Some(g) = group.take() {
        leave(g, 0).await;
    }
    Ok(())
}

fn send_to(links: &BTreeMap<usize, (Option<u64>, mpsc::UnboundedSender<FromWorker>)>, index: usize, msg: FromWorker) {
    if let Some((_, tx)) = links.get(&index) {
        let _ = tx.send(msg);
    }
}

/// Send a request's event to the coordinator whose id the request id carries.
fn route(links: &BTreeMap<usize, (Option<u64>, mpsc::UnboundedSender<FromWorker>)>, msg: FromWorker) {
    let id = match &msg {
        FromWorker::Event(e) => e.id(),
        FromWorker::Rejected { id, .. } => *id,
        _ => return,
    };
    let owner = request_coordinator(id);
    if let Some((_, tx)) = links.values().find(|(c, _)| *c == Some(owner)) {
        let _ = tx.send(msg);
    }
}

/// Tell the group to leave and wait for its thread (off the async runtime).
async fn leave(g: Group, next_epoch: u64) {
    let reason = if next_epoch > 0 {
        format!("the cluster moved to placement epoch {next_epoch}; retry the request")
    } else {
        "the worker is shutting down".to_string()
    };
    let _ = g.commands.send(Command::Leave { reason });
    let _ = tokio::task::spawn_blocking(move || g.thread.join()).await;
}

/// Build the model, engine and data plane for `a` on a thread, then run the lockstep loop.
fn start_group(config: Arc<AgentConfig>, a: Assignment, notes: mpsc::UnboundedSender<GroupNote>) -> Group {
    let (commands, rx) = std_mpsc::channel();
    let load = Arc::new(Mutex::new(Load::default()));
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let epoch = a.epoch;
    let (thread_load, thread_serving) = (Arc::clone(&load), Arc::clone(&serving));
    let thread = std::thread::spawn(move || {
        let result = run_group(&config, &a, &rx, &notes, thread_load, &thread_serving);
        thread_serving.store(false, std::sync::atomic::Ordering::Release);
        let _ = notes.send(GroupNote::Ended { epoch: a.epoch, error: result.err() });
    });
    Group { epoch, commands, thread, load, serving }
}

fn run_group(
    config: &AgentConfig,
    a: &Assignment,
    commands: &std_mpsc::Receiver<Command>,
    notes: &mpsc::UnboundedSender<GroupNote>,
    load: Arc<Mutex<Load>>,
    serving: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let local: BTreeMap<usize, Vec<usize>> =
        a.placement.layers.keys().map(|&l| (l, a.placement.local_experts(a.rank, l))).collect();
    let model = config.frontend.load_model(config.dtype, Some(&local)).map_err(|e| format!("loading weights: {e}"))?;
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
    let listener = config.listener.try_clone().map_err(|e| format!("data-plane listener: {e}"))?;
    let deadline = Instant::now() + Duration::from_millis(a.step_timeout_ms.max(10_000));
    let transport = TcpTransport::connect(a.rank, a.members.len(), &a.members, listener, config.tcp.clone(), deadline)
        .map_err(|e| format!("joining the group of epoch {}: {e}", a.epoch))?;
    let mut runner = EpRunner::new(Box::new(transport), a.placement.clone(), Duration::from_millis(a.step_timeout_ms));
    serving.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(epoch = a.epoch, rank = a.rank, world = a.members.len(), "group formed");
    let mut report = |r: Report| {
        let _ = notes.send(GroupNote::Report(r));
    };
    // The agent runs one group at a time (`leave` joins the old group's thread first).
    let lockstep_config = LockstepConfig { load: Some(load), steps_on_pool: true, ..LockstepConfig::default() };
    lockstep::run(&mut engine, &mut runner, commands, &mut report, lockstep_config)
        .map(|_| ())
        .map_err(|e| format!("group of epoch {} failed: {e}", a.epoch))
}

/// Events that end a request with an error when its worker's group disappears before any
/// token: the coordinator may retry these elsewhere.
pub fn is_retryable(event: &Event) -> bool {
    matches!(event, Event::Aborted { error, .. } if error.contains("epoch") || error.contains("lost rank") || error.contains("deadline"))
}
