//! Where requests run: an engine in this process, or a group of worker processes.
//!
//! The CLI's `generate` and `eval` are written once against [`Backend`]; `--workers N`
//! picks [`ClusterBackend`], otherwise [`LocalBackend`].

use crate::local_cluster::{LocalCluster, WorkerMsg};
use anyhow::{Context, bail};
use herd_worker::control::{Command, Report, WorkerStats};
use herd_worker::engine::Engine;
use herd_worker::engine::request::{Event, Request, RequestId};
use std::collections::HashMap;
use std::time::Duration;

pub trait Backend {
    /// Queue a request. A refusal arrives later as an `Aborted` event, as it would from a
    /// remote worker.
    fn submit(&mut self, req: Request) -> anyhow::Result<()>;
    /// The next events, waiting until there is at least one. Errors mean the backend itself
    /// failed (a worker died); requests' own failures are `Aborted` events.
    fn poll(&mut self) -> anyhow::Result<Vec<Event>>;
    /// Stop, returning what each worker measured (empty in process).
    fn close(&mut self) -> Vec<WorkerStats> {
        Vec::new()
    }
}

/// An engine in this process, stepped by `poll`.
#[derive(Debug)]
pub struct LocalBackend {
    engine: Engine,
    pending: Vec<Event>,
}

impl LocalBackend {
    pub fn new(engine: Engine) -> Self {
        Self { engine, pending: Vec::new() }
    }
}

impl Backend for LocalBackend {
    fn submit(&mut self, req: Request) -> anyhow::Result<()> {
        let id = req.id;
        if let Err(reason) = self.engine.submit(req) {
            self.pending.push(Event::Aborted {
                id,
                reason: herd_worker::engine::request::AbortReason::engine(format!("rejected: {reason}")),
            });
        }
        Ok(())
    }

    fn poll(&mut self) -> anyhow::Result<Vec<Event>> {
        if !self.pending.is_empty() {
            return Ok(std::mem::take(&mut self.pending));
        }
        if !self.engine.has_work() {
            bail!("polled an idle engine");
        }
        let (events, _) = self.engine.step()?;
        Ok(events)
    }
}

/// Worker processes; each request goes to the worker with the fewest requests in flight.
#[derive(Debug)]
pub struct ClusterBackend {
    cluster: Option<LocalCluster>,
    in_flight: Vec<usize>,
    home: HashMap<RequestId, usize>,
    /// Longest wait for any event before the group is declared stuck.
    timeout: Duration,
}

impl ClusterBackend {
    pub fn new(cluster: LocalCluster, timeout: Duration) -> Self {
        let n = cluster.workers();
        Self { cluster: Some(cluster), in_flight: vec![0; n], home: HashMap::new(), timeout }
    }

    fn cluster(&mut self) -> anyhow::Result<&mut LocalCluster> {
        self.cluster.as_mut().context("the worker group has shut down")
    }

    /// Leave the group; returns each worker's exit code and statistics.
    pub fn shutdown(&mut self) -> (Vec<Option<i32>>, Vec<WorkerStats>) {
        self.cluster.take().map(|c| c.shutdown_with_stats(Duration::from_secs(30))).unwrap_or_default()
    }
}

impl Drop for ClusterBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Backend for ClusterBackend {
    fn submit(&mut self, req: Request) -> anyhow::Result<()> {
        let rank = (0..self.in_flight.len()).min_by_key(|&r| (self.in_flight[r], r)).context("no workers")?;
        self.in_flight[rank] += 1;
        self.home.insert(req.id, rank);
        self.cluster()?.send(rank, &Command::Submit(req))
    }

    fn poll(&mut self) -> anyhow::Result<Vec<Event>> {
        let timeout = self.timeout;
        let (rank, msg) = self.cluster()?.recv(timeout).context("no event from any worker within the timeout")?;
        let event = match msg {
            WorkerMsg::Report(Report::Event(e)) => e,
            WorkerMsg::Report(Report::Rejected { id, reason }) => Event::Aborted {
                id,
                reason: herd_worker::engine::request::AbortReason::engine(format!("rejected: {reason}")),
            },
            WorkerMsg::Report(Report::Fatal { error }) => bail!("worker {rank} failed: {error}"),
            WorkerMsg::Report(_) => return Ok(Vec::new()),
            WorkerMsg::Closed => bail!("worker {rank} exited unexpectedly"),
        };
        if event.is_final()
            && let Some(r) = self.home.remove(&event.id())
        {
            self.in_flight[r] -= 1;
        }
        Ok(vec![event])
    }

    fn close(&mut self) -> Vec<WorkerStats> {
        self.shutdown().1
    }
}
