//! AVX2+FMA matmul kernels: register tiles of `MR` activation rows × `NR` weight vectors so
//! that each weight load feeds several tokens (prefill), and a wide single-row tile that
//! streams the weights with eight independent FMA chains (decode).
//!
//! Every tile shape computes each of its elements with the same instruction sequence (see
//! the order in the parent module), so the choice of tile never changes a bit.

use super::Job;
use crate::cpu::simd::{Widen, prefetch_lines};
use std::arch::x86_64::*;

/// Rows of `x` per cache block in the batched kernels: 64 rows of a 4 KiB activation row
/// (k = 1024) stay in a 512 KiB L2 while every weight tile of the block passes over them.
const ROW_BLOCK: usize = 64;

/// Horizontal sum in the fixed tree `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)); // [a0+a4, a1+a5, a2+a6, a3+a7]
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s)); // [s0+s2, s1+s3, ..]
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

// ---------------------------------------------------------------------------------------
// x · Wᵀ  (W output-major, [n, k])

/// Dot products of `MR` rows of `x` (stride `k`) with `NR` rows of `w` (stride `k`).
///
/// # Safety
/// `x` has `MR` readable rows of `k` elements and `w` has `NR`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_nk<W: Widen, const MR: usize, const NR: usize>(x: *const f32, w: *const W, k: usize) -> [[f32; NR]; MR] {
    // SAFETY: forwarded; a null prefetch pointer prefetches nothing.
    unsafe { tile_nk_pf::<W, MR, NR>(x, w, k, std::ptr::null()) }
}

/// [`tile_nk`] that also prefetches, spread over its loop, the `NR·k` weights at `next` (the
/// next tile's rows, contiguous after this tile's). Decode streams each weight row once, and a
/// row of 1–2 KiB is too short for the hardware prefetcher to ramp up on before it ends.
///
/// # Safety
/// As [`tile_nk`]; `next` may point anywhere (prefetches never fault) or be null.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_nk_pf<W: Widen, const MR: usize, const NR: usize>(
    x: *const f32,
    w: *const W,
    k: usize,
    next: *const W,
) -> [[f32; NR]; MR] {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let full = k & !7;
    // Bytes of the next tile to prefetch per 8-element step: the same share of it as this
    // step consumes of this tile.
    let step_bytes = NR * 8 * std::mem::size_of::<W>();
    let mut p = 0;
    while p < full {
        if !next.is_null() {
            prefetch_lines(next.cast::<u8>().wrapping_add(p * NR * std::mem::size_of::<W>()), step_bytes);
        }
        let mut wv = [_mm256_setzero_ps(); NR];
        for (j, v) in wv.iter_mut().enumerate() {
            // SAFETY: p + 8 <= k within row j.
            *v = unsafe { W::load8(w.add(j * k + p)) };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: p + 8 <= k within row i.
            let xv = unsafe { _mm256_loadu_ps(x.add(i * k + p)) };
            for (a, &wj) in row.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(xv, wj, *a);
            }
        }
        p += 8;
    }
    if full < k {
        // The last partial group, zero-padded through a stack copy (AVX2 has no 16-bit
        // masked load): lanes past the end add 0·0, which changes nothing.
        let rem = k - full;
        let mut wt = [[W::default(); 8]; NR];
        let mut xt = [[0.0f32; 8]; MR];
        for (j, t) in wt.iter_mut().enumerate() {
            // SAFETY: elements full..k of row j are readable.
            t[..rem].copy_from_slice(unsafe { std::slice::from_raw_parts(w.add(j * k + full), rem) });
        }
        for (i, t) in xt.iter_mut().enumerate() {
            // SAFETY: elements full..k of row i are readable.
            t[..rem].copy_from_slice(unsafe { std::slice::from_raw_parts(x.add(i * k + full), rem) });
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: the stack copies hold eight elements each.
            let xv = unsafe { _mm256_loadu_ps(xt[i].as_ptr()) };
            for (a, t) in row.iter_mut().zip(&wt) {
                // SAFETY: as above.
                *a = _mm256_fmadd_ps(xv, unsafe { W::load8(t.as_ptr()) }, *a);
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR];
    for (r, a) in res.iter_mut().zip(&acc) {
        for (v, &s) in r.iter_mut().zip(a) {
            *v = hsum(s);
        }
    }
    res
}

/// Columns `[j0, j1)` of `x · Wᵀ`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `job.dst` points to an `m * n` buffer and no other
/// thread writes columns `[j0, j1)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn block_nk<W: Widen>(job: Job<'_, W>, j0: usize, j1: usize) {
    let Job { x, w, m, n, k, dst } = job;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    // SAFETY (all tiles below): rows i..i+MR of x and j..j+NR of w are within the slices
    // (i + MR <= m, j + NR <= j1 <= n), and the tile writes only columns [j, j + NR) ⊆ [j0, j1).
    macro_rules! tile {
        ($i:expr, $j:expr, $mr:literal, $nr:literal) => {{
            let r = unsafe { tile_nk::<W, $mr, $nr>(xp.add($i * k), wp.add($j * k), k) };
            for (a, row) in r.iter().enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    unsafe { *dst.0.add(($i + a) * n + $j + c) = v };
                }
            }
        }};
    }
    if m == 1 {
        // Decode: eight weight rows at once give eight independent FMA chains and eight
        // concurrent streams for the prefetcher.
        let mut j = j0;
        while j + 8 <= j1 {
            // SAFETY: as for `tile!`; the prefetch address is never dereferenced.
            let r = unsafe { tile_nk_pf::<W, 1, 8>(xp, wp.add(j * k), k, wp.wrapping_add((j + 8) * k)) };
            for (c, &v) in r[0].iter().enumerate() {
                // SAFETY: column j + c < j1 of row 0 belongs to this task.
                unsafe { *dst.0.add(j + c) = v };
            }
            j += 8;
        }
        while j + 2 <= j1 {
            tile!(0, j, 1, 2);
            j += 2;
        }
        if j < j1 {
            tile!(0, j, 1, 1);
        }
        return;
    }
    // Batches: 4×3 tiles (12 accumulators + 3 weight vectors + 1 activation vector = all 16
    // ymm registers), 7 loads per 12 FMAs; the 3 weight rows stay in L1 across the row block.
    for i0 in (0..m).step_by(ROW_BLOCK) {
        let i1 = (i0 + ROW_BLOCK).min(m);
        let mut j = j0;
        while j < j1 {
            let nr = (j1 - j).min(3);
            let mut i = i0;
            while i < i1 {
                let mr = (i1 - i).min(4);
                match (mr, nr) {
                    (4, 3) => tile!(i, j, 4, 3),
                    (4, 2) => tile!(i, j, 4, 2),
                    (4, _) => tile!(i, j, 4, 1),
                    (3, 3) => tile!(i, j, 3, 3),
                    (3, 2) => tile!(i, j, 3, 2),
                    (3, _) => tile!(i, j, 3, 1),
                    (2, 3) => tile!(i, j, 2, 3),
                    (2, 2) => tile!(i, j, 2, 2),
                    (2, _) => tile!(i, j, 2, 1),
                    (_, 3) => tile!(i, j, 1, 3),
                    (_, 2) => tile!(i, j, 1, 2),
                    (_, _) => tile!(i, j, 1, 1),
                }
                i += mr;
            }
            j += nr;
        }
    }
}

// ---------------------------------------------------------------------------------------
// x · W  (W input-major, [k, n])

/// `MR` rows of `x` (stride `k`) times `8·NV` columns of `w` (row stride `n`), written to
/// `out` (row stride `n`).
///
/// # Safety
/// `x` has `MR` readable rows of `k`; `w` has `k` rows with `8·NV` readable columns each;
/// `out` has `MR` writable rows of `8·NV` columns that no other thread writes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_kn<W: Widen, const MR: usize, const NV: usize>(
    x: *const f32,
    w: *const W,
    k: usize,
    n: usize,
    out: *mut f32,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for p in 0..k {
        let mut xb = [_mm256_setzero_ps(); MR];
        for (i, b) in xb.iter_mut().enumerate() {
            // SAFETY: p < k within row i.
            *b = _mm256_set1_ps(unsafe { *x.add(i * k + p) });
        }
        for v in 0..NV {
            // SAFETY: row p has 8·NV readable columns.
            let wv = unsafe { W::load8(w.add(p * n + 8 * v)) };
            for (row, &b) in acc.iter_mut().zip(&xb) {
                row[v] = _mm256_fmadd_ps(b, wv, row[v]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, &a) in row.iter().enumerate() {
            // SAFETY: out row i has 8·NV writable columns.
            unsafe { _mm256_storeu_ps(out.add(i * n + 8 * v), a) };
        }
    }
}

/// Weight rows ahead that [`decode_kn`] prefetches.
const KN_PREFETCH_ROWS: usize = 4;

/// Columns `[j0, j1)` of `x[1, k] · W[k, n]`, a row of `W` at a time: each weight row's
/// column range is one contiguous run, and the sums live in the output (L1) between rows.
/// A tile of 64 columns walking all `k` rows instead read 128 bytes per row at a stride of
/// a whole row (3 KiB for Scout's fused gate/up), which the prefetchers follow poorly.
/// Each output element still gets `fma(x[p], w[p, j], ·)` for `p` in order from zero:
/// the bits of [`tile_kn`].
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `x` has `k` values, `w` `k` rows of `n`, and `out`
/// `n` elements of which only this task writes `[j0, j1)`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_kn<W: Widen>(x: *const f32, w: *const W, k: usize, n: usize, j0: usize, j1: usize, out: *mut f32) {
    let cols = j1 - j0;
    let full = cols / 8 * 8;
    // SAFETY: [j0, j1) of the n-element output belongs to this task.
    let ap = unsafe { out.add(j0) };
    for c in 0..cols {
        // SAFETY: as above.
        unsafe { *ap.add(c) = 0.0 };
    }
    for p in 0..k {
        let row = w.wrapping_add(p * n + j0);
        if p + KN_PREFETCH_ROWS < k {
            prefetch_lines(row.wrapping_add(KN_PREFETCH_ROWS * n).cast(), cols * std::mem::size_of::<W>());
        }
        // SAFETY: p < k.
        let xv = unsafe { *x.add(p) };
        let xb = _mm256_set1_ps(xv);
        let mut c = 0;
        while c < full {
            // SAFETY: c + 8 <= cols within row p's range and the accumulators.
            unsafe {
                _mm256_storeu_ps(ap.add(c), _mm256_fmadd_ps(xb, W::load8(row.add(c)), _mm256_loadu_ps(ap.add(c))))
            };
            c += 8;
        }
        for c in full..cols {
            // SAFETY: c < cols, as above; all accumulator accesses go through `ap`.
            unsafe { *ap.add(c) = xv.mul_add((*row.add(c)).widen(), *ap.add(c)) };
        }
    }
}

/// Columns `[j0, j1)` of `x · W`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `job.dst` points to an `m * n` buffer and no other
/// thread writes columns `[j0, j1)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn block_kn<W: Widen>(job: Job<'_, W>, j0: usize, j1: usize) {
    let Job { x, w, m, n, k, dst } = job;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    // SAFETY (all tiles below): rows i..i+MR of x exist (i + MR <= m) and columns
    // [j, j + 8·NV) ⊆ [j0, j1) of w and of the output; only this task writes them.
    macro_rules! tile {
        ($i:expr, $j:expr, $mr:literal, $nv:literal) => {
            unsafe { tile_kn::<W, $mr, $nv>(xp.add($i * k), wp.add($j), k, n, dst.0.add($i * n + $j)) }
        };
    }
    if m == 1 {
        // SAFETY: forwarded; row 0 of x and columns [j0, j1) are this task's.
        return unsafe { decode_kn(xp, wp, k, n, j0, j1, dst.0) };
    }
    for i0 in (0..m).step_by(ROW_BLOCK) {
        let i1 = (i0 + ROW_BLOCK).min(m);
        let mut j = j0;
        // 3×4 tiles: 12 accumulators, 3 broadcasts, one weight vector at a time.
        while j + 32 <= j1 {
            let mut i = i0;
            while i < i1 {
                match (i1 - i).min(3) {
                    3 => tile!(i, j, 3, 4),
                    2 => tile!(i, j, 2, 4),
                    _ => tile!(i, j, 1, 4),
                }
                i += 3;
            }
            j += 32;
        }
        while j + 8 <= j1 {
            let mut i = i0;
            while i < i1 {
                match (i1 - i).min(3) {
                    3 => tile!(i, j, 3, 1),
                    2 => tile!(i, j, 2, 1),
                    _ => tile!(i, j, 1, 1),
                }
                i += 3;
            }
            j += 8;
        }
        // Fewer than eight columns left: scalar fused multiply-adds in the same order.
        for c in j..j1 {
            for i in i0..i1 {
                let mut a = 0.0f32;
                for p in 0..k {
                    a = x[i * k + p].mul_add(w[p * n + c].widen(), a);
                }
                // SAFETY: (i, c) lies in this task's column block of the m×n output.
                unsafe { *dst.0.add(i * n + c) = a };
            }
        }
    }
}
