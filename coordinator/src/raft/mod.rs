//! The coordinators' Raft control plane, built on tikv's `raft` crate (raft-rs 0.7).
//!
//! raft-rs does no I/O: it tells us what to send, persist and apply through `Ready`. This module
//! supplies the I/O around it. Where each kind of code lives:
//! - `node.rs`: the node thread. It owns the `RawNode`, ticks it, steps incoming
//!   messages and handles each `Ready` in raft-rs's documented order (send → snapshot → apply →
//!   persist with fsync → send persisted → advance → light ready). The only module that calls
//!   into raft-rs's state machine.
//! - `pending.rs`: who is waiting for what — proposals (local and forwarded) and ReadIndex
//!   requests — matched to applied entries and read states. Plain data, tested without a network.
//! - [`storage`]: [`RaftStorage`], raft-rs's `Storage` on a redb file, fsynced before returning.
//! - `handle.rs`: [`RaftNode`] (owns the thread) and [`RaftHandle`] (the cloneable async API).
//! - `wire.rs`: [`WireMessage`], what travels between coordinators.
//! - [`testkit`]: an in-memory network that drops, partitions and delays, and a recording state
//!   machine, for tests.
//!
//! The replicated state machine itself ([`StateMachine`]) is not here: it holds slow-changing
//! cluster facts and is a pure `apply` written elsewhere.
//!
//! Conventions: `pre_vote` and `check_quorum` are always on (Raft thesis §9.6 and §6.2);
//! linearizable reads use ReadIndex (thesis §6.4) in its safe form (a heartbeat round confirms
//! leadership, no clock-based lease); membership changes are single-server changes (thesis §4.1).

mod handle;
mod node;
mod pending;
mod slog_bridge;
pub mod storage;
pub mod testkit;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use handle::{Mailbox, RaftHandle, RaftNode};
pub use storage::RaftStorage;
pub use wire::{ForwardReply, Proposal, WireMessage};

/// The replicated state machine (cluster state implements it).
///
/// `apply` must be deterministic: every coordinator applies the same commands in the same order
/// and must reach the same state and return the same bytes. Each committed command is applied
/// exactly once per incarnation of the in-memory state: after a restart the machine is rebuilt
/// from the last snapshot and the entries after it are applied again, in order.
pub trait StateMachine: Send + 'static {
    /// Apply one committed command; the returned bytes are the proposal's result.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// Serialise the whole state (taken every [`RaftConfig::snapshot_every`] applied entries).
    fn snapshot(&self) -> Vec<u8>;
    /// Replace the whole state with a snapshot produced by [`StateMachine::snapshot`].
    fn restore(&mut self, snapshot: &[u8]);
}

/// How raft traffic leaves this node (QUIC with mutual TLS in production,
/// [`testkit::MemNetwork`] in tests).
pub trait RaftTransport: Send + Sync + 'static {
    /// Fire-and-forget; messages may be lost, duplicated or reordered (raft tolerates it).
    /// Called from the node thread, so it must not block for long.
    fn send(&self, to: u64, msg: WireMessage);
}

impl<T: RaftTransport + ?Sized> RaftTransport for Arc<T> {
    fn send(&self, to: u64, msg: WireMessage) {
        (**self).send(to, msg)
    }
}

/// Configuration of one coordinator's raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This node's id; non-zero and unique in the cluster.
    pub id: u64,
    /// The initial voters, this node included, used only when `data_dir` holds no raft state
    /// yet. Every founding member must be given the same list. Leave it empty for a node that
    /// joins an existing cluster: it waits, non-voting, until a leader adds it
    /// ([`RaftHandle::add_voter`]) and sends it the log or a snapshot.
    pub peers: Vec<u64>,
    /// Where the raft log, hard state and snapshots live (`raft.redb` inside).
    pub data_dir: PathBuf,
    /// The length of one raft tick.
    pub tick: Duration,
    /// Ticks without a leader before a follower starts a (pre-)election; randomised in
    /// `[election_tick, 2 * election_tick)`.
    pub election_tick: usize,
    /// Ticks between the leader's heartbeats; must be smaller than `election_tick`.
    pub heartbeat_tick: usize,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_every: u64,
    /// How long a proposal or conf change may wait, in total (finding a leader, being
    /// forwarded, committed and applied here), before it fails.
    pub propose_timeout: Duration,
    /// How long a [`RaftHandle::read_index`] may wait before it fails.
    pub read_timeout: Duration,
    /// The most bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// The most append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Capacity of the node's inbox. Network messages beyond it are dropped (raft retries);
    /// local requests beyond it fail with [`RaftError::Busy`].
    pub inbox_capacity: usize,
}

impl RaftConfig {
    /// A configuration with production defaults: 100 ms ticks, elections after 1–2 s,
    /// heartbeats every 300 ms, a snapshot every 1000 entries, 5 s request timeouts.
    pub fn new(id: u64, peers: Vec<u64>, data_dir: impl Into<PathBuf>) -> Self {
        RaftConfig {
            id,
            peers,
            data_dir: data_dir.into(),
            tick: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 3,
            snapshot_every: 1000,
            propose_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            inbox_capacity: 4096,
        }
    }

    /// The raft-rs configuration this maps to, with `pre_vote` and `check_quorum` on.
    pub(crate) fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..raft::Config::default()
        }
    }

    /// Checks this configuration and the raft-rs configuration derived from it.
    pub fn validate(&self) -> Result<(), RaftError> {
        let bad = |why: &str| Err(RaftError::Config(why.to_owned()));
        if self.id == 0 {
            return bad("id must be non-zero");
        }
        if self.peers.contains(&0) {
            return bad("peer ids must be non-zero");
        }
        if !self.peers.is_empty() && !self.peers.contains(&self.id) {
            return bad("peers must include this node's own id (or be empty to join a cluster)");
        }
        if self.tick.is_zero() {
            return bad("tick must be positive");
        }
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be positive");
        }
        if self.propose_timeout.is_zero() || self.read_timeout.is_zero() {
            return bad("timeouts must be positive");
        }
        if self.inbox_capacity == 0 {
            return bad("inbox_capacity must be positive");
        }
        self.raft_config(0).validate().map_err(|e| RaftError::Config(e.to_string()))
    }
}

/// Why a raft request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RaftError {
    /// No leader was known for the whole timeout; the request was never handed to one.
    #[error("no raft leader within the timeout")]
    NoLeader,
    /// The request reached a leader but did not complete in time. A proposal may or may not
    /// have been applied.
    #[error("raft request timed out (a proposal may still be applied)")]
    Timeout,
    /// The proposal will never be applied: its log slot went to another entry (leadership was
    /// lost) or raft refused it.
    #[error("proposal dropped: {0}")]
    Dropped(String),
    /// The node has stopped or is stopping.
    #[error("raft node is shutting down")]
    ShuttingDown,
    /// The node's inbox is full.
    #[error("raft node is overloaded (inbox full)")]
    Busy,
    /// Invalid configuration.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// The durable storage failed; the node stops rather than continue without it.
    #[error("raft storage: {0}")]
    Storage(String),
    /// raft-rs rejected something (e.g. an invalid conf change).
    #[error("raft: {0}")]
    Raft(String),
    /// A message from the network could not be decoded.
    #[error("malformed raft wire message: {0}")]
    Malformed(String),
}

impl From<raft::Error> for RaftError {
    fn from(e: raft::Error) -> Self {
        match e {
            raft::Error::ProposalDropped => RaftError::Dropped("raft refused the proposal".to_owned()),
            other => RaftError::Raft(other.to_string()),
        }
    }
}

/// A node's role in its current term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    #[default]
    Follower,
    /// Probing with pre-votes whether an election could succeed (term unchanged).
    PreCandidate,
    Candidate,
    Leader,
}

impl From<raft::StateRole> for Role {
    fn from(r: raft::StateRole) -> Self {
        match r {
            raft::StateRole::Follower => Role::Follower,
            raft::StateRole::PreCandidate => Role::PreCandidate,
            raft::StateRole::Candidate => Role::Candidate,
            raft::StateRole::Leader => Role::Leader,
        }
    }
}

/// A snapshot of a node's raft state, refreshed by the node thread after every loop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    pub id: u64,
    /// The leader this node currently follows (itself when leader).
    pub leader: Option<u64>,
    pub term: u64,
    pub role: Role,
    /// The voters of the applied configuration, sorted.
    pub voters: Vec<u64>,
    /// The highest index known committed.
    pub commit: u64,
    /// The highest index applied to the state machine.
    pub applied: u64,
    /// The first index still in the log (everything before is in the snapshot).
    pub first_index: u64,
    /// The last index in the log.
    pub last_index: u64,
    /// The index of the latest snapshot (0 if none).
    pub snapshot_index: u64,
    /// False once the node thread has stopped.
    pub running: bool,
}
