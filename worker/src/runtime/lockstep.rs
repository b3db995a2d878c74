//! The lockstep loop of one worker in an expert-parallel group.
//!
//! Every iteration starts with a tiny all-gather: each worker says whether it has work and
//! whether it wants to leave. If anyone has work, every worker runs one engine step, those
//! without requests on an empty batch, so that each MoE layer's collectives find all peers
//! present. If nobody has work, workers wait briefly for commands and vote again. The group
//! leaves together once everyone has asked to and nobody has work. A transport error (a
//! dead or hung peer, a malformed frame) ends every request with an error and the loop with
//! that error, on every surviving worker, within the collective deadline.
//!
//! The loop takes [`GroupCommand`]s between steps only, so a step's batch never changes under
//! it, and reports what happens to requests as the [`FromWorker`] messages that go up the
//! control channel unchanged.

use crate::control::FromWorker;
use crate::engine::request::{AbortReason, Event, Rejection, Request, RequestId};
use crate::engine::{Engine, EngineError, Load};
use crate::ep::EpRunner;
use crate::model::ModelError;
use crate::transport::{TransportError, all_gather};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LockstepError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl LockstepError {
    /// What the failure means for the requests that were in the group: a lost or late peer
    /// (worth retrying elsewhere), or an engine error.
    pub fn abort_reason(&self) -> AbortReason {
        let exchange = match self {
            LockstepError::Transport(t) => return transport_abort(t),
            LockstepError::Engine(EngineError::Model(ModelError::Exchange(x))) => x,
            #[cfg(feature = "cuda")]
            LockstepError::Engine(EngineError::Gpu(crate::gpu::GpuError::Exchange(x))) => x,
            LockstepError::Engine(e) => return AbortReason::engine(e.to_string()),
        };
        AbortReason::from(exchange)
    }
}

/// A failed collective outside the MoE layers (the per-step vote).
fn transport_abort(t: &TransportError) -> AbortReason {
    let detail = t.to_string();
    match (t.root(), t.peer()) {
        (TransportError::Timeout { peer, .. }, _) => AbortReason::Deadline { rank: *peer, detail },
        (_, Some(rank)) => AbortReason::PeerLost { rank, detail },
        (_, None) => AbortReason::Engine { message: detail },
    }
}

/// What the loop is told between steps.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupCommand {
    Submit(Request),
    Cancel(RequestId),
    /// Finish the running requests, then leave together with every other worker.
    Drain,
    /// Leave now: every request ends with this reason (a new placement epoch, a shutdown).
    Leave(AbortReason),
}

/// Loop settings.
#[derive(Clone, Debug)]
pub struct LockstepConfig {
    /// How long an idle group waits for a command before voting again.
    pub idle_wait: Duration,
    /// Where the loop publishes the engine's load after every iteration (for heartbeats).
    pub load: Option<Arc<Mutex<Load>>>,
    /// Run each step on a thread of the compute pool
    /// ([`on_pool`](herd_kernels::cpu::parallel::on_pool)), which saves two thread
    /// handoffs per parallel region. Only for a process whose one engine is this loop: a
    /// step holds its pool thread through the group's collectives, so engines of one
    /// process sharing a smaller pool would wait on each other forever.
    pub steps_on_pool: bool,
}

impl Default for LockstepConfig {
    fn default() -> Self {
        Self { idle_wait: Duration::from_millis(2), load: None, steps_on_pool: false }
    }
}

/// Totals over the loop's life.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopStats {
    pub steps: u64,
}

/// Run until the group shuts down (Ok) or the data plane fails (Err, after reporting an
/// `Aborted` event for every request this worker held).
pub fn run(
    engine: &mut Engine,
    runner: &mut EpRunner,
    commands: &Receiver<GroupCommand>,
    report: &mut dyn FnMut(FromWorker),
    config: LockstepConfig,
) -> Result<LoopStats, LockstepError> {
    let mut leaving = false;
    let mut stats = LoopStats::default();
    let result = loop {
        // Commands arrive between steps only, so a step's batch never changes under it.
        loop {
            match commands.try_recv() {
                Ok(GroupCommand::Leave(reason)) => {
                    deliver(engine.abort_all(&reason), report);
                    return Ok(stats);
                }
                Ok(cmd) => apply(engine, cmd, &mut leaving, report),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                // The driver is gone: finish what we have, then leave with the group.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    leaving = true;
                    break;
                }
            }
        }
        deliver(engine.take_events(), report);
        if let Some(load) = &config.load
            && let Ok(mut l) = load.lock()
        {
            *l = engine.load();
        }
        let vote = [u8::from(engine.has_work()), u8::from(leaving)];
        let deadline = Instant::now() + runner.timeout();
        let votes = match all_gather(runner.transport(), &vote, deadline) {
            Ok(v) => v,
            Err(e) => break Err(LockstepError::from(e)),
        };
        let any_work = votes.iter().any(|v| v.first() == Some(&1));
        if !any_work {
            if votes.iter().all(|v| v.get(1) == Some(&1)) {
                break Ok(stats);
            }
            if !leaving {
                match commands.recv_timeout(config.idle_wait) {
                    Ok(cmd) => apply(engine, cmd, &mut leaving, report),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => leaving = true,
                }
            }
            continue;
        }
        let step = if config.steps_on_pool {
            herd_kernels::cpu::parallel::on_pool(|| engine.step_with(runner))
        } else {
            engine.step_with(runner)
        };
        match step {
            Ok((events, _)) => deliver(events, report),
            Err(e) => break Err(LockstepError::from(e)),
        }
        stats.steps += 1;
    };
    if let Err(e) = &result {
        deliver(engine.abort_all(&e.abort_reason()), report);
    }
    result
}

fn apply(engine: &mut Engine, cmd: GroupCommand, leaving: &mut bool, report: &mut dyn FnMut(FromWorker)) {
    match cmd {
        GroupCommand::Submit(req) => {
            let id = req.id;
            if *leaving {
                report(FromWorker::Rejected { id, reason: Rejection::ShuttingDown });
            } else if let Err(reason) = engine.submit(req) {
                report(FromWorker::Rejected { id, reason });
            }
        }
        GroupCommand::Cancel(id) => {
            engine.cancel(id);
        }
        GroupCommand::Drain => *leaving = true,
        GroupCommand::Leave(_) => {}
    }
}

fn deliver(events: Vec<Event>, report: &mut dyn FnMut(FromWorker)) {
    for e in events {
        report(FromWorker::Event(e));
    }
}
