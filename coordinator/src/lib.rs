//! herd-coordinator: drives workers, and (as the cluster grows) owns cluster state.
//!
//! Modules:
//! - [`local_cluster`]: start `herd worker` processes on this host and talk to them over
//!   their control channels.
//! - [`cluster`]: the replicated cluster state and its pure `apply` (membership, model,
//!   workers and verdicts, placement epochs).
//! - [`backend`]: run requests in process ([`backend::LocalBackend`]) or on a worker group
//!   ([`backend::ClusterBackend`]) behind one interface.
//!
//! A request from the CLI: tokenize with the checkpoint's frontend → [`backend::Backend::submit`]
//! → the least busy worker's engine → events back through [`backend::Backend::poll`].

pub mod admin;
pub mod api;
pub mod backend;
pub mod cluster;
pub mod control_server;
pub mod leader;
pub mod local_cluster;
pub mod raft;
pub mod raft_quic;
pub mod scheduler;
pub mod state_machine;
