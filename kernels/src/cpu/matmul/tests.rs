use super::*;
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// f64 reference of x · Wᵀ with W given as f32 values `[n, k]`.
fn reference_t(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
        }
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

fn check_close(got: &[f32], want: &[f64], k: usize, what: &str) {
    // Each product is exact in f64; f32 accumulation of k terms of magnitude ≤ 1 errs by
    // at most ~k·2⁻²⁴ in the worst case.
    let tol = 1e-6 * k as f64 + 1e-6;
    assert_eq!(got.len(), want.len(), "{what}");
    for (idx, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol, "{what}: element {idx}: got {g}, want {w}");
    }
}

/// Shapes around every tile edge: 1 token, rows not a multiple of the 4- or 3-row tiles,
/// columns not a multiple of 3, 8, 32 or 64, k not a multiple of 8, and a row block edge.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 33),
    (1, 9, 8),
    (1, 65, 17),
    (1, 300, 257),
    (2, 33, 7),
    (3, 5, 16),
    (3, 32, 5),
    (5, 9, 17),
    (5, 65, 17),
    (9, 130, 70),
    (17, 64, 64),
    (67, 37, 23),
];

/// Both products on f32, bf16 and f16 weights against the f64 reference of the widened
/// weights.
#[test]
fn both_layouts_match_f64_reference_on_odd_shapes_and_dtypes() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(m, n, k) in SHAPES {
        let x = rand_vec(&mut rng, m * k);
        let w = rand_vec(&mut rng, n * k); // [n, k]
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let widened = [w.clone(), wb.iter().map(|v| v.to_f32()).collect(), wh.iter().map(|v| v.to_f32()).collect()];
        let wb_t: Vec<bf16> = transpose(&widened[1], n, k).into_iter().map(bf16::from_f32).collect();
        let wh_t: Vec<f16> = transpose(&widened[2], n, k).into_iter().map(f16::from_f32).collect();
        let w_t = transpose(&w, n, k); // [k, n]
        let nk = [Elems::F32(&w), Elems::Bf16(&wb), Elems::F16(&wh)];
        let kn = [Elems::F32(&w_t), Elems::Bf16(&wb_t), Elems::F16(&wh_t)];
        for d in 0..3 {
            let want = reference_t(&x, &widened[d], m, n, k);
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, MatRef::new(nk[d], n, k), &mut out);
            check_close(&out, &want, k, &format!("matmul_t {m}x{n}x{k} dtype {d}"));
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, MatRef::new(kn[d], k, n), &mut out);
            check_close(&out, &want, k, &format!("matmul {m}x{n}x{k} dtype {d}"));
        }
    }
}

#[test]
fn empty_batches_write_nothing() {
    let w = vec![1.0f32; 12];
    let mut out: Vec<f32> = Vec::new();
    matmul_t(&[], MatRef::new(Elems::F32(&w), 3, 4), &mut out);
    matmul(&[], MatRef::new(Elems::F32(&w), 4, 3), &mut out);
    let mut none: Vec<f32> = Vec::new();
    matmul_t(&[1.0; 4], MatRef::new(Elems::F32(&[]), 0, 4), &mut none);
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
        for (rows, cols, f) in [(n, k, matmul_t as fn(&[f32], MatRef<'_>, &mut [f32])), (k, n, matmul)] {
            let mut got = vec![0.0; m * n];
            let mut want = vec![0.0; m * n];
            f(&x, MatRef::new(elems, rows, cols), &mut got);
            f(&x, MatRef::new(Elems::F32(&widened), rows, cols), &mut want);
            assert_eq!(got, want);
        }
    }
}

/// The batch-invariance contract: every row of every batch size, alone or in a batch, on
/// one thread or several, gives the same bits — in both layouts and every dtype, with
/// shapes that put rows in different tiles and row blocks.
#[test]
fn a_row_gives_identical_bits_in_any_batch_and_any_split() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
    for &(n, k) in &[(97usize, 200usize), (200, 37), (67, 64)] {
        let w = rand_vec(&mut rng, n * k);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rand_vec(&mut rng, 70 * k);
        for elems in [Elems::F32(&w), Elems::Bf16(&wb)] {
            for (rows, cols, f) in [(n, k, matmul_t as fn(&[f32], MatRef<'_>, &mut [f32])), (k, n, matmul)] {
                let wm = MatRef::new(elems, rows, cols);
                let alone: Vec<Vec<f32>> = (0..70)
                    .map(|i| {
                        let mut o = vec![0.0; n];
                        f(&x[i * k..(i + 1) * k], wm, &mut o);
                        o
                    })
                    .collect();
                for m in [2, 3, 4, 5, 7, 13, 64, 65, 70] {
                    for pool in [&one, &three] {
                        let mut batch = vec![0.0; m * n];
                        pool.install(|| f(&x[..m * k], wm, &mut batch));
                        for (i, row) in batch.chunks_exact(n).enumerate() {
                            assert_eq!(alone[i], row, "n={n} k={k} m={m} row {i}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn large_products_split_across_threads_match_serial() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (n, k) = (1000, 300);
    let w = rand_vec(&mut rng, n * k);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    for (m, rows, cols, f) in
        [1, 6].into_iter().flat_map(|m| [(m, n, k, matmul_t as fn(&[f32], MatRef<'_>, &mut [f32])), (m, k, n, matmul)])
    {
        let x = rand_vec(&mut rng, m * k);
        let wm = MatRef::new(Elems::F32(&w), rows, cols);
        let mut par = vec![0.0; m * n];
        f(&x, wm, &mut par);
        let mut ser = vec![0.0; m * n];
        pool.install(|| f(&x, wm, &mut ser));
        assert_eq!(par, ser);
    }
}

/// The portable kernels (what a CPU without AVX2 runs) against the reference too.
#[test]
fn portable_kernels_match_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for &(m, n, k) in SHAPES {
        let x = rand_vec(&mut rng, m * k);
        let w = rand_vec(&mut rng, n * k);
        let w_t = transpose(&w, n, k);
        let want = reference_t(&x, &w, m, n, k);
        for (layout, ws) in [(Layout::NK, &w), (Layout::KN, &w_t)] {
            let mut out = vec![f32::NAN; m * n];
            let job = Job { x: &x, w: ws.as_slice(), m, n, k, dst: SharedOut(out.as_mut_ptr()) };
            // SAFETY: one task writes every column of `out`, which outlives the call.
            unsafe {
                match layout {
                    Layout::NK => portable::block_nk(job, 0, n),
                    Layout::KN => portable::block_kn(job, 0, n),
                }
            }
            check_close(&out, &want, k, &format!("portable {layout:?} {m}x{n}x{k}"));
        }
    }
}

/// One region over several products (q/k/v, router + gate/up) gives each output exactly the
/// bits its own `matmul_t` gives, for float and quantized weights, at decode and batch sizes,
/// on small (serial) and large (split) products.
#[test]
fn many_products_in_one_region_equal_each_alone() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (m, k) in [(1, 37), (1, 512), (5, 130), (70, 256)] {
        let ns = [1000, 9, 260, 64];
        let ws: Vec<Vec<f32>> = ns.iter().map(|&n| rand_vec(&mut rng, n * k)).collect();
        let bf: Vec<bf16> = ws[1].iter().map(|&v| bf16::from_f32(v)).collect();
        let mut codes = vec![0u8; ns[2] * k];
        let mut fp8_scales = vec![0.0f32; ns[2]];
        crate::quant::quantize_fp8(&ws[2], ns[2], k, &mut codes, &mut fp8_scales).expect("fp8");
        let (rb, rg) = (crate::quant::int4_row_bytes(k), crate::quant::int4_row_groups(k));
        let mut packed = vec![0u8; ns[3] * rb];
        let mut int4_scales = vec![0.0f32; ns[3] * rg];
        crate::quant::quantize_int4(&ws[3], ns[3], k, &mut packed, &mut int4_scales).expect("int4");
        let mats = [
            MatRef::new(Elems::F32(&ws[0]), ns[0], k),
            MatRef::new(Elems::Bf16(&bf), ns[1], k),
            MatRef::new(Elems::F8E4M3 { codes: &codes, scales: &fp8_scales, row_len: k }, ns[2], k),
            MatRef::new(Elems::Int4 { packed: &packed, scales: &int4_scales, row_len: k }, ns[3], k),
        ];
        let x = rand_vec(&mut rng, m * k);
        let alone: Vec<Vec<f32>> = mats
            .iter()
            .map(|w| {
                let mut out = vec![0.0; m * w.rows];
                matmul_t(&x, *w, &mut out);
                out
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
        let mut products: Vec<(MatRef<'_>, &mut [f32])> =
            mats.iter().zip(outs.iter_mut()).map(|(w, o)| (*w, o.as_mut_slice())).collect();
        matmul_t_many(&x, &mut products);
        for (i, (got, want)) in outs.iter().zip(&alone).enumerate() {
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "m={m} k={k}: product {i} differs");
        }
    }
}
