//! herd-coordinator: drives workers, and (as the cluster grows) owns cluster state.
//!
//! Modules:
//! - [`local_cluster`]: start `herd worker` processes on this host and talk to them over
//!   their control channels.
//! - [`backend`]: run requests in process ([`backend::LocalBackend`]) or on a worker group
//!   ([`backend::ClusterBackend`]) behind one interface.
//!
//! A request from the CLI: tokenize with the checkpoint's frontend → [`backend::Backend::submit`]
//! → the least busy worker's engine → events back through [`backend::Backend::poll`].

pub mod api;
pub mod backend;
pub mod local_cluster;
pub mod raft;
