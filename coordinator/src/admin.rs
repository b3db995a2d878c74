//! The admin HTTP API (its own port and key): cluster status for operators and
//! `herd admin status`, and coordinator membership changes. Reads go through Raft's ReadIndex,
//! so what it shows is never older than the latest committed change.
//!
//! - `GET /admin/status`: leader, members, workers, placement epoch and its data plane.
//! - `GET /admin/self`: this coordinator's addresses (what `add-coordinator` needs).
//! - `POST /admin/coordinators` with a [`CoordinatorInfo`]: record its addresses in the log
//!   (so every member can reach it), then add it as a voter (one single-server conf change).
//! - `DELETE /admin/coordinators/{id}`: remove it as a voter, then forget its addresses.

use crate::cluster::{ClusterCommand, CoordinatorInfo, Outcome};
use crate::raft::RaftHandle;
use crate::scheduler::Scheduler;
use crate::state_machine::{ClusterMachine, decode_outcome, encode_command};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub raft: RaftHandle<ClusterMachine>,
    pub scheduler: Arc<Scheduler>,
    pub admin_key: Option<String>,
    /// This coordinator's addresses.
    pub this: CoordinatorInfo,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/self", get(this))
        .route("/admin/coordinators", axum::routing::post(add_coordinator))
        .route("/admin/coordinators/{id}", delete(remove_coordinator))
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "admin_error", "param": null, "code": null}})))
        .into_response()
}

/// The 401 to answer when the admin key is required and missing or wrong.
fn unauthorized(s: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let key = s.admin_key.as_ref()?;
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    (given != Some(key.as_str())).then(|| error(StatusCode::UNAUTHORIZED, "missing or wrong admin key"))
}

async fn this(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    Json(&s.this).into_response()
}

async fn add_coordinator(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<CoordinatorInfo>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let Json(info) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body must be a coordinator's addresses: {e}")),
    };
    if info.id == 0 {
        return error(StatusCode::BAD_REQUEST, "coordinator ids are non-zero");
    }
    if s.raft.status().voters.contains(&info.id) {
        return error(StatusCode::CONFLICT, &format!("coordinator {} is already a member", info.id));
    }
    // Addresses first: once the conf change commits, the leader must already know where to
    // send the new member its log.
    let id = info.id;
    match s.raft.propose(encode_command(&ClusterCommand::AddCoordinator(info))).await {
        Ok(b) if matches!(decode_outcome(&b), Outcome::Done | Outcome::Unchanged) => {}
        Ok(b) => return error(StatusCode::CONFLICT, &format!("refused: {:?}", decode_outcome(&b))),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("recording the addresses failed: {e}")),
    }
    match s.raft.add_voter(id).await {
        Ok(()) => Json(json!({"added": id, "voters": s.raft.status().voters})).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("the conf change failed: {e}")),
    }
}

async fn remove_coordinator(State(s): State<AdminState>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let voters = s.raft.status().voters;
    if !voters.contains(&id) {
        return error(StatusCode::NOT_FOUND, &format!("coordinator {id} is not a member"));
    }
    if voters.len() == 1 {
        return error(StatusCode::CONFLICT, "cannot remove the last coordinator");
    }
    if let Err(e) = s.raft.remove_voter(id).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &format!("the conf change failed: {e}"));
    }
    // Forgetting the addresses is best-effort: a removed node's entry only costs a few bytes.
    let _ = s.raft.propose(encode_command(&ClusterCommand::RemoveCoordinator { id })).await;
    Json(json!({"removed": id, "voters": s.raft.status().voters})).into_response()
}

async fn status(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
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
                "device": w.device.to_string(),
                "connected": v.is_some_and(|v| v.connected),
                "serving_epoch": v.map(|v| v.status.epoch),
                "running": v.map(|v| v.status.load.running),
                "waiting": v.map(|v| v.status.load.waiting),
                "kv_usage": v.map(|v| v.status.load.kv_usage),
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
            "data_plane": s.scheduler.data_plane(),
            "reason": p.reason,
        })),
        "model": state.model.as_ref().map(|m| &m.name),
        "raft": {"commit": raft.commit, "applied": raft.applied, "snapshot_index": raft.snapshot_index},
    }))
    .into_response()
}
