//! In-process ranks: one [`LocalTransport`] per thread, connected by std channels.
//!
//! Used by tests and by single-process runs that want the real engine loop without sockets.
//! Faults are injected through a [`LocalFaultHandle`] shared by the whole group, so a test can
//! delay every message or make one rank's messages vanish mid-run and check that the others
//! fail with the right error within their deadline. Dropping a rank's transport closes its
//! channels, which its peers see as [`TransportError::PeerLost`].
//!
//! Channels are unbounded, so sending never blocks and the group cannot deadlock however large
//! the buffers; a peer that runs ahead simply leaves its next message queued.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Collective, Lockstep, TransportError};

/// Faults applied to every message of a group (snapshotted at the start of each collective).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalFaults {
    /// Every message is delivered this long after it was sent.
    pub delay: Option<Duration>,
    /// Messages sent by this rank silently vanish, as if its network link were cut.
    pub drop_messages_from: Option<usize>,
}

/// A shared, mutable [`LocalFaults`]: clone it into the test, change it at any time.
#[derive(Clone, Debug, Default)]
pub struct LocalFaultHandle(Arc<Mutex<LocalFaults>>);

impl LocalFaultHandle {
    pub fn new(faults: LocalFaults) -> Self {
        LocalFaultHandle(Arc::new(Mutex::new(faults)))
    }

    pub fn get(&self) -> LocalFaults {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn set(&self, faults: LocalFaults) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = faults;
    }
}

struct Message {
    op: Collective,
    seq: u64,
    payload: Vec<u8>,
    /// When an injected delay lets the receiver see it.
    deliver_at: Option<Instant>,
}

/// One rank of an in-process group. Move each to its own thread.
pub struct LocalTransport {
    lockstep: Lockstep,
    /// `to[p]`: the channel to rank p (`None` for ourselves).
    to: Vec<Option<Sender<Message>>>,
    /// `from[p]`: the channel from rank p (`None` for ourselves).
    from: Vec<Option<Receiver<Message>>>,
    faults: LocalFaultHandle,
}

impl std::fmt::Debug for LocalTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTransport")
            .field("rank", &self.lockstep.rank())
            .field("world", &self.lockstep.world())
            .field("poisoned", &self.lockstep.poisoned())
            .finish_non_exhaustive()
    }
}

impl LocalTransport {
    /// A group of `world` ranks with no faults; element r is rank r.
    pub fn group(world: usize) -> Vec<LocalTransport> {
        LocalTransport::group_with_faults(world, LocalFaultHandle::default())
    }

    /// A group whose messages pass through `faults`.
    pub fn group_with_faults(world: usize, faults: LocalFaultHandle) -> Vec<LocalTransport> {
        let mut to: Vec<Vec<Option<Sender<Message>>>> =
            (0..world).map(|_| (0..world).map(|_| None).collect()).collect();
        let mut from: Vec<Vec<Option<Receiver<Message>>>> =
            (0..world).map(|_| (0..world).map(|_| None).collect()).collect();
        for src in 0..world {
            for dst in 0..world {
                if src != dst {
                    let (tx, rx) = mpsc::channel();
                    to[src][dst] = Some(tx);
                    from[dst][src] = Some(rx);
                }
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| LocalTransport {
                lockstep: Lockstep::new(rank, world),
                to,
                from,
                faults: faults.clone(),
            })
            .collect()
    }

    /// The fault switchboard this rank's group shares.
    pub fn faults(&self) -> &LocalFaultHandle {
        &self.faults
    }

    fn exchange(
        &mut self,
        op: Collective,
        mut send: Vec<Vec<u8>>,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let seq = self.lockstep.begin((op == Collective::AllToAll).then_some(send.as_slice()))?;
        if op == Collective::Barrier {
            send = vec![Vec::new(); self.lockstep.world()];
        }
        let started = Instant::now();
        let (mut sent, mut received) = (0u64, 0u64);
        let result = self.exchange_inner(op, seq, send, started, deadline, &mut sent, &mut received);
        self.lockstep.end(started, sent, received, result)
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange_inner(
        &mut self,
        op: Collective,
        seq: u64,
        send: Vec<Vec<u8>>,
        started: Instant,
        deadline: Instant,
        sent: &mut u64,
        received: &mut u64,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let rank = self.lockstep.rank();
        let faults = self.faults.get();
        let deliver_at = faults.delay.map(|d| Instant::now() + d);
        let mut recv: Vec<Vec<u8>> = vec![Vec::new(); send.len()];
        // Errors are collected rather than returned at once: a rank that stopped half-way would
        // leave its other peers waiting for its message, and they would blame it instead of the
        // rank that actually failed.
        let mut first_error: Option<TransportError> = None;
        for (peer, payload) in send.into_iter().enumerate() {
            let Some(tx) = &self.to[peer] else {
                recv[peer] = payload;
                continue;
            };
            if faults.drop_messages_from == Some(rank) {
                continue;
            }
            let len = payload.len() as u64;
            match tx.send(Message { op, seq, payload, deliver_at }) {
                Ok(()) => *sent += len,
                Err(_) => {
                    first_error
                        .get_or_insert(TransportError::PeerLost { peer, reason: "its transport was dropped".into() });
                }
            }
        }
        for (peer, rx) in self.from.iter().enumerate() {
            let Some(rx) = rx else { continue };
            match receive(rx, peer, op, seq, started, deadline) {
                Ok(payload) => {
                    *received += payload.len() as u64;
                    recv[peer] = payload;
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(recv),
        }
    }
}

/// Takes rank `peer`'s message for collective `seq`, honouring any injected delay.
fn receive(
    rx: &Receiver<Message>,
    peer: usize,
    op: Collective,
    seq: u64,
    started: Instant,
    deadline: Instant,
) -> Result<Vec<u8>, TransportError> {
    let timeout = || TransportError::Timeout { peer, op, seq, waited: started.elapsed() };
    let msg = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(msg) => msg,
        Err(RecvTimeoutError::Timeout) => return Err(timeout()),
        Err(RecvTimeoutError::Disconnected) => {
            return Err(TransportError::PeerLost { peer, reason: "its transport was dropped".into() });
        }
    };
    if let Some(at) = msg.deliver_at {
        // An injected delay past the deadline is a timeout, reported at the deadline.
        std::thread::sleep(at.min(deadline).saturating_duration_since(Instant::now()));
        if at > deadline {
            return Err(timeout());
        }
    }
    if msg.seq != seq || msg.op != op {
        return Err(TransportError::Desync { peer, expected: op, expected_seq: seq, got: msg.op, got_seq: msg.seq });
    }
    Ok(msg.payload)
}

super::lockstep_transport!(LocalTransport);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::Transport;
    use crate::transport::testkit;

    #[test]
    fn random_exchanges_for_worlds_1_to_4() {
        for world in 1..=4 {
            testkit::check_random_exchanges(LocalTransport::group(world), 3);
        }
    }

    #[test]
    fn one_large_payload() {
        testkit::check_large_exchange(LocalTransport::group(3));
    }

    #[test]
    fn a_thousand_small_collectives() {
        testkit::check_many_small(LocalTransport::group(4), 1000);
    }

    #[test]
    fn barrier_waits_for_the_last_rank() {
        testkit::check_barrier(LocalTransport::group(3));
    }

    #[test]
    fn absent_rank_times_out_everyone_within_the_deadline() {
        testkit::check_absent_rank_times_out(LocalTransport::group(3), 2);
    }

    #[test]
    fn dropped_rank_is_peer_lost() {
        testkit::check_dropped_rank_is_lost(LocalTransport::group(4), 1, 5);
    }

    #[test]
    fn errors_poison_the_transport() {
        testkit::check_poisoning(LocalTransport::group(2));
    }

    #[test]
    fn lost_messages_time_out_on_every_waiting_rank() {
        let faults = LocalFaultHandle::default();
        let group = LocalTransport::group_with_faults(3, faults.clone());
        // A thread barrier, not the transport's, so that no message is in flight while the
        // faults change.
        let sync = Arc::new(std::sync::Barrier::new(3));
        let results = testkit::run_ranks(group, move |rank, mut t| {
            let deadline = Instant::now() + Duration::from_secs(10);
            t.all_to_all_v(vec![vec![rank as u8]; 3], deadline)?;
            sync.wait();
            if rank == 0 {
                faults.set(LocalFaults { drop_messages_from: Some(1), ..LocalFaults::default() });
            }
            sync.wait();
            let started = Instant::now();
            let r = t.all_to_all_v(vec![vec![1]; 3], Instant::now() + Duration::from_millis(300));
            // Keep the transport: dropping it early would turn the others' timeout into PeerLost.
            Ok::<_, TransportError>((r, started.elapsed(), t))
        });
        for (rank, result) in results.into_iter().enumerate() {
            let (r, took, _t) = result.expect("the first collective succeeds");
            if rank == 1 {
                // Rank 1 still hears from 0 and 2.
                assert!(r.is_ok(), "rank 1: {r:?}");
            } else {
                let err = r.expect_err("rank 1's message was dropped");
                assert!(matches!(err, TransportError::Timeout { peer: 1, .. }), "rank {rank}: {err}");
                assert!(took < Duration::from_secs(2), "rank {rank} took {took:?}");
            }
        }
    }

    #[test]
    fn delay_within_the_deadline_is_fine() {
        let faults =
            LocalFaultHandle::new(LocalFaults { delay: Some(Duration::from_millis(50)), ..Default::default() });
        let results = testkit::run_ranks(LocalTransport::group_with_faults(2, faults), move |rank, mut t| {
            let started = Instant::now();
            let recv = t.all_to_all_v(vec![vec![rank as u8]; 2], Instant::now() + Duration::from_secs(5))?;
            Ok::<_, TransportError>((recv, started.elapsed()))
        });
        for (rank, result) in results.into_iter().enumerate() {
            let (recv, took) = result.expect("a 50 ms delay fits a 5 s deadline");
            assert_eq!(recv[1 - rank], vec![(1 - rank) as u8]);
            assert!(took >= Duration::from_millis(45), "the delay applies: {took:?}");
        }
    }

    #[test]
    fn delay_past_the_deadline_times_out_at_the_deadline() {
        let faults = LocalFaultHandle::new(LocalFaults { delay: Some(Duration::from_secs(5)), ..Default::default() });
        let results = testkit::run_ranks(LocalTransport::group_with_faults(2, faults), move |_, mut t| {
            let started = Instant::now();
            let r = t.barrier(Instant::now() + Duration::from_millis(200));
            (r, started.elapsed())
        });
        for (rank, (r, took)) in results.into_iter().enumerate() {
            assert!(matches!(r, Err(TransportError::Timeout { op: Collective::Barrier, .. })), "rank {rank}: {r:?}");
            assert!(took < Duration::from_millis(1500), "returned at the deadline, not after the delay: {took:?}");
        }
    }
}
