//! Test helpers: [`MemNetwork`], an in-memory network between raft nodes that can partition,
//! drop and delay messages, and [`LogMachine`], a state machine that records what it applied.
//!
//! Every message goes through [`WireMessage::encode`] and [`Mailbox::deliver_bytes`], as over
//! a real transport.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::node::lock;
use super::{Mailbox, RaftTransport, StateMachine, WireMessage};

/// An in-memory network. Clones share it.
#[derive(Clone, Default)]
pub struct MemNetwork {
    inner: Arc<NetInner>,
}

#[derive(Default)]
struct NetInner {
    mailboxes: Mutex<HashMap<u64, Mailbox>>,
    rules: Mutex<Rules>,
    delayer: Mutex<Option<mpsc::Sender<Delayed>>>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Rules {
    /// Partition side of each node (absent: side 0). Messages cross no side boundary.
    side: HashMap<u64, u32>,
    /// One-way blocked links (from, to).
    blocked: HashSet<(u64, u64)>,
    drop_rate: f64,
    delay: Duration,
    jitter: Duration,
    rng: u64,
}

impl Rules {
    /// splitmix64: deterministic for a given seed.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Delayed {
    at: Instant,
    seq: u64,
    from: u64,
    to: u64,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    /// Reversed, so that `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// The transport node `id` sends through.
    pub fn transport(&self, id: u64) -> MemTransport {
        MemTransport { id, net: self.clone() }
    }

    /// Connects a node's mailbox (replacing an earlier one with the same id, e.g. after a restart).
    pub fn register(&self, mailbox: Mailbox) {
        lock(&self.inner.mailboxes).insert(mailbox.id(), mailbox);
    }

    /// Disconnects a node: messages to it vanish.
    pub fn unregister(&self, id: u64) {
        lock(&self.inner.mailboxes).remove(&id);
    }

    /// Cuts `minority` off from everyone else (they still talk among themselves).
    pub fn partition(&self, minority: &[u64]) {
        let mut rules = lock(&self.inner.rules);
        rules.side.clear();
        for id in minority {
            rules.side.insert(*id, 1);
        }
    }

    /// Cuts one node off from everyone.
    pub fn isolate(&self, id: u64) {
        self.partition(&[id]);
    }

    /// Blocks messages from `from` to `to` (one way).
    pub fn block(&self, from: u64, to: u64) {
        lock(&self.inner.rules).blocked.insert((from, to));
    }

    /// Removes every partition and blocked link (drop rate and delay stay).
    pub fn heal(&self) {
        let mut rules = lock(&self.inner.rules);
        rules.side.clear();
        rules.blocked.clear();
    }

    /// Drops each message with probability `rate`, from a deterministic sequence seeded by `seed`.
    pub fn set_drop_rate(&self, rate: f64, seed: u64) {
        let mut rules = lock(&self.inner.rules);
        rules.drop_rate = rate;
        rules.rng = seed;
    }

    /// Delays each message by `base` plus up to `jitter` (so messages can be reordered).
    pub fn set_delay(&self, base: Duration, jitter: Duration) {
        let mut rules = lock(&self.inner.rules);
        rules.delay = base;
        rules.jitter = jitter;
    }

    /// Messages handed to the network so far.
    pub fn sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Relaxed)
    }

    /// Messages the network dropped so far (partitions, blocks, drop rate, unknown targets).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    fn route(&self, from: u64, to: u64, msg: WireMessage) {
        self.inner.sent.fetch_add(1, Ordering::Relaxed);
        let bytes = match msg.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(from, to, error = %e, "memnet: cannot encode");
                return;
            }
        };
        let delay = {
            let mut rules = lock(&self.inner.rules);
            let crosses = rules.side.get(&from).copied().unwrap_or(0) != rules.side.get(&to).copied().unwrap_or(0);
            let drop_it = crosses || rules.blocked.contains(&(from, to)) || {
                let rate = rules.drop_rate;
                rate > 0.0 && rules.unit() < rate
            };
            if drop_it {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let jitter = rules.jitter.mul_f64(if rules.jitter.is_zero() { 0.0 } else { rules.unit() });
            rules.delay + jitter
        };
        if delay.is_zero() {
            self.deliver(from, to, &bytes);
            return;
        }
        let seq = self.inner.sent.load(Ordering::Relaxed);
        let item = Delayed { at: Instant::now() + delay, seq, from, to, bytes };
        let mut delayer = lock(&self.inner.delayer);
        let tx = delayer.get_or_insert_with(|| spawn_delayer(Arc::downgrade(&self.inner)));
        let _ = tx.send(item);
    }

    fn deliver(&self, from: u64, to: u64, bytes: &[u8]) {
        deliver(&self.inner, from, to, bytes);
    }
}

fn deliver(inner: &NetInner, from: u64, to: u64, bytes: &[u8]) {
    let mailbox = lock(&inner.mailboxes).get(&to).cloned();
    match mailbox {
        Some(m) => m.deliver_bytes(from, bytes),
        None => {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A thread that holds delayed messages until due; it ends with the network.
fn spawn_delayer(net: Weak<NetInner>) -> mpsc::Sender<Delayed> {
    let (tx, rx) = mpsc::channel::<Delayed>();
    std::thread::spawn(move || {
        let mut heap = BinaryHeap::new();
        loop {
            let wait = heap
                .peek()
                .map_or(Duration::from_secs(1), |d: &Delayed| d.at.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(wait) {
                Ok(d) => heap.push(d),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            while heap.peek().is_some_and(|d| d.at <= now) {
                let Some(d) = heap.pop() else { break };
                let Some(inner) = net.upgrade() else { return };
                deliver(&inner, d.from, d.to, &d.bytes);
            }
        }
    });
    tx
}

/// Node `id`'s side of a [`MemNetwork`].
#[derive(Clone)]
pub struct MemTransport {
    id: u64,
    net: MemNetwork,
}

impl RaftTransport for MemTransport {
    fn send(&self, to: u64, msg: WireMessage) {
        self.net.route(self.id, to, msg);
    }
}

/// A deterministic state machine that records every applied command with its index. The
/// result of a command is the number of commands applied so far (8 bytes, little-endian).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogMachine {
    /// (index, command) in application order.
    pub applied: Vec<(u64, Vec<u8>)>,
    /// How many times a snapshot was restored into this instance.
    pub restores: u64,
}

impl LogMachine {
    /// The commands in application order.
    pub fn commands(&self) -> Vec<Vec<u8>> {
        self.applied.iter().map(|(_, c)| c.clone()).collect()
    }

    /// Whether indices strictly increase (no entry applied twice, none out of order).
    pub fn strictly_increasing(&self) -> bool {
        self.applied.windows(2).all(|w| w[0].0 < w[1].0)
    }
}

impl StateMachine for LogMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.applied.push((index, command.to_vec()));
        (self.applied.len() as u64).to_le_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(&self.applied, bincode::config::standard()).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) {
        self.applied = bincode::serde::decode_from_slice(snapshot, bincode::config::standard())
            .map(|(v, _)| v)
            .unwrap_or_default();
        self.restores += 1;
    }
}
