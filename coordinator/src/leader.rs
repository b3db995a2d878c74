//! What only the Raft leader does: judge worker liveness from heartbeats and plan placement
//! epochs. Both write through the log, so a new leader continues from the same facts.
//!
//! Verdicts: a worker silent for `suspect_after` becomes `Suspect` (no new requests), for
//! `dead_after` `Dead`; a heartbeat makes it `Live` again. A new leader first waits
//! `dead_after` so it never judges workers before they have had time to reach it.
//!
//! Planning: the first epoch forms once `min_workers` are live; after that a new epoch is
//! planned (round-robin over the live workers) whenever a member is no longer live or a
//! member reports that the current epoch's group failed.

use crate::cluster::{ClusterCommand, ClusterState, ModelSpec, Outcome, Verdict, plan_round_robin};
use crate::raft::RaftHandle;
use crate::scheduler::Scheduler;
use crate::state_machine::{ClusterMachine, decode_outcome, encode_command};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub me: u64,
    pub model: ModelSpec,
    pub min_workers: usize,
    pub suspect_after: Duration,
    pub dead_after: Duration,
    pub interval: Duration,
}

pub async fn run(config: LeaderConfig, raft: RaftHandle<ClusterMachine>, scheduler: Arc<Scheduler>) {
    let mut leading_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(config.interval);
    loop {
        tick.tick().await;
        if raft.status().leader != Some(config.me) {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(Instant::now);
        let state = raft.read(|m| m.state().clone());
        if state.model.is_none() {
            propose(&raft, ClusterCommand::SetModel(config.model.clone())).await;
            continue;
        }
        if since.elapsed() >= config.dead_after {
            judge(&config, &raft, &scheduler, &state).await;
        }
        let state = raft.read(|m| m.state().clone());
        plan(&config, &raft, &scheduler, &state).await;
    }
}

async fn propose(raft: &RaftHandle<ClusterMachine>, cmd: ClusterCommand) -> Option<Outcome> {
    match raft.propose(encode_command(&cmd)).await {
        Ok(bytes) => Some(decode_outcome(&bytes)),
        Err(e) => {
            tracing::warn!("proposal failed: {e}");
            None
        }
    }
}

async fn judge(config: &LeaderConfig, raft: &RaftHandle<ClusterMachine>, scheduler: &Scheduler, state: &ClusterState) {
    let seen: std::collections::HashMap<u64, Option<Instant>> =
        scheduler.workers().into_iter().map(|w| (w.id, w.last_seen.filter(|_| w.connected))).collect();
    for w in state.workers.values() {
        if w.verdict == Verdict::Draining {
            continue;
        }
        let silent = seen.get(&w.id).copied().flatten().map(|t| t.elapsed());
        // A dead worker comes back only on fresh heartbeats (e.g. after a network partition).
        if w.verdict == Verdict::Dead && silent.is_none_or(|d| d >= config.suspect_after) {
            continue;
        }
        let next = match silent {
            Some(d) if d < config.suspect_after => Verdict::Live,
            Some(d) if d < config.dead_after => Verdict::Suspect,
            _ => Verdict::Dead,
        };
        if next != w.verdict {
            let reason = match silent {
                Some(d) => format!("no heartbeat for {:.1} s", d.as_secs_f64()),
                None => "not connected".into(),
            };
            tracing::warn!(worker = w.id, name = %w.name, ?next, "{reason}");
            propose(raft, ClusterCommand::SetVerdict { worker: w.id, verdict: next, reason }).await;
        }
    }
}

async fn plan(config: &LeaderConfig, raft: &RaftHandle<ClusterMachine>, scheduler: &Scheduler, state: &ClusterState) {
    let live = state.live_workers();
    let reason = match &state.placement {
        None if live.len() >= config.min_workers.max(1) => format!("first epoch over {} workers", live.len()),
        Some(_) if !state.epoch_healthy() && !live.is_empty() => "a member is no longer live".to_string(),
        Some(_) if scheduler.current_group_failed() && !live.is_empty() => {
            "the group of the current epoch failed".into()
        }
        _ => return,
    };
    // Plan over workers that are live and connected here: a worker that just vanished may
    // not be judged dead yet, and a group that includes it could not form.
    let connected: std::collections::HashSet<u64> =
        scheduler.workers().into_iter().filter(|w| w.connected).map(|w| w.id).collect();
    let Some((members, placement)) = plan_round_robin(state, |id| connected.contains(&id)) else { return };
    let cmd =
        ClusterCommand::SetPlacement { expected_epoch: state.epoch(), members, placement, reason: reason.clone() };
    if let Some(Outcome::Epoch { epoch }) = propose(raft, cmd).await {
        tracing::info!(epoch, "new placement epoch: {reason}");
    }
}
