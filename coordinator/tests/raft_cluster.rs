//! The coordinators' Raft control plane over an in-memory network: elections, forwarding,
//! failures, partitions, ReadIndex, snapshots and membership changes.
//!
//! Ticks are 20 ms and elections take 10–20 ticks (0.2–0.4 s); waits allow many election
//! timeouts so the tests hold on a loaded two-core machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::join_all;
use herd_coordinator::raft::testkit::{LogMachine, MemNetwork};
use herd_coordinator::raft::{RaftConfig, RaftError, RaftHandle, RaftNode, RaftStatus, Role};

const WAIT: Duration = Duration::from_secs(20);

struct Cluster {
    net: MemNetwork,
    root: tempfile::TempDir,
    founders: Vec<u64>,
    tweak: fn(&mut RaftConfig),
    nodes: BTreeMap<u64, (RaftNode, RaftHandle<LogMachine>)>,
}

fn base_config(cfg: &mut RaftConfig) {
    cfg.tick = Duration::from_millis(20);
    cfg.election_tick = 10;
    cfg.heartbeat_tick = 2;
    cfg.propose_timeout = Duration::from_secs(5);
    cfg.read_timeout = Duration::from_secs(5);
}

impl Cluster {
    fn new(ids: &[u64], tweak: fn(&mut RaftConfig)) -> Self {
        let mut c = Cluster {
            net: MemNetwork::new(),
            root: tempfile::tempdir().expect("tmp"),
            founders: ids.to_vec(),
            tweak,
            nodes: BTreeMap::new(),
        };
        for id in ids {
            c.start(*id, ids.to_vec());
        }
        c
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// Starts (or restarts, from its data dir) node `id`.
    fn start(&mut self, id: u64, peers: Vec<u64>) {
        let mut cfg = RaftConfig::new(id, peers, self.dir(id));
        base_config(&mut cfg);
        (self.tweak)(&mut cfg);
        let (node, handle) = RaftNode::spawn(cfg, LogMachine::default(), self.net.transport(id)).expect("spawn");
        self.net.register(handle.mailbox());
        self.nodes.insert(id, (node, handle));
    }

    /// Stops node `id` abruptly (its thread ends; nothing is flushed beyond what was fsynced).
    fn kill(&mut self, id: u64) {
        self.net.unregister(id);
        self.nodes.remove(&id);
    }

    fn h(&self, id: u64) -> RaftHandle<LogMachine> {
        self.nodes.get(&id).map(|(_, h)| h.clone()).expect("node running")
    }

    fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    fn status(&self, id: u64) -> RaftStatus {
        self.h(id).status()
    }

    fn log(&self, id: u64) -> LogMachine {
        self.h(id).read(|m| m.clone())
    }

    fn describe(&self) -> String {
        self.nodes.values().map(|(_, h)| format!("{:?}\n", h.status())).collect()
    }

    /// Waits until every node in `ids` follows the same leader, which is one of them.
    async fn leader_among(&self, ids: &[u64]) -> u64 {
        let found = wait_for(WAIT, || {
            let st: Vec<RaftStatus> = ids.iter().map(|id| self.status(*id)).collect();
            let leader = st[0].leader?;
            let agreed = st.iter().all(|s| s.leader == Some(leader) && s.term == st[0].term);
            let is_leader = ids.contains(&leader) && self.status(leader).role == Role::Leader;
            (agreed && is_leader).then_some(leader)
        })
        .await;
        found.unwrap_or_else(|| panic!("no agreed leader among {ids:?}:\n{}", self.describe()))
    }

    async fn leader(&self) -> u64 {
        self.leader_among(&self.ids()).await
    }

    /// Waits until every node in `ids` has applied the same index, at least `min`.
    async fn converged(&self, ids: &[u64], min: u64) -> u64 {
        let found = wait_for(WAIT, || {
            let applied: Vec<u64> = ids.iter().map(|id| self.status(*id).applied).collect();
            let commit = ids.iter().map(|id| self.status(*id).commit).max().unwrap_or(0);
            (applied.iter().all(|a| *a == applied[0] && *a >= min && *a >= commit)).then_some(applied[0])
        })
        .await;
        found.unwrap_or_else(|| panic!("{ids:?} did not converge at >= {min}:\n{}", self.describe()))
    }

    /// Asserts that every node in `ids` applied exactly the same commands at the same indices
    /// up to `upto` (a state machine may be a little ahead of the status it published).
    fn assert_same_logs(&self, ids: &[u64], upto: u64) -> LogMachine {
        let log = |id: u64| {
            let mut m = self.log(id);
            assert!(m.strictly_increasing(), "node {id} applied out of order or twice");
            m.applied.retain(|(index, _)| *index <= upto);
            m
        };
        let first = log(ids[0]);
        for id in &ids[1..] {
            assert_eq!(log(*id).applied, first.applied, "node {id} differs from node {}", ids[0]);
        }
        first
    }
}

async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Proposes, retrying only on errors that guarantee the command was not applied.
async fn propose(h: &RaftHandle<LogMachine>, cmd: &str) -> Result<Vec<u8>, RaftError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match h.propose(cmd.as_bytes().to_vec()).await {
            Err(RaftError::NoLeader | RaftError::Dropped(_) | RaftError::Busy) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn count(log: &LogMachine, cmd: &str) -> usize {
    log.applied.iter().filter(|(_, c)| c == cmd.as_bytes()).count()
}

/// Raft §5.2 (election) and §5.3 (replication): one leader; commands from any node — followers
/// forward theirs — are applied once each, in one order, on every node; and a proposal
/// resolves only after its own node applied it (read-your-writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_and_apply_in_one_order() {
    let c = Cluster::new(&[1, 2, 3], |_| {});
    let leader = c.leader().await;
    let per_node = 12;
    let runs = c.ids().into_iter().map(|id| {
        let h = c.h(id);
        async move {
            for i in 0..per_node {
                let cmd = format!("n{id}-{i}");
                let result = propose(&h, &cmd).await.unwrap_or_else(|e| panic!("{cmd}: {e}"));
                assert_eq!(result.len(), 8, "the state machine's result comes back");
                assert!(h.read(|m| count(m, &cmd) == 1), "{cmd} not applied on its own node {id} yet");
            }
        }
    });
    join_all(runs).await;
    let applied = c.converged(&c.ids(), 3 * per_node).await;
    let log = c.assert_same_logs(&c.ids(), applied);
    assert_eq!(log.applied.len(), 3 * per_node as usize);
    for id in c.ids() {
        for i in 0..per_node {
            assert_eq!(count(&log, &format!("n{id}-{i}")), 1);
        }
        // Each node's own commands keep their order (each waited for the previous one).
        let mine: Vec<Vec<u8>> =
            log.commands().into_iter().filter(|cmd| cmd.starts_with(format!("n{id}-").as_bytes())).collect();
        let want: Vec<Vec<u8>> = (0..per_node).map(|i| format!("n{id}-{i}").into_bytes()).collect();
        assert_eq!(mine, want);
    }
    let st = c.status(leader);
    assert_eq!(st.voters, vec![1, 2, 3]);
    assert!(st.commit >= applied);
}

/// Raft §5.2 / §5.4: kill the leader, a new one takes over with a higher term and commits;
/// the old node restarts from its data dir (snapshot + log replay) and catches up without
/// applying anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_new_leader_and_restart_catches_up() {
    let mut c = Cluster::new(&[1, 2, 3], |cfg| cfg.snapshot_every = 8);
    let old = c.leader().await;
    let old_term = c.status(old).term;
    for i in 0..10 {
        propose(&c.h(old), &format!("before-{i}")).await.expect("propose");
    }
    let started = Instant::now();
    c.kill(old);
    let survivors = c.ids();
    let new = c.leader_among(&survivors).await;
    let took = started.elapsed();
    assert_ne!(new, old);
    assert!(c.status(new).term > old_term);
    assert!(took < Duration::from_secs(10), "new leader after {took:?}");
    for (n, i) in (0..10).map(|i| (survivors[i % 2], i)) {
        propose(&c.h(n), &format!("after-{i}")).await.expect("propose after failover");
    }

    c.start(old, c.founders.clone());
    let everyone = c.ids();
    let applied = c.converged(&everyone, 21).await;
    let log = c.assert_same_logs(&everyone, applied);
    assert_eq!(log.applied.len(), 20);
    let restarted = c.log(old);
    assert!(restarted.restores >= 1, "restarted from its own snapshot");
    assert!(restarted.strictly_increasing());
    assert!(c.status(old).snapshot_index > 1, "compacted beyond the bootstrap snapshot");
    eprintln!("failover took {took:?}");
}

/// Raft §5.4.1 / §6.2: a leader cut off with no majority cannot commit (its proposal never
/// applies anywhere) while the majority elects a new leader and commits; after healing the old
/// leader's uncommitted entry is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_commit_majority_can() {
    let c = Cluster::new(&[1, 2, 3], |cfg| cfg.propose_timeout = Duration::from_secs(3));
    let old = c.leader().await;
    propose(&c.h(old), "committed-before").await.expect("propose");
    c.converged(&c.ids(), 2).await;
    let commit_before = c.status(old).commit;

    c.net.isolate(old);
    let stranded = tokio::spawn({
        let h = c.h(old);
        async move { h.propose(b"stranded".to_vec()).await }
    });
    let majority: Vec<u64> = c.ids().into_iter().filter(|id| *id != old).collect();
    let new = c.leader_among(&majority).await;
    for i in 0..5 {
        propose(&c.h(majority[i % 2]), &format!("majority-{i}")).await.expect("majority commits");
    }
    assert_eq!(c.status(old).commit, commit_before, "the isolated node committed something");
    let stepped_down = wait_for(WAIT, || (c.status(old).role != Role::Leader).then_some(())).await;
    assert!(stepped_down.is_some(), "check_quorum: the isolated leader must step down");

    let outcome = stranded.await.expect("join");
    assert!(
        matches!(outcome, Err(RaftError::Timeout | RaftError::Dropped(_) | RaftError::NoLeader)),
        "a proposal on the minority side must fail, got {outcome:?}"
    );
    c.net.heal();
    let applied = c.converged(&c.ids(), 8).await;
    let log = c.assert_same_logs(&c.ids(), applied);
    assert_eq!(count(&log, "stranded"), 0);
    assert_eq!(count(&log, "committed-before"), 1);
    assert_eq!(c.leader().await, new);
}

/// Raft thesis §6.4 (ReadIndex): right after a write completes on the leader, a read barrier on
/// a follower makes that follower's local state include it, even with a slow network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_index_on_follower_sees_prior_write() {
    let c = Cluster::new(&[1, 2, 3], |_| {});
    let leader = c.leader().await;
    c.net.set_delay(Duration::from_millis(2), Duration::from_millis(8));
    let followers: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();
    for i in 0..15 {
        let cmd = format!("w{i}");
        propose(&c.h(leader), &cmd).await.expect("write");
        let f = c.h(followers[i % 2]);
        let seen = f.linearizable_read(|m| count(m, &cmd)).await.expect("read_index");
        assert_eq!(seen, 1, "follower {} missed {cmd}", f.id());
        c.h(leader).read_index().await.expect("read_index on the leader");
    }
}

/// Raft §7 (log compaction): snapshots compact the log; a follower that missed more than the
/// log holds catches up through an installed snapshot, and so does a brand-new fourth voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_and_bring_laggards_up() {
    let mut c = Cluster::new(&[1, 2, 3], |cfg| cfg.snapshot_every = 20);
    let leader = c.leader().await;
    let lagger = c.ids().into_iter().find(|id| *id != leader).expect("a follower");
    c.net.isolate(lagger);
    let h = c.h(leader);
    join_all((0..100).map(|i| {
        let h = h.clone();
        async move { propose(&h, &format!("bulk-{i}")).await.expect("propose") }
    }))
    .await;
    let st = c.status(leader);
    assert!(st.snapshot_index >= 80 && st.first_index == st.snapshot_index + 1, "not compacted: {st:?}");

    c.net.heal();
    let applied = c.converged(&c.ids(), 101).await;
    c.assert_same_logs(&c.ids(), applied);
    assert!(c.log(lagger).restores >= 1, "the lagging follower should have installed a snapshot");

    c.start(4, vec![]);
    c.h(lagger).add_voter(4).await.expect("add voter 4 (forwarded by a follower)");
    propose(&h, "after-join").await.expect("propose");
    let all = c.ids();
    let applied = c.converged(&all, 103).await;
    c.assert_same_logs(&all, applied);
    assert!(c.log(4).restores >= 1, "the new node should have started from a snapshot");
    for id in &all {
        assert_eq!(c.status(*id).voters, vec![1, 2, 3, 4]);
    }
}

/// Raft §4.1 (single-server membership changes): add a fourth voter, remove the leader itself
/// (it hands leadership over), and the three that remain keep committing without elections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_voters() {
    let mut c = Cluster::new(&[1, 2, 3], |_| {});
    let leader = c.leader().await;
    propose(&c.h(leader), "one").await.expect("propose");
    c.start(4, vec![]);
    c.h(leader).add_voter(4).await.expect("add voter");
    propose(&c.h(4), "from-the-new-voter").await.expect("the new voter proposes");
    c.converged(&c.ids(), 4).await;
    for id in c.ids() {
        assert_eq!(c.status(id).voters, vec![1, 2, 3, 4]);
    }

    c.h(leader).remove_voter(leader).await.expect("remove the leader");
    let rest: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();
    let new = c.leader_among(&rest).await;
    assert_ne!(new, leader);
    for id in &rest {
        let voters = wait_for(WAIT, || {
            let v = c.status(*id).voters;
            (!v.contains(&leader)).then_some(v)
        })
        .await;
        assert_eq!(voters.map(|v| v.len()), Some(3), "node {id}");
    }
    let term = c.status(new).term;
    for i in 0..5 {
        propose(&c.h(rest[i % 3]), &format!("three-{i}")).await.expect("propose");
    }
    // The removed node never campaigns (it is not promotable), so the term stays put.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.status(new).term, term);
    assert_ne!(c.status(leader).role, Role::Leader);
    assert!(!c.status(leader).voters.contains(&leader));
    c.kill(leader);
    propose(&c.h(new), "after-removed-node-gone").await.expect("three voters still commit");

    // A restarted voter replays both conf changes from its log (idempotently: its stored
    // configuration already has them) and ends up in the same configuration.
    let again = rest.iter().copied().find(|id| *id != new).expect("a follower");
    c.kill(again);
    c.start(again, c.founders.clone());
    propose(&c.h(new), "after-restart").await.expect("propose");
    let applied = c.converged(&rest, 12).await;
    c.assert_same_logs(&rest, applied);
    assert_eq!(c.status(again).voters, c.status(new).voters);
    assert!(c.log(again).strictly_increasing());
}

/// Raft thesis §9.6 (pre-vote): a follower cut off for many election timeouts does not bump its
/// term, so when it comes back the leader keeps its term and leadership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prevote_rejoin_does_not_disrupt_leader() {
    // Longer elections (0.4–0.8 s) so a loaded machine does not cause a real one.
    let c = Cluster::new(&[1, 2, 3], |cfg| cfg.election_tick = 20);
    let leader = c.leader().await;
    let term = c.status(leader).term;
    let loner = c.ids().into_iter().find(|id| *id != leader).expect("a follower");
    c.net.isolate(loner);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = c.status(loner);
    assert_eq!(st.term, term, "pre-vote must keep the isolated node's term: {st:?}");
    assert_ne!(st.role, Role::Leader);
    propose(&c.h(leader), "while-apart").await.expect("the majority commits");

    c.net.heal();
    c.converged(&c.ids(), 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.leader().await, leader);
    for id in c.ids() {
        assert_eq!(c.status(id).term, term, "node {id}:\n{}", c.describe());
    }
}

/// Messages lost (10%) and reordered: proposals still succeed or fail cleanly, nothing is
/// applied twice and every node ends with the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_reordering_network() {
    let c = Cluster::new(&[1, 2, 3], |cfg| cfg.snapshot_every = 10);
    c.leader().await;
    c.net.set_drop_rate(0.1, 7);
    c.net.set_delay(Duration::from_millis(1), Duration::from_millis(6));
    let mut ok = 0;
    for i in 0..30 {
        let id = c.ids()[i % 3];
        match propose(&c.h(id), &format!("lossy-{i}")).await {
            Ok(_) => ok += 1,
            Err(RaftError::Timeout) => {} // outcome unknown; checked below: at most once
            Err(e) => panic!("lossy-{i}: {e}"),
        }
    }
    c.net.set_drop_rate(0.0, 0);
    propose(&c.h(1), "final").await.expect("propose");
    let leader = c.leader().await;
    let applied = c.status(leader).applied;
    let applied = c.converged(&c.ids(), applied).await;
    let log = c.assert_same_logs(&c.ids(), applied);
    for i in 0..30 {
        assert!(count(&log, &format!("lossy-{i}")) <= 1);
    }
    assert!(ok >= 25, "only {ok} of 30 proposals succeeded");
    assert!(c.net.dropped() > 0);
}

/// Requests fail cleanly, never hang: no leader (a lone node of three), and a stopped node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_time_out_without_a_leader_and_fail_after_shutdown() {
    let net = MemNetwork::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = RaftConfig::new(1, vec![1, 2, 3], dir.path());
    base_config(&mut cfg);
    cfg.propose_timeout = Duration::from_millis(500);
    cfg.read_timeout = Duration::from_millis(500);
    let (node, h) = RaftNode::spawn(cfg.clone(), LogMachine::default(), net.transport(1)).expect("spawn");
    net.register(h.mailbox());
    let started = Instant::now();
    assert_eq!(h.propose(b"x".to_vec()).await, Err(RaftError::NoLeader));
    assert_eq!(h.read_index().await, Err(RaftError::NoLeader));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(h.status().term, 1, "pre-vote: a node that cannot win keeps the bootstrap term");

    h.clone().shutdown().await;
    assert_eq!(h.propose(b"y".to_vec()).await, Err(RaftError::ShuttingDown));
    assert!(!h.status().running);
    drop(node);

    // Malformed input from the network is dropped, not fatal.
    let (node, h) = RaftNode::spawn(cfg, LogMachine::default(), net.transport(1)).expect("respawn");
    h.mailbox().deliver_bytes(2, b"\xff\xfe garbage");
    h.receive(2, herd_coordinator::raft::WireMessage::Raft(vec![0xff; 7]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!node.is_finished() && h.status().running);

    let mut bad = RaftConfig::new(0, vec![1], dir.path());
    base_config(&mut bad);
    assert!(matches!(RaftNode::spawn(bad, LogMachine::default(), net.transport(0)), Err(RaftError::Config(_))));
}
