//! Which worker takes a request, its events back to the client's stream, and retries.
//!
//! A request goes to a live, serving member of the current epoch with the most free KV cache
//! ([`pick`]). Its events come back on that worker's session and are routed by id. A request
//! whose worker went away, or whose group failed, before its first token is re-sent elsewhere
//! ([`fail_or_retry`], at most [`MAX_RETRIES`](super::MAX_RETRIES) times); after the first
//! token it ends with a clear error, since tokens already streamed cannot be taken back.

use super::sessions::send;
use super::{Inner, MAX_RETRIES, MAX_WAITING_PER_WORKER, Route, Scheduler, Session};
use crate::api::service::{EventStream, Health, InferenceService, Load, ServiceError, Submission};
use crate::cluster::WorkerId;
use herd_worker::control::{ToWorker, make_request_id};
use herd_worker::engine::request::{AbortReason, Event, Rejection, RequestId};
use std::sync::Arc;

impl Scheduler {
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

    /// Send a new request to the best worker; its events come back on the returned stream.
    pub fn submit(self: &Arc<Self>, submission: Submission) -> Result<EventStream, ServiceError> {
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
        let request = submission.into_request(id);
        send(&inner, worker, ToWorker::Submit(request.clone()));
        inner.routes.insert(id, Route { worker, events, got_token: false, request, retries: 0 });
        Ok(stream)
    }
}

/// The best worker to take a new request: a live, serving member of the current epoch with
/// the most free KV cache, then the fewest requests in flight from this coordinator.
pub(super) fn pick(inner: &Inner, exclude: Option<WorkerId>) -> Result<WorkerId, ServiceError> {
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
    if candidates.iter().all(|(_, s)| s.status.load.waiting >= MAX_WAITING_PER_WORKER) {
        return Err(ServiceError::Overloaded { retry_after_s: 1 });
    }
    // KV usage in 5% steps: heartbeats lag, so finer differences are noise.
    let best = candidates
        .iter()
        .min_by_key(|(w, s)| ((s.status.load.kv_usage * 20.0) as u64, in_flight(*w) + s.status.load.waiting, *w))
        .map(|(w, _)| *w);
    best.ok_or(ServiceError::Unavailable { reason: "no worker".into(), retry_after_s: 2 })
}

/// Re-send request `id` to another worker if it has produced nothing yet and has retries
/// left; otherwise end it with `error`.
pub(super) fn fail_or_retry(inner: &mut Inner, id: RequestId, reason: AbortReason) {
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
    fn submit(&self, submission: Submission) -> Result<EventStream, ServiceError> {
        self.0.submit(submission)
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
            running: members.iter().map(|s| s.status.load.running).sum(),
            waiting: members.iter().map(|s| s.status.load.waiting).sum(),
            kv_usage: members.iter().map(|s| s.status.load.kv_usage).sum::<f64>() / n,
        }
    }
}
