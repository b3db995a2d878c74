//! The coordinator's scheduler: worker sessions, request routing, and retries.
//!
//! [`sessions`]: the workers' control channels as the scheduler holds them (attach and detach,
//! heartbeats, placement assignments, the NCCL id relay). [`routing`]: which worker takes a
//! request, its events back to the client's stream, and retries; [`ClusterService`] is the
//! scheduler as the API's `InferenceService`. This module holds the state both share: the
//! view of the replicated cluster state, sessions and routes, under one lock.
//!
//! Every worker keeps a control channel to every coordinator, so each coordinator schedules
//! the requests its own API receives. A request goes to a worker of the current placement
//! epoch that is live and serving, with the most free KV cache (ties: fewest requests in
//! flight from here). Its events come back on that worker's channel and are routed by id
//! (the id carries this coordinator's number, see `control::make_request_id`).
//!
//! A request whose worker dies, disconnects, or leaves its group before the first token is
//! re-sent to another worker (at most [`MAX_RETRIES`] times); after the first token it ends
//! with a clear error, since tokens already streamed cannot be taken back.

use crate::api::service::EventSender;
use crate::cluster::{ClusterState, Verdict, WorkerId};
use crate::data_plane::DataPlanePolicy;
use herd_worker::control::{Assignment, DataPlane, NcclId, ToWorker, WorkerStatus};
use herd_worker::engine::request::{AbortReason, Request, RequestId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::mpsc;

mod routing;
mod sessions;

pub use routing::ClusterService;

/// Re-sends of one request before its first token.
pub const MAX_RETRIES: u32 = 2;

/// Requests waiting per worker beyond which new ones get 429.
pub const MAX_WAITING_PER_WORKER: usize = 512;

/// What the scheduler knows of the replicated state.
#[derive(Clone, Debug, Default)]
struct View {
    epoch: u64,
    /// Members in rank order.
    members: Vec<WorkerId>,
    live: HashSet<WorkerId>,
    /// Assignment of each member for the current epoch.
    assignments: HashMap<WorkerId, Assignment>,
    /// The current epoch's data plane, once its members' records are known.
    data_plane: Option<DataPlane>,
    names: HashMap<WorkerId, String>,
}

struct Session {
    tx: mpsc::UnboundedSender<ToWorker>,
    conn: u64,
    status: WorkerStatus,
    last_seen: Instant,
    /// Highest epoch assignment sent on this connection.
    assigned: u64,
    /// Highest epoch whose NCCL id was sent on this connection.
    nccl_sent: u64,
}

struct Route {
    worker: WorkerId,
    events: EventSender,
    got_token: bool,
    request: Request,
    retries: u32,
}

#[derive(Default)]
struct Inner {
    view: View,
    sessions: HashMap<WorkerId, Session>,
    routes: HashMap<RequestId, Route>,
    next_seq: u64,
    next_conn: u64,
    /// Workers whose group failed at an epoch (the leader re-plans when a member reports it).
    group_failed: HashMap<WorkerId, u64>,
    /// The NCCL unique id rank 0 made for an epoch, for members that connect after it came.
    nccl_id: Option<(u64, NcclId)>,
}

/// A worker as the scheduler sees it (for the leader's liveness checks and admin status).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    pub id: WorkerId,
    pub connected: bool,
    pub last_seen: Option<Instant>,
    pub status: WorkerStatus,
    pub in_flight_here: usize,
}

/// The scheduler of one coordinator.
pub struct Scheduler {
    coordinator: u64,
    step_timeout_ms: u64,
    data_plane: DataPlanePolicy,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("coordinator", &self.coordinator).finish_non_exhaustive()
    }
}

impl Scheduler {
    pub fn new(coordinator: u64, step_timeout_ms: u64, data_plane: DataPlanePolicy) -> Arc<Self> {
        Arc::new(Self { coordinator, step_timeout_ms, data_plane, inner: Mutex::new(Inner::default()) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug elsewhere; the state stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take in the replicated state after an apply, and send new assignments.
    pub fn set_state(&self, state: &ClusterState) {
        let mut inner = self.lock();
        let mut view = View {
            epoch: state.epoch(),
            live: state.workers.values().filter(|w| w.verdict == Verdict::Live).map(|w| w.id).collect(),
            names: state.workers.values().map(|w| (w.id, w.name.clone())).collect(),
            ..View::default()
        };
        if let Some(p) = &state.placement {
            view.members = p.members.clone();
            let records: Vec<_> = p.members.iter().filter_map(|m| state.workers.get(m)).collect();
            let addrs: Vec<_> = records.iter().map(|w| w.data_addr).collect();
            // Every coordinator sees the same records, so all of them pick the same plane.
            let data_plane = self.data_plane.choose(records.iter().map(|w| (w.data_addr, &w.device)));
            if addrs.len() == p.members.len() {
                view.data_plane = Some(data_plane);
                for (rank, &m) in p.members.iter().enumerate() {
                    let a = Assignment {
                        epoch: p.epoch,
                        rank,
                        members: addrs.clone(),
                        placement: p.placement.clone(),
                        step_timeout_ms: self.step_timeout_ms,
                        data_plane,
                    };
                    view.assignments.insert(m, a);
                }
            }
        }
        // A worker judged dead will not answer: end (or move) its requests now rather than
        // when its connection finally times out (a killed process sends no goodbye over UDP).
        let dead: HashSet<WorkerId> =
            state.workers.values().filter(|w| w.verdict == Verdict::Dead).map(|w| w.id).collect();
        inner.view = view;
        let stranded: Vec<(RequestId, WorkerId)> =
            inner.routes.iter().filter(|(_, r)| dead.contains(&r.worker)).map(|(&id, r)| (id, r.worker)).collect();
        for (id, worker) in stranded {
            let name = inner.view.names.get(&worker).cloned().unwrap_or_else(|| worker.to_string());
            let why = "stopped responding and was declared dead".to_string();
            routing::fail_or_retry(&mut inner, id, AbortReason::WorkerLost { worker: name, why });
        }
        sessions::push_assignments(&mut inner);
    }

    /// The current epoch's data plane (admin status); `None` before a group can form.
    pub fn data_plane(&self) -> Option<DataPlane> {
        self.lock().view.data_plane
    }

    /// Every worker with a record or a session, for liveness checks and status.
    pub fn workers(&self) -> Vec<WorkerView> {
        let inner = self.lock();
        let mut ids: Vec<WorkerId> = inner.view.names.keys().copied().collect();
        ids.extend(inner.sessions.keys().copied().filter(|id| !inner.view.names.contains_key(id)));
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| {
                let s = inner.sessions.get(&id);
                WorkerView {
                    id,
                    connected: s.is_some(),
                    last_seen: s.map(|s| s.last_seen),
                    status: s.map(|s| s.status.clone()).unwrap_or_default(),
                    in_flight_here: inner.routes.values().filter(|r| r.worker == id).count(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{PlacementEpoch, WorkerRecord};
    use herd_worker::placement::{MoeShape, Placement};

    /// Workers 1, 2, 3 live; the group of `epoch` is `members` in rank order.
    fn state(epoch: u64, members: &[WorkerId]) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.workers.insert(
                id,
                WorkerRecord {
                    id,
                    name: format!("w{id}"),
                    data_addr: format!("127.0.0.1:{}", 9000 + id).parse().expect("addr"),
                    memory_bytes: 0,
                    device: herd_worker::control::WorkerDevice::Cuda { ordinal: 0, name: String::new() },
                    verdict: Verdict::Live,
                    reason: String::new(),
                },
            );
        }
        let shape = MoeShape { moe_layers: vec![0], experts: 4 };
        s.placement = Some(PlacementEpoch {
            epoch,
            members: members.to_vec(),
            placement: Placement::round_robin(members.len(), &shape),
            reason: String::new(),
        });
        s
    }

    fn nccl_ids(rx: &mut mpsc::UnboundedReceiver<ToWorker>) -> Vec<(u64, NcclId)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                ToWorker::NcclId { epoch, id } => Some((epoch, id)),
                _ => None,
            })
            .collect()
    }

    fn data_planes(rx: &mut mpsc::UnboundedReceiver<ToWorker>) -> Vec<herd_worker::control::DataPlane> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                ToWorker::Assign(a) => Some(a.data_plane),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_member_of_an_epoch_gets_the_policys_data_plane() {
        let mut gpus = state(2, &[1, 2]);
        for (id, w) in gpus.workers.iter_mut() {
            w.device = herd_worker::control::WorkerDevice::Cuda {
                ordinal: *id as usize,
                name: "NVIDIA H100 80GB HBM3".into(),
            };
        }
        for (policy, devices, want) in [
            (DataPlanePolicy::Auto, gpus.clone(), DataPlane::Nccl),
            (DataPlanePolicy::Tcp, gpus, DataPlane::Tcp),
            // state() puts every worker on the one GPU of 127.0.0.1.
            (DataPlanePolicy::Auto, state(2, &[1, 2]), DataPlane::Tcp),
        ] {
            let sched = Scheduler::new(1, 1000, policy);
            sched.set_state(&devices);
            assert_eq!(sched.data_plane(), Some(want));
            let (tx1, mut rx1) = mpsc::unbounded_channel();
            let (tx2, mut rx2) = mpsc::unbounded_channel();
            sched.attach(1, tx1);
            sched.attach(2, tx2);
            assert_eq!(data_planes(&mut rx1), vec![want], "{policy:?}");
            assert_eq!(data_planes(&mut rx2), vec![want], "{policy:?}");
        }
    }

    #[test]
    fn rank_zeros_nccl_id_reaches_the_other_members_once_including_late_ones() {
        let sched = Scheduler::new(1, 1000, DataPlanePolicy::Auto);
        sched.set_state(&state(5, &[2, 1, 3]));
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        sched.attach(1, tx1);
        sched.attach(2, tx2);
        let id = NcclId([7; herd_worker::control::NCCL_ID_BYTES]);
        // Only rank 0 (worker 2) of the current epoch may set the group's id.
        assert!(!sched.relay_nccl_id(1, 5, id));
        assert!(!sched.relay_nccl_id(2, 4, id));
        assert!(nccl_ids(&mut rx1).is_empty());
        assert!(sched.relay_nccl_id(2, 5, id));
        assert_eq!(nccl_ids(&mut rx1), vec![(5, id)]);
        // Rank 0 made it: it is not sent back.
        assert!(nccl_ids(&mut rx2).is_empty());
        // A member connecting later gets it on attach; nobody gets it twice.
        let (tx3, mut rx3) = mpsc::unbounded_channel();
        sched.attach(3, tx3);
        assert_eq!(nccl_ids(&mut rx3), vec![(5, id)]);
        assert!(sched.relay_nccl_id(2, 5, id));
        assert!(nccl_ids(&mut rx1).is_empty() && nccl_ids(&mut rx3).is_empty());
        // A new epoch makes the old id stale: a reconnecting member does not get it.
        sched.set_state(&state(6, &[1, 3]));
        let (tx3, mut rx3) = mpsc::unbounded_channel();
        sched.attach(3, tx3);
        assert!(nccl_ids(&mut rx3).is_empty());
        assert!(sched.relay_nccl_id(1, 6, NcclId([9; herd_worker::control::NCCL_ID_BYTES])));
        assert_eq!(nccl_ids(&mut rx3).len(), 1);
    }
}
