//! This machine's memory read bandwidth, the ceiling of batch-1 decode: every decoded token
//! streams its active weights from DRAM once.

use rayon::prelude::*;
use std::time::Instant;

/// Bytes read per pass: well past any last-level cache, so every pass comes from DRAM.
pub const BUFFER_BYTES: usize = 1 << 30;

/// Read passes; the best one is reported (the machine may be shared, and the best pass is
/// the closest to what the hardware can do).
const PASSES: usize = 5;

/// Best read bandwidth in bytes/s of `PASSES` passes over a [`BUFFER_BYTES`] buffer, split
/// over the rayon pool in 1 MiB chunks.
///
/// The buffer asks for 2 MiB pages, as the weight maps do (`worker::model::checkpoint`): with
/// 4 KiB pages the TLB misses of a streaming read cost this machine 10–35% of its bandwidth,
/// and the limit should be the hardware's, not the page size's.
pub fn measure() -> f64 {
    let words = BUFFER_BYTES / 8;
    let mut buf = HugeBuffer::new(words);
    // Written first so that every page is backed by real memory (not the shared zero page).
    buf.words_mut().par_chunks_mut(1 << 17).enumerate().for_each(|(c, chunk)| {
        for (i, w) in chunk.iter_mut().enumerate() {
            *w = (c << 17 | i) as u64;
        }
    });
    let buf = buf.words();
    let mut best = 0.0f64;
    for _ in 0..PASSES {
        let started = Instant::now();
        let sum = buf
            .par_chunks(1 << 17)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(BUFFER_BYTES as f64 / secs);
    }
    best
}

/// An anonymous `[u64]` buffer aligned to 2 MiB and advised to use transparent huge pages.
struct HugeBuffer {
    /// The mapping as returned by mmap, for munmap.
    base: *mut libc::c_void,
    map_len: usize,
    /// The first 2 MiB boundary inside it.
    ptr: *mut u64,
    words: usize,
}

const HUGE_PAGE: usize = 2 << 20;

impl HugeBuffer {
    fn new(words: usize) -> Self {
        // One extra huge page so the start can be rounded up to a 2 MiB boundary.
        let map_len = words * 8 + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(raw != libc::MAP_FAILED, "membw: cannot map {map_len} bytes: {}", std::io::Error::last_os_error());
        let ptr = (raw as usize).next_multiple_of(HUGE_PAGE) as *mut u64;
        // SAFETY: the range lies inside the mapping. Only a hint: without THP the pages stay 4 KiB.
        unsafe { libc::madvise(ptr.cast(), words * 8, libc::MADV_HUGEPAGE) };
        Self { base: raw, map_len, ptr, words }
    }

    fn words(&self) -> &[u64] {
        // SAFETY: `words` u64s from `ptr` lie inside the live mapping (zero-filled at first).
        unsafe { std::slice::from_raw_parts(self.ptr, self.words) }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `words`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.words) }
    }
}

impl Drop for HugeBuffer {
    fn drop(&mut self) {
        // SAFETY: exactly this buffer's own mapping; nothing borrows it after drop.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}
