//! The admin HTTP API (its own port and key): cluster status for operators and
//! `herd admin status`. Reads go through Raft's ReadIndex, so what it shows is never older
//! than the latest committed change.

use crate::raft::RaftHandle;
use crate::scheduler::Scheduler;
use crate::state_machine::ClusterMachine;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub raft: RaftHandle<ClusterMachine>,
    pub scheduler: Arc<Scheduler>,
    pub admin_key: Option<String>,
}

pub fn router(state: AdminState) -> Router {
    Router::new().route("/admin/status", get(status)).with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "admin_error", "param": null, "code": null}})))
        .into_response()
}

async fn status(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(key) = &s.admin_key {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong admin key");
        }
    }
    let state = match s.raft.linearizable_read(|m| m.state().clone()).await {
        Ok(state) => state,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("no quorum for a linearizable read: {e}")),
    };
    let raft = s.raft.status();
    let seen: std::collections::HashMap<u64, crate::scheduler::WorkerView> =
        s.scheduler.workers().into_iter().map(|w| (w.id, w)).collect();
    let workers: Vec<Value> = state
        .workers
        .values()
        .map(|w| {
            let v = seen.get(&w.id);
            json!({
                "id": w.id,
                "name": w.name,
                "verdict": w.verdict,
                "reason": w.reason,
                "data_addr": w.data_addr,
                "device": w.device,
                "connected": v.is_some_and(|v| v.connected),
                "serving_epoch": v.map(|v| v.status.epoch),
                "running": v.map(|v| v.status.running),
                "waiting": v.map(|v| v.status.waiting),
                "kv_usage": v.map(|v| v.status.kv_usage),
            })
        })
        .collect();
    let members: Vec<Value> =
        raft.voters.iter().map(|id| json!({"id": id, "addrs": state.coordinators.get(id)})).collect();
    Json(json!({
        "leader": raft.leader,
        "term": raft.term,
        "this": raft.id,
        "members": members,
        "workers": workers,
        "placement_epoch": state.epoch(),
        "placement": state.placement.as_ref().map(|p| json!({
            "members": p.members,
            "experts_per_worker": p.placement.experts_per_rank(),
            "reason": p.reason,
        })),
        "model": state.model.as_ref().map(|m| &m.name),
        "raft": {"commit": raft.commit, "applied": raft.applied, "snapshot_index": raft.snapshot_index},
    }))
    .into_response()
}
