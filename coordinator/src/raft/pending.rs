//! Who waits for what: proposals (made here, or forwarded here by followers) and ReadIndex
//! requests, matched against applied entries and read states. No raft-rs calls and no I/O;
//! the node thread feeds events in and sends what comes out.
//!
//! Each proposal's log entry carries a [`Tag`] in its context: the node that asked for it and a
//! request id unique to that node's incarnation. A node resolves its own waiter when it applies
//! the tagged entry itself, so the caller can read its write locally afterwards. The index a
//! proposal got (known at once on the leader, or from the leader's `Accepted` reply) detects a
//! proposal that lost its slot: if a different entry is applied at that index, it was dropped.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::{Proposal, RaftError};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, RaftError>>;

/// Answers held back until [`Outbox::flush`]: the node thread publishes its status first, so a
/// caller whose request completed sees a status that includes it.
pub(crate) struct Outbox<T>(Vec<(Reply<T>, Result<T, RaftError>)>);

impl<T> Outbox<T> {
    fn new() -> Self {
        Outbox(Vec::new())
    }

    fn push(&mut self, reply: Reply<T>, result: Result<T, RaftError>) {
        self.0.push((reply, result));
    }

    /// Sends every held answer (a caller that gave up is ignored).
    pub fn flush(&mut self) {
        for (reply, result) in self.0.drain(..) {
            let _ = reply.send(result);
        }
    }
}

/// Identifies one request across the cluster: (origin node, request id). Used as the context of
/// proposed entries and of ReadIndex requests (raft-rs's leader deduplicates reads by context,
/// so it must be unique cluster-wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tag {
    pub origin: u64,
    pub id: u64,
}

impl Tag {
    pub fn encode(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.origin.to_le_bytes());
        v.extend_from_slice(&self.id.to_le_bytes());
        v
    }

    pub fn decode(bytes: &[u8]) -> Option<Tag> {
        let origin = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let id = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        (bytes.len() == 16).then_some(Tag { origin, id })
    }
}

/// A random starting point for request ids, so ids of a restarted node cannot collide with tags
/// of its previous incarnation that are still in the log.
pub(crate) fn random_id_base() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish()
}

fn forwarded_to(stage: Stage) -> Option<u64> {
    match stage {
        Stage::Forwarded { to, .. } => Some(to),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Waiting for a leader (or for a pending conf change to finish on the leader).
    Queued,
    /// Sent to `to`, leader in `term`; no answer yet. Sent again while `to` still leads in
    /// `term` (it deduplicates), never to another leader (which might propose it twice).
    Forwarded { to: u64, term: u64 },
    /// In a leader's log at this index.
    Proposed { index: u64 },
}

struct PendingProposal {
    proposal: Proposal,
    reply: Reply<Vec<u8>>,
    deadline: Instant,
    stage: Stage,
    /// Ever handed to a leader (decides NoLeader vs Timeout on expiry).
    reached_leader: bool,
    /// The leader's result, waiting until this node has applied `index` too.
    leader_result: Option<(u64, Result<Vec<u8>, RaftError>)>,
}

/// What a leader remembers of a proposal it made for a follower.
struct ForwardedSlot {
    index: u64,
    term: u64,
    forget_at: Instant,
    replied: bool,
}

/// A forwarded reply to send: `ForwardReply::Applied` to `to`.
#[derive(Debug, PartialEq)]
pub(crate) struct AppliedReply {
    pub to: u64,
    pub id: u64,
    pub index: u64,
    pub result: Result<Vec<u8>, RaftError>,
}

/// Proposals made on this node, plus (as leader) the followers' proposals it put in its log.
pub(crate) struct Proposals {
    me: u64,
    next_id: u64,
    pending: HashMap<u64, PendingProposal>,
    /// index → id for proposals whose log index is known.
    by_index: BTreeMap<u64, u64>,
    /// Proposals this node (as leader) made for followers, kept until `propose_timeout` after
    /// they arrived so that a re-sent `Forward` is not proposed twice.
    forwarded: HashMap<Tag, ForwardedSlot>,
    /// The highest index this node jumped to by installing a snapshot: entries at or below it
    /// may have been applied without this node seeing them.
    restored_through: u64,
    pub done: Outbox<Vec<u8>>,
}

impl Proposals {
    pub fn new(me: u64, restored_through: u64) -> Self {
        Proposals {
            me,
            next_id: random_id_base(),
            pending: HashMap::new(),
            by_index: BTreeMap::new(),
            forwarded: HashMap::new(),
            restored_through,
            done: Outbox::new(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn add(&mut self, proposal: Proposal, reply: Reply<Vec<u8>>, deadline: Instant) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.insert(
            id,
            PendingProposal {
                proposal,
                reply,
                deadline,
                stage: Stage::Queued,
                reached_leader: false,
                leader_result: None,
            },
        );
        id
    }

    pub fn tag(&self, id: u64) -> Tag {
        Tag { origin: self.me, id }
    }

    /// The queued proposals, oldest id first is not guaranteed; callers submit them all.
    pub fn queued(&self) -> Vec<(u64, Proposal)> {
        let mut q: Vec<(u64, Proposal)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.stage == Stage::Queued)
            .map(|(id, p)| (*id, p.proposal.clone()))
            .collect();
        q.sort_by_key(|(id, _)| *id);
        q
    }

    pub fn stage(&self, id: u64) -> Option<Stage> {
        self.pending.get(&id).map(|p| p.stage)
    }

    pub fn mark_forwarded(&mut self, id: u64, to: u64, term: u64) {
        if let Some(p) = self.pending.get_mut(&id) {
            p.stage = Stage::Forwarded { to, term };
            p.reached_leader = true;
        }
    }

    /// Proposed into this node's own log (as leader) at `index`.
    pub fn mark_proposed(&mut self, id: u64, index: u64) {
        if let Some(p) = self.pending.get_mut(&id) {
            p.stage = Stage::Proposed { index };
            p.reached_leader = true;
            self.by_index.insert(index, id);
        }
    }

    /// The leader we forwarded to said "not now": queue it again for the next tick.
    pub fn requeue(&mut self, id: u64, from: u64) {
        if let Some(p) = self.pending.get_mut(&id)
            && forwarded_to(p.stage) == Some(from)
        {
            p.stage = Stage::Queued;
        }
    }

    pub fn fail(&mut self, id: u64, err: RaftError) {
        if let Some(p) = self.pending.remove(&id) {
            self.forget_index(&p);
            self.done.push(p.reply, Err(err));
        }
    }

    /// The leader we forwarded to refused the proposal for good.
    pub fn fail_forwarded(&mut self, id: u64, from: u64, err: RaftError) {
        if self.stage(id).and_then(forwarded_to) == Some(from) {
            self.fail(id, err);
        }
    }

    fn forget_index(&mut self, p: &PendingProposal) {
        if let Stage::Proposed { index: i } = p.stage {
            self.by_index.remove(&i);
        }
    }

    fn resolve(&mut self, id: u64, result: Result<Vec<u8>, RaftError>) {
        if let Some(p) = self.pending.remove(&id) {
            self.forget_index(&p);
            self.done.push(p.reply, result);
        }
    }

    /// The leader appended our forwarded proposal at `index`. `applied` is this node's applied
    /// index: if it is already past `index` (and not by a snapshot), a different entry took the
    /// slot and the proposal was dropped.
    pub fn on_accepted(&mut self, id: u64, from: u64, index: u64, applied: u64) {
        let Some(p) = self.pending.get_mut(&id) else { return };
        if forwarded_to(p.stage) != Some(from) {
            return;
        }
        p.stage = Stage::Proposed { index };
        if index <= applied && index > self.restored_through {
            self.fail(id, RaftError::Dropped("its log slot was taken by another entry".into()));
        } else {
            self.by_index.insert(index, id);
            self.try_leader_result(id, applied);
        }
    }

    /// The leader applied our forwarded proposal; we answer once we have applied `index` too.
    pub fn on_leader_applied(&mut self, id: u64, index: u64, result: Result<Vec<u8>, RaftError>, applied: u64) {
        let Some(p) = self.pending.get_mut(&id) else { return };
        p.leader_result = Some((index, result));
        if !matches!(p.stage, Stage::Proposed { .. }) {
            p.stage = Stage::Proposed { index };
            self.by_index.insert(index, id);
        }
        self.try_leader_result(id, applied);
    }

    fn try_leader_result(&mut self, id: u64, applied: u64) {
        let ready = matches!(self.pending.get(&id), Some(p) if matches!(p.leader_result, Some((i, _)) if i <= applied));
        if ready && let Some(mut p) = self.pending.remove(&id) {
            self.forget_index(&p);
            if let Some((_, result)) = p.leader_result.take() {
                self.done.push(p.reply, result);
            }
        }
    }

    /// Forwarded proposals still unanswered by `leader` in `term`, to send again.
    pub fn unanswered(&self, leader: u64, term: u64) -> Vec<(u64, Proposal)> {
        let mut v: Vec<(u64, Proposal)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.stage == Stage::Forwarded { to: leader, term })
            .map(|(id, p)| (*id, p.proposal.clone()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// Where this node (as leader) already proposed `tag` for a follower: (index, term).
    pub fn forwarded_slot(&self, tag: Tag) -> Option<(u64, u64)> {
        self.forwarded.get(&tag).map(|f| (f.index, f.term))
    }

    /// Remember that this node (as leader) proposed `tag` for a follower at `index`.
    pub fn note_forwarded(&mut self, tag: Tag, index: u64, term: u64, forget_at: Instant) {
        self.forwarded.insert(tag, ForwardedSlot { index, term, forget_at, replied: false });
    }

    /// This node applied the entry at `index` (tag from its context; `result` is None for an
    /// entry that carries no request, like a new leader's empty entry). Resolves the matching
    /// waiter, fails waiters whose slot went to this different entry, and returns the reply to
    /// send if this node proposed the entry for a follower.
    pub fn on_applied(
        &mut self,
        index: u64,
        tag: Option<Tag>,
        result: Option<Result<Vec<u8>, RaftError>>,
    ) -> Option<AppliedReply> {
        let mut reply = None;
        if let (Some(tag), Some(result)) = (tag, result) {
            if tag.origin == self.me {
                self.resolve(tag.id, result);
            } else if let Some(f) = self.forwarded.get_mut(&tag)
                && !f.replied
            {
                f.replied = true;
                reply = Some(AppliedReply { to: tag.origin, id: tag.id, index, result });
            }
        }
        // Anything still waiting for a slot at or below `index` lost it, unless a snapshot
        // covered that slot (then the outcome is unknown here: wait for the leader's result).
        if index <= self.restored_through {
            return reply;
        }
        let stale: Vec<u64> = self.by_index.range(self.restored_through + 1..=index).map(|(_, id)| *id).collect();
        for id in stale {
            let has_leader_result = matches!(self.pending.get(&id), Some(p) if p.leader_result.is_some());
            if has_leader_result {
                self.try_leader_result(id, index);
            } else {
                self.fail(id, RaftError::Dropped("its log slot was taken by another entry".into()));
            }
        }
        reply
    }

    /// This node installed a snapshot up to `index`. Waiters at or below it cannot tell whether
    /// their entry was in it; those with the leader's result get it, the others wait for it
    /// (or time out).
    pub fn on_snapshot(&mut self, index: u64) {
        self.restored_through = self.restored_through.max(index);
        let ids: Vec<u64> = self.by_index.range(..=index).map(|(_, id)| *id).collect();
        for id in ids {
            self.try_leader_result(id, index);
        }
    }

    /// Fails what has waited past its deadline; forgets old forwarded tags.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let err = match self.pending.get(&id) {
                Some(p) if !p.reached_leader => RaftError::NoLeader,
                _ => RaftError::Timeout,
            };
            self.fail(id, err);
        }
        self.forwarded.retain(|_, f| f.forget_at > now);
    }
}

struct PendingRead {
    reply: Reply<()>,
    deadline: Instant,
    /// The leader's confirmed commit index, once known.
    index: Option<u64>,
}

/// ReadIndex requests made on this node.
pub(crate) struct Reads {
    me: u64,
    next_id: u64,
    pending: BTreeMap<u64, PendingRead>,
    pub done: Outbox<()>,
}

impl Reads {
    pub fn new(me: u64) -> Self {
        Reads { me, next_id: random_id_base(), pending: BTreeMap::new(), done: Outbox::new() }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Registers a read; returns the context to pass to raft-rs.
    pub fn add(&mut self, reply: Reply<()>, deadline: Instant) -> Vec<u8> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.insert(id, PendingRead { reply, deadline, index: None });
        Tag { origin: self.me, id }.encode()
    }

    /// Contexts of reads the leader has not confirmed yet (raft-rs silently drops a read when
    /// there is no leader, or the leader has not committed in its term, so they are retried).
    pub fn unconfirmed(&self) -> Vec<Vec<u8>> {
        self.pending
            .iter()
            .filter(|(_, r)| r.index.is_none())
            .map(|(id, _)| Tag { origin: self.me, id: *id }.encode())
            .collect()
    }

    /// A read state from raft-rs: the leader confirmed commit index `index` for `ctx`.
    pub fn on_read_state(&mut self, ctx: &[u8], index: u64) {
        if let Some(tag) = Tag::decode(ctx)
            && tag.origin == self.me
            && let Some(r) = self.pending.get_mut(&tag.id)
            && r.index.is_none()
        {
            r.index = Some(index);
        }
    }

    /// Completes reads whose confirmed index this node has applied.
    pub fn on_applied(&mut self, applied: u64) {
        let done: Vec<u64> =
            self.pending.iter().filter(|(_, r)| r.index.is_some_and(|i| i <= applied)).map(|(id, _)| *id).collect();
        for id in done {
            if let Some(r) = self.pending.remove(&id) {
                self.done.push(r.reply, Ok(()));
            }
        }
    }

    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self.pending.iter().filter(|(_, r)| r.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(r) = self.pending.remove(&id) {
                let err = if r.index.is_some() { RaftError::Timeout } else { RaftError::NoLeader };
                self.done.push(r.reply, Err(err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn cmd(s: &str) -> Proposal {
        Proposal::Command(s.as_bytes().to_vec())
    }

    #[test]
    fn tag_round_trip() {
        let t = Tag { origin: 3, id: u64::MAX - 1 };
        assert_eq!(Tag::decode(&t.encode()), Some(t));
        assert_eq!(Tag::decode(b""), None);
        assert_eq!(Tag::decode(&[0; 17]), None);
        assert_eq!(Tag::decode(&[0; 15]), None);
    }

    #[test]
    fn own_entry_resolves_with_local_result() {
        let mut p = Proposals::new(1, 0);
        let (tx, mut rx) = oneshot::channel();
        let id = p.add(cmd("a"), tx, later());
        p.mark_proposed(id, 5);
        assert_eq!(p.on_applied(4, None, None), None);
        p.done.flush();
        assert!(rx.try_recv().is_err());
        assert_eq!(p.on_applied(5, Some(p.tag(id)), Some(Ok(b"r".to_vec()))), None);
        p.done.flush();
        assert_eq!(rx.try_recv().expect("resolved"), Ok(b"r".to_vec()));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn slot_taken_by_another_entry_is_dropped() {
        // Raft §5.3: an uncommitted entry of a deposed leader is overwritten by the new leader's.
        let mut p = Proposals::new(1, 0);
        let (tx, mut rx) = oneshot::channel();
        let id = p.add(cmd("a"), tx, later());
        p.mark_proposed(id, 5);
        p.on_applied(5, Some(Tag { origin: 2, id: 9 }), Some(Ok(vec![])));
        p.done.flush();
        assert!(matches!(rx.try_recv().expect("resolved"), Err(RaftError::Dropped(_))));
    }

    #[test]
    fn forwarded_waits_for_own_apply_or_leader_result() {
        let mut p = Proposals::new(2, 0);
        let (tx, mut rx) = oneshot::channel();
        let id = p.add(cmd("a"), tx, later());
        assert_eq!(p.queued().len(), 1);
        p.mark_forwarded(id, 1, 4);
        assert!(p.queued().is_empty());
        assert_eq!(p.unanswered(1, 4).len(), 1);
        assert!(p.unanswered(1, 5).is_empty(), "never re-sent to a leader of another term");
        p.on_accepted(id, 1, 7, 3);
        // The leader applied it, but we have not reached 7: keep waiting (read-your-writes).
        p.on_leader_applied(id, 7, Ok(b"x".to_vec()), 6);
        p.done.flush();
        assert!(rx.try_recv().is_err());
        // We caught up through a snapshot that covers 7: the leader's result stands.
        p.on_snapshot(10);
        p.done.flush();
        assert_eq!(rx.try_recv().expect("resolved"), Ok(b"x".to_vec()));
    }

    #[test]
    fn leader_side_reply_for_followers() {
        let mut leader = Proposals::new(1, 0);
        let tag = Tag { origin: 2, id: 42 };
        leader.note_forwarded(tag, 8, 2, later());
        assert_eq!(leader.forwarded_slot(tag), Some((8, 2)));
        let reply = leader.on_applied(8, Some(tag), Some(Ok(b"y".to_vec())));
        assert_eq!(reply, Some(AppliedReply { to: 2, id: 42, index: 8, result: Ok(b"y".to_vec()) }));
        // Only once; and the slot is remembered so that a re-sent Forward is not proposed again.
        assert_eq!(leader.on_applied(8, Some(tag), Some(Ok(b"y".to_vec()))), None);
        assert_eq!(leader.forwarded_slot(tag), Some((8, 2)));
    }

    #[test]
    fn retry_and_expiry() {
        let mut p = Proposals::new(2, 0);
        let (tx, mut rx) = oneshot::channel();
        let now = Instant::now();
        let id = p.add(cmd("a"), tx, now + Duration::from_millis(10));
        p.mark_forwarded(id, 1, 3);
        p.requeue(id, 3); // not the node we forwarded to: ignored
        assert_eq!(p.stage(id), Some(Stage::Forwarded { to: 1, term: 3 }));
        p.requeue(id, 1);
        assert_eq!(p.stage(id), Some(Stage::Queued));
        p.expire(now + Duration::from_millis(20));
        // It reached a leader once, so the outcome is unknown: Timeout, not NoLeader.
        p.done.flush();
        assert_eq!(rx.try_recv().expect("expired"), Err(RaftError::Timeout));

        let (tx, mut rx) = oneshot::channel();
        let _ = p.add(cmd("b"), tx, now);
        p.expire(now);
        p.done.flush();
        assert_eq!(rx.try_recv().expect("expired"), Err(RaftError::NoLeader));
    }

    #[test]
    fn reads_complete_when_applied() {
        let mut r = Reads::new(1);
        let (tx, mut rx) = oneshot::channel();
        let ctx = r.add(tx, later());
        assert_eq!(r.unconfirmed(), vec![ctx.clone()]);
        r.on_read_state(&Tag { origin: 2, id: 0 }.encode(), 1); // someone else's: ignored
        r.on_read_state(&ctx, 9);
        assert!(r.unconfirmed().is_empty());
        r.on_applied(8);
        r.done.flush();
        assert!(rx.try_recv().is_err());
        r.on_applied(9);
        r.done.flush();
        assert_eq!(rx.try_recv().expect("done"), Ok(()));
        assert_eq!(r.len(), 0);
    }
}
