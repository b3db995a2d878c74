//! The NCCL side of the transport: the library checks, unique ids, and one owned non-blocking
//! communicator (init with a deadline, grouped point-to-point, abort).

use std::ffi::{CStr, c_char, c_void};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::sys as nc;

use super::NcclId;
use crate::transport::TransportError;

/// Oldest NCCL with non-blocking communicators (`ncclCommInitRankConfig`), as `ncclGetVersion`
/// encodes it.
const MIN_NCCL_VERSION: i32 = 21400;
/// The `ncclConfig_t` layout of cudarc's bindings (NCCL 2.30); the library reads the fields
/// this version knows and defaults the rest.
const CONFIG_VERSION: u32 = 23000;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const CONFIG_UNDEF: i32 = i32::MIN;
/// How long an abort may take before the communicator is left to a detached thread.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// What one grouped round does with one peer.
#[derive(Clone, Copy)]
pub(super) enum P2p {
    Send { peer: usize, ptr: u64, len: usize },
    Recv { peer: usize, ptr: u64, len: usize },
}

impl NcclId {
    /// A fresh unique id for one communicator (`ncclGetUniqueId`). Needs libnccl but no GPU.
    ///
    /// It also starts NCCL's bootstrap root in this process, listening on the interface NCCL
    /// picks (`NCCL_SOCKET_IFNAME` steers it), so the creator must stay up while the group
    /// forms: rank 0 makes it.
    pub fn new() -> Result<NcclId, TransportError> {
        nccl_library()?;
        let mut raw = nc::ncclUniqueId { internal: [0; 128] };
        // SAFETY: the library is loaded (checked above) and `raw` is a valid out-pointer.
        let r = unsafe { nc::ncclGetUniqueId(&mut raw) };
        if r != nc::ncclResult_t::ncclSuccess {
            return Err(setup(None, format!("ncclGetUniqueId: {}", result_string(r))));
        }
        Ok(NcclId(raw.internal.map(|c| c as u8)))
    }
}

/// Checks that libnccl loads and is new enough, so that no cudarc NCCL call can panic on a
/// missing library or symbol. Returns the version code.
pub(super) fn nccl_library() -> Result<i32, TransportError> {
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { nc::is_culib_present() } {
        return Err(setup(
            None,
            "NCCL not found: no libnccl.so on the loader path (the nvidia-nccl-cu12 wheel ships only \
             libnccl.so.2; add a libnccl.so symlink next to it)"
                .into(),
        ));
    }
    let version = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| setup(None, format!("ncclGetVersion: {}", result_string(e.0))))?;
    if version < MIN_NCCL_VERSION {
        return Err(setup(None, format!("NCCL {version} is too old: non-blocking communicators need 2.14 or newer")));
    }
    Ok(version)
}

pub(super) fn setup(peer: Option<usize>, reason: String) -> TransportError {
    TransportError::Setup { peer, reason }
}

/// `ncclGetErrorString` of a result code.
pub(super) fn result_string(r: nc::ncclResult_t) -> String {
    // SAFETY: only called once the library is known to load; NCCL returns a static string.
    let text = unsafe { nc::ncclGetErrorString(r) };
    if text.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    format!("{r:?} ({})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
}

/// An owned NCCL communicator.
pub(super) struct Comm(nc::ncclComm_t);

// SAFETY: NCCL communicators may be used from any thread as long as calls do not overlap;
// `NcclTransport` only touches it through `&mut self` (or in `Drop`).
unsafe impl Send for Comm {}

impl Comm {
    /// The communicator's state: `ncclSuccess`, `ncclInProgress`, or the error that broke it.
    pub(super) fn state(&self) -> nc::ncclResult_t {
        let mut state = nc::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        let r = unsafe { nc::ncclCommGetAsyncError(self.0, &mut state) };
        if r != nc::ncclResult_t::ncclSuccess { r } else { state }
    }

    /// The error code with NCCL's last error message for this communicator.
    pub(super) fn describe(&self, r: nc::ncclResult_t) -> String {
        // SAFETY: a live communicator; NCCL returns a NUL-terminated string it owns.
        let last = unsafe { nc::ncclGetLastError(self.0) };
        let last = if last.is_null() {
            String::new()
        } else {
            // SAFETY: non-null and NUL-terminated.
            unsafe { CStr::from_ptr(last) }.to_string_lossy().into_owned()
        };
        if last.is_empty() { result_string(r) } else { format!("{}: {last}", result_string(r)) }
    }

    /// Enqueues `ops` as one NCCL group on `stream`. On failure returns which call failed and
    /// its code.
    pub(super) fn group(&self, ops: &[P2p], stream: &CudaStream) -> Result<(), (&'static str, nc::ncclResult_t)> {
        let stream = stream.cu_stream() as nc::cudaStream_t;
        let ok = |r: nc::ncclResult_t| matches!(r, nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress);
        // SAFETY: the library is loaded (checked before the communicator was made).
        let start = unsafe { nc::ncclGroupStart() };
        if !ok(start) {
            return Err(("ncclGroupStart", start));
        }
        let mut first_err = None;
        for op in ops {
            // SAFETY: the caller's pointers lie inside device buffers that outlive the operation
            // (they are only freed stream-ordered after it), with `len` bytes to spare.
            let r = unsafe {
                match *op {
                    P2p::Send { peer, ptr, len } => nc::ncclSend(
                        ptr as *const c_void,
                        len,
                        nc::ncclDataType_t::ncclUint8,
                        peer as i32,
                        self.0,
                        stream,
                    ),
                    P2p::Recv { peer, ptr, len } => nc::ncclRecv(
                        ptr as *mut c_void,
                        len,
                        nc::ncclDataType_t::ncclUint8,
                        peer as i32,
                        self.0,
                        stream,
                    ),
                }
            };
            if !ok(r) {
                first_err = Some(("ncclSend/ncclRecv", r));
                break;
            }
        }
        // Always closed: NCCL's group depth is per thread, and a dangling ncclGroupStart would
        // swallow the next group on this thread.
        // SAFETY: as above.
        let end = unsafe { nc::ncclGroupEnd() };
        match first_err {
            Some(err) => Err(err),
            None if !ok(end) => Err(("ncclGroupEnd", end)),
            None => Ok(()),
        }
    }

    /// `ncclCommAbort` on a helper thread, waiting at most [`ABORT_WAIT`]: the abort should be
    /// quick (it raises the abort flag the kernels and proxy threads poll, then frees), but a
    /// stuck one must not hang the caller, so past the wait the communicator is left to it.
    pub(super) fn abort(self, ctx: &Arc<CudaContext>) {
        let (done_tx, done_rx) = mpsc::channel();
        let ctx = Arc::clone(ctx);
        let comm = self;
        let spawned = std::thread::Builder::new().name("nccl-abort".into()).spawn(move || {
            // The whole `Comm` moves here (it is `Send`; its raw pointer alone is not).
            let comm = comm;
            let _ = ctx.bind_to_thread();
            // SAFETY: the communicator is owned and no other call on it is in flight.
            let r = unsafe { nc::ncclCommAbort(comm.0) };
            let _ = done_tx.send(r);
        });
        if let Err(e) = spawned {
            tracing::warn!("could not start the NCCL abort thread ({e}); the communicator leaks");
            return;
        }
        match done_rx.recv_timeout(ABORT_WAIT) {
            Ok(nc::ncclResult_t::ncclSuccess) => {}
            Ok(r) => tracing::warn!("ncclCommAbort: {}", result_string(r)),
            Err(_) => tracing::warn!("ncclCommAbort still running after {ABORT_WAIT:?}; left to finish on its own"),
        }
    }
}

/// Creates this rank's non-blocking communicator and polls it up to `deadline`.
pub(super) fn init_comm(
    rank: usize,
    world: usize,
    id: &NcclId,
    ctx: &Arc<CudaContext>,
    deadline: Instant,
) -> Result<Comm, TransportError> {
    let started = Instant::now();
    let blamed = (world == 2).then(|| 1 - rank);
    let mut config = nc::ncclConfig_t {
        size: std::mem::size_of::<nc::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF,
        minCTAs: CONFIG_UNDEF,
        maxCTAs: CONFIG_UNDEF,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF,
        trafficClass: CONFIG_UNDEF,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF,
        CTAPolicy: CONFIG_UNDEF,
        shrinkShare: CONFIG_UNDEF,
        nvlsCTAs: CONFIG_UNDEF,
        nChannelsPerNetPeer: CONFIG_UNDEF,
        nvlinkCentricSched: CONFIG_UNDEF,
        graphUsageMode: CONFIG_UNDEF,
        numRmaCtx: CONFIG_UNDEF,
        maxP2pPeers: CONFIG_UNDEF,
    };
    let unique = nc::ncclUniqueId { internal: id.0.map(|b| b as c_char) };
    let mut raw: nc::ncclComm_t = std::ptr::null_mut();
    // The communicator is created on the context's device (NCCL asks the current one).
    ctx.bind_to_thread().map_err(|e| setup(None, format!("binding CUDA device {}: {e}", ctx.ordinal())))?;
    // SAFETY: valid out-pointer and config; world and rank fit in i32 (checked by the caller).
    let r = unsafe { nc::ncclCommInitRankConfig(&mut raw, world as i32, unique, rank as i32, &mut config) };
    if raw.is_null() {
        return Err(setup(blamed, format!("ncclCommInitRankConfig: {}", result_string(r))));
    }
    let comm = Comm(raw);
    let fail = |comm: Comm, reason: String| -> Result<Comm, TransportError> {
        comm.abort(ctx);
        Err(setup(blamed, reason))
    };
    if !matches!(r, nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress) {
        let reason = format!("ncclCommInitRankConfig: {}", comm.describe(r));
        return fail(comm, reason);
    }
    let mut polls = 0u32;
    loop {
        match comm.state() {
            nc::ncclResult_t::ncclSuccess => return Ok(comm),
            nc::ncclResult_t::ncclInProgress => {}
            r => {
                let reason = format!("NCCL communicator init (rank {rank} of {world}): {}", comm.describe(r));
                return fail(comm, reason);
            }
        }
        if Instant::now() >= deadline {
            let reason = format!(
                "NCCL communicator init (rank {rank} of {world}) missed the deadline (waited {:?}): \
                 not every rank joined",
                started.elapsed()
            );
            return fail(comm, reason);
        }
        backoff(&mut polls);
    }
}

/// Spins briefly (MoE exchanges are short), then sleeps in small steps.
pub(super) fn backoff(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    if *polls < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}
