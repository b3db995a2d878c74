//! The data plane: the collectives that workers run in lockstep at every MoE layer.
//!
//! At each MoE layer every worker sends token activations to the workers that hold their experts
//! with one [`Transport::all_to_all_v`], and gets the expert outputs back with a second one. A
//! worker with nothing to send still joins with empty buffers, so a collective never waits on an
//! absent peer; a peer that is really gone or stuck is caught by the deadline every call carries.
//!
//! Implementations:
//! - [`local`]: ranks as threads of one process, over std channels, with fault injection (delay,
//!   dropped messages) for tests of the failure paths.
//! - [`tcp`]: the CPU data plane between processes and hosts: one TCP connection per peer pair,
//!   raw frames ([`frame`]) and optional mutual TLS ([`tls`]).
//! - `nccl` (`cuda` builds only): the GPU data plane, grouped `ncclSend`/`ncclRecv` on a
//!   non-blocking communicator that is aborted at the deadline.
//!
//! Every implementation shares the bookkeeping in [`Lockstep`]: collective sequence numbers,
//! counters, and poisoning. After the first error a transport refuses all further calls, because
//! the peers can no longer agree on which collective is which: the engine must abort the step and
//! rebuild the group.

pub mod frame;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;
pub mod tls;

#[cfg(test)]
mod testkit;

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

pub use local::{LocalFaultHandle, LocalFaults, LocalTransport};
pub use tcp::{TcpOptions, TcpTransport};
pub use tls::TlsConfig;

// Activations travel as raw little-endian bytes; a big-endian host would need a byte swap that
// nothing here does.
const _: () = assert!(cfg!(target_endian = "little"), "the transport assumes a little-endian host");

/// A group of ranks that exchange byte buffers in lockstep.
///
/// The engine calls it from one dedicated thread per worker, synchronously; every rank must make
/// the same sequence of calls.
pub trait Transport: Send + fmt::Debug {
    /// This worker's index in the group, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world(&self) -> usize;
    /// Exchanges one byte buffer with every rank.
    ///
    /// `send.len() == world`; `send[p]` goes to rank p (`send[self.rank()]` is returned as
    /// `recv[self.rank()]` without touching the network). Returns `recv` with `recv[p]` = what
    /// rank p sent to us. Each peer's payload length travels in a frame header before the payload.
    ///
    /// Fails, with an error naming the peer, if a peer misses `deadline`, closes its connection,
    /// sends a malformed or truncated frame, or is at a different collective (sequence-number
    /// mismatch). Never blocks much past the deadline. After any error the transport is
    /// poisoned: every later call fails fast with [`TransportError::Poisoned`] wrapping the first
    /// error.
    fn all_to_all_v(&mut self, send: Vec<Vec<u8>>, deadline: Instant) -> Result<Vec<Vec<u8>>, TransportError>;
    /// Returns once every rank has entered the barrier (or errors as [`Transport::all_to_all_v`]).
    fn barrier(&mut self, deadline: Instant) -> Result<(), TransportError>;
    /// Cumulative counters since the transport was built.
    fn stats(&self) -> TransportStats;
}

/// Cumulative counters of one transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Collectives run (successful or not), barriers included.
    pub collectives: u64,
    /// Bytes handed to the network for other ranks, frame headers included (in-process
    /// transports count payload bytes only). The rank's own buffer is never counted.
    pub bytes_sent: u64,
    /// Bytes taken from the network from other ranks, frame headers included.
    pub bytes_received: u64,
    /// Wall time spent inside collectives.
    pub busy: Duration,
}

/// Which collective a frame or message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    AllToAll,
    Barrier,
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Collective::AllToAll => "all_to_all_v",
            Collective::Barrier => "barrier",
        })
    }
}

/// Why a collective (or setting up a transport) failed. Every variant that can be blamed on one
/// rank names it, so the engine can report that peer to the coordinator.
///
/// `Clone` so that a poisoned transport can hand out its first error again; I/O errors are
/// therefore kept as their kind and message.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TransportError {
    #[error("rank {peer} missed the deadline of {op} #{seq} (waited {waited:?})")]
    Timeout { peer: usize, op: Collective, seq: u64, waited: Duration },
    #[error("lost rank {peer}: {reason}")]
    PeerLost { peer: usize, reason: String },
    #[error("malformed frame from rank {peer}: {reason}")]
    Malformed { peer: usize, reason: String },
    #[error("rank {peer} is at a different collective: expected {expected} #{expected_seq}, got {got} #{got_seq}")]
    Desync { peer: usize, expected: Collective, expected_seq: u64, got: Collective, got_seq: u64 },
    #[error("I/O error with rank {peer}: {message}")]
    Io { peer: usize, kind: io::ErrorKind, message: String },
    /// Building the group failed: a peer could not be reached, was rejected, or rejected us.
    #[error("transport setup failed{}: {reason}", peer.map(|p| format!(" (rank {p})")).unwrap_or_default())]
    Setup { peer: Option<usize>, reason: String },
    /// The caller broke the contract (wrong number of buffers, bad options).
    #[error("invalid use of the transport: {0}")]
    Usage(String),
    #[error("transport is unusable after an earlier error: {0}")]
    Poisoned(Box<TransportError>),
}

impl TransportError {
    /// The rank this error blames, if any (looking through [`TransportError::Poisoned`]).
    pub fn peer(&self) -> Option<usize> {
        match self {
            TransportError::Timeout { peer, .. }
            | TransportError::PeerLost { peer, .. }
            | TransportError::Malformed { peer, .. }
            | TransportError::Desync { peer, .. }
            | TransportError::Io { peer, .. } => Some(*peer),
            TransportError::Setup { peer, .. } => *peer,
            TransportError::Usage(_) => None,
            TransportError::Poisoned(first) => first.peer(),
        }
    }

    /// The error that poisoned the transport, or this one if it is not [`TransportError::Poisoned`].
    pub fn root(&self) -> &TransportError {
        match self {
            TransportError::Poisoned(first) => first.root(),
            other => other,
        }
    }
}

/// Sends the same `bytes` to every rank and returns what each rank sent (`out[p]` from rank p).
///
/// The engine uses it for the per-step "has work" vote.
pub fn all_gather(
    transport: &mut dyn Transport,
    bytes: &[u8],
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, TransportError> {
    let send = vec![bytes.to_vec(); transport.world()];
    transport.all_to_all_v(send, deadline)
}

/// `f32` activations as the raw little-endian bytes that go on the wire.
pub fn f32s_to_bytes(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice::<f32, u8>(values).to_vec()
}

/// The inverse of [`f32s_to_bytes`]. `peer` is only used to blame the sender of a buffer whose
/// length is not a multiple of 4.
pub fn bytes_to_f32s(bytes: &[u8], peer: usize) -> Result<Vec<f32>, TransportError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(TransportError::Malformed {
            peer,
            reason: format!("{} bytes is not a whole number of f32 values", bytes.len()),
        });
    }
    // The received Vec<u8> is only byte-aligned, so this copies rather than casting in place.
    Ok(bytemuck::pod_collect_to_vec::<u8, f32>(bytes))
}

/// The [`Transport`] impl every implementation shares: rank, world and counters from its
/// `lockstep` field ([`Lockstep`]), both collectives through its own
/// `exchange(op, send, deadline)` (a barrier is an exchange of empty buffers).
macro_rules! lockstep_transport {
    ($t:ty) => {
        impl $crate::transport::Transport for $t {
            fn rank(&self) -> usize {
                self.lockstep.rank()
            }

            fn world(&self) -> usize {
                self.lockstep.world()
            }

            fn all_to_all_v(
                &mut self,
                send: Vec<Vec<u8>>,
                deadline: std::time::Instant,
            ) -> Result<Vec<Vec<u8>>, $crate::transport::TransportError> {
                self.exchange($crate::transport::Collective::AllToAll, send, deadline)
            }

            fn barrier(&mut self, deadline: std::time::Instant) -> Result<(), $crate::transport::TransportError> {
                self.exchange($crate::transport::Collective::Barrier, Vec::new(), deadline).map(|_| ())
            }

            fn stats(&self) -> $crate::transport::TransportStats {
                self.lockstep.stats()
            }
        }
    };
}
pub(crate) use lockstep_transport;

/// The state every implementation shares: where the group is in its sequence of collectives,
/// the counters, and the first error.
#[derive(Debug)]
pub(crate) struct Lockstep {
    rank: usize,
    world: usize,
    /// Sequence number of the last collective started; the first is 1 (0 is the handshake).
    seq: u64,
    poisoned: Option<TransportError>,
    stats: TransportStats,
}

impl Lockstep {
    pub(crate) fn new(rank: usize, world: usize) -> Self {
        Lockstep { rank, world, seq: 0, poisoned: None, stats: TransportStats::default() }
    }

    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    pub(crate) fn world(&self) -> usize {
        self.world
    }

    pub(crate) fn stats(&self) -> TransportStats {
        self.stats
    }

    pub(crate) fn poisoned(&self) -> Option<&TransportError> {
        self.poisoned.as_ref()
    }

    /// Starts the next collective: fails fast if poisoned, checks `send`, returns its sequence
    /// number. A bad `send` poisons too: this rank skipping a collective would desync the group.
    pub(crate) fn begin(&mut self, send: Option<&[Vec<u8>]>) -> Result<u64, TransportError> {
        if let Some(first) = &self.poisoned {
            return Err(TransportError::Poisoned(Box::new(first.clone())));
        }
        self.seq += 1;
        self.stats.collectives += 1;
        if let Some(send) = send
            && send.len() != self.world
        {
            let err = TransportError::Usage(format!(
                "all_to_all_v needs one buffer per rank: got {}, world is {}",
                send.len(),
                self.world
            ));
            self.poisoned = Some(err.clone());
            return Err(err);
        }
        Ok(self.seq)
    }

    /// Ends a collective started at `started`: records its time and byte counts and poisons the
    /// transport if it failed.
    pub(crate) fn end<T>(
        &mut self,
        started: Instant,
        sent: u64,
        received: u64,
        result: Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        self.stats.busy += started.elapsed();
        self.stats.bytes_sent += sent;
        self.stats.bytes_received += received;
        if let Err(err) = &result {
            self.poison(err.clone());
        }
        result
    }

    /// Marks the transport unusable, keeping the first error.
    pub(crate) fn poison(&mut self, err: TransportError) {
        if self.poisoned.is_none() {
            self.poisoned = Some(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let values = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE, f32::INFINITY, f32::NAN, -3.25e-7];
        let bytes = f32s_to_bytes(&values);
        assert_eq!(bytes.len(), values.len() * 4);
        assert_eq!(&bytes[8..12], &1.5f32.to_le_bytes());
        let back = bytes_to_f32s(&bytes, 0).expect("whole floats");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
        // A buffer that starts at an odd address still converts.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(bits(&bytes_to_f32s(&shifted[1..], 0).expect("whole floats")), bits(&values));
    }

    #[test]
    fn ragged_f32_buffer_is_malformed_and_blames_the_sender() {
        let err = bytes_to_f32s(&[1, 2, 3, 4, 5], 3).expect_err("5 bytes");
        assert!(matches!(err, TransportError::Malformed { peer: 3, .. }), "{err}");
    }

    #[test]
    fn lockstep_poisons_on_first_error_and_keeps_it() {
        let mut ls = Lockstep::new(0, 2);
        assert_eq!(ls.begin(None), Ok(1));
        let first = TransportError::PeerLost { peer: 1, reason: "gone".into() };
        let second = TransportError::PeerLost { peer: 0, reason: "also gone".into() };
        let started = Instant::now();
        assert!(ls.end::<()>(started, 10, 20, Err(first.clone())).is_err());
        ls.poison(second);
        let err = ls.begin(None).expect_err("poisoned");
        assert_eq!(err, TransportError::Poisoned(Box::new(first.clone())));
        assert_eq!(err.peer(), Some(1));
        assert_eq!(err.root(), &first);
        assert_eq!(ls.stats().collectives, 1);
        assert_eq!((ls.stats().bytes_sent, ls.stats().bytes_received), (10, 20));
    }

    #[test]
    fn wrong_buffer_count_is_a_usage_error_that_poisons() {
        let mut ls = Lockstep::new(1, 3);
        let err = ls.begin(Some(&[vec![], vec![]])).expect_err("2 buffers for world 3");
        assert!(matches!(err, TransportError::Usage(_)), "{err}");
        assert!(matches!(ls.begin(None), Err(TransportError::Poisoned(_))));
    }

    #[test]
    fn error_messages_name_the_peer() {
        let err =
            TransportError::Timeout { peer: 2, op: Collective::Barrier, seq: 7, waited: Duration::from_millis(5) };
        assert_eq!(err.to_string(), "rank 2 missed the deadline of barrier #7 (waited 5ms)");
        let err = TransportError::Setup { peer: Some(1), reason: "refused".into() };
        assert_eq!(err.to_string(), "transport setup failed (rank 1): refused");
        let err = TransportError::Setup { peer: None, reason: "bad options".into() };
        assert_eq!(err.to_string(), "transport setup failed: bad options");
    }
}
