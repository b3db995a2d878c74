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
    let mut map = memmap2::MmapOptions::new().len(BUFFER_BYTES).map_anon().expect("membw: mapping the read buffer");
    // Only a hint: without THP the pages stay 4 KiB.
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    // Written first so that every page is backed by real memory (not the shared zero page).
    let words: &mut [u64] = bytemuck::cast_slice_mut(&mut map[..]);
    words.par_chunks_mut(1 << 17).enumerate().for_each(|(c, chunk)| {
        for (i, w) in chunk.iter_mut().enumerate() {
            *w = (c << 17 | i) as u64;
        }
    });
    let buf: &[u64] = words;
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
