use super::*;
use crate::cpu::matmul::matmul_t;
use crate::quant::{int4_row_bytes, int4_row_groups, quantize_fp8, quantize_int4};
use crate::tensor::{Elems, MatRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A quantized `[n, k]` matrix and its owned buffers.
struct Q {
    data: Vec<u8>,
    scales: Vec<f32>,
    k: usize,
    int4: bool,
}

impl Q {
    fn fp8(w: &[f32], n: usize, k: usize) -> Self {
        let (mut data, mut scales) = (vec![0u8; n * k], vec![0f32; n]);
        quantize_fp8(w, n, k, &mut data, &mut scales).expect("shapes");
        Q { data, scales, k, int4: false }
    }

    fn int4(w: &[f32], n: usize, k: usize) -> Self {
        let (mut data, mut scales) = (vec![0u8; n * int4_row_bytes(k)], vec![0f32; n * int4_row_groups(k)]);
        quantize_int4(w, n, k, &mut data, &mut scales).expect("shapes");
        Q { data, scales, k, int4: true }
    }

    fn elems(&self) -> Elems<'_> {
        if self.int4 {
            Elems::Int4 { packed: &self.data, scales: &self.scales, row_len: self.k }
        } else {
            Elems::F8E4M3 { codes: &self.data, scales: &self.scales, row_len: self.k }
        }
    }

    fn mat(&self, n: usize) -> MatRef<'_> {
        MatRef::new(self.elems(), n, self.k)
    }
}

/// f64 reference of x · Wᵀ over the dequantized weights (code · scale in exact arithmetic).
fn reference(x: &[f32], q: &Q, m: usize, n: usize, k: usize) -> Vec<f64> {
    let w: Vec<f64> = (0..n * k)
        .map(|i| {
            let (j, p) = (i / k, i % k);
            if q.int4 {
                let rb = int4_row_bytes(k);
                let nib = (q.data[j * rb + p / 2] >> (4 * (p % 2))) & 0xF;
                (nib as f64 - 8.0) * q.scales[j * int4_row_groups(k) + p / INT4_GROUP] as f64
            } else {
                quant::e4m3_to_f32(q.data[i]) as f64 * q.scales[j] as f64
            }
        })
        .collect();
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p]).sum();
        }
    }
    out
}

fn check_close(got: &[f32], want: &[f64], k: usize, what: &str) {
    // Dequantized weights are ≤ 1 in magnitude, as are the activations: f32 accumulation of
    // k products errs by at most ~k·2⁻²⁴ (plus one rounding of the dequantized weight each).
    let tol = 1e-6 * k as f64 + 1e-6;
    assert_eq!(got.len(), want.len());
    for (idx, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol, "{what} element {idx}: got {g}, want {w}");
    }
}

const SHAPES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (1, 7, 33),
    (3, 5, 16),
    (5, 9, 17),
    (9, 130, 70),
    (1, 300, 257),
    (17, 64, 64),
    (2, 3, 128),
    (4, 10, 300),
    (1, 5, 7),
    (6, 1000, 384),
    (1, 33, 1030),
];

#[test]
fn fp8_and_int4_match_the_f64_reference_on_odd_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for &(m, n, k) in &SHAPES {
        let x = rand_vec(&mut rng, m * k);
        let w = rand_vec(&mut rng, n * k);
        for q in [Q::fp8(&w, n, k), Q::int4(&w, n, k)] {
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, q.mat(n), &mut out);
            let what = format!("{} {m}x{n}x{k}", if q.int4 { "int4" } else { "fp8" });
            check_close(&out, &reference(&x, &q, m, n, k), k, &what);
        }
    }
}

#[test]
fn empty_batches_and_matrices_are_no_ops() {
    let w = vec![0.5f32; 3 * 20];
    for q in [Q::fp8(&w, 3, 20), Q::int4(&w, 3, 20)] {
        let mut out: Vec<f32> = vec![];
        matmul_t(&[], q.mat(3), &mut out);
        let empty = Q { data: vec![], scales: vec![], k: 20, int4: q.int4 };
        matmul_t(&[1.0; 40], empty.mat(0), &mut out);
    }
}

#[test]
fn a_row_gives_identical_bits_in_any_batch_and_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (n, k) = (97, 300);
    let w = rand_vec(&mut rng, n * k);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    // Activations under 2⁸ and over it take the two weight decodings of the FP8 decode kernel.
    let x1 = rand_vec(&mut rng, 11 * k);
    for (x, q) in [
        (&x1, Q::fp8(&w, n, k)),
        (&x1.iter().map(|v| v * 1000.0).collect(), Q::fp8(&w, n, k)),
        (&x1, Q::int4(&w, n, k)),
    ] {
        let x: &Vec<f32> = x;
        let mut batch = vec![0.0; 11 * n];
        matmul_t(x, q.mat(n), &mut batch);
        for r in 0..11 {
            let mut alone = vec![0.0; n];
            matmul_t(&x[r * k..(r + 1) * k], q.mat(n), &mut alone);
            assert_eq!(alone, batch[r * n..(r + 1) * n], "row {r}, int4 {}", q.int4);
        }
        for m in 1..=11 {
            let mut part = vec![0.0; m * n];
            pool.install(|| matmul_t(&x[..m * k], q.mat(n), &mut part));
            assert_eq!(part, batch[..m * n], "serial m={m}, int4 {}", q.int4);
        }
        // Column slices (rows of W) give the same bits as the whole matrix.
        let mut sub = vec![0.0; 11 * 40];
        matmul_t(x, q.mat(n).rows_range(30, 40), &mut sub);
        for r in 0..11 {
            assert_eq!(sub[r * 40..(r + 1) * 40], batch[r * n + 30..r * n + 70]);
        }
    }
}

#[test]
fn large_products_split_across_threads_match_serial() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (n, k) = (1000, 512);
    let w = rand_vec(&mut rng, n * k);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    for m in [1, 6] {
        let x = rand_vec(&mut rng, m * k);
        for q in [Q::fp8(&w, n, k), Q::int4(&w, n, k)] {
            let mut par = vec![0.0; m * n];
            matmul_t(&x, q.mat(n), &mut par);
            let mut ser = vec![0.0; m * n];
            pool.install(|| matmul_t(&x, q.mat(n), &mut ser));
            assert_eq!(par, ser);
        }
    }
}

#[test]
fn portable_and_simd_paths_agree_with_the_reference() {
    // The portable fallback (no FMA) runs here whatever the machine supports.
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let (m, n, k) = (5, 13, 300);
    let x = rand_vec(&mut rng, m * k);
    let w = rand_vec(&mut rng, n * k);
    for q in [Q::fp8(&w, n, k), Q::int4(&w, n, k)] {
        let mut out = vec![0.0; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        // SAFETY: one task writes every column of the m×n buffer.
        unsafe {
            if q.int4 {
                let rows = Int4Rows {
                    packed: &q.data,
                    scales: &q.scales,
                    row_bytes: int4_row_bytes(k),
                    row_groups: int4_row_groups(k),
                };
                cols_block(Isa::Portable, &x, rows, m, n, k, 0, n, dst);
            } else {
                cols_block(Isa::Portable, &x, Fp8Rows { codes: &q.data, scales: &q.scales, k }, m, n, k, 0, n, dst);
            }
        }
        check_close(&out, &reference(&x, &q, m, n, k), k, "portable");
    }
}

#[test]
fn fast_e4m3_decode_equals_the_table_for_every_finite_code() {
    for b in 0..=255u8 {
        let t = quant::e4m3_to_f32(b);
        if t.is_nan() {
            assert_eq!(e4m3_fast(b).abs(), 480.0);
        } else {
            assert_eq!(e4m3_fast(b).to_bits(), t.to_bits(), "code {b:#04x}");
        }
    }
}

#[test]
#[should_panic(expected = "quantized weights slice only at row boundaries")]
fn quantized_slices_must_be_whole_rows() {
    let q = Q::fp8(&[0.1; 40], 4, 10);
    let _ = q.elems().slice(5, 10);
}

/// A batch that spans several activation-row blocks and weight panels (odd rows at the
/// panel ends) gives each row the bits it has alone.
#[test]
fn batches_across_row_blocks_and_panels_keep_each_rows_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    let (m, n, k) = (70, 75, 200);
    assert!(m > ROW_BLOCK && n > panel_rows(k) && panel_rows(k).is_multiple_of(2));
    let w = rand_vec(&mut rng, n * k);
    let x = rand_vec(&mut rng, m * k);
    for q in [Q::fp8(&w, n, k), Q::int4(&w, n, k)] {
        let mut batch = vec![0.0; m * n];
        matmul_t(&x, q.mat(n), &mut batch);
        check_close(&batch, &reference(&x, &q, m, n, k), k, "batch");
        for r in [0, 1, 63, 64, 65, 69] {
            let mut alone = vec![0.0; n];
            matmul_t(&x[r * k..(r + 1) * k], q.mat(n), &mut alone);
            assert_eq!(alone, batch[r * n..(r + 1) * n], "row {r}, int4 {}", q.int4);
        }
    }
}
