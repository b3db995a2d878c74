//! Single-token FP8 `x · Wᵀ` with explicit AVX2: the decode path, where the generic
//! chunk-at-a-time code spends about four cycles per weight on scalar e4m3 conversions and
//! the matvec is compute-bound instead of streaming at memory speed.
//!
//! Bit-identical to the generic kernel with FMA (the order contract of the parent module):
//! lanes 0–7 of each 16-element chunk accumulate in one register and lanes 8–15 in a
//! second, each a fused multiply-add of the unscaled e4m3 value; the halving tree is the
//! same sums in the same pairs; the tail and the row scale come last.

use super::super::parallel::SharedOut;
use super::batch_avx2::reduce16;
use super::{LANES, e4m3_fast};
use std::arch::x86_64::*;

/// Rows per tile: four independent weight streams, as the generic decode tile.
const ROWS: usize = 4;

/// Sixteen e4m3 codes → sixteen f32 equal to `e4m3 · 2⁻⁸`, as two registers (lanes 0–7,
/// 8–15). An e4m3 byte `s eeee mmm` moved to the f16 bits `s 0eeee mmm 0000000` is exactly
/// `value · 2⁻⁸` (f16's exponent bias is 15 against e4m3's 7, and e4m3's subnormals land on
/// f16 subnormals), and F16C widens that to f32 exactly: 9 instructions per 16 weights
/// where the f32 bit trick of [`e4m3_fast`] needs 14. The caller scales `x` by 2⁸ instead
/// (exact), so every product `x·w` — and hence every fused sum — is bit-identical.
///
/// # Safety
/// AVX2 and F16C are available and `p` has sixteen readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode16(p: *const u8) -> (__m256, __m256) {
    // SAFETY: sixteen readable bytes at p.
    let b = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p.cast()) });
    let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, _mm256_set1_epi16(0x80)));
    let mag = _mm256_slli_epi16::<7>(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)));
    let h = _mm256_or_si256(sign, mag);
    (_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
}

/// Columns `[j0, j1)` of `x[1, k] · W[n, k]ᵀ` (codes `[n, k]`, row scales `[n]`).
///
/// # Safety
/// AVX2, FMA and F16C are available; `dst` points to an `n`-element buffer of which no other thread
/// writes `[j0, j1)`; `codes` holds `n·k` bytes with `j1 <= n`, `x` holds `k` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fp8_decode_avx2(
    x: &[f32],
    codes: &[u8],
    scales: &[f32],
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    let full = k / LANES * LANES;
    // x · 2⁸ against weights decoded as w · 2⁻⁸ (see `decode16`): exact, as 2⁸ is a power of two.
    let x256: Vec<f32> = x[..full].iter().map(|v| v * 256.0).collect();
    let (xp, cp) = (x256.as_ptr(), codes.as_ptr());
    let mut j = j0;
    while j < j1 {
        let rows = (j1 - j).min(ROWS);
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        let mut c = 0;
        while c < full {
            // The next tile's rows, one cache line per row every four chunks: a 1 KiB row
            // ends before the hardware prefetcher ramps up on it. Never dereferenced.
            if c % 64 == 0 {
                for t in 0..ROWS {
                    _mm_prefetch::<_MM_HINT_T0>(cp.wrapping_add((j + ROWS + t) * k + c).cast());
                }
            }
            // SAFETY: c + 16 <= k.
            let (x0, x1) = unsafe { (_mm256_loadu_ps(xp.add(c)), _mm256_loadu_ps(xp.add(c + 8))) };
            for (t, a) in acc.iter_mut().enumerate().take(rows) {
                // SAFETY: row j + t < j1 <= n, and c + 16 <= k within it.
                let (w0, w1) = unsafe { decode16(cp.add((j + t) * k + c)) };
                a[0] = _mm256_fmadd_ps(x0, w0, a[0]);
                a[1] = _mm256_fmadd_ps(x1, w1, a[1]);
            }
            c += LANES;
        }
        for (t, a) in acc.iter().enumerate().take(rows) {
            let row = j + t;
            let mut tail = 0.0f32;
            for p in full..k {
                tail = x[p].mul_add(e4m3_fast(codes[row * k + p]), tail);
            }
            // SAFETY: column `row` lies in this task's block.
            unsafe { *dst.0.add(row) = (reduce16(a[0], a[1]) + tail) * scales[row] };
        }
        j += rows;
    }
}
