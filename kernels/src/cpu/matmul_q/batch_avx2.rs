//! Batched quantized `x · Wᵀ` on AVX2, after the weights are decoded: two decoded weight rows
//! against up to three activation rows at a time, in registers.
//!
//! The generic tile keeps `MR × NR × 16` accumulator lanes in arrays that LLVM spills at
//! batch sizes, which made an FP8 batch ~17× slower than bf16. The arithmetic here is the
//! parent module's order exactly: lanes 0–7 and 8–15 of each 16-element chunk in two
//! registers, fused multiply-adds in chunk order, the same halving tree, then the tail.

use super::LANES;
use std::arch::x86_64::*;

/// The parent module's 16-lane halving tree on lanes `lo` (0–7) and `hi` (8–15).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn reduce16(lo: __m256, hi: __m256) -> f32 {
    let s8 = _mm256_add_ps(lo, hi); // v[l] += v[l + 8]
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8)); // v[l] += v[l + 4]
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // v[l] += v[l + 2]
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) // v[0] += v[1]
}

/// Unfinished dot products (before the row scale of FP8) of `MR` rows of `x` with two
/// decoded weight rows `w` (`[2, k]`).
///
/// # Safety
/// AVX2 and FMA are available; each `xs[i]` and each row of `w` hold `k` values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dots_2rows<const MR: usize>(xs: [&[f32]; MR], w: &[f32], k: usize) -> [[f32; 2]; MR] {
    let full = k / LANES * LANES;
    let (w0, w1) = (w[..k].as_ptr(), w[k..2 * k].as_ptr());
    let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; MR];
    let mut c = 0;
    while c < full {
        // One half-chunk (lanes 0–7, then 8–15) at a time: 2 weight vectors and one
        // activation vector live beside the 4·MR accumulators, so MR = 3 fits 16 registers.
        for half in 0..2 {
            let at = c + 8 * half;
            // SAFETY: at + 8 <= c + 16 <= k within every row.
            let (wa, wb) = unsafe { (_mm256_loadu_ps(w0.add(at)), _mm256_loadu_ps(w1.add(at))) };
            for (a, x) in acc.iter_mut().zip(&xs) {
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) };
                a[0][half] = _mm256_fmadd_ps(xv, wa, a[0][half]);
                a[1][half] = _mm256_fmadd_ps(xv, wb, a[1][half]);
            }
        }
        c += LANES;
    }
    let mut out = [[0.0f32; 2]; MR];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
        for (t, (ot, at)) in o.iter_mut().zip(a).enumerate() {
            let wr = &w[t * k..(t + 1) * k];
            let mut tail = 0.0f32;
            for p in full..k {
                tail = x[p].mul_add(wr[p], tail);
            }
            *ot = reduce16(at[0], at[1]) + tail;
        }
    }
    out
}
