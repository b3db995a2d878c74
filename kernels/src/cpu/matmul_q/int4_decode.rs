//! Single-token int4 `x · Wᵀ` with explicit AVX2 (the decode path), bit-identical to the
//! generic kernel with FMA: each weight is `f32(nibble − 8) · group scale` rounded as one f32
//! multiply, lanes 0–7 / 8–15 of each 16-element chunk accumulate by fused multiply-adds in
//! two registers, then the same halving tree and the tail.

use super::super::parallel::SharedOut;
use super::batch_avx2::reduce16;
use super::{Int4Rows, LANES, QuantRows};
use crate::quant::INT4_GROUP;
use std::arch::x86_64::*;

/// Rows per tile: four independent weight streams, as the generic decode tile.
const ROWS: usize = 4;

/// Sixteen weights from eight packed bytes (element `2t` in the low nibble of byte `t`),
/// scaled by `scale`, as lanes 0–7 and 8–15.
///
/// # Safety
/// AVX2 is available and `p` has eight readable bytes.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode16(p: *const u8, scale: __m256) -> (__m256, __m256) {
    // SAFETY: eight readable bytes at p.
    let b = unsafe { _mm_loadl_epi64(p.cast()) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(b, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), mask);
    let q = _mm_unpacklo_epi8(lo, hi); // nibbles in element order 0..16
    let eight = _mm256_set1_epi32(8);
    let q0 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(q), eight);
    let q1 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(q)), eight);
    (_mm256_mul_ps(_mm256_cvtepi32_ps(q0), scale), _mm256_mul_ps(_mm256_cvtepi32_ps(q1), scale))
}

/// Columns `[j0, j1)` of `x[1, k] · W[n, k]ᵀ` for int4 rows `w`.
///
/// # Safety
/// AVX2 and FMA are available; `dst` points to an `n`-element buffer of which no other thread
/// writes `[j0, j1)`; `w` holds `n` rows with `j1 <= n`; `x` holds `k` values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int4_decode_avx2(x: &[f32], w: Int4Rows<'_>, k: usize, j0: usize, j1: usize, dst: SharedOut) {
    let full = k / LANES * LANES;
    let (xp, bp) = (x.as_ptr(), w.packed.as_ptr());
    let mut j = j0;
    while j < j1 {
        let rows = (j1 - j).min(ROWS);
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        let mut c = 0;
        while c < full {
            if c % 128 == 0 {
                // The next tile's rows, a cache line (128 weights) per row. Never dereferenced.
                for t in 0..ROWS {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((j + ROWS + t) * w.row_bytes + c / 2).cast());
                }
            }
            // SAFETY: c + 16 <= k.
            let (x0, x1) = unsafe { (_mm256_loadu_ps(xp.add(c)), _mm256_loadu_ps(xp.add(c + 8))) };
            for (t, a) in acc.iter_mut().enumerate().take(rows) {
                let row = j + t;
                let scale = _mm256_set1_ps(w.scales[row * w.row_groups + c / INT4_GROUP]);
                // SAFETY: row < n, and bytes c/2 .. c/2 + 8 lie within it (c + 16 <= k).
                let (w0, w1) = unsafe { decode16(bp.add(row * w.row_bytes + c / 2), scale) };
                a[0] = _mm256_fmadd_ps(x0, w0, a[0]);
                a[1] = _mm256_fmadd_ps(x1, w1, a[1]);
            }
            c += LANES;
        }
        for (t, a) in acc.iter().enumerate().take(rows) {
            let row = j + t;
            let mut tail = 0.0f32;
            for (p, xv) in x.iter().enumerate().take(k).skip(full) {
                tail = xv.mul_add(w.elem(row, p), tail);
            }
            // SAFETY: column `row` lies in this task's block.
            unsafe { *dst.0.add(row) = w.finish(row, reduce16(a[0], a[1]) + tail) };
        }
        j += rows;
    }
}
