//! Splitting work over rayon's persistent pool.

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: every task that holds a `SharedOut` writes a set of indices disjoint from every
// other task's (each caller documents its partition), and the owning `&mut [f32]` outlives
// the parallel region.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Run `f` on a thread of rayon's pool (inline if this already is one), blocking until it
/// returns.
///
/// A model step opens dozens of parallel regions. Opened from a thread outside the pool,
/// each one is a cold injection: the caller parks on a futex until a pool thread has run
/// it, and waking a parked vCPU costs more than a decode-sized region's whole work. Opened
/// from a pool thread, a region is a join whose other half an idle pool thread steals
/// while the caller works on its own half.
///
/// `f` holds a pool thread for as long as it runs, so it must not wait on work that needs
/// another pool thread to start (e.g. a peer engine of the same process in a collective).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// Below this many multiply-adds a kernel runs on the calling thread: a rayon fork costs a
/// few microseconds, more than the whole product of a tiny test model's layer.
pub(crate) const SERIAL_WORK: usize = 1 << 15;

/// Split `n` items into blocks that are multiples of `align`, about four per thread so the
/// pool can balance uneven progress.
pub(crate) fn block_size(n: usize, align: usize, work: usize) -> usize {
    if work < SERIAL_WORK {
        return n.max(1).next_multiple_of(align);
    }
    let tasks = rayon::current_num_threads() * 4;
    n.div_ceil(tasks).max(1).next_multiple_of(align)
}
