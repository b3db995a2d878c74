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
//!
//! The data plane is the one the assignment names. Over NCCL, rank 0 creates the group's
//! unique id and sends it to the coordinators, which relay it to the other members; the agent
//! hands an id to the group of its epoch, or keeps it for a group not started yet.

use crate::control::{
    Assignment, Command, DataPlane, FromWorker, NcclId, Report, ToWorker, WorkerHello, WorkerStatus,
    request_coordinator,
};
use crate::engine::EngineConfig;
use crate::engine::device::{self, DeviceOptions};
use crate::engine::request::{Event, Rejection};
use crate::ep::EpRunner;
use crate::frontend::Frontend;
use crate::lockstep::{self, Load, LockstepConfig};
use crate::model::weights::ComputeDtype;
use crate::transport::Transport;
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
    /// Where this epoch's NCCL unique id goes (read only by an NCCL group's ranks other than 0).
    nccl_ids: std_mpsc::Sender<NcclId>,
    thread: std::thread::JoinHandle<()>,
    load: Arc<Mutex<Load>>,
    serving: Arc<std::sync::atomic::AtomicBool>,
}

/// What the group thread tells the agent.
enum GroupNote {
    Report(Report),
    /// Rank 0 of an NCCL group made its unique id: send it to every coordinator.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    NcclId {
        epoch: u64,
        id: NcclId,
    },
    Ended {
        epoch: u64,
        error: Option<String>,
    },
}

/// Run the agent until a coordinator refuses the worker (Err) or every link is gone and the
/// inbox closes (Ok).
pub async fn run(config: AgentConfig, mut inbox: mpsc::UnboundedReceiver<Inbox>) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let mut links: BTreeMap<usize, (Option<u64>, mpsc::UnboundedSender<FromWorker>)> = BTreeMap::new();
    let mut group: Option<Group> = None;
    let mut latest: Option<Assignment> = None;
    // An NCCL id that came before its epoch's assignment (coordinators relay independently).
    let mut early_nccl_id: Option<(u64, NcclId)> = None;
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
                                let early = take_early_id(&mut early_nccl_id, a.epoch);
                                group = Some(start_group(Arc::clone(&config), a, early, note_tx.clone()));
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
                        // Every coordinator relays the id; the group takes the first that arrives.
                        ToWorker::NcclId { epoch, id } => match &group {
                            Some(g) if g.epoch == epoch => {
                                let _ = g.nccl_ids.send(id);
                            }
                            _ if epoch > latest.as_ref().map_or(0, |l| l.epoch) => early_nccl_id = Some((epoch, id)),
                            _ => tracing::debug!(epoch, "ignoring the NCCL id of a past epoch"),
                        },
                    },
                }
            }
            note = notes.recv() => {
                let Some(note) = note else { continue };
                match note {
                    GroupNote::Report(Report::Event(e)) => route(&links, FromWorker::Event(e)),
                    GroupNote::Report(Report::Rejected { id, reason }) => route(&links, FromWorker::Rejected { id, reason }),
                    GroupNote::Report(_) => {}
                    GroupNote::NcclId { epoch, id } => {
                        for (_, tx) in links.values() {
                            let _ = tx.send(FromWorker::NcclId { epoch, id });
                        }
                    }
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

/// The kept NCCL id if it is `epoch`'s; an id of a still newer epoch stays for that epoch's
/// assignment, an older one is dropped.
fn take_early_id(early: &mut Option<(u64, NcclId)>, epoch: u64) -> Option<NcclId> {
    let id = early.filter(|&(e, _)| e == epoch).map(|(_, id)| id);
    *early = early.filter(|&(e, _)| e > epoch);
    id
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
fn start_group(
    config: Arc<AgentConfig>,
    a: Assignment,
    early_nccl_id: Option<NcclId>,
    notes: mpsc::UnboundedSender<GroupNote>,
) -> Group {
    let (commands, rx) = std_mpsc::channel();
    let (nccl_ids, nccl_rx) = std_mpsc::channel();
    if let Some(id) = early_nccl_id {
        let _ = nccl_ids.send(id);
    }
    let load = Arc::new(Mutex::new(Load::default()));
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let epoch = a.epoch;
    let (thread_load, thread_serving) = (Arc::clone(&load), Arc::clone(&serving));
    let thread = std::thread::spawn(move || {
        let result = run_group(&config, &a, &rx, &nccl_rx, &notes, thread_load, &thread_serving);
        thread_serving.store(false, std::sync::atomic::Ordering::Release);
        let _ = notes.send(GroupNote::Ended { epoch: a.epoch, error: result.err() });
    });
    Group { epoch, commands, nccl_ids, thread, load, serving }
}

fn run_group(
    config: &AgentConfig,
    a: &Assignment,
    commands: &std_mpsc::Receiver<Command>,
    nccl_ids: &std_mpsc::Receiver<NcclId>,
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
    let deadline = Instant::now() + Duration::from_millis(a.step_timeout_ms.max(10_000));
    let transport: Box<dyn Transport> = match a.data_plane {
        DataPlane::Tcp => {
            let listener = config.listener.try_clone().map_err(|e| format!("data-plane listener: {e}"))?;
            let tcp =
                TcpTransport::connect(a.rank, a.members.len(), &a.members, listener, config.tcp.clone(), deadline)
                    .map_err(|e| format!("joining the group of epoch {}: {e}", a.epoch))?;
            Box::new(tcp)
        }
        DataPlane::Nccl => nccl_transport(config, a, nccl_ids, notes, deadline)?,
    };
    let mut runner = EpRunner::new(transport, a.placement.clone(), Duration::from_millis(a.step_timeout_ms));
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

/// Joins the NCCL group of `a`: rank 0 makes the unique id and sends it out through the
/// coordinators; the others wait for it until `deadline`.
#[cfg(feature = "cuda")]
fn nccl_transport(
    config: &AgentConfig,
    a: &Assignment,
    ids: &std_mpsc::Receiver<NcclId>,
    notes: &mpsc::UnboundedSender<GroupNote>,
    deadline: Instant,
) -> Result<Box<dyn Transport>, String> {
    use crate::transport::nccl::NcclTransport;
    let herd_kernels::device::Device::Cuda(ordinal) = config.device.device else {
        return Err(nccl_refusal(a.epoch, "this worker runs on the CPU"));
    };
    let id = if a.rank == 0 {
        let id = NcclId::new().map_err(|e| nccl_refusal(a.epoch, &format!("creating the NCCL unique id: {e}")))?;
        let _ = notes.send(GroupNote::NcclId { epoch: a.epoch, id });
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
fn nccl_transport(
    _config: &AgentConfig,
    a: &Assignment,
    _ids: &std_mpsc::Receiver<NcclId>,
    _notes: &mpsc::UnboundedSender<GroupNote>,
    _deadline: Instant,
) -> Result<Box<dyn Transport>, String> {
    Err(nccl_refusal(a.epoch, "this herd was built without the `cuda` feature"))
}

/// Why an NCCL group could not form, with the way out.
fn nccl_refusal(epoch: u64, why: &str) -> String {
    format!(
        "the group of epoch {epoch} runs its data plane over NCCL, but {why} \
         (start the coordinators with `--data-plane tcp` to use TCP instead)"
    )
}

/// Events that end a request with an error when its worker's group disappears before any
/// token: the coordinator may retry these elsewhere.
pub fn is_retryable(event: &Event) -> bool {
    matches!(event, Event::Aborted { reason, .. } if reason.is_retryable())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::CONTROL_VERSION;
    use crate::placement::{MoeShape, Placement};

    #[test]
    fn an_early_nccl_id_waits_for_its_own_epoch() {
        let id = NcclId([3; crate::control::NCCL_ID_BYTES]);
        let mut early = Some((7, id));
        assert_eq!(take_early_id(&mut early, 6), None, "an older assignment does not take it");
        assert_eq!(early, Some((7, id)), "and it stays for epoch 7");
        assert_eq!(take_early_id(&mut early, 7), Some(id));
        assert_eq!(early, None);
        let mut stale = Some((5, id));
        assert_eq!(take_early_id(&mut stale, 6), None);
        assert_eq!(stale, None, "an id older than the assignment is dropped");
    }

    // A CPU worker told to run NCCL must fail that group with an error that says why and how
    // to get TCP instead (reported to the coordinators), not hang waiting for an id or a GPU.
    #[test]
    fn a_cpu_worker_fails_an_nccl_group_with_the_way_out() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/scout/model");
        let frontend = Arc::new(Frontend::load(&dir).expect("the golden scout checkpoint"));
        let text = &frontend.config.text;
        let shape = MoeShape {
            moe_layers: (0..text.num_hidden_layers).filter(|&l| text.layers[l].moe).collect(),
            experts: text.num_local_experts,
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let data_addr = listener.local_addr().expect("addr");
        let config = AgentConfig {
            hello: WorkerHello {
                name: "w1".into(),
                data_addr,
                memory_bytes: 0,
                device: "cpu".into(),
                fingerprint: frontend.fingerprint(),
                version: CONTROL_VERSION,
            },
            frontend,
            dtype: ComputeDtype::F32,
            engine: EngineConfig::default(),
            device: DeviceOptions::default(),
            tcp: TcpOptions::default(),
            listener,
            heartbeat: Duration::from_millis(50),
        };
        let assignment = Assignment {
            epoch: 3,
            rank: 1,
            members: vec!["127.0.0.1:9".parse().expect("addr"), data_addr],
            placement: Placement::round_robin(2, &shape),
            step_timeout_ms: 1_000,
            data_plane: DataPlane::Nccl,
        };

        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let error = runtime.block_on(async move {
            let (inbox_tx, inbox) = mpsc::unbounded_channel();
            let (to_coordinator, mut from_worker) = mpsc::unbounded_channel();
            let agent = tokio::spawn(run(config, inbox));
            inbox_tx.send(Inbox::Connected { index: 0, link: Link { to_coordinator } }).expect("send");
            let message = ToWorker::Assign(assignment);
            inbox_tx.send(Inbox::Message { index: 0, message }).expect("send");
            let error = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    match from_worker.recv().await.expect("the agent stopped") {
                        FromWorker::GroupFailed { epoch, error } => break (epoch, error),
                        FromWorker::NcclId { .. } => panic!("rank 1 must not make an NCCL id"),
                        _ => {}
                    }
                }
            })
            .await
            .expect("no GroupFailed within 60 s");
            drop(inbox_tx);
            tokio::time::timeout(Duration::from_secs(30), agent)
                .await
                .expect("agent exits")
                .expect("join")
                .expect("ok");
            error
        });
        assert_eq!(error.0, 3);
        assert!(error.1.contains("NCCL") && error.1.contains("--data-plane tcp"), "unhelpful error: {}", error.1);
    }
}
