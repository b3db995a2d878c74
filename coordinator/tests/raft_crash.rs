//! Durability under `kill -9`: a child process (this test binary re-executed in child mode)
//! runs a single-voter raft node and proposes without pause, printing every command whose
//! proposal resolved (so it was fsynced, committed and applied). The parent SIGKILLs it at an
//! arbitrary moment, several times over the same data dir, and checks that the storage reopens
//! consistent and that a node restarted from it still holds every acknowledged command, exactly
//! once, in one order.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use herd_coordinator::raft::testkit::LogMachine;
use herd_coordinator::raft::{RaftConfig, RaftNode, RaftStorage, RaftTransport, Role, WireMessage};

const CHILD_DIR: &str = "HERD_RAFT_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "HERD_RAFT_CRASH_CHILD_ROUND";

/// A single voter never sends anything.
struct NoNetwork;

impl RaftTransport for NoNetwork {
    fn send(&self, _to: u64, _msg: WireMessage) {}
}

fn config(dir: &str) -> RaftConfig {
    let mut cfg = RaftConfig::new(1, vec![1], dir);
    cfg.tick = Duration::from_millis(10);
    cfg.election_tick = 5;
    cfg.heartbeat_tick = 1;
    cfg.snapshot_every = 25;
    cfg
}

/// Child mode only (a no-op in a normal test run): propose forever, print `ACK <cmd> <commit>`
/// for each proposal that resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    let round = std::env::var(CHILD_ROUND).unwrap_or_default();
    let (_node, h) = RaftNode::spawn(config(&dir), LogMachine::default(), NoNetwork).expect("spawn child node");
    let mut n = 0u64;
    loop {
        let batch = (0..4).map(|k| {
            let h = h.clone();
            let cmd = format!("r{round}-c{}", n + k);
            async move { (h.propose(cmd.clone().into_bytes()).await, cmd) }
        });
        for (result, cmd) in join_all(batch).await {
            if result.is_ok() {
                println!("ACK {cmd} {}", h.status().commit);
            }
        }
        n += 4;
    }
}

struct Round {
    acked: Vec<String>,
    max_commit: u64,
}

fn run_child_and_kill(dir: &str, round: u32, min_acks: usize) -> Round {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_ROUND, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = Round { acked: Vec::new(), max_commit: 0 };
    let take = |line: String, out: &mut Round| {
        let mut parts = line.split_whitespace();
        if parts.next() == Some("ACK") {
            let cmd = parts.next().expect("cmd").to_owned();
            let commit: u64 = parts.next().expect("commit").parse().expect("commit index");
            out.acked.push(cmd);
            out.max_commit = out.max_commit.max(commit);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.acked.len() < min_acks {
        assert!(Instant::now() < deadline, "child acknowledged only {} proposals", out.acked.len());
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            take(line, &mut out);
        }
    }
    // Kill it mid-stream: it is always proposing, persisting or applying.
    std::thread::sleep(Duration::from_millis(u64::from(round) * 7 % 23));
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    reader.join().expect("reader");
    for line in rx.try_iter() {
        take(line, &mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_str().expect("utf-8 path").to_owned();
    let mut acked = Vec::new();
    for round in 0..5 {
        let r = run_child_and_kill(&dir, round, 40);
        acked.extend(r.acked);
        let s = RaftStorage::open(tmp.path()).expect("storage reopens after kill -9");
        let hs = s.hard_state();
        assert!(
            s.last() >= r.max_commit,
            "round {round}: last index {} < acknowledged commit {}",
            s.last(),
            r.max_commit
        );
        assert!(hs.commit >= s.snapshot_index() && hs.commit <= s.last(), "round {round}: {s:?}");
        for i in s.first()..=s.last() {
            let e = s.entry(i).expect("contiguous log");
            assert!(e.term <= hs.term && e.index == i, "round {round}: entry {i} term {} > hard state term", e.term);
        }
        eprintln!("round {round}: {} acked, storage {s:?}", acked.len());
    }

    // Recover: snapshot + replay of the committed entries after it.
    let (node, h) = RaftNode::spawn(config(&dir), LogMachine::default(), NoNetwork).expect("restart");
    let settled = Instant::now() + Duration::from_secs(20);
    loop {
        let st = h.status();
        if st.role == Role::Leader && st.applied == st.commit && st.commit == st.last_index {
            break;
        }
        assert!(Instant::now() < settled, "never settled: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = h.read(|m| m.clone());
    assert!(log.restores >= 1, "recovery should start from a snapshot");
    assert!(log.strictly_increasing(), "an entry was applied twice or out of order");
    let mut seen = std::collections::HashSet::new();
    for cmd in log.commands() {
        assert!(seen.insert(cmd.clone()), "{} applied twice", String::from_utf8_lossy(&cmd));
    }
    for cmd in &acked {
        assert!(seen.contains(cmd.as_bytes()), "acknowledged {cmd} was lost");
    }
    drop(node);
}
