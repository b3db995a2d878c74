//! The node thread: owns raft-rs's `RawNode`, ticks it, steps what arrives, and handles each
//! `Ready` in the order raft-rs documents (see [`Node::on_ready`]).
//!
//! A dedicated OS thread rather than a tokio task: every Ready ends in an fsync, which must not
//! block an async runtime's worker. Callers talk to it through a bounded channel and get answers
//! on tokio oneshot channels, which need no runtime on the sending side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, HardState, Message, MessageType, Snapshot,
};
use raft::{INVALID_ID, RawNode, SnapshotStatus, StateRole};

use super::pending::{Proposals, Reads, Reply, Tag};
use super::{
    ForwardReply, Proposal, RaftConfig, RaftError, RaftStatus, RaftStorage, RaftTransport, StateMachine, WireMessage,
    slog_bridge,
};

/// Most inbox items handled between two Ready cycles (bounds the latency of a tick).
const MAX_BATCH: usize = 1024;

/// What the handles send to the node thread.
pub(crate) enum Command {
    Propose {
        proposal: Proposal,
        reply: Reply<Vec<u8>>,
    },
    ReadIndex {
        reply: Reply<()>,
    },
    Receive {
        from: u64,
        msg: WireMessage,
    },
    /// Only wakes the loop, so it notices the stop flag.
    Wake,
}

/// Locks a mutex, recovering the data if a panic poisoned it (the node thread is the only
/// writer; a panicking reader cannot leave the data half-written).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) struct Node<S: StateMachine> {
    id: u64,
    cfg: RaftConfig,
    raw: RawNode<RaftStorage>,
    sm: Arc<Mutex<S>>,
    transport: Box<dyn RaftTransport>,
    status: Arc<Mutex<RaftStatus>>,
    /// The last index applied to `sm` (or installed from a snapshot).
    applied: u64,
    /// The commit index found on disk at start: until it is re-applied the persisted conf
    /// state may be ahead of `applied`, so no snapshot is taken before.
    replay_until: u64,
    proposals: Proposals,
    reads: Reads,
    /// Peers a `MsgSnapshot` went to in this Ready; reported to raft after `advance`.
    snapshot_sent_to: Vec<u64>,
    ticks: u64,
    known_leader: u64,
}

impl<S: StateMachine> Node<S> {
    /// Opens the storage, bootstraps or recovers, restores the state machine from the latest
    /// snapshot and builds the `RawNode`. Entries after the snapshot are re-applied by the first
    /// Ready cycles (raft hands them out as committed entries since `applied`).
    pub fn new(
        cfg: RaftConfig,
        sm: Arc<Mutex<S>>,
        transport: Box<dyn RaftTransport>,
        status: Arc<Mutex<RaftStatus>>,
    ) -> Result<Self, RaftError> {
        cfg.validate()?;
        let mut storage = RaftStorage::open(&cfg.data_dir)?;
        if !storage.is_initialized() && !cfg.peers.is_empty() {
            // A founder: the state machine as given is the initial state all founders share.
            let initial_state = lock(&sm).snapshot();
            storage.bootstrap(&cfg.peers, initial_state)?;
        } else if storage.snapshot_index() > 0 {
            lock(&sm).restore(storage.snapshot_data());
        }
        let snapshot_index = storage.snapshot_index();
        let replay_until = storage.hard_state().commit;
        tracing::info!(
            id = cfg.id,
            snapshot_index,
            commit = replay_until,
            last_index = storage.last(),
            voters = ?storage.conf_state().voters,
            "raft node starting"
        );
        let logger = slog_bridge::logger(cfg.id);
        let raw = RawNode::new(&cfg.raft_config(snapshot_index), storage, &logger)?;
        let node = Node {
            id: cfg.id,
            raw,
            sm,
            transport,
            status,
            applied: snapshot_index,
            replay_until,
            proposals: Proposals::new(cfg.id, snapshot_index),
            reads: Reads::new(cfg.id),
            snapshot_sent_to: Vec::new(),
            ticks: 0,
            known_leader: INVALID_ID,
            cfg,
        };
        node.publish_status(true);
        Ok(node)
    }

    /// The loop: wait for the inbox or the next tick, handle what came, tick when due, handle
    /// the Ready. Ends on the stop flag, when every sender is gone, or on a storage failure
    /// (a node that cannot persist must not take part).
    pub fn run(mut self, inbox: Receiver<Command>, stop: &AtomicBool) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        while !stop.load(Ordering::Acquire) {
            let wait =
                if self.raw.has_ready() { Duration::ZERO } else { next_tick.saturating_duration_since(Instant::now()) };
            match inbox.recv_timeout(wait) {
                Ok(cmd) => {
                    self.handle(cmd);
                    for cmd in inbox.try_iter().take(MAX_BATCH) {
                        self.handle(cmd);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                self.on_tick(now);
                next_tick = now + self.cfg.tick;
            }
            if let Err(e) = self.on_ready() {
                tracing::error!(id = self.id, error = %e, "raft node stopping: cannot persist");
                break;
            }
            self.publish_status(true);
            self.proposals.done.flush();
            self.reads.done.flush();
        }
        self.publish_status(false);
        self.proposals.done.flush();
        self.reads.done.flush();
        tracing::info!(id = self.id, "raft node stopped");
    }

    fn handle(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Propose { proposal, reply } => {
                let id = self.proposals.add(proposal.clone(), reply, now + self.cfg.propose_timeout);
                self.submit(id, &proposal);
            }
            Command::ReadIndex { reply } => {
                let ctx = self.reads.add(reply, now + self.cfg.read_timeout);
                // Dropped silently by raft-rs without a leader; `on_tick` asks again.
                self.raw.read_index(ctx);
            }
            Command::Receive { from, msg } => self.on_message(from, msg),
            Command::Wake => {}
        }
    }

    fn on_tick(&mut self, now: Instant) {
        self.ticks += 1;
        self.proposals.expire(now);
        self.reads.expire(now);
        self.submit_queued();
        let retry_every = (self.cfg.election_tick as u64 / 2).max(1);
        if self.ticks.is_multiple_of(retry_every) {
            for ctx in self.reads.unconfirmed() {
                self.raw.read_index(ctx);
            }
            // A lost Forward or Accepted: ask the same leader again (it deduplicates by tag).
            let (leader, term) = (self.raw.raft.leader_id, self.raw.raft.term);
            for (id, proposal) in self.proposals.unanswered(leader, term) {
                self.transport.send(leader, WireMessage::Forward { id, proposal });
            }
        }
    }

    fn submit_queued(&mut self) {
        for (id, proposal) in self.proposals.queued() {
            self.submit(id, &proposal);
        }
    }

    /// Proposes here when leader, forwards to the leader when one is known, else leaves the
    /// proposal queued for the next tick.
    fn submit(&mut self, id: u64, proposal: &Proposal) {
        if self.raw.raft.state == StateRole::Leader {
            match self.propose_here(self.proposals.tag(id), proposal) {
                Ok(Some(index)) => self.proposals.mark_proposed(id, index),
                Ok(None) => {}
                Err(e) => self.proposals.fail(id, e),
            }
        } else if self.raw.raft.leader_id != INVALID_ID {
            let to = self.raw.raft.leader_id;
            self.transport.send(to, WireMessage::Forward { id, proposal: proposal.clone() });
            self.proposals.mark_forwarded(id, to, self.raw.raft.term);
        }
    }

    /// Appends `proposal` to this leader's log with `tag` as the entry's context. `Ok(None)`:
    /// not now (a conf change is still pending, or leadership is being transferred).
    fn propose_here(&mut self, tag: Tag, proposal: &Proposal) -> Result<Option<u64>, RaftError> {
        if self.raw.raft.lead_transferee.is_some() {
            return Ok(None);
        }
        let before = self.raw.raft.raft_log.last_index();
        match proposal {
            Proposal::Command(data) => self.raw.propose(tag.encode(), data.clone())?,
            Proposal::AddVoter(node) | Proposal::RemoveVoter(node) => {
                if *node == INVALID_ID {
                    return Err(RaftError::Raft("node id 0 is invalid".into()));
                }
                // raft-rs would turn a second concurrent conf change into an empty entry.
                if self.raw.raft.has_pending_conf() {
                    return Ok(None);
                }
                let change_type = match proposal {
                    Proposal::AddVoter(_) => ConfChangeType::AddNode,
                    _ => ConfChangeType::RemoveNode,
                };
                let cc = ConfChange { node_id: *node, change_type, ..ConfChange::default() };
                self.raw.propose_conf_change(tag.encode(), cc)?;
            }
        }
        let after = self.raw.raft.raft_log.last_index();
        if after == before {
            return Err(RaftError::Dropped("not appended to the leader's log".into()));
        }
        Ok(Some(after))
    }

    /// A message from peer `from` (as authenticated by the transport). Never panics on bad input.
    fn on_message(&mut self, from: u64, msg: WireMessage) {
        match msg {
            WireMessage::Raft(bytes) => {
                let m = match Message::parse_from_bytes(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(id = self.id, from, error = %e, "dropping undecodable raft message");
                        return;
                    }
                };
                if m.from != from || m.to != self.id {
                    tracing::warn!(
                        id = self.id,
                        from,
                        msg_from = m.from,
                        msg_to = m.to,
                        "dropping misaddressed raft message"
                    );
                    return;
                }
                if let Err(e) = self.raw.step(m) {
                    tracing::debug!(id = self.id, from, error = %e, "raft message not stepped");
                }
            }
            WireMessage::Forward { id, proposal } => self.on_forward(from, id, proposal),
            WireMessage::ForwardReply { id, reply } => match reply {
                ForwardReply::Accepted { index, .. } => self.proposals.on_accepted(id, from, index, self.applied),
                ForwardReply::Applied { index, result } => {
                    self.proposals.on_leader_applied(id, index, result, self.applied)
                }
                ForwardReply::Retry => self.proposals.requeue(id, from),
                ForwardReply::Failed(e) => self.proposals.fail_forwarded(id, from, e),
            },
        }
    }

    /// A follower's proposal: propose it under the follower's tag, answer `Accepted`, and later
    /// `Applied` (from `apply_entries`).
    fn on_forward(&mut self, from: u64, id: u64, proposal: Proposal) {
        let tag = Tag { origin: from, id };
        let reply = if self.raw.raft.state != StateRole::Leader {
            ForwardReply::Retry
        } else if let Some((index, term)) = self.proposals.forwarded_slot(tag) {
            ForwardReply::Accepted { index, term } // sent again: it is in the log once already
        } else {
            match self.propose_here(tag, &proposal) {
                Ok(Some(index)) => {
                    let term = self.raw.raft.term;
                    self.proposals.note_forwarded(tag, index, term, Instant::now() + self.cfg.propose_timeout);
                    ForwardReply::Accepted { index, term }
                }
                Ok(None) => ForwardReply::Retry,
                Err(e) => ForwardReply::Failed(e),
            }
        };
        self.transport.send(from, WireMessage::ForwardReply { id, reply });
    }

    /// One Ready cycle, in raft-rs's documented order (`RawNode::ready`, five_mem_node example).
    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();

        // 1. Messages that need no persistence first: only a leader has them (it may send
        //    appends before writing them itself, thesis §10.2.1). A follower's replies are all
        //    in `persisted_messages` (step 5).
        let msgs = ready.take_messages();
        self.send_messages(msgs);

        // 2. A snapshot from the leader: persist it (fsync), then restore the state machine.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot, ready.hs())?;
        }

        // ReadIndex answers: complete once `applied` reaches their index (below and step 6).
        for rs in ready.take_read_states() {
            self.reads.on_read_state(&rs.request_ctx, rs.index);
        }

        // 3. Committed entries (already durable in earlier Readies): apply them.
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;

        // 4. New entries and hard state: one redb transaction, fsynced before we go on.
        self.raw.mut_store().append(ready.entries(), ready.hs())?;

        // 5. Messages that promise what step 4 persisted (votes, append acks).
        let msgs = ready.take_persisted_messages();
        self.send_messages(msgs);

        // 6. Advance, then the LightReady: new commit index, messages, committed entries.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        let msgs = light.take_messages();
        self.send_messages(msgs);
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();

        // After the cycle (no raft calls are allowed between `ready` and `advance`).
        self.reads.on_applied(self.applied);
        for to in std::mem::take(&mut self.snapshot_sent_to) {
            // The transport cannot tell us whether it arrived; "finished" makes the leader wait
            // for the follower's append response and fall back to probing if it never comes.
            self.raw.report_snapshot(to, SnapshotStatus::Finish);
        }
        self.step_aside_if_removed();
        self.maybe_compact()?;
        if self.raw.raft.leader_id != self.known_leader {
            self.known_leader = self.raw.raft.leader_id;
            tracing::info!(id = self.id, leader = self.known_leader, term = self.raw.raft.term, "raft leader changed");
            self.submit_queued();
        }
        Ok(())
    }

    fn send_messages(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshot_sent_to.push(m.to);
            }
            match m.write_to_bytes() {
                Ok(bytes) => self.transport.send(m.to, WireMessage::Raft(bytes)),
                Err(e) => tracing::warn!(id = self.id, error = %e, "cannot encode raft message"),
            }
        }
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot, hs: Option<&HardState>) -> Result<(), RaftError> {
        let index = snapshot.get_metadata().index;
        self.raw.mut_store().apply_snapshot(snapshot, hs)?;
        lock(&self.sm).restore(&snapshot.data);
        self.applied = index;
        self.proposals.on_snapshot(index);
        tracing::info!(id = self.id, index, term = snapshot.get_metadata().term, "installed raft snapshot");
        Ok(())
    }

    /// Applies committed entries in order: commands to the state machine, conf changes to raft
    /// (and the new conf state to disk). Err only for a storage failure.
    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        if entries.is_empty() {
            return Ok(());
        }
        let sm = Arc::clone(&self.sm);
        let mut sm = lock(&sm);
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            let tag = Tag::decode(&e.context);
            let result = match e.get_entry_type() {
                // A new leader's empty entry carries no request.
                EntryType::EntryNormal if e.data.is_empty() && tag.is_none() => None,
                EntryType::EntryNormal => Some(Ok(sm.apply(e.index, &e.data))),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => Some(self.apply_conf_change(&e)?),
            };
            self.applied = e.index;
            if let Some(r) = self.proposals.on_applied(e.index, tag, result) {
                let reply = ForwardReply::Applied { index: r.index, result: r.result };
                self.transport.send(r.to, WireMessage::ForwardReply { id: r.id, reply });
            }
        }
        Ok(())
    }

    /// The inner result is the proposal's; the outer error is a storage failure.
    fn apply_conf_change(&mut self, e: &Entry) -> Result<Result<Vec<u8>, RaftError>, RaftError> {
        let applied = if e.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&e.data)
                .map_err(raft::Error::from)
                .and_then(|cc| self.raw.apply_conf_change(&cc))
        } else {
            ConfChangeV2::parse_from_bytes(&e.data)
                .map_err(raft::Error::from)
                .and_then(|cc| self.raw.apply_conf_change(&cc))
        };
        match applied {
            Ok(cs) => {
                tracing::info!(id = self.id, index = e.index, voters = ?cs.voters, "applied raft conf change");
                self.raw.mut_store().set_conf_state(cs)?;
                Ok(Ok(Vec::new()))
            }
            Err(err) => {
                tracing::warn!(id = self.id, index = e.index, error = %err, "rejected raft conf change");
                Ok(Err(err.into()))
            }
        }
    }

    /// A leader that removed itself keeps leading a configuration it is not in (raft-rs leaves
    /// this to the application), so hand leadership to the most up-to-date voter.
    fn step_aside_if_removed(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || raft.lead_transferee.is_some() {
            return;
        }
        let voters = raft.prs().conf().voters();
        if voters.contains(self.id) {
            return;
        }
        let target = raft
            .prs()
            .iter()
            .filter(|(id, _)| voters.contains(**id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id);
        if let Some(to) = target {
            tracing::info!(id = self.id, to, "removed from the voters: transferring leadership");
            self.raw.transfer_leader(to);
        }
    }

    /// Log compaction: every `snapshot_every` applied entries (or when raft needs a snapshot
    /// newer than ours), snapshot the state machine at `applied` and drop the log up to it.
    fn maybe_compact(&mut self) -> Result<(), RaftError> {
        let store = self.raw.store();
        let wanted = store.take_snapshot_request();
        let snapshot_index = store.snapshot_index();
        if self.applied <= snapshot_index || self.applied < self.replay_until {
            return Ok(());
        }
        if !wanted && self.applied - snapshot_index < self.cfg.snapshot_every {
            return Ok(());
        }
        let conf_state = store.conf_state().clone();
        let data = lock(&self.sm).snapshot();
        let bytes = data.len();
        self.raw.mut_store().compact_with_snapshot(self.applied, conf_state, data)?;
        tracing::debug!(id = self.id, index = self.applied, bytes, "raft snapshot taken, log compacted");
        Ok(())
    }

    fn publish_status(&self, running: bool) {
        let raft = &self.raw.raft;
        let mut voters: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        let store = self.raw.store();
        let status = RaftStatus {
            id: self.id,
            leader: (raft.leader_id != INVALID_ID).then_some(raft.leader_id),
            term: raft.term,
            role: raft.state.into(),
            voters,
            commit: raft.raft_log.committed,
            applied: self.applied,
            first_index: store.first(),
            last_index: raft.raft_log.last_index(),
            snapshot_index: store.snapshot_index(),
            running,
        };
        *lock(&self.status) = status;
    }
}
