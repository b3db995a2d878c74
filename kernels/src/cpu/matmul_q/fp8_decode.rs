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

/// Sixteen e4m3 codes → sixteen f32 equal to `e4m3 · 2⁻¹²⁰`, as two registers. The byte
/// sign-extended to 32 bits and shifted left by 20 puts the magnitude bits on an f32's
/// exponent/mantissa (exponent bias 127 against 7; e4m3 subnormals land on f32 subnormals,
/// exactly) and copies of the sign on bits 27–31, which the mask clears except bit 31:
/// 6 instructions per 16 weights against [`decode16`]'s 9 (two of those are 2-µop F16C
/// converts). The caller scales `x` by 2¹²⁰, exact only while `|x| < 2⁸`.
///
/// # Safety
/// AVX2 is available and `p` has sixteen readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode16_bits(p: *const u8) -> (__m256, __m256) {
    let mask = _mm256_set1_epi32(0x87F0_0000u32 as i32);
    // SAFETY: sixteen readable bytes at p.
    let (lo, hi) = unsafe { (_mm_loadl_epi64(p.cast()), _mm_loadl_epi64(p.add(8).cast())) };
    let f = |b: __m128i| _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(b)), mask));
    (f(lo), f(hi))
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
    // x · 2¹²⁰ against weights decoded as w · 2⁻¹²⁰ ([`decode16_bits`]) where that is finite,
    // else x · 2⁸ against w · 2⁻⁸ ([`decode16`]): exact either way, as the factors are
    // powers of two, so every product equals x · w.
    let small = x[..full].iter().all(|v| v.abs() < 256.0);
    let factor = if small { f32::from_bits((127 + 120) << 23) } else { 256.0 };
    let xs: Vec<f32> = x[..full].iter().map(|v| v * factor).collect();
    let ops = Operands { x, xs: &xs, codes, scales, k, dst };
    // SAFETY: forwarded; the branch only picks the weight decoding that matches `factor`.
    unsafe { if small { tiles::<true>(ops, j0, j1) } else { tiles::<false>(ops, j0, j1) } }
}

/// What every tile of one [`fp8_decode_avx2`] call reads and writes.
#[derive(Clone, Copy)]
struct Operands<'a> {
    x: &'a [f32],
    /// The first `k / 16 · 16` values of `x` scaled to match the weight decoding.
    xs: &'a [f32],
    codes: &'a [u8],   // [n, k]
    scales: &'a [f32], // [n]
    k: usize,
    dst: SharedOut,
}

/// The body of [`fp8_decode_avx2`] for `ops.xs` scaled by 2¹²⁰ (`BITS`) or 2⁸.
///
/// # Safety
/// As [`fp8_decode_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiles<const BITS: bool>(ops: Operands<'_>, j0: usize, j1: usize) {
    let mut j = j0;
    // SAFETY (all tiles): rows j..j + R < j1 <= n; the tile writes only columns in [j0, j1).
    while j + ROWS <= j1 {
        unsafe { tile::<BITS, ROWS>(ops, j) };
        j += ROWS;
    }
    match j1 - j {
        0 => {}
        1 => unsafe { tile::<BITS, 1>(ops, j) },
        2 => unsafe { tile::<BITS, 2>(ops, j) },
        _ => unsafe { tile::<BITS, 3>(ops, j) },
    }
}

/// Rows `[j, j + R)` of [`tiles`]: `R` weight streams, two accumulators each.
///
/// # Safety
/// As [`tiles`], with `j + R <= n` and columns `[j, j + R)` in this task's block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const BITS: bool, const R: usize>(ops: Operands<'_>, j: usize) {
    let Operands { x, xs, codes, scales, k, dst } = ops;
    let full = k / LANES * LANES;
    let (xp, cp) = (xs.as_ptr(), codes.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut c = 0;
    while c < full {
        // The next tile's rows, one cache line per row every four chunks: a 1 KiB row
        // ends before the hardware prefetcher ramps up on it. Never dereferenced.
        if c % 64 == 0 {
            for t in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(cp.wrapping_add((j + R + t) * k + c).cast());
            }
        }
        // SAFETY: c + 16 <= k.
        let (x0, x1) = unsafe { (_mm256_loadu_ps(xp.add(c)), _mm256_loadu_ps(xp.add(c + 8))) };
        for (t, a) in acc.iter_mut().enumerate() {
            // SAFETY: row j + t < n, and c + 16 <= k within it.
            let (w0, w1) = unsafe {
                let at = cp.add((j + t) * k + c);
                if BITS { decode16_bits(at) } else { decode16(at) }
            };
            a[0] = _mm256_fmadd_ps(x0, w0, a[0]);
            a[1] = _mm256_fmadd_ps(x1, w1, a[1]);
        }
        c += LANES;
    }
    for (t, a) in acc.iter().enumerate() {
        let row = j + t;
        let mut tail = 0.0f32;
        for p in full..k {
            tail = x[p].mul_add(e4m3_fast(codes[row * k + p]), tail);
        }
        // SAFETY: column `row` lies in this task's block.
        unsafe { *dst.0.add(row) = (reduce16(a[0], a[1]) + tail) * scales[row] };
    }
}

/// One row of e4m3 codes → their f32 values (exactly [`e4m3_fast`]'s), for the batch
/// kernel's decoded weight panels: [`decode16_bits`] then the exact multiply by 2¹²⁰.
///
/// # Safety
/// AVX2 and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_row_avx2(codes: &[u8], out: &mut [f32]) {
    assert_eq!(codes.len(), out.len());
    let full = codes.len() / LANES * LANES;
    let up = _mm256_set1_ps(f32::from_bits((127 + 120) << 23));
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= len for both slices.
        unsafe {
            let (lo, hi) = decode16_bits(codes.as_ptr().add(c));
            _mm256_storeu_ps(out.as_mut_ptr().add(c), _mm256_mul_ps(lo, up));
            _mm256_storeu_ps(out.as_mut_ptr().add(c + 8), _mm256_mul_ps(hi, up));
        }
        c += LANES;
    }
    for (v, &b) in out[full..].iter_mut().zip(&codes[full..]) {
        *v = e4m3_fast(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both decodings give every finite code's value (scaled by their power of two), the
    /// subnormal codes included; the two NaN codes decode as [`e4m3_fast`] does.
    #[test]
    fn both_decodings_give_every_code() {
        if !std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("f16c") {
            return;
        }
        for first in (0..=255u8).step_by(16) {
            let codes: Vec<u8> = (first..=first + 15).collect();
            // SAFETY: AVX2 and F16C were detected; sixteen codes are readable.
            let (bits, f16) = unsafe { (decode16_bits(codes.as_ptr()), decode16(codes.as_ptr())) };
            let lanes = |(a, b): (__m256, __m256)| {
                let mut v = [0.0f32; 16];
                // SAFETY: v holds sixteen f32.
                unsafe { (_mm256_storeu_ps(v.as_mut_ptr(), a), _mm256_storeu_ps(v.as_mut_ptr().add(8), b)) };
                v
            };
            let (bits, f16) = (lanes(bits), lanes(f16));
            let mut row = [0.0f32; 16];
            // SAFETY: as above.
            unsafe { decode_row_avx2(&codes, &mut row) };
            for (l, &c) in codes.iter().enumerate() {
                let want = e4m3_fast(c);
                assert_eq!(row[l].to_bits(), want.to_bits(), "code {c:#04x} (row)");
                assert_eq!(bits[l] * f32::from_bits((127 + 120) << 23), want, "code {c:#04x} (bits)");
                if !crate::quant::e4m3_to_f32(c).is_nan() {
                    assert_eq!(f16[l] * 256.0, want, "code {c:#04x} (f16)");
                }
            }
        }
    }
}
