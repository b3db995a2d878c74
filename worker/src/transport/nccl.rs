//! The GPU data plane: NCCL point-to-point between one GPU per rank (`cuda` builds).
//!
//! Setup: rank 0 creates the group's [`NcclId`] ([`NcclId::new`], which starts NCCL's bootstrap
//! root in that process) and the id reaches the other ranks over the authenticated control
//! channel ([`ToWorker::NcclId`](crate::control::ToWorker::NcclId)); every rank then calls
//! [`NcclTransport::connect`] with it.
//!
//! Each [`Transport::all_to_all_v`] runs two grouped `ncclSend`/`ncclRecv` rounds on a private
//! stream: first a 16-byte header per peer (the collective's tag and the payload length, so
//! that a receiver can size its buffer and a rank at another collective is caught as
//! [`TransportError::Desync`], as over TCP), then the payloads, copied host → device from the
//! callers' buffers and device → host into the returned ones. The rank's own buffer is handed
//! back without touching NCCL. A barrier is the header round alone.
//!
//! Deadlines: the communicator is non-blocking (`ncclConfig_t::blocking = 0`), so no NCCL call
//! waits on a peer; setup and every round poll `ncclCommGetAsyncError` and `cuStreamQuery`
//! until done or the deadline. At the deadline (or on any error) the communicator is aborted
//! (`ncclCommAbort`, which also stops its kernels) and the transport poisoned, so a dead peer
//! costs the others one deadline, never a hang. Device → host copies are only issued once the
//! NCCL kernels have finished, because a copy into pageable memory may block the host until the
//! stream reaches it.
//!
//! NCCL cannot tell which peer is late. With two ranks the error names the other one; with
//! more it names this rank (as the TCP transport does when it cannot blame anyone).
//!
//! Libraries, all dlopened: `libnccl.so` (2.14 or newer; the pip wheel `nvidia-nccl-cu12` ships
//! only `libnccl.so.2`, so a `libnccl.so` symlink must be on the loader path) and the driver
//! `libcuda.so.1`. Both are checked first, because cudarc panics on a missing library.
//!
//! How the id travels: rank 0 sends [`FromWorker::NcclId`](crate::control::FromWorker::NcclId)
//! and the coordinator relays it to the other members of that epoch as
//! [`ToWorker::NcclId`](crate::control::ToWorker::NcclId) (coordinator `Scheduler::relay_nccl_id`).
//! The agent (`crate::agent`) forms a group over this transport when the coordinators'
//! assignment names [`DataPlane::Nccl`](crate::control::DataPlane). The expert-parallel exchange
//! ([`EpRunner::exchange`](crate::ep::EpRunner::exchange)) still hands it host rows, which it
//! stages through the device; sending straight from the GPU engine's dispatch buffers is the
//! next step.

mod comm;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};
use cudarc::nccl::sys as nc;

pub use crate::control::NcclId;

use self::comm::{Comm, P2p, backoff, init_comm, nccl_library, setup};
use super::{Collective, Lockstep, TransportError};

/// Default [`NcclOptions::max_frame_bytes`]: 1 GiB, as over TCP.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 1 << 30;

/// Bytes of the per-peer header: the collective's tag and the payload length.
const HEADER_BYTES: usize = 16;

/// Settings of one rank's [`NcclTransport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NcclOptions {
    /// Largest payload a peer may announce; more is [`TransportError::Malformed`] before any
    /// device memory is allocated, and sending more is a usage error.
    pub max_frame_bytes: u64,
    /// Send this rank's own buffer through NCCL too (a send/recv to itself) instead of handing
    /// it back directly. Only for checking NCCL on a single GPU, where a group has one rank and
    /// nothing would otherwise cross NCCL.
    pub own_buffer_through_nccl: bool,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, own_buffer_through_nccl: false }
    }
}

/// One rank of a group whose collectives run over NCCL.
pub struct NcclTransport {
    lockstep: Lockstep,
    opts: NcclOptions,
    device: usize,
    /// `None` once aborted (after the first error).
    comm: Option<Comm>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Outgoing and incoming headers, [`HEADER_BYTES`] per rank.
    headers_out: CudaSlice<u8>,
    headers_in: CudaSlice<u8>,
    /// Payload staging, grown on demand and reused.
    payload_out: Option<CudaSlice<u8>>,
    payload_in: Option<CudaSlice<u8>>,
}

impl fmt::Debug for NcclTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclTransport")
            .field("rank", &self.lockstep.rank())
            .field("world", &self.lockstep.world())
            .field("device", &self.device)
            .field("poisoned", &self.lockstep.poisoned())
            .finish_non_exhaustive()
    }
}

impl NcclTransport {
    /// Joins the group of `world` ranks described by `id` as `rank`, on CUDA device
    /// `device_ordinal`, with default options. Fails at `deadline` if some rank has not joined.
    pub fn connect(
        rank: usize,
        world: usize,
        id: &NcclId,
        device_ordinal: usize,
        deadline: Instant,
    ) -> Result<NcclTransport, TransportError> {
        NcclTransport::connect_with(rank, world, id, device_ordinal, NcclOptions::default(), deadline)
    }

    /// [`NcclTransport::connect`] with explicit options (every rank must use the same).
    pub fn connect_with(
        rank: usize,
        world: usize,
        id: &NcclId,
        device_ordinal: usize,
        opts: NcclOptions,
        deadline: Instant,
    ) -> Result<NcclTransport, TransportError> {
        if rank >= world || i32::try_from(world).is_err() {
            return Err(TransportError::Usage(format!("rank {rank} in a group of {world}")));
        }
        nccl_library()?;
        // SAFETY: only tries to dlopen the candidate names.
        if !unsafe { cu::is_culib_present() } {
            return Err(setup(None, "no CUDA driver: libcuda.so not found (is the NVIDIA driver installed?)".into()));
        }
        let cuda = |what: &str, e: DriverError| setup(None, format!("{what} on CUDA device {device_ordinal}: {e}"));
        let ctx = CudaContext::new(device_ordinal).map_err(|e| cuda("opening the context", e))?;
        // SAFETY: every buffer of this transport is used on its one stream only, so cudarc's
        // cross-stream events are not needed (this touches only this `CudaContext` handle).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda("creating a stream", e))?;
        let headers_out = stream.alloc_zeros::<u8>(HEADER_BYTES * world).map_err(|e| cuda("allocating", e))?;
        let headers_in = stream.alloc_zeros::<u8>(HEADER_BYTES * world).map_err(|e| cuda("allocating", e))?;
        stream.synchronize().map_err(|e| cuda("synchronizing", e))?;
        let comm = init_comm(rank, world, id, &ctx, deadline)?;
        Ok(NcclTransport {
            lockstep: Lockstep::new(rank, world),
            opts,
            device: device_ordinal,
            comm: Some(comm),
            ctx,
            stream,
            headers_out,
            headers_in,
            payload_out: None,
            payload_in: None,
        })
    }

    /// The rank NCCL failures are blamed on: with two ranks the other one, otherwise (NCCL does
    /// not say which peer failed) this one.
    fn blamed(&self) -> usize {
        let rank = self.lockstep.rank();
        if self.lockstep.world() == 2 { 1 - rank } else { rank }
    }

    fn device_error(&self, what: &str, e: DriverError) -> TransportError {
        let rank = self.lockstep.rank();
        TransportError::Io {
            peer: rank,
            kind: std::io::ErrorKind::Other,
            message: format!("CUDA {what} on device {}: {e}", self.device),
        }
    }

    fn exchange(
        &mut self,
        op: Collective,
        send: Vec<Vec<u8>>,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let seq = self.lockstep.begin((op == Collective::AllToAll).then_some(send.as_slice()))?;
        let send = if op == Collective::Barrier { vec![Vec::new(); self.lockstep.world()] } else { send };
        let started = Instant::now();
        let (mut sent, mut received) = (0u64, 0u64);
        let result = self.exchange_inner(op, seq, send, started, deadline, &mut sent, &mut received);
        if result.is_err()
            && let Some(comm) = self.comm.take()
        {
            // The group can no longer agree on what comes next; abort so that nothing of ours
            // stays queued on the device and the peers' own deadlines end their wait.
            comm.abort(&self.ctx);
        }
        self.lockstep.end(started, sent, received, result)
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange_inner(
        &mut self,
        op: Collective,
        seq: u64,
        mut send: Vec<Vec<u8>>,
        started: Instant,
        deadline: Instant,
        sent: &mut u64,
        received: &mut u64,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let (rank, world) = (self.lockstep.rank(), self.lockstep.world());
        if let Some((peer, len)) =
            send.iter().enumerate().map(|(p, b)| (p, b.len())).find(|&(_, len)| len as u64 > self.opts.max_frame_bytes)
        {
            return Err(TransportError::Usage(format!(
                "a {len}-byte buffer for rank {peer} exceeds max_frame_bytes ({})",
                self.opts.max_frame_bytes
            )));
        }
        let mut recv: Vec<Vec<u8>> = vec![Vec::new(); world];
        if !self.opts.own_buffer_through_nccl {
            recv[rank] = std::mem::take(&mut send[rank]);
        }
        let peers: Vec<usize> = (0..world).filter(|&p| p != rank || self.opts.own_buffer_through_nccl).collect();
        if peers.is_empty() {
            return Ok(recv);
        }
        self.ctx.bind_to_thread().map_err(|e| self.device_error("binding the context", e))?;

        // Round 1: headers. The tag is the sequence number with the barrier flag in bit 0.
        let tag = (seq << 1) | u64::from(op == Collective::Barrier);
        let mut headers = vec![0u8; HEADER_BYTES * world];
        for &p in &peers {
            headers[HEADER_BYTES * p..][..8].copy_from_slice(&tag.to_le_bytes());
            headers[HEADER_BYTES * p + 8..][..8].copy_from_slice(&(send[p].len() as u64).to_le_bytes());
        }
        self.stream
            .memcpy_htod(&headers, &mut self.headers_out)
            .map_err(|e| self.device_error("copying headers", e))?;
        let (out, inc) = (dptr(&self.headers_out, &self.stream), dptr(&self.headers_in, &self.stream));
        let ops: Vec<P2p> = peers
            .iter()
            .flat_map(|&peer| {
                let at = (HEADER_BYTES * peer) as u64;
                [
                    P2p::Send { peer, ptr: out + at, len: HEADER_BYTES },
                    P2p::Recv { peer, ptr: inc + at, len: HEADER_BYTES },
                ]
            })
            .collect();
        self.launch(&ops)?;
        self.wait(op, seq, started, deadline)?;
        self.stream.memcpy_dtoh(&self.headers_in, &mut headers).map_err(|e| self.device_error("copying headers", e))?;
        self.wait(op, seq, started, deadline)?;
        let others = peers.iter().filter(|&&p| p != rank).count() as u64;
        *sent += HEADER_BYTES as u64 * others;
        *received += HEADER_BYTES as u64 * others;
        let mut lens = vec![0usize; world];
        for &p in &peers {
            let field = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&headers[HEADER_BYTES * p + at..][..8]);
                u64::from_le_bytes(b)
            };
            let (got_tag, len) = (field(0), field(8));
            if got_tag != tag {
                let got = if got_tag & 1 == 1 { Collective::Barrier } else { Collective::AllToAll };
                return Err(TransportError::Desync {
                    peer: p,
                    expected: op,
                    expected_seq: seq,
                    got,
                    got_seq: got_tag >> 1,
                });
            }
            if len > self.opts.max_frame_bytes {
                return Err(TransportError::Malformed {
                    peer: p,
                    reason: format!("announced {len} bytes, more than max_frame_bytes ({})", self.opts.max_frame_bytes),
                });
            }
            lens[p] = len as usize;
        }

        // Round 2: payloads, packed back to back in one staging buffer each way.
        let out_total: usize = peers.iter().map(|&p| send[p].len()).sum();
        let in_total: usize = peers.iter().map(|&p| lens[p]).sum();
        if out_total == 0 && in_total == 0 {
            return Ok(recv);
        }
        let grow = |buf: &mut Option<CudaSlice<u8>>, len: usize, stream: &Arc<CudaStream>| {
            if buf.as_ref().is_none_or(|b| b.len() < len) {
                // Free first (stream-ordered) so that the peak is not old + new.
                *buf = None;
                // SAFETY: uninitialised device bytes; every byte read is written first (by the
                // host copy or by NCCL).
                *buf = Some(unsafe { stream.alloc::<u8>(len.max(1).next_multiple_of(1 << 16)) }?);
            }
            Ok::<(), DriverError>(())
        };
        grow(&mut self.payload_out, out_total, &self.stream).map_err(|e| self.device_error("allocating", e))?;
        grow(&mut self.payload_in, in_total, &self.stream).map_err(|e| self.device_error("allocating", e))?;
        let ops = self
            .stage_payloads(&peers, &send, &lens)
            .map_err(|e| self.device_error("copying payloads to the device", e))?;
        self.launch(&ops)?;
        self.wait(op, seq, started, deadline)?;
        if let Some(payload_in) = self.payload_in.as_ref() {
            let mut at = 0usize;
            for &p in peers.iter().filter(|&&p| lens[p] > 0) {
                let mut buf = vec![0u8; lens[p]];
                self.stream
                    .memcpy_dtoh(&payload_in.slice(at..at + lens[p]), &mut buf)
                    .map_err(|e| self.device_error("copying payloads to the host", e))?;
                at += lens[p];
                recv[p] = buf;
            }
        }
        self.wait(op, seq, started, deadline)?;
        for &p in peers.iter().filter(|&&p| p != rank) {
            *sent += send[p].len() as u64;
            *received += lens[p] as u64;
        }
        Ok(recv)
    }

    /// Copies every non-empty outgoing payload into `payload_out`, back to back, and lists the
    /// round's sends and receives (`payload_in` is laid out the same way from `lens`).
    /// Zero-length messages are skipped on both sides: the receiver knows them from round 1.
    fn stage_payloads(&mut self, peers: &[usize], send: &[Vec<u8>], lens: &[usize]) -> Result<Vec<P2p>, DriverError> {
        let (Some(payload_out), Some(payload_in)) = (self.payload_out.as_mut(), self.payload_in.as_ref()) else {
            return Err(DriverError(cu::CUresult::CUDA_ERROR_INVALID_VALUE));
        };
        let inc = dptr(payload_in, &self.stream);
        let out = dptr(payload_out, &self.stream);
        let mut ops = Vec::with_capacity(2 * peers.len());
        let (mut out_at, mut in_at) = (0usize, 0usize);
        for &p in peers {
            let len = send[p].len();
            if len > 0 {
                self.stream.memcpy_htod(&send[p], &mut payload_out.slice_mut(out_at..out_at + len))?;
                ops.push(P2p::Send { peer: p, ptr: out + out_at as u64, len });
                out_at += len;
            }
            if lens[p] > 0 {
                ops.push(P2p::Recv { peer: p, ptr: inc + in_at as u64, len: lens[p] });
                in_at += lens[p];
            }
        }
        Ok(ops)
    }

    /// Enqueues `ops` as one NCCL group on the stream.
    fn launch(&self, ops: &[P2p]) -> Result<(), TransportError> {
        let comm = self.comm.as_ref().ok_or_else(|| TransportError::PeerLost {
            peer: self.blamed(),
            reason: "the NCCL communicator was aborted".into(),
        })?;
        comm.group(ops, &self.stream).map_err(|(what, r)| self.nccl_error(comm, what, r))
    }

    /// Polls until the communicator has no operation in progress and the stream is idle.
    ///
    /// NCCL first: in non-blocking mode a group's kernels reach the stream only once the
    /// communicator leaves `ncclInProgress`, and a peer's failure shows up there.
    fn wait(&self, op: Collective, seq: u64, started: Instant, deadline: Instant) -> Result<(), TransportError> {
        let comm = self.comm.as_ref().ok_or_else(|| TransportError::PeerLost {
            peer: self.blamed(),
            reason: "the NCCL communicator was aborted".into(),
        })?;
        let mut polls = 0u32;
        loop {
            match comm.state() {
                nc::ncclResult_t::ncclSuccess => {
                    // SAFETY: a live stream of this context.
                    match unsafe { cu::cuStreamQuery(self.stream.cu_stream()) } {
                        cu::CUresult::CUDA_SUCCESS => return Ok(()),
                        cu::CUresult::CUDA_ERROR_NOT_READY => {}
                        e => return Err(self.device_error("stream", DriverError(e))),
                    }
                }
                nc::ncclResult_t::ncclInProgress => {}
                r => return Err(self.nccl_error(comm, "NCCL", r)),
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout { peer: self.blamed(), op, seq, waited: started.elapsed() });
            }
            backoff(&mut polls);
        }
    }

    fn nccl_error(&self, comm: &Comm, what: &str, r: nc::ncclResult_t) -> TransportError {
        TransportError::PeerLost { peer: self.blamed(), reason: format!("{what}: {}", comm.describe(r)) }
    }
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for outstanding work and can wait on
        // peers; every collective has already finished or failed.
        if let Some(comm) = self.comm.take() {
            comm.abort(&self.ctx);
        }
    }
}

super::lockstep_transport!(NcclTransport);

/// The device address of a buffer (event tracking is off, so the guard does nothing).
fn dptr(buf: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (ptr, _guard) = buf.device_ptr(stream);
    ptr
}
