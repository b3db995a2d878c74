//! The public face of a raft node: [`RaftNode`] owns the node thread, [`RaftHandle`] is the
//! cloneable async API, [`Mailbox`] is where a transport drops what arrives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};

use super::node::{Command, Node, lock};
use super::pending::Reply;
use super::{Proposal, RaftConfig, RaftError, RaftStatus, RaftTransport, StateMachine, WireMessage};

/// Owns a running raft node's thread. Dropping it stops the node and waits for the thread
/// (at most about one tick plus one fsync); everything acknowledged is already on disk, so this
/// is also how tests "crash" a node.
pub struct RaftNode {
    id: u64,
    stop: Arc<AtomicBool>,
    tx: SyncSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl RaftNode {
    /// Recovers (or bootstraps) the node from `config.data_dir` and starts its thread.
    /// Errors: invalid configuration, unreadable or inconsistent storage.
    pub fn spawn<S: StateMachine, T: RaftTransport>(
        config: RaftConfig,
        state_machine: S,
        transport: T,
    ) -> Result<(RaftNode, RaftHandle<S>), RaftError> {
        let id = config.id;
        let capacity = config.inbox_capacity;
        let sm = Arc::new(Mutex::new(state_machine));
        let status = Arc::new(Mutex::new(RaftStatus { id, ..RaftStatus::default() }));
        let node = Node::new(config, Arc::clone(&sm), Box::new(transport), Arc::clone(&status))?;
        let (tx, rx) = sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                // Declared first so that it is dropped last, even when unwinding: whoever waits
                // in `RaftHandle::shutdown` wakes only after the storage is closed.
                let stopped_tx = stopped_tx;
                node.run(rx, &thread_stop);
                let _ = stopped_tx.send(true);
            })
            .map_err(|e| RaftError::Raft(format!("cannot start the raft thread: {e}")))?;
        let handle = RaftHandle {
            id,
            mailbox: Mailbox { id, tx: tx.clone() },
            sm,
            status,
            stop: Arc::clone(&stop),
            stopped: stopped_rx,
        };
        Ok((RaftNode { id, stop, tx, thread: Some(thread) }, handle))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the node thread has ended (stopped, or failed to persist).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.tx.try_send(Command::Wake);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a transport delivers what arrived for a node. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Mailbox {
    id: u64,
    tx: SyncSender<Command>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").field("id", &self.id).finish()
    }
}

impl Mailbox {
    /// The node this mailbox belongs to.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Hands a message from peer `from` to the node. Dropped (raft retransmits; forwarded
    /// proposals time out) when the inbox is full or the node has stopped.
    pub fn deliver(&self, from: u64, msg: WireMessage) {
        match self.tx.try_send(Command::Receive { from, msg }) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => tracing::debug!(id = self.id, from, "raft inbox full; dropping a message"),
        }
    }

    /// Decodes bytes from the network and delivers them; malformed input is dropped with a
    /// warning.
    pub fn deliver_bytes(&self, from: u64, bytes: &[u8]) {
        match WireMessage::decode(bytes) {
            Ok(msg) => self.deliver(from, msg),
            Err(e) => tracing::warn!(id = self.id, from, error = %e, "dropping malformed raft wire message"),
        }
    }

    fn request(&self, cmd: Command) -> Result<(), RaftError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => RaftError::Busy,
            TrySendError::Disconnected(_) => RaftError::ShuttingDown,
        })
    }
}

/// The async API of a running node. Clones share the node; the state machine is behind a mutex
/// shared with the node thread, which holds it while applying a batch of entries.
pub struct RaftHandle<S> {
    id: u64,
    mailbox: Mailbox,
    sm: Arc<Mutex<S>>,
    status: Arc<Mutex<RaftStatus>>,
    stop: Arc<AtomicBool>,
    stopped: watch::Receiver<bool>,
}

impl<S> Clone for RaftHandle<S> {
    fn clone(&self) -> Self {
        RaftHandle {
            id: self.id,
            mailbox: self.mailbox.clone(),
            sm: Arc::clone(&self.sm),
            status: Arc::clone(&self.status),
            stop: Arc::clone(&self.stop),
            stopped: self.stopped.clone(),
        }
    }
}

impl<S: StateMachine> RaftHandle<S> {
    pub fn id(&self) -> u64 {
        self.id
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.mailbox.request(make(tx))?;
        // The node thread answers every request by its deadline; a dropped sender means it stopped.
        rx.await.unwrap_or(Err(RaftError::ShuttingDown))
    }

    /// Replicates `command` and resolves once it is applied on THIS node, with the state
    /// machine's result (so a read on this node right after sees it). A follower forwards it to
    /// the leader. Errors: [`RaftError::NoLeader`] (no leader for `propose_timeout`; not
    /// applied), [`RaftError::Dropped`] (will not be applied), [`RaftError::Timeout`] (reached a
    /// leader, outcome unknown), [`RaftError::ShuttingDown`], [`RaftError::Busy`].
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        self.request(|reply| Command::Propose { proposal: Proposal::Command(command), reply }).await
    }

    /// Adds `id` as a voter (a single-server conf change). Start the new node first with empty
    /// `peers`; it catches up from the leader. Resolves once applied on this node.
    pub async fn add_voter(&self, id: u64) -> Result<(), RaftError> {
        self.request(|reply| Command::Propose { proposal: Proposal::AddVoter(id), reply }).await.map(|_| ())
    }

    /// Removes voter `id`. A removed node stops campaigning; a removed leader hands
    /// leadership to another voter. Resolves once applied on this node.
    pub async fn remove_voter(&self, id: u64) -> Result<(), RaftError> {
        self.request(|reply| Command::Propose { proposal: Proposal::RemoveVoter(id), reply }).await.map(|_| ())
    }

    /// Linearizable read barrier (ReadIndex, Raft thesis §6.4): resolves once this node has
    /// applied at least the commit index that the leader confirmed, with a heartbeat quorum,
    /// after this call. A read of the local state machine afterwards sees every write that
    /// completed anywhere before the call.
    pub async fn read_index(&self) -> Result<(), RaftError> {
        self.request(|reply| Command::ReadIndex { reply }).await
    }

    /// [`Self::read_index`], then [`Self::read`].
    pub async fn linearizable_read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, RaftError> {
        self.read_index().await?;
        Ok(self.read(f))
    }

    /// Reads the local state machine as applied so far (possibly stale; see [`Self::read_index`]).
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&lock(&self.sm))
    }

    /// The node's raft state as of its last loop.
    pub fn status(&self) -> RaftStatus {
        lock(&self.status).clone()
    }

    /// Delivers a message that arrived from the network from peer `from`.
    pub fn receive(&self, from: u64, msg: WireMessage) {
        self.mailbox.deliver(from, msg)
    }

    /// Where a transport should deliver this node's incoming messages.
    pub fn mailbox(&self) -> Mailbox {
        self.mailbox.clone()
    }

    /// Stops the node and waits until its thread has ended and closed the storage. Requests
    /// still waiting fail with [`RaftError::ShuttingDown`].
    pub async fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.mailbox.tx.try_send(Command::Wake);
        let mut stopped = self.stopped.clone();
        // Err means the thread is gone without saying so (it panicked): stopped either way.
        let _ = stopped.wait_for(|s| *s).await;
    }
}
