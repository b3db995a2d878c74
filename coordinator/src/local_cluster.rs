//! A static group of `herd worker` processes on this host: the coordinator-less case of the
//! cluster, for `herd generate|eval|bench --workers N`.
//!
//! The workers speak the control vocabulary of a managed cluster (`ToWorker` down,
//! `FromWorker` up) as JSON lines on their stdin/stdout, and this process plays the
//! coordinators' part with the same [`Scheduler`]: it registers each worker from its hello,
//! makes placement epoch 1 over all of them, and the scheduler sends each its assignment,
//! routes requests to them and their events back ([`LocalCluster::service`]).
//!
//! Start-up: every worker binds a data-plane port on 127.0.0.1 and says hello with its
//! address; once all have, the scheduler assigns each its rank, the members' addresses and
//! the placement, the group connects, and each reports that it serves epoch 1. Letting workers
//! pick their own ports avoids the race of choosing free ports for them in advance.

use crate::cluster::{ClusterState, PlacementEpoch, Verdict, WorkerId, WorkerRecord};
use crate::data_plane::DataPlanePolicy;
use crate::scheduler::{ClusterService, Scheduler};
use herd_worker::control::{FromWorker, ToWorker, WorkerStats, read_message, write_message};
use herd_worker::placement::Placement;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("starting worker {rank} ({exe}): {source}")]
    Spawn { rank: usize, exe: String, source: std::io::Error },
    #[error("worker {rank} failed: {error}")]
    Failed { rank: usize, error: String },
    #[error("worker {rank} exited during start-up")]
    Exited { rank: usize },
    #[error("workers did not start within the start-up timeout of {0:?}")]
    Timeout(Duration),
    #[error("worker {rank} sent {message} during start-up")]
    Unexpected { rank: usize, message: String },
    #[error("no such worker: {0}")]
    NoSuchWorker(usize),
    #[error("worker {rank}: {source}")]
    Io { rank: usize, source: std::io::Error },
}

/// A message from one worker, as a test observing the group sees it.
#[derive(Debug)]
pub enum WorkerMsg {
    Message(FromWorker),
    /// Its control channel closed (the process exited or crashed).
    Closed,
}

/// How to start the group.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `herd` executable.
    pub exe: PathBuf,
    pub workers: usize,
    pub model_dir: PathBuf,
    /// Where the routed experts go (the scheduler sends it in every assignment).
    pub placement: Placement,
    /// Deadline of each data-plane collective.
    pub step_timeout: Duration,
    /// Extra `herd worker` arguments (dtype, engine flags).
    pub worker_args: Vec<String>,
    /// More arguments for rank `i` only (e.g. its `--device`); ranks past the end get none.
    pub rank_args: Vec<Vec<String>>,
    /// Compute threads per worker (`None`: each uses every core, which oversubscribes).
    pub threads: Option<usize>,
    /// How long start-up (model load + connect) may take.
    pub start_timeout: Duration,
    /// Also hand every message to [`LocalCluster::recv`] (failure tests watch the raw traffic).
    pub observe: bool,
}

/// Running worker processes, served by a scheduler of their own.
#[derive(Debug)]
pub struct LocalCluster {
    children: Vec<Child>,
    /// Each worker's channel down (its writer thread holds the stdin).
    to_worker: Vec<mpsc::UnboundedSender<ToWorker>>,
    scheduler: Arc<Scheduler>,
    stats: Arc<Mutex<Vec<WorkerStats>>>,
    observed: Option<Receiver<(usize, WorkerMsg)>>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
}

/// Worker ids are ranks + 1 (id 0 means none in the cluster state).
fn worker_id(rank: usize) -> WorkerId {
    rank as WorkerId + 1
}

impl LocalCluster {
    /// Spawn the workers and wait until every one serves epoch 1.
    pub fn start(opts: &ClusterOptions) -> Result<Self, LocalClusterError> {
        if opts.workers == 0 {
            return Err(LocalClusterError::NoWorkers);
        }
        let (tx, rx) = channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for rank in 0..opts.workers {
            let mut cmd = std::process::Command::new(&opts.exe);
            if let Some(t) = opts.threads {
                cmd.args(["--threads", &t.to_string()]);
            }
            let spawned = cmd
                .arg("worker")
                .args(["--rank", &rank.to_string(), "--world", &opts.workers.to_string()])
                .arg("--model")
                .arg(&opts.model_dir)
                .args(&opts.worker_args)
                .args(opts.rank_args.get(rank).into_iter().flatten())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn();
            let mut child = spawned.map_err(|source| LocalClusterError::Spawn {
                rank,
                exe: opts.exe.display().to_string(),
                source,
            })?;
            let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                unreachable!("both were piped")
            };
            stdins.push(stdin);
            children.push(child);
            spawn_reader(rank, stdout, tx.clone());
        }
        drop(tx);
        let mut cluster = Self {
            children,
            to_worker: Vec::new(),
            scheduler: Scheduler::new(0, opts.step_timeout.as_millis() as u64, DataPlanePolicy::Tcp),
            stats: Arc::new(Mutex::new(Vec::new())),
            observed: None,
            dispatcher: None,
        };
        let deadline = Instant::now() + opts.start_timeout;
        let hellos = collect(&rx, opts.workers, deadline, opts.start_timeout, |_, m| match m {
            FromWorker::Hello(h) => Some(h),
            _ => None,
        })?;
        // The cluster state a coordinator tier would have replicated: every worker live, one
        // epoch over all of them in rank order.
        let mut state = ClusterState::default();
        for (rank, hello) in hellos.into_iter().enumerate() {
            let id = worker_id(rank);
            let record = WorkerRecord {
                id,
                name: hello.name,
                data_addr: hello.data_addr,
                memory_bytes: hello.memory_bytes,
                device: hello.device,
                verdict: Verdict::Live,
                reason: String::new(),
            };
            state.workers.insert(id, record);
        }
        let members = (0..opts.workers).map(worker_id).collect();
        let reason = "a static group".to_string();
        state.placement = Some(PlacementEpoch { epoch: 1, members, placement: opts.placement.clone(), reason });
        cluster.scheduler.set_state(&state);
        let mut conns = Vec::new();
        for (rank, stdin) in stdins.into_iter().enumerate() {
            let (down, up) = mpsc::unbounded_channel();
            let _ = down.send(ToWorker::Welcome { worker_id: worker_id(rank), coordinator_id: 0 });
            spawn_writer(stdin, up);
            cluster.to_worker.push(down.clone());
            conns.push(cluster.scheduler.attach(worker_id(rank), down));
        }
        let scheduler = Arc::clone(&cluster.scheduler);
        collect(&rx, opts.workers, deadline, opts.start_timeout, |rank, m| match m {
            FromWorker::Status(s) => {
                let serving = s.serving && s.epoch == 1;
                scheduler.heartbeat(worker_id(rank), s);
                serving.then_some(())
            }
            _ => None,
        })?;
        let (observe_tx, observed) = if opts.observe {
            let (t, r) = channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        cluster.observed = observed;
        let (scheduler, stats) = (Arc::clone(&cluster.scheduler), Arc::clone(&cluster.stats));
        cluster.dispatcher = Some(std::thread::spawn(move || dispatch(&rx, &scheduler, &conns, &stats, observe_tx)));
        Ok(cluster)
    }

    pub fn workers(&self) -> usize {
        self.children.len()
    }

    /// The group as the API's inference service: requests go to its workers through the
    /// scheduler, as they would in a managed cluster.
    pub fn service(&self) -> ClusterService {
        ClusterService(Arc::clone(&self.scheduler))
    }

    /// Send a message straight to one worker (failure tests; requests normally go through
    /// [`service`](Self::service)).
    pub fn send(&self, rank: usize, msg: ToWorker) -> Result<(), LocalClusterError> {
        let down = self.to_worker.get(rank).ok_or(LocalClusterError::NoSuchWorker(rank))?;
        down.send(msg).map_err(|_| LocalClusterError::Io {
            rank,
            source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the worker's control channel is closed"),
        })
    }

    /// The next message from any worker, waiting at most `timeout` (only with
    /// [`ClusterOptions::observe`]).
    pub fn recv(&self, timeout: Duration) -> Option<(usize, WorkerMsg)> {
        self.observed.as_ref()?.recv_timeout(timeout).ok()
    }

    /// Ask every worker to finish and leave, and wait up to `timeout` for them to exit;
    /// stragglers are killed. Returns each worker's exit code (`None` if killed by a signal).
    pub fn shutdown(self, timeout: Duration) -> Vec<Option<i32>> {
        self.shutdown_with_stats(timeout).0
    }

    /// [`shutdown`](Self::shutdown), also collecting the statistics each worker reports as it leaves.
    pub fn shutdown_with_stats(mut self, timeout: Duration) -> (Vec<Option<i32>>, Vec<WorkerStats>) {
        for down in &self.to_worker {
            let _ = down.send(ToWorker::Shutdown);
        }
        let deadline = Instant::now() + timeout;
        let mut codes = vec![None; self.children.len()];
        for (rank, child) in self.children.iter_mut().enumerate() {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        codes[rank] = status.code();
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        // Every reader has seen its worker's last line once the processes are gone, and the
        // dispatcher ends with the readers.
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
        let mut stats = std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()));
        stats.sort_by_key(|s| s.rank);
        (codes, stats)
    }

    /// Kill one worker process (for failure tests).
    pub fn kill(&mut self, rank: usize) -> Result<(), LocalClusterError> {
        let child = self.children.get_mut(rank).ok_or(LocalClusterError::NoSuchWorker(rank))?;
        child.kill().map_err(|source| LocalClusterError::Io { rank, source })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Wait until `pick` has taken one message from every worker (others are dropped); a worker
/// that fails or exits first ends start-up with its reason.
fn collect<T>(
    rx: &Receiver<(usize, WorkerMsg)>,
    workers: usize,
    deadline: Instant,
    timeout: Duration,
    mut pick: impl FnMut(usize, FromWorker) -> Option<T>,
) -> Result<Vec<T>, LocalClusterError> {
    let mut got: Vec<Option<T>> = (0..workers).map(|_| None).collect();
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, WorkerMsg::Message(FromWorker::GroupFailed { error, .. }))) => {
                return Err(LocalClusterError::Failed { rank, error });
            }
            Ok((rank, WorkerMsg::Message(FromWorker::Event(e)))) => {
                return Err(LocalClusterError::Unexpected { rank, message: format!("{e:?}") });
            }
            Ok((rank, WorkerMsg::Message(m))) => {
                if let Some(t) = pick(rank, m) {
                    got[rank].get_or_insert(t);
                }
            }
            Ok((rank, WorkerMsg::Closed)) => return Err(LocalClusterError::Exited { rank }),
            Err(_) => return Err(LocalClusterError::Timeout(timeout)),
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// Feed the workers' messages to the scheduler until every worker's channel has closed.
fn dispatch(
    rx: &Receiver<(usize, WorkerMsg)>,
    scheduler: &Scheduler,
    conns: &[u64],
    stats: &Mutex<Vec<WorkerStats>>,
    observe: Option<Sender<(usize, WorkerMsg)>>,
) {
    for (rank, msg) in rx {
        let id = worker_id(rank);
        let observed = match msg {
            WorkerMsg::Message(m) => {
                match &m {
                    FromWorker::Status(s) => scheduler.heartbeat(id, s.clone()),
                    FromWorker::Event(e) => scheduler.on_event(e.clone()),
                    FromWorker::Rejected { id, reason } => scheduler.on_rejected(*id, reason.clone()),
                    FromWorker::GroupFailed { epoch, .. } => scheduler.group_failed(id, *epoch),
                    FromWorker::Stats(s) => stats.lock().unwrap_or_else(|p| p.into_inner()).push(s.clone()),
                    FromWorker::Hello(_) | FromWorker::NcclId { .. } => {}
                }
                WorkerMsg::Message(m)
            }
            WorkerMsg::Closed => {
                scheduler.detach(id, conns[rank]);
                WorkerMsg::Closed
            }
        };
        if let Some(tx) = &observe {
            let _ = tx.send((rank, observed));
        }
    }
}

fn spawn_reader(rank: usize, stdout: std::process::ChildStdout, tx: Sender<(usize, WorkerMsg)>) {
    std::thread::spawn(move || {
        let mut input = BufReader::new(stdout);
        loop {
            match read_message::<FromWorker>(&mut input) {
                Ok(msg) => {
                    if tx.send((rank, WorkerMsg::Message(msg))).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = tx.send((rank, WorkerMsg::Closed));
                    return;
                }
            }
        }
    });
}

/// Write a worker's messages to its stdin until the channel closes or the pipe breaks.
fn spawn_writer(mut stdin: ChildStdin, mut down: mpsc::UnboundedReceiver<ToWorker>) {
    std::thread::spawn(move || {
        while let Some(msg) = down.blocking_recv() {
            if write_message(&mut stdin, &msg).is_err() {
                return;
            }
        }
    });
}
