//! herd-coordinator: the coordinator tier (Raft, cluster state, scheduling, the APIs) and the
//! pieces the `herd` binary uses to drive workers.
//!
//! Modules:
//! - [`node`]: the composition root; `node::start(NodeConfig)` wires everything below for one
//!   coordinator and returns a handle whose `shutdown` stops it.
//! - [`cluster`]: the replicated cluster state and its pure `apply` (membership, model,
//!   workers and verdicts, placement epochs); [`state_machine`] wraps it for Raft.
//! - [`raft`]: the Raft node on raft-rs (storage, Ready handling, forwarding, ReadIndex);
//!   [`raft_quic`]: its transport between coordinators (QUIC, mutual TLS).
//! - [`control_server`]: worker control channels; [`scheduler`]: worker sessions
//!   (`scheduler::sessions`) and request routing with retries (`scheduler::routing`);
//!   [`leader`]: worker verdicts and placement epochs, on the leader only; [`data_plane`]: NCCL
//!   or TCP for each epoch's group.
//! - [`api`]: the OpenAI-compatible HTTP API over the `InferenceService` seam; [`admin`]: the
//!   operators' status API.
//! - [`local_cluster`]: a static group of worker processes on this host, driven by a scheduler
//!   of its own over their stdin/stdout; [`blocking`]: a blocking client of any
//!   `InferenceService`, for `herd generate/eval/bench`.
//!
//! A request through the cluster: [`api`] validates and tokenizes it → [`scheduler`] picks the
//! worker with the most free KV room on the current epoch → [`control_server`]'s channel to
//! that worker carries it down and its token events back → [`api`] streams them to the client.
//! `herd generate --workers N` takes the same path from the scheduler on, with
//! [`local_cluster`] in place of the control server.

pub mod admin;
pub mod api;
pub mod blocking;
pub mod cluster;
pub mod control_server;
pub mod data_plane;
pub mod leader;
pub mod local_cluster;
pub mod node;
pub mod raft;
pub mod raft_quic;
pub mod scheduler;
pub mod state_machine;
