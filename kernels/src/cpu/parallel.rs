//! Splitting work over rayon's persistent pool.

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: every task that holds a `SharedOut` writes a set of indices disjoint from every
// other task's (each caller documents its partition), and the owning `&mut [f32]` outlives
// the parallel region.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

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
