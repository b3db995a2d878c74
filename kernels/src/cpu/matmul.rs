//! Matrix products with f32 activations and weights in their stored dtype.
//!
//! Two layouts appear in Llama 4 checkpoints:
//! - [`matmul_t`]: `W` is `[n, k]` (nn.Linear, output-major): `out = x · Wᵀ`.
//! - [`matmul`]: `W` is `[k, n]` (the fused expert tensors, input-major): `out = x · W`.
//!
//! Accumulation order is fixed per output element (16 interleaved lanes over `k` reduced
//! by a fixed tree for `matmul_t`; sequential over `k` for `matmul`), independent of the
//! number of rows in `x` and of how the work is tiled or threaded. So a row's result is
//! bit-identical whatever batch it is computed in.

use super::parallel::{SharedOut, block_size};
use super::simd::{Isa, Widen, fmadd, isa};
use crate::tensor::{Elems, MatRef};
use rayon::prelude::*;

const LANES: usize = 16;

/// `out[m, n] = x[m, k] · W[n, k]ᵀ`, where `m = x.len() / k`.
pub fn matmul_t(x: &[f32], w: MatRef<'_>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert!(k > 0 && x.len().is_multiple_of(k), "matmul_t: x has {} elements, not a multiple of k={k}", x.len());
    let m = x.len() / k;
    assert_eq!(out.len(), m * n, "matmul_t: out is {} elements, want {m}x{n}", out.len());
    match w.elems {
        Elems::F32(ws) => dispatch_t(x, ws, m, n, k, out),
        Elems::Bf16(ws) => dispatch_t(x, ws, m, n, k, out),
        Elems::F16(ws) => dispatch_t(x, ws, m, n, k, out),
        Elems::F8E4M3 { codes, scales, .. } => super::matmul_q::matmul_t_fp8(x, codes, scales, m, n, k, out),
        Elems::Int4 { packed, scales, .. } => super::matmul_q::matmul_t_int4(x, packed, scales, m, n, k, out),
    }
}

/// `out[m, n] = x[m, k] · W[k, n]`, where `m = x.len() / k`.
pub fn matmul(x: &[f32], w: MatRef<'_>, out: &mut [f32]) {
    let (k, n) = (w.rows, w.cols);
    assert!(k > 0 && x.len().is_multiple_of(k), "matmul: x has {} elements, not a multiple of k={k}", x.len());
    let m = x.len() / k;
    assert_eq!(out.len(), m * n, "matmul: out is {} elements, want {m}x{n}", out.len());
    match w.elems {
        Elems::F32(ws) => dispatch_kn(x, ws, m, n, k, out),
        Elems::Bf16(ws) => dispatch_kn(x, ws, m, n, k, out),
        Elems::F16(ws) => dispatch_kn(x, ws, m, n, k, out),
        // Quantized scales belong to output rows of an output-major [n, k] matrix.
        Elems::F8E4M3 { .. } | Elems::Int4 { .. } => panic!("matmul: quantized weights are [n, k]; use matmul_t"),
    }
}

// ---------------------------------------------------------------------------------------
// x · Wᵀ

fn dispatch_t<W: Widen>(x: &[f32], w: &[W], m: usize, n: usize, k: usize, out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    let nb = block_size(n, 4, m * n * k);
    let dst = SharedOut(out.as_mut_ptr());
    let run = |j0: usize| {
        let j1 = (j0 + nb).min(n);
        // SAFETY: this task writes only columns [j0, j1) of `out`; blocks are disjoint.
        unsafe { rows_block_t(isa(), x, w, m, n, k, j0, j1, dst) }
    };
    if nb >= n {
        run(0);
    } else {
        (0..n.div_ceil(nb)).into_par_iter().for_each(|b| run(b * nb));
    }
}

/// Columns `[j0, j1)` of `out` for every row of `x`.
///
/// # Safety
/// `dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_block_t<W: Widen>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA was detected at run time.
        Isa::Avx512 => return unsafe { block_t_avx512(x, w, m, n, k, j0, j1, dst) },
        Isa::Avx2Fma => return unsafe { block_t_avx2(x, w, m, n, k, j0, j1, dst) },
        Isa::Portable => {}
    }
    let _ = isa;
    // SAFETY: forwarded from the caller.
    unsafe { block_t::<W, false>(x, w, m, n, k, j0, j1, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_t_avx512<W: Widen>(
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    // SAFETY: forwarded from the caller.
    unsafe { block_t::<W, true>(x, w, m, n, k, j0, j1, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_t_avx2<W: Widen>(
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    // SAFETY: forwarded from the caller.
    unsafe { block_t::<W, true>(x, w, m, n, k, j0, j1, dst) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block_t<W: Widen, const FMA: bool>(
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let wr = |j: usize| &w[j * k..(j + 1) * k];
    let put = |i: usize, j: usize, v: f32| {
        debug_assert!(i < m && j >= j0 && j < j1);
        // SAFETY: (i, j) lies in this task's column block of an m×n buffer.
        unsafe { *dst.0.add(i * n + j) = v };
    };
    if m == 1 {
        // Decode: stream W once, four rows at a time for memory-level parallelism.
        let mut j = j0;
        while j + 4 <= j1 {
            let r = tile_t::<W, 1, 4, FMA>([xr(0)], [wr(j), wr(j + 1), wr(j + 2), wr(j + 3)]);
            for (c, v) in r[0].iter().enumerate() {
                put(0, j + c, *v);
            }
            j += 4;
        }
        for j in j..j1 {
            put(0, j, tile_t::<W, 1, 1, FMA>([xr(0)], [wr(j)])[0][0]);
        }
        return;
    }
    let mut j = j0;
    while j < j1 {
        let two = j + 2 <= j1;
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            macro_rules! tile {
                ($mr:literal, $xs:expr) => {{
                    if two {
                        let r = tile_t::<W, $mr, 2, FMA>($xs, [wr(j), wr(j + 1)]);
                        for (a, row) in r.iter().enumerate() {
                            put(i + a, j, row[0]);
                            put(i + a, j + 1, row[1]);
                        }
                    } else {
                        let r = tile_t::<W, $mr, 1, FMA>($xs, [wr(j)]);
                        for (a, row) in r.iter().enumerate() {
                            put(i + a, j, row[0]);
                        }
                    }
                }};
            }
            match rows {
                4 => tile!(4, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)]),
                3 => tile!(3, [xr(i), xr(i + 1), xr(i + 2)]),
                2 => tile!(2, [xr(i), xr(i + 1)]),
                _ => tile!(1, [xr(i)]),
            }
            i += rows;
        }
        j += if two { 2 } else { 1 };
    }
}

/// Dot products of `MR` activation rows with `NR` weight rows.
#[inline(always)]
fn tile_t<W: Widen, const MR: usize, const NR: usize, const FMA: bool>(
    xs: [&[f32]; MR],
    ws: [&[W]; NR],
) -> [[f32; NR]; MR] {
    let k = xs[0].len();
    let full = k / LANES * LANES;
    let mut acc = [[[0.0f32; LANES]; NR]; MR];
    let xc: [&[[f32; LANES]]; MR] = xs.map(|r| r[..full].as_chunks::<LANES>().0);
    let wc: [&[[W; LANES]]; NR] = ws.map(|r| r[..full].as_chunks::<LANES>().0);
    for c in 0..full / LANES {
        let mut wv = [[0.0f32; LANES]; NR];
        for j in 0..NR {
            let src = &wc[j][c];
            for l in 0..LANES {
                wv[j][l] = src[l].widen();
            }
        }
        for i in 0..MR {
            let xv = &xc[i][c];
            for j in 0..NR {
                for l in 0..LANES {
                    acc[i][j][l] = fmadd::<FMA>(xv[l], wv[j][l], acc[i][j][l]);
                }
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            let mut tail = 0.0f32;
            for p in full..k {
                tail = fmadd::<FMA>(xs[i][p], ws[j][p].widen(), tail);
            }
            res[i][j] = reduce_lanes(acc[i][j]) + tail;
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

// ---------------------------------------------------------------------------------------
// x · W  (W input-major)

/// Output columns handled by one register tile of the input-major product.
const NB: usize = 32;

fn dispatch_kn<W: Widen>(x: &[f32], w: &[W], m: usize, n: usize, k: usize, out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    let cb = block_size(n, NB, m * n * k);
    let dst = SharedOut(out.as_mut_ptr());
    let run = |j0: usize| {
        let j1 = (j0 + cb).min(n);
        // SAFETY: this task writes only columns [j0, j1) of `out`; blocks are disjoint.
        unsafe { cols_block_kn(isa(), x, w, m, n, k, j0, j1, dst) }
    };
    if cb >= n {
        run(0);
    } else {
        (0..n.div_ceil(cb)).into_par_iter().for_each(|b| run(b * cb));
    }
}

/// # Safety
/// `dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
#[allow(clippy::too_many_arguments)]
unsafe fn cols_block_kn<W: Widen>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA was detected at run time.
        Isa::Avx512 => return unsafe { block_kn_avx512(x, w, m, n, k, j0, j1, dst) },
        Isa::Avx2Fma => return unsafe { block_kn_avx2(x, w, m, n, k, j0, j1, dst) },
        Isa::Portable => {}
    }
    let _ = isa;
    // SAFETY: forwarded from the caller.
    unsafe { block_kn::<W, false>(x, w, m, n, k, j0, j1, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_kn_avx512<W: Widen>(
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    // SAFETY: forwarded from the caller.
    unsafe { block_kn::<W, true>(x, w, m, n, k, j0, j1, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_kn_avx2<W: Widen>(
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    dst: SharedOut,
) {
    // SAFETY: forwarded from the caller.
    unsafe { block_kn::<W, true>(x, w, m, n, k, j0, j1, dst) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block_kn<W: Widen, const FMA: bool>(
    x: &[f32],
    w: &[W],
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
    let mut j = j0;
    while j + NB <= j1 {
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            macro_rules! tile {
                ($mr:literal, $xs:expr) => {{
                    let r = tile_kn::<W, $mr, FMA>($xs, w, n, j);
                    for (a, row) in r.iter().enumerate() {
                        for (c, v) in row.iter().enumerate() {
                            put(i + a, j + c, *v);
                        }
                    }
                }};
            }
            match rows {
                4 => tile!(4, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)]),
                3 => tile!(3, [xr(i), xr(i + 1), xr(i + 2)]),
                2 => tile!(2, [xr(i), xr(i + 1)]),
                _ => tile!(1, [xr(i)]),
            }
            i += rows;
        }
        j += NB;
    }
    // Ragged columns: the same sequential-over-k order, one element at a time.
    for jj in j..j1 {
        for i in 0..m {
            let xi = xr(i);
            let mut acc = 0.0f32;
            for p in 0..k {
                acc = fmadd::<FMA>(xi[p], w[p * n + jj].widen(), acc);
            }
            put(i, jj, acc);
        }
    }
}

/// `MR` rows of `x` times columns `[j, j + NB)` of the input-major `w` (`[k, n]`).
#[inline(always)]
fn tile_kn<W: Widen, const MR: usize, const FMA: bool>(
    xs: [&[f32]; MR],
    w: &[W],
    n: usize,
    j: usize,
) -> [[f32; NB]; MR] {
    let k = xs[0].len();
    let mut acc = [[0.0f32; NB]; MR];
    for p in 0..k {
        let src: &[W; NB] = w[p * n + j..p * n + j + NB].try_into().expect("NB columns");
        let mut wv = [0.0f32; NB];
        for l in 0..NB {
            wv[l] = src[l].widen();
        }
        for i in 0..MR {
            let xv = xs[i][p];
            for l in 0..NB {
                acc[i][l] = fmadd::<FMA>(xv, wv[l], acc[i][l]);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// f64 reference of x · Wᵀ with W given as f32 values.
    fn reference_t(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        out
    }

    fn check_close(got: &[f32], want: &[f64], k: usize) {
        // Each product is exact in f64; f32 accumulation of k terms of magnitude ≤ 1 errs by
        // at most ~k·2⁻²⁴ in the worst case.
        let tol = 1e-6 * k as f64 + 1e-6;
        for (idx, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= tol, "element {idx}: got {g}, want {w}");
        }
    }

    #[test]
    fn matmul_t_matches_f64_reference_on_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for &(m, n, k) in &[(1, 1, 1), (1, 7, 33), (3, 5, 16), (5, 9, 17), (9, 130, 70), (1, 300, 257), (17, 64, 64)] {
            let x = rand_vec(&mut rng, m * k);
            let w = rand_vec(&mut rng, n * k);
            let mut out = vec![0.0; m * n];
            matmul_t(&x, MatRef::new(Elems::F32(&w), n, k), &mut out);
            check_close(&out, &reference_t(&x, &w, m, n, k), k);
        }
    }

    #[test]
    fn matmul_kn_matches_f64_reference_on_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for &(m, n, k) in &[(1, 1, 1), (1, 33, 7), (3, 32, 5), (5, 65, 17), (9, 130, 70), (2, 300, 3)] {
            let x = rand_vec(&mut rng, m * k);
            let w_kn = rand_vec(&mut rng, k * n);
            // Transpose to [n, k] for the shared reference.
            let mut w_nk = vec![0.0; n * k];
            for p in 0..k {
                for j in 0..n {
                    w_nk[j * k + p] = w_kn[p * n + j];
                }
            }
            let mut out = vec![0.0; m * n];
            matmul(&x, MatRef::new(Elems::F32(&w_kn), k, n), &mut out);
            check_close(&out, &reference_t(&x, &w_nk, m, n, k), k);
        }
    }

    #[test]
    fn half_weights_widen_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, n, k) = (3, 11, 40);
        let x = rand_vec(&mut rng, m * k);
        let w = rand_vec(&mut rng, n * k);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for (elems, widened) in [
            (Elems::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
            (Elems::F16(&wh), wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
        ] {
            let mut got = vec![0.0; m * n];
            let mut want = vec![0.0; m * n];
            matmul_t(&x, MatRef::new(elems, n, k), &mut got);
            matmul_t(&x, MatRef::new(Elems::F32(&widened), n, k), &mut want);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_row_gives_identical_bits_in_any_batch() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, k) = (97, 200);
        let w = rand_vec(&mut rng, n * k);
        let w_mat = MatRef::new(Elems::F32(&w), n, k);
        let w_kn = MatRef::new(Elems::F32(&w), k, n);
        let x = rand_vec(&mut rng, 11 * k);
        let row = &x[5 * k..6 * k];
        for (alone_fn, name) in [(matmul_t as fn(&[f32], MatRef<'_>, &mut [f32]), "t"), (matmul, "kn")] {
            let wm = if name == "t" { w_mat } else { w_kn };
            let mut alone = vec![0.0; n];
            alone_fn(row, wm, &mut alone);
            let mut batch = vec![0.0; 11 * n];
            alone_fn(&x, wm, &mut batch);
            assert_eq!(alone, batch[5 * n..6 * n], "layout {name}");
        }
    }

    #[test]
    fn large_products_split_across_threads_match_serial() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (m, n, k) = (6, 1000, 300);
        let x = rand_vec(&mut rng, m * k);
        let w = rand_vec(&mut rng, n * k);
        let mut par = vec![0.0; m * n];
        matmul_t(&x, MatRef::new(Elems::F32(&w), n, k), &mut par);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
        let mut ser = vec![0.0; m * n];
        pool.install(|| matmul_t(&x, MatRef::new(Elems::F32(&w), n, k), &mut ser));
        assert_eq!(par, ser);
    }
}
