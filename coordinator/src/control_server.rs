//! The coordinator's end of worker control channels (QUIC, mutual TLS, bincode frames).
//!
//! A worker's first frame is its `Hello`. The coordinator registers it through the Raft log
//! (forwarded to the leader when this node follows) and answers `Welcome` with the worker's
//! id, or `Refused`. From then on the channel carries heartbeats, events and refusals up, and
//! assignments, requests and cancellations down.

use crate::cluster::{ClusterCommand, Outcome};
use crate::raft::RaftHandle;
use crate::scheduler::Scheduler;
use crate::state_machine::{ClusterMachine, decode_outcome, encode_command};
use herd_net::{Channel, FrameCodec};
use herd_worker::control::{CONTROL_VERSION, FromWorker, ToWorker};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Control frames carry prompts (token ids), so allow large ones.
pub fn codec() -> FrameCodec {
    FrameCodec::new(64 << 20)
}

/// Accept worker connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, raft: RaftHandle<ClusterMachine>, scheduler: Arc<Scheduler>, me: u64) {
    while let Some(incoming) = herd_net::quic::accept(&endpoint).await {
        let Ok(conn) = incoming else { continue };
        let (raft, scheduler) = (raft.clone(), Arc::clone(&scheduler));
        tokio::spawn(async move {
            if let Err(e) = session(conn, raft, scheduler, me).await {
                tracing::info!("worker control session ended: {e}");
            }
        });
    }
}

async fn session(
    conn: quinn::Connection,
    raft: RaftHandle<ClusterMachine>,
    scheduler: Arc<Scheduler>,
    me: u64,
) -> Result<(), String> {
    let ch = Channel::<ToWorker, FromWorker>::accept(&conn, codec()).await.map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = ch.split();
    let hello = match rx.recv().await {
        Ok(Some(FromWorker::Hello(h))) => h,
        other => return Err(format!("expected a hello, got {other:?}")),
    };
    if hello.version != CONTROL_VERSION {
        let reason = format!(
            "worker {} speaks control version {}, this coordinator {CONTROL_VERSION}; run the same herd on both",
            hello.name, hello.version
        );
        let _ = tx.send(&ToWorker::Refused { reason: reason.clone() }).await;
        return Err(reason);
    }
    let cmd = ClusterCommand::RegisterWorker {
        name: hello.name.clone(),
        data_addr: hello.data_addr,
        memory_bytes: hello.memory_bytes,
        device: hello.device.clone(),
        fingerprint: hello.fingerprint.clone(),
    };
    let worker = match raft.propose(encode_command(&cmd)).await.map(|b| decode_outcome(&b)) {
        Ok(Outcome::WorkerRegistered { id }) => id,
        Ok(Outcome::Rejected { reason }) => {
            let _ = tx.send(&ToWorker::Refused { reason: reason.clone() }).await;
            return Err(format!("refused worker {}: {reason}", hello.name));
        }
        Ok(other) => return Err(format!("unexpected registration outcome {other:?}")),
        // No leader yet: drop the connection; the worker reconnects and tries again.
        Err(e) => return Err(format!("cannot register worker {} now: {e}", hello.name)),
    };
    tx.send(&ToWorker::Welcome { worker_id: worker, coordinator_id: me }).await.map_err(|e| e.to_string())?;
    tracing::info!(worker, name = %hello.name, "worker connected");
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ToWorker>();
    let conn_id = scheduler.attach(worker, out_tx);
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if tx.send(&msg).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        match rx.recv().await {
            Ok(Some(FromWorker::Status(s))) => scheduler.heartbeat(worker, s),
            Ok(Some(FromWorker::Event(e))) => scheduler.on_event(e),
            Ok(Some(FromWorker::Rejected { id, reason })) => scheduler.on_rejected(id, reason),
            Ok(Some(FromWorker::GroupFailed { epoch, error })) => {
                tracing::warn!(worker, epoch, "worker's group failed: {error}");
                scheduler.group_failed(worker, epoch);
            }
            Ok(Some(FromWorker::NcclId { epoch, id })) => {
                if !scheduler.relay_nccl_id(worker, epoch, id) {
                    tracing::warn!(worker, epoch, "dropped an NCCL id that is not from rank 0 of the current epoch");
                }
            }
            Ok(Some(FromWorker::Stats(s))) => {
                tracing::debug!(worker, steps = s.steps, bytes_sent = s.bytes_sent, "worker left a group cleanly");
            }
            Ok(Some(FromWorker::Hello(_))) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
    };
    scheduler.detach(worker, conn_id);
    writer.abort();
    result
}
