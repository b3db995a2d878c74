//! The cluster state machine: the slow-changing facts the Raft log replicates.
//!
//! `apply(state, command) -> outcome` is pure: no clock, no network, no randomness, so every
//! coordinator that applies the same log reaches the same state, and tests can replay command
//! sequences against golden files (`coordinator/tests/data/cluster/`). Requests and tokens
//! never pass through here; only membership, the model, worker registrations and verdicts,
//! and placement epochs (with a bounded audit trail) do.

use herd_worker::control::WorkerDevice;
use herd_worker::placement::{MoeShape, Placement};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// A worker's id, assigned at first registration and stable across re-registrations of the
/// same name.
pub type WorkerId = u64;

/// How many past placement epochs the audit trail keeps.
pub const HISTORY_LEN: usize = 32;

/// A coordinator's addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    pub id: u64,
    pub raft_addr: SocketAddr,
    pub control_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// The served model, as every node must load it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Served model name (the API's `model` field).
    pub name: String,
    /// Hash of config.json, so a worker with another checkpoint is refused.
    pub fingerprint: String,
    pub moe_layers: Vec<usize>,
    pub experts: usize,
}

impl ModelSpec {
    pub fn shape(&self) -> MoeShape {
        MoeShape { moe_layers: self.moe_layers.clone(), experts: self.experts }
    }
}

/// The leader's judgement of a worker, from its heartbeats (heartbeats themselves never go
/// through the log; only changes of verdict do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Live,
    /// Missed heartbeats; not given new requests.
    Suspect,
    /// Gone; removed from placement at the next epoch.
    Dead,
    /// Asked to leave: no new requests, removed from placement at the next epoch.
    Draining,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub name: String,
    /// Data-plane (all-to-all) address.
    pub data_addr: SocketAddr,
    pub memory_bytes: u64,
    pub device: WorkerDevice,
    pub verdict: Verdict,
    /// Why the verdict last changed.
    pub reason: String,
}

/// One placement epoch: which workers form the lockstep group, in rank order, and where
/// the routed experts live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementEpoch {
    pub epoch: u64,
    /// Worker ids in rank order.
    pub members: Vec<WorkerId>,
    pub placement: Placement,
    pub reason: String,
}

/// Everything the log replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub coordinators: BTreeMap<u64, CoordinatorInfo>,
    pub model: Option<ModelSpec>,
    pub workers: BTreeMap<WorkerId, WorkerRecord>,
    pub next_worker_id: WorkerId,
    pub placement: Option<PlacementEpoch>,
    /// Earlier epochs, newest last (at most [`HISTORY_LEN`]).
    pub history: Vec<PlacementEpoch>,
}

/// A change to the cluster state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterCommand {
    AddCoordinator(CoordinatorInfo),
    RemoveCoordinator {
        id: u64,
    },
    /// Set the served model; refused if a different model is already set.
    SetModel(ModelSpec),
    /// Register (or re-register, by name) a worker; it becomes `Live`.
    RegisterWorker {
        name: String,
        data_addr: SocketAddr,
        memory_bytes: u64,
        device: WorkerDevice,
        fingerprint: String,
    },
    SetVerdict {
        worker: WorkerId,
        verdict: Verdict,
        reason: String,
    },
    /// Install a new placement epoch, only if the current epoch is still `expected_epoch`
    /// (so two leaders' plans, or a plan based on stale state, cannot both land).
    SetPlacement {
        expected_epoch: u64,
        members: Vec<WorkerId>,
        placement: Placement,
        reason: String,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Done,
    /// Nothing changed (e.g. a verdict that was already so).
    Unchanged,
    WorkerRegistered {
        id: WorkerId,
    },
    Epoch {
        epoch: u64,
    },
    Rejected {
        reason: String,
    },
}

impl ClusterState {
    pub fn epoch(&self) -> u64 {
        self.placement.as_ref().map_or(0, |p| p.epoch)
    }

    pub fn worker_by_name(&self, name: &str) -> Option<&WorkerRecord> {
        self.workers.values().find(|w| w.name == name)
    }

    /// Workers that may serve: live ones.
    pub fn live_workers(&self) -> Vec<WorkerId> {
        self.workers.values().filter(|w| w.verdict == Verdict::Live).map(|w| w.id).collect()
    }

    /// Whether every member of the current epoch is live.
    pub fn epoch_healthy(&self) -> bool {
        self.placement
            .as_ref()
            .is_some_and(|p| p.members.iter().all(|m| self.workers.get(m).is_some_and(|w| w.verdict == Verdict::Live)))
    }
}

fn rejected(reason: impl Into<String>) -> Outcome {
    Outcome::Rejected { reason: reason.into() }
}

/// Apply one command. Deterministic: the same state and command give the same result on
/// every coordinator.
pub fn apply(state: &mut ClusterState, command: ClusterCommand) -> Outcome {
    match command {
        ClusterCommand::AddCoordinator(info) => {
            if state.coordinators.get(&info.id) == Some(&info) {
                return Outcome::Unchanged;
            }
            state.coordinators.insert(info.id, info);
            Outcome::Done
        }
        ClusterCommand::RemoveCoordinator { id } => match state.coordinators.remove(&id) {
            Some(_) => Outcome::Done,
            None => Outcome::Unchanged,
        },
        ClusterCommand::SetModel(spec) => match &state.model {
            Some(current) if *current == spec => Outcome::Unchanged,
            Some(current) => rejected(format!(
                "the cluster serves {} (config {}); refusing to switch to {} (config {})",
                current.name, current.fingerprint, spec.name, spec.fingerprint
            )),
            None => {
                state.model = Some(spec);
                Outcome::Done
            }
        },
        ClusterCommand::RegisterWorker { name, data_addr, memory_bytes, device, fingerprint } => {
            let Some(model) = &state.model else { return rejected("no model is set yet") };
            if fingerprint != model.fingerprint {
                return rejected(format!(
                    "worker {name} loaded a checkpoint with config {fingerprint}, the cluster serves {}",
                    model.fingerprint
                ));
            }
            if let Some(w) = state.workers.values_mut().find(|w| w.name == name) {
                w.data_addr = data_addr;
                w.memory_bytes = memory_bytes;
                w.device = device;
                w.verdict = Verdict::Live;
                w.reason = "re-registered".into();
                return Outcome::WorkerRegistered { id: w.id };
            }
            let id = state.next_worker_id;
            state.next_worker_id += 1;
            let record = WorkerRecord {
                id,
                name,
                data_addr,
                memory_bytes,
                device,
                verdict: Verdict::Live,
                reason: "registered".into(),
            };
            state.workers.insert(id, record);
            Outcome::WorkerRegistered { id }
        }
        ClusterCommand::SetVerdict { worker, verdict, reason } => {
            let Some(w) = state.workers.get_mut(&worker) else { return rejected(format!("no worker {worker}")) };
            if w.verdict == verdict {
                return Outcome::Unchanged;
            }
            w.verdict = verdict;
            w.reason = reason;
            Outcome::Done
        }
        ClusterCommand::SetPlacement { expected_epoch, members, placement, reason } => {
            let current = state.epoch();
            if expected_epoch != current {
                return rejected(format!("placement is at epoch {current}, not {expected_epoch}"));
            }
            let Some(model) = &state.model else { return rejected("no model is set yet") };
            if members.is_empty() {
                return rejected("a placement needs at least one worker");
            }
            let mut seen = std::collections::BTreeSet::new();
            for m in &members {
                match state.workers.get(m) {
                    None => return rejected(format!("no worker {m}")),
                    Some(w) if w.verdict != Verdict::Live => {
                        return rejected(format!("worker {m} ({}) is {:?}", w.name, w.verdict));
                    }
                    Some(_) if !seen.insert(*m) => return rejected(format!("worker {m} listed twice")),
                    Some(_) => {}
                }
            }
            if let Err(e) = placement.validate(members.len(), &model.shape()) {
                return rejected(format!("invalid placement: {e}"));
            }
            let epoch = current + 1;
            if let Some(old) = state.placement.take() {
                state.history.push(old);
                if state.history.len() > HISTORY_LEN {
                    state.history.remove(0);
                }
            }
            state.placement = Some(PlacementEpoch { epoch, members, placement, reason });
            Outcome::Epoch { epoch }
        }
    }
}

/// The leader's default plan: every live worker that `eligible` accepts, in id order,
/// experts round-robin.
pub fn plan_round_robin(
    state: &ClusterState,
    eligible: impl Fn(WorkerId) -> bool,
) -> Option<(Vec<WorkerId>, Placement)> {
    let model = state.model.as_ref()?;
    let members: Vec<WorkerId> = state.live_workers().into_iter().filter(|&w| eligible(w)).collect();
    if members.is_empty() {
        return None;
    }
    let placement = Placement::round_robin(members.len(), &model.shape());
    Some((members, placement))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelSpec {
        ModelSpec { name: "m".into(), fingerprint: "abc".into(), moe_layers: vec![1, 3], experts: 4 }
    }

    fn register(name: &str, port: u16) -> ClusterCommand {
        ClusterCommand::RegisterWorker {
            name: name.into(),
            data_addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            memory_bytes: 1 << 30,
            device: WorkerDevice::Cpu,
            fingerprint: "abc".into(),
        }
    }

    #[test]
    fn registration_is_idempotent_by_name_and_checks_the_model() {
        let mut s = ClusterState::default();
        assert!(matches!(apply(&mut s, register("w", 1)), Outcome::Rejected { .. }));
        assert_eq!(apply(&mut s, ClusterCommand::SetModel(model())), Outcome::Done);
        assert_eq!(apply(&mut s, ClusterCommand::SetModel(model())), Outcome::Unchanged);
        let other = ModelSpec { fingerprint: "zzz".into(), ..model() };
        assert!(matches!(apply(&mut s, ClusterCommand::SetModel(other)), Outcome::Rejected { .. }));
        assert_eq!(apply(&mut s, register("a", 1)), Outcome::WorkerRegistered { id: 0 });
        assert_eq!(apply(&mut s, register("b", 2)), Outcome::WorkerRegistered { id: 1 });
        assert_eq!(apply(&mut s, register("a", 9)), Outcome::WorkerRegistered { id: 0 });
        assert_eq!(s.workers[&0].data_addr.port(), 9);
        let mut wrong = register("c", 3);
        if let ClusterCommand::RegisterWorker { fingerprint, .. } = &mut wrong {
            *fingerprint = "zzz".into();
        }
        assert!(matches!(apply(&mut s, wrong), Outcome::Rejected { .. }));
    }

    #[test]
    fn placement_epochs_compare_and_set_and_keep_history() {
        let mut s = ClusterState::default();
        apply(&mut s, ClusterCommand::SetModel(model()));
        apply(&mut s, register("a", 1));
        apply(&mut s, register("b", 2));
        let (members, placement) = plan_round_robin(&s, |_| true).expect("plan");
        let set = |expected_epoch, members: Vec<u64>, placement: Placement| ClusterCommand::SetPlacement {
            expected_epoch,
            members,
            placement,
            reason: "test".into(),
        };
        assert_eq!(apply(&mut s, set(0, members.clone(), placement.clone())), Outcome::Epoch { epoch: 1 });
        assert!(s.epoch_healthy());
        // A stale plan loses.
        assert!(matches!(apply(&mut s, set(0, members.clone(), placement.clone())), Outcome::Rejected { .. }));
        apply(&mut s, ClusterCommand::SetVerdict { worker: 1, verdict: Verdict::Dead, reason: "silent".into() });
        assert!(!s.epoch_healthy());
        assert!(matches!(apply(&mut s, set(1, members, placement)), Outcome::Rejected { .. }), "dead member");
        let (members, placement) = plan_round_robin(&s, |_| true).expect("plan");
        assert_eq!(members, vec![0]);
        assert_eq!(apply(&mut s, set(1, members, placement)), Outcome::Epoch { epoch: 2 });
        assert_eq!(s.history.len(), 1);
        assert!(s.epoch_healthy());
    }
}
