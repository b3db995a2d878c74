//! The workers' control channels as the scheduler holds them: a session per connected worker
//! (its sender, its last heartbeat, what it was sent), the assignment of the current epoch
//! pushed to every member, and rank 0's NCCL unique id relayed to the others.

use super::{Inner, Scheduler, Session, routing};
use crate::cluster::WorkerId;
use herd_worker::control::{NcclId, ToWorker, WorkerStatus};
use herd_worker::engine::request::{AbortReason, RequestId};
use std::time::Instant;
use tokio::sync::mpsc;

impl Scheduler {
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
                routing::fail_or_retry(&mut inner, id, lost);
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
}

/// Send the current epoch's assignment on every session that has not had it.
pub(super) fn push_assignments(inner: &mut Inner) {
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

pub(super) fn send(inner: &Inner, worker: WorkerId, msg: ToWorker) {
    if let Some(s) = inner.sessions.get(&worker) {
        let _ = s.tx.send(msg);
    }
}
