//! The worker runtime: one way to start, drive and stop an expert-parallel group, used by a
//! coordinator-managed worker and by a static group alike.
//!
//! - [`agent`]: the worker's side of the control channel ([`crate::control`]'s `ToWorker` in,
//!   `FromWorker` out): greets its drivers, heartbeats, runs the group of each assignment,
//!   routes requests to it and events back. A static group (`herd worker --rank/--world`) is
//!   the agent with one driver on stdin/stdout and one group ([`agent::Lifetime::OneGroup`]).
//! - [`group`]: one placement epoch's group on its own thread: model with this rank's experts,
//!   engine on its device, data plane (TCP or NCCL), then the lockstep loop.
//! - [`lockstep`]: the loop that keeps the group's workers stepping together.
//! - [`host`]: memory and peak RSS, for the hello and the statistics.
//!
//! A request: `ToWorker::Submit` on a link → [`agent`] → [`group::Group::submit`] → between two
//! steps the [`lockstep`] loop hands it to the engine → every step its events leave as
//! `FromWorker::Event`s → [`agent`] routes each to the link of the coordinator that sent it.

pub mod agent;
pub mod group;
pub mod host;
pub mod lockstep;

pub use agent::{AgentConfig, AgentError, Inbox, Lifetime, Link};
pub use group::{Group, GroupConfig, GroupNote};
pub use lockstep::{GroupCommand, LockstepConfig, LockstepError};
