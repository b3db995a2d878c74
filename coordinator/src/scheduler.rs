//! The coordinator's scheduler: worker sessions, request routing, and retries.
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

use crate::api::service::{EventSender, EventStream, Health, InferenceService, Load, ServiceError};
use crate::cluster::{ClusterState, Verdict, WorkerId};
use crate::data_plane::DataPlanePolicy;
use herd_worker::control::{Assignment, DataPlane, NcclId, ToWorker, WorkerStatus, make_request_id};
use herd_worker::engine::request::{AbortReason, Event, Rejection, Request, RequestId};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::vision::PixelValues;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::mpsc;

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
            let data_plane = self.data_plane.choose(records.iter().map(|w| (w.data_addr, w.device.as_str())));
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
            fail_or_retry(&mut inner, id, AbortReason::WorkerLost { worker: name, why });
        }
        push_assignments(&mut inner);
    }

    /// A worker's control channel is up; returns a connection id for [`Scheduler::detach`].
    pub fn attach(&self, worker: WorkerId, tx: mpsc::UnboundedSender<ToWorker>) -> u64 {
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn = inner.next_conn;
        let session =
            Session { tx, conn, status: WorkerStatus::default(), last_seen: Instant::now(), assigned: 0, nccl_sent: 0 };
        inner.sessions.insert(worker, session);
        push_assignments(&mut inner);
        push_nccl_id(&mut inner);
        conn
    }

    /// The channel closed: requests on that worker are retried elsewhere or fail.
    pub fn detach(&self, worker: WorkerId, conn: u64) {
        let mut inner = self.lock();
        if inner.sessions.get(&worker).is_some_and(|s| s.conn == conn) {
            inner.sessions.remove(&worker);
            let ids: Vec<RequestId> =
                inner.routes.iter().filter(|(_, r)| r.worker == worker).map(|(&id, _)| id).collect();
            for id in ids {
                let lost = AbortReason::WorkerLost { worker: worker.to_string(), why: "disconnected".into() };
                fail_or_retry(&mut inner, id, lost);
            }
        }
    }

    pub fn heartbeat(&self, worker: WorkerId, status: WorkerStatus) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(&worker) {
            s.status = status;
            s.last_seen = Instant::now();
        }
    }

    /// Rank 0 of `epoch` made its group's NCCL unique id: send it to the other members connected
    /// here, now and as they connect. Returns false (and drops it) unless it comes from rank 0 of
    /// the current epoch: an id from elsewhere would point a group at the wrong bootstrap root.
    /// The id only ever travels over the workers' authenticated control channels.
    pub fn relay_nccl_id(&self, from: WorkerId, epoch: u64, id: NcclId) -> bool {
        let mut inner = self.lock();
        if epoch == 0 || epoch != inner.view.epoch || inner.view.members.first() != Some(&from) {
            return false;
        }
        inner.nccl_id = Some((epoch, id));
        push_nccl_id(&mut inner);
        true
    }

    pub fn group_failed(&self, worker: WorkerId, epoch: u64) {
        self.lock().group_failed.insert(worker, epoch);
    }

    /// Whether a member of the current epoch reported that epoch's group failed.
    pub fn current_group_failed(&self) -> bool {
        let inner = self.lock();
        let epoch = inner.view.epoch;
        epoch > 0 && inner.view.members.iter().any(|m| inner.group_failed.get(m) == Some(&epoch))
    }

    /// An event from a worker.
    pub fn on_event(&self, event: Event) {
        let mut inner = self.lock();
        let id = event.id();
        let retry = match inner.routes.get(&id) {
            None => return,
            Some(r) => {
                !r.got_token
                    && r.retries < MAX_RETRIES
                    && matches!(&event, Event::Aborted { reason, .. } if reason.is_retryable())
            }
        };
        if retry && let Event::Aborted { reason, .. } = event {
            fail_or_retry(&mut inner, id, reason);
            return;
        }
        let Some(route) = inner.routes.get_mut(&id) else { return };
        if matches!(event, Event::Token { .. }) {
            route.got_token = true;
        }
        let last = event.is_final();
        let delivered = route.events.send(event);
        if last || !delivered {
            let worker = route.worker;
            inner.routes.remove(&id);
            if !delivered && !last {
                send(&inner, worker, ToWorker::Cancel { id });
            }
        }
    }

    /// A worker refused a request.
    pub fn on_rejected(&self, id: RequestId, reason: Rejection) {
        let mut inner = self.lock();
        if matches!(reason, Rejection::NotServing | Rejection::ShuttingDown) {
            fail_or_retry(&mut inner, id, AbortReason::engine(reason.to_string()));
            return;
        }
        if let Some(route) = inner.routes.remove(&id) {
            route.events.refuse(ServiceError::Rejected(reason));
        }
    }

    /// Cancel a request (its client went away).
    pub fn cancel(&self, id: RequestId) {
        let mut inner = self.lock();
        if let Some(route) = inner.routes.remove(&id) {
            send(&inner, route.worker, ToWorker::Cancel { id });
        }
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

    fn submit_arc(
        self: &Arc<Self>,
        prompt: Vec<u32>,
        images: Vec<PixelValues>,
        params: SamplingParams,
    ) -> Result<EventStream, ServiceError> {
        let mut inner = self.lock();
        let worker = pick(&inner, None)?;
        inner.next_seq += 1;
        let id = make_request_id(self.coordinator, inner.next_seq);
        let me = Arc::downgrade(self);
        let (events, stream) = EventStream::channel(move || {
            if let Some(s) = me.upgrade() {
                s.cancel(id);
            }
        });
        let request = Request { id, prompt, params, prompt_logits: false, images };
        send(&inner, worker, ToWorker::Submit(request.clone()));
        inner.routes.insert(id, Route { worker, events, got_token: false, request, retries: 0 });
        Ok(stream)
    }
}

/// Send the current epoch's assignment on every session that has not had it.
fn push_assignments(inner: &mut Inner) {
    let epoch = inner.view.epoch;
    for (worker, session) in inner.sessions.iter_mut() {
        if session.assigned >= epoch {
            continue;
        }
        if let Some(a) = inner.view.assignments.get(worker) {
            let _ = session.tx.send(ToWorker::Assign(a.clone()));
            session.assigned = epoch;
        }
    }
}

/// Send the current epoch's NCCL id (if rank 0 has sent one) to every other member that has not
/// had it on its current connection.
fn push_nccl_id(inner: &mut Inner) {
    let Some((epoch, id)) = inner.nccl_id else { return };
    if epoch != inner.view.epoch {
        return;
    }
    for &m in inner.view.members.iter().skip(1) {
        if let Some(session) = inner.sessions.get_mut(&m)
            && session.nccl_sent < epoch
        {
            let _ = session.tx.send(ToWorker::NcclId { epoch, id });
            session.nccl_sent = epoch;
        }
    }
}

fn send(inner: &Inner, worker: WorkerId, msg: ToWorker) {
    if let Some(s) = inner.sessions.get(&worker) {
        let _ = s.tx.send(msg);
    }
}

/// The best worker to take a new request: a live, serving member of the current epoch with
/// the most free KV cache, then the fewest requests in flight from this coordinator.
fn pick(inner: &Inner, exclude: Option<WorkerId>) -> Result<WorkerId, ServiceError> {
    let view = &inner.view;
    let in_flight = |w: WorkerId| inner.routes.values().filter(|r| r.worker == w).count();
    let candidates: Vec<(WorkerId, &Session)> = view
        .members
        .iter()
        .filter(|m| view.live.contains(m) && Some(**m) != exclude)
        .filter_map(|m| inner.sessions.get(m).map(|s| (*m, s)))
        .filter(|(_, s)| s.status.serving && s.status.epoch == view.epoch)
        .collect();
    if candidates.is_empty() {
        let reason = if view.epoch == 0 {
            "no placement yet: waiting for workers to register".to_string()
        } else {
            format!("no worker of placement epoch {} is serving", view.epoch)
        };
        return Err(ServiceError::Unavailable { reason, retry_after_s: 2 });
    }
    if candidates.iter().all(|(_, s)| s.status.waiting >= MAX_WAITING_PER_WORKER) {
        return Err(ServiceError::Overloaded { retry_after_s: 1 });
    }
    // KV usage in 5% steps: heartbeats lag, so finer differences are noise.
    let best = candidates
        .iter()
        .min_by_key(|(w, s)| ((s.status.kv_usage * 20.0) as u64, in_flight(*w) + s.status.waiting, *w))
        .map(|(w, _)| *w);
    best.ok_or(ServiceError::Unavailable { reason: "no worker".into(), retry_after_s: 2 })
}

/// Re-send request `id` to another worker if it has produced nothing yet and has retries
/// left; otherwise end it with `error`.
fn fail_or_retry(inner: &mut Inner, id: RequestId, reason: AbortReason) {
    let Some(route) = inner.routes.get(&id) else { return };
    if !route.got_token && route.retries < MAX_RETRIES {
        let failed = route.worker;
        if let Ok(worker) = pick(inner, Some(failed)) {
            let request = route.request.clone();
            send(inner, worker, ToWorker::Submit(request));
            if let Some(r) = inner.routes.get_mut(&id) {
                tracing::info!(id, from = failed, to = worker, "retrying request on another worker: {reason}");
                r.worker = worker;
                r.retries += 1;
            }
            return;
        }
    }
    if let Some(route) = inner.routes.remove(&id) {
        // Final here: the reason keeps its words, with what it means for this request.
        let message = if route.got_token {
            format!("the worker serving this request failed after it started streaming: {reason}")
        } else {
            format!("no worker could run this request: {reason}")
        };
        route.events.send(Event::Aborted { id, reason: AbortReason::engine(message) });
    }
}

/// The scheduler as the API's [`InferenceService`].
#[derive(Clone, Debug)]
pub struct ClusterService(pub Arc<Scheduler>);

impl InferenceService for ClusterService {
    fn submit(
        &self,
        prompt: Vec<u32>,
        images: Vec<PixelValues>,
        params: SamplingParams,
    ) -> Result<EventStream, ServiceError> {
        self.0.submit_arc(prompt, images, params)
    }

    fn health(&self) -> Health {
        let inner = self.0.lock();
        let view = &inner.view;
        let mut problems = Vec::new();
        if view.epoch == 0 {
            problems.push("no placement epoch yet".to_string());
        }
        for m in &view.members {
            let name = view.names.get(m).cloned().unwrap_or_else(|| m.to_string());
            match inner.sessions.get(m) {
                _ if !view.live.contains(m) => problems.push(format!("worker {name} is not live")),
                None => problems.push(format!("worker {name} is not connected")),
                Some(s) if s.status.epoch != view.epoch || !s.status.serving => {
                    problems.push(format!("worker {name} is not serving epoch {} yet", view.epoch))
                }
                Some(_) => {}
            }
        }
        let workers: Vec<serde_json::Value> = view
            .members
            .iter()
            .map(|m| {
                let s = inner.sessions.get(m);
                serde_json::json!({
                    "id": m,
                    "name": view.names.get(m),
                    "live": view.live.contains(m),
                    "connected": s.is_some(),
                    "serving_epoch": s.map(|s| s.status.epoch),
                })
            })
            .collect();
        let dead: Vec<&String> = view.names.iter().filter(|(id, _)| !view.live.contains(id)).map(|(_, n)| n).collect();
        Health {
            ok: problems.is_empty(),
            reason: (!problems.is_empty()).then(|| problems.join("; ")),
            detail: serde_json::json!({"epoch": view.epoch, "workers": workers, "not_live": dead}),
        }
    }

    fn load(&self) -> Load {
        let inner = self.0.lock();
        let members: Vec<&Session> = inner.view.members.iter().filter_map(|m| inner.sessions.get(m)).collect();
        let n = members.len().max(1) as f64;
        Load {
            running: members.iter().map(|s| s.status.running).sum(),
            waiting: members.iter().map(|s| s.status.waiting).sum(),
            kv_cache_usage: members.iter().map(|s| s.status.kv_usage).sum::<f64>() / n,
        }
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
                    device: "cuda".into(),
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
            w.device = format!("cuda:{id} (NVIDIA H100 80GB HBM3)");
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
