//! `out = x · Wᵀ` with a quantized output-major `W[n, k]` (FP8 e4m3 per-channel, or int4
//! group-wise; formats in [`crate::quant`]), f32 activations and f32 accumulation.
//!
//! [`super::matmul::matmul_t`] splits the columns and forwards each block of quantized weights here. Each 16-element chunk of a
//! weight row is dequantized once into f32 registers and reused for up to four activation
//! rows (prefill) or streamed four weight rows at a time (decode, `m == 1`).
//!
//! Reduction order per output element, fixed whatever `m` is and however columns are split
//! over threads (so a row's result is bit-identical in any batch):
//! - 16 lanes; lane `l` accumulates `x[p] · w[p]` (fused multiply-add where available) over
//!   `p = 16c + l` for `c = 0, 1, …` in order;
//! - the lanes are summed by a fixed halving tree, then the tail `p ≥ 16⌊k/16⌋` is added
//!   sequentially;
//! - FP8: `w[p]` is the unscaled e4m3 value and the sum is multiplied by the row's scale at
//!   the end; int4: `w[p] = f32(q) · scale[group]` (groups are whole chunks, as 128 = 8·16).
//!
//! e4m3 is decoded with bit arithmetic that vectorises (not the lookup table): the 7
//! magnitude bits shifted into an f32's exponent/mantissa give `value · 2⁻¹²⁰` exactly (also
//! for subnormals), and the multiply by 2¹²⁰ is exact. The two NaN codes decode to ±480,
//! which the quantizer never writes.

use super::parallel::SharedOut;
use super::simd::{Isa, fmadd};
use crate::quant::{self, INT4_GROUP};

const LANES: usize = 16;

/// A quantized weight matrix: how to dequantize one row's chunks and finish its dot product.
trait QuantRows: Copy + Send + Sync {
    /// Weights `[16c, 16c + 16)` of row `j` (scaled or not, see [`QuantRows::finish`]).
    fn chunk(&self, j: usize, c: usize, out: &mut [f32; LANES]);
    /// Weight `p` of row `j` (same scaling as `chunk`).
    fn elem(&self, j: usize, p: usize) -> f32;
    /// Turn row `j`'s dot product with the `chunk` weights into the output value.
    fn finish(&self, j: usize, dot: f32) -> f32;
    /// Row `j` (`k` weights) as `chunk` and `elem` give them.
    fn decode_row(&self, j: usize, out: &mut [f32]) {
        let full = out.len() / LANES * LANES;
        for (c, chunk) in out[..full].as_chunks_mut::<LANES>().0.iter_mut().enumerate() {
            self.chunk(j, c, chunk);
        }
        for (p, v) in out.iter_mut().enumerate().skip(full) {
            *v = self.elem(j, p);
        }
    }
}

#[derive(Clone, Copy)]
struct Fp8Rows<'a> {
    codes: &'a [u8],   // [n, k]
    scales: &'a [f32], // [n]
    k: usize,
}

/// e4m3 byte → f32 by bit arithmetic (see the module doc); NaN codes give ±480.
#[inline(always)]
fn e4m3_fast(b: u8) -> f32 {
    let b = b as u32;
    f32::from_bits(((b & 0x80) << 24) | ((b & 0x7F) << 20)) * f32::from_bits((127 + 120) << 23)
}

impl QuantRows for Fp8Rows<'_> {
    #[inline(always)]
    fn chunk(&self, j: usize, c: usize, out: &mut [f32; LANES]) {
        let s = j * self.k + c * LANES;
        let src: &[u8; LANES] = self.codes[s..s + LANES].try_into().expect("16 codes");
        for l in 0..LANES {
            out[l] = e4m3_fast(src[l]);
        }
    }

    #[inline(always)]
    fn elem(&self, j: usize, p: usize) -> f32 {
        e4m3_fast(self.codes[j * self.k + p])
    }

    #[inline(always)]
    fn finish(&self, j: usize, dot: f32) -> f32 {
        dot * self.scales[j]
    }

    fn decode_row(&self, j: usize, out: &mut [f32]) {
        let row = &self.codes[j * self.k..(j + 1) * self.k];
        #[cfg(target_arch = "x86_64")]
        if matches!(super::simd::isa(), Isa::Avx2Fma | Isa::Avx512) {
            // SAFETY: AVX2 and F16C were detected at run time.
            return unsafe { fp8_decode::decode_row_avx2(row, out) };
        }
        for (v, &b) in out.iter_mut().zip(row) {
            *v = e4m3_fast(b);
        }
    }
}

#[derive(Clone, Copy)]
struct Int4Rows<'a> {
    packed: &'a [u8],  // [n, ceil(k/2)]
    scales: &'a [f32], // [n, ceil(k/128)]
    row_bytes: usize,
    row_groups: usize,
}

impl QuantRows for Int4Rows<'_> {
    #[inline(always)]
    fn chunk(&self, j: usize, c: usize, out: &mut [f32; LANES]) {
        let s = j * self.row_bytes + c * LANES / 2;
        let src: &[u8; LANES / 2] = self.packed[s..s + LANES / 2].try_into().expect("8 bytes");
        let scale = self.scales[j * self.row_groups + c * LANES / INT4_GROUP];
        for t in 0..LANES / 2 {
            out[2 * t] = ((src[t] & 0xF) as i32 - 8) as f32 * scale;
            out[2 * t + 1] = ((src[t] >> 4) as i32 - 8) as f32 * scale;
        }
    }

    #[inline(always)]
    fn elem(&self, j: usize, p: usize) -> f32 {
        let row = &self.packed[j * self.row_bytes..(j + 1) * self.row_bytes];
        quant::int4_get(row, &self.scales[j * self.row_groups..(j + 1) * self.row_groups], p)
    }

    #[inline(always)]
    fn finish(&self, _j: usize, dot: f32) -> f32 {
        dot
    }
}

/// Columns `[j0, j1)` of `x[m, k] · W[n, k]ᵀ` with FP8 codes `[n, k]` and per-row scales `[n]`.
///
/// # Safety
/// `dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn fp8_cols(
    isa: Isa,
    x: &[f32],
    codes: &[u8],
    scales: &[f32],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    assert_eq!(codes.len(), n * k, "fp8 matmul: codes");
    assert_eq!(scales.len(), n, "fp8 matmul: scales");
    #[cfg(target_arch = "x86_64")]
    if m == 1 && matches!(isa, Isa::Avx2Fma | Isa::Avx512) {
        // SAFETY: AVX2, FMA and F16C were detected at run time; the rest is forwarded.
        return unsafe { fp8_decode::fp8_decode_avx2(x, codes, scales, k, j0, j1, dst) };
    }
    // SAFETY: forwarded from the caller.
    unsafe { cols_block(isa, x, Fp8Rows { codes, scales, k }, m, n, k, j0, j1, dst) }
}

/// Columns `[j0, j1)` of `x[m, k] · W[n, k]ᵀ` with int4 `packed[n, ceil(k/2)]` and
/// `scales[n, ceil(k/128)]`.
///
/// # Safety
/// `dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn int4_cols(
    isa: Isa,
    x: &[f32],
    packed: &[u8],
    scales: &[f32],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    let (row_bytes, row_groups) = (quant::int4_row_bytes(k), quant::int4_row_groups(k));
    assert_eq!(packed.len(), n * row_bytes, "int4 matmul: packed bytes");
    assert_eq!(scales.len(), n * row_groups, "int4 matmul: scales");
    let rows = Int4Rows { packed, scales, row_bytes, row_groups };
    #[cfg(target_arch = "x86_64")]
    if m == 1 && matches!(isa, Isa::Avx2Fma | Isa::Avx512) {
        // SAFETY: AVX2 and FMA were detected at run time; the rest is forwarded.
        return unsafe { int4_decode::int4_decode_avx2(x, rows, k, j0, j1, dst) };
    }
    // SAFETY: forwarded from the caller.
    unsafe { cols_block(isa, x, rows, m, n, k, j0, j1, dst) }
}

/// # Safety
/// `dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
#[allow(clippy::too_many_arguments)]
unsafe fn cols_block<Q: QuantRows>(
    isa: Isa,
    x: &[f32],
    q: Q,
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA was detected at run time (AVX-512 machines also have AVX2+FMA).
        Isa::Avx512 | Isa::Avx2Fma => return unsafe { block_avx2(x, q, m, n, k, j0, j1, dst) },
        Isa::Portable => {}
    }
    let _ = isa;
    // SAFETY: forwarded from the caller.
    unsafe { block::<Q, false>(x, q, m, n, k, j0, j1, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2<Q: QuantRows>(
    x: &[f32],
    q: Q,
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    // SAFETY: forwarded from the caller.
    unsafe { block::<Q, true>(x, q, m, n, k, j0, j1, dst) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<Q: QuantRows, const FMA: bool>(
    x: &[f32],
    q: Q,
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let put = |i: usize, j: usize, v: f32| {
        debug_assert!(i < m && j >= j0 && j < j1);
        // SAFETY: (i, j) lies in this task's column block of an m×n buffer.
        unsafe { *dst.0.add(i * n + j) = v };
    };
    if m == 1 {
        // Decode: stream W once, four rows at a time for memory-level parallelism.
        let mut j = j0;
        while j + 4 <= j1 {
            let r = tile::<Q, 1, 4, FMA>(q, [xr(0)], [j, j + 1, j + 2, j + 3]);
            for (c, v) in r[0].iter().enumerate() {
                put(0, j + c, *v);
            }
            j += 4;
        }
        for j in j..j1 {
            put(0, j, tile::<Q, 1, 1, FMA>(q, [xr(0)], [j])[0][0]);
        }
        return;
    }
    // Batches: a panel of weight rows is decoded once into f32 and every block of
    // `ROW_BLOCK` activation rows passes over it, so the panel and the row block both stay in
    // L2. (Without the row blocks each pair of weight rows streamed the whole activation
    // matrix, 2 MiB at a 512-token prompt, from L3.)
    let panel = panel_rows(k);
    let mut decoded = vec![0.0f32; panel.min(j1 - j0) * k]; // [panel rows, k]
    let mut j = j0;
    while j < j1 {
        let rows = (j1 - j).min(panel);
        decode_rows(q, j, rows, k, &mut decoded);
        let dq = Decoded { q, j0: j, w: &decoded[..rows * k], k };
        for i0 in (0..m).step_by(ROW_BLOCK) {
            let i1 = (i0 + ROW_BLOCK).min(m);
            let mut t = 0;
            while t < rows {
                let (jt, two) = (j + t, t + 2 <= rows);
                #[cfg(target_arch = "x86_64")]
                if FMA && two {
                    let w = &decoded[t * k..(t + 2) * k];
                    let mut i = i0;
                    while i < i1 {
                        let store = |a: usize, row: [f32; 2]| {
                            put(i + a, jt, q.finish(jt, row[0]));
                            put(i + a, jt + 1, q.finish(jt + 1, row[1]));
                        };
                        // SAFETY: `FMA` is only set on the AVX2+FMA path (`block_avx2`); rows exist.
                        if i + 3 <= i1 {
                            let r = unsafe { batch_avx2::dots_2rows::<3>([xr(i), xr(i + 1), xr(i + 2)], w, k) };
                            store(0, r[0]);
                            store(1, r[1]);
                            store(2, r[2]);
                            i += 3;
                        } else if i + 2 <= i1 {
                            let r = unsafe { batch_avx2::dots_2rows::<2>([xr(i), xr(i + 1)], w, k) };
                            store(0, r[0]);
                            store(1, r[1]);
                            i += 2;
                        } else {
                            store(0, unsafe { batch_avx2::dots_2rows::<1>([xr(i)], w, k) }[0]);
                            i += 1;
                        }
                    }
                    t += 2;
                    continue;
                }
                let mut i = i0;
                while i < i1 {
                    let mr = (i1 - i).min(4);
                    macro_rules! tile {
                        ($mr:literal, $xs:expr) => {{
                            if two {
                                let r = tile::<_, $mr, 2, FMA>(dq, $xs, [jt, jt + 1]);
                                for (a, row) in r.iter().enumerate() {
                                    put(i + a, jt, row[0]);
                                    put(i + a, jt + 1, row[1]);
                                }
                            } else {
                                let r = tile::<_, $mr, 1, FMA>(dq, $xs, [jt]);
                                for (a, row) in r.iter().enumerate() {
                                    put(i + a, jt, row[0]);
                                }
                            }
                        }};
                    }
                    match mr {
                        4 => tile!(4, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)]),
                        3 => tile!(3, [xr(i), xr(i + 1), xr(i + 2)]),
                        2 => tile!(2, [xr(i), xr(i + 1)]),
                        _ => tile!(1, [xr(i)]),
                    }
                    i += mr;
                }
                t += if two { 2 } else { 1 };
            }
        }
        j += rows;
    }
}

/// Activation rows per block of the batched kernel: 64 rows of a 4 KiB row (k = 1024) take
/// 256 KiB of a 512 KiB L2, next to a decoded weight panel.
const ROW_BLOCK: usize = 64;

/// Weight rows decoded per panel: about 128 KiB of f32, an even number from 2 to 32.
fn panel_rows(k: usize) -> usize {
    ((128 << 10) / (4 * k.max(1))).clamp(2, 32) & !1
}

/// Weight rows `j0..j0 + rows` of `q`, decoded: exactly the values of `q.chunk` / `q.elem`.
fn decode_rows<Q: QuantRows>(q: Q, j0: usize, rows: usize, k: usize, out: &mut [f32]) {
    for r in 0..rows {
        q.decode_row(j0 + r, &mut out[r * k..(r + 1) * k]);
    }
}

/// Rows of `Q` already decoded by [`decode_rows`] (rows `j0..`), finished as `Q` finishes them.
#[derive(Clone, Copy)]
struct Decoded<'a, Q> {
    q: Q,
    j0: usize,
    w: &'a [f32], // [rows, k]
    k: usize,
}

impl<Q: QuantRows> QuantRows for Decoded<'_, Q> {
    #[inline(always)]
    fn chunk(&self, j: usize, c: usize, out: &mut [f32; LANES]) {
        let at = (j - self.j0) * self.k + c * LANES;
        out.copy_from_slice(&self.w[at..at + LANES]);
    }

    #[inline(always)]
    fn elem(&self, j: usize, p: usize) -> f32 {
        self.w[(j - self.j0) * self.k + p]
    }

    #[inline(always)]
    fn finish(&self, j: usize, dot: f32) -> f32 {
        self.q.finish(j, dot)
    }
}

/// Dot products of `MR` activation rows with weight rows `js`.
// Index loops over fixed-size arrays are what LLVM unrolls and vectorises best here.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn tile<Q: QuantRows, const MR: usize, const NR: usize, const FMA: bool>(
    q: Q,
    xs: [&[f32]; MR],
    js: [usize; NR],
) -> [[f32; NR]; MR] {
    let k = xs[0].len();
    let full = k / LANES * LANES;
    let mut acc = [[[0.0f32; LANES]; NR]; MR];
    let xc: [&[[f32; LANES]]; MR] = xs.map(|r| r[..full].as_chunks::<LANES>().0);
    for c in 0..full / LANES {
        let mut wv = [[0.0f32; LANES]; NR];
        for t in 0..NR {
            q.chunk(js[t], c, &mut wv[t]);
        }
        for i in 0..MR {
            let xv = &xc[i][c];
            for t in 0..NR {
                for l in 0..LANES {
                    acc[i][t][l] = fmadd::<FMA>(xv[l], wv[t][l], acc[i][t][l]);
                }
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR];
    for i in 0..MR {
        for t in 0..NR {
            let mut tail = 0.0f32;
            for p in full..k {
                tail = fmadd::<FMA>(xs[i][p], q.elem(js[t], p), tail);
            }
            res[i][t] = q.finish(js[t], reduce_lanes(acc[i][t]) + tail);
        }
    }
    res
}

/// Sum 16 lanes by a fixed halving tree.
#[inline(always)]
fn reduce_lanes(mut v: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
mod batch_avx2;
#[cfg(target_arch = "x86_64")]
mod fp8_decode;
#[cfg(target_arch = "x86_64")]
mod int4_decode;
#[cfg(test)]
mod tests;
