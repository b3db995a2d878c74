//! The dense linear kernels (kernels/cuda/linear.cu) against an f64 host reference. Needs a CUDA
//! device: without one every test prints `SKIPPED <name>: <why>` and returns, so a pass here
//! means nothing was checked. scripts/gpu-check.sh-style runs must treat SKIPPED as a failure.
//!
//! Inputs are fresh random values each run (the seed is printed); y is poisoned with NaN before
//! each launch, and one extra row past m with a sentinel that must survive.
#![cfg(feature = "cuda")]

use herd_kernels::cuda::fp8::{e4m3_to_f32, quantize_rows};
use herd_kernels::cuda::linear::{self, LinearWeight, Route};
use herd_kernels::cuda::{CudaSlice, Gpu};
use rand::Rng;

mod support;
use support::{gpu_or_skip, randn, rng};

const MS: [usize; 6] = [1, 3, 8, 9, 64, 200];
/// (n, k): odd sizes, a Maverick-like K, and one that fits the FP8 tensor-core route.
const SHAPES: [(usize, usize); 3] = [(40, 96), (1000, 5120), (256, 64)];
const SENTINEL: f32 = 12345.0;

/// `y[i, j] = Σ_k x[i, k]·w[j, k]` in f64, with `Σ_k |x·w|` (the scale of the rounding error).
fn reference(x: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for (p, q) in xr.iter().zip(wr) {
                s += p * q;
                a += (p * q).abs();
            }
            y[i * n + j] = s;
            mag[i * n + j] = a;
        }
    }
    (y, mag)
}

/// Runs `route`, checks `|got - want| ≤ rel · mag` element-wise and that row m is untouched.
#[allow(clippy::too_many_arguments)] // the case's operands
fn check(
    gpu: &Gpu,
    what: &str,
    dx: &CudaSlice<f32>,
    m: usize,
    w: &LinearWeight,
    route: Route,
    want: &[f64],
    mag: &[f64],
    rel: f64,
) {
    let n = w.n();
    let mut host = vec![f32::NAN; m * n];
    host.extend(std::iter::repeat_n(SENTINEL, n));
    let mut dy = gpu.upload(&host).expect("cuda");
    linear::linear_via(gpu, dx, m, w, &mut dy, route).expect("cuda");
    let got = gpu.download(&dy).expect("cuda");
    let what = format!("{what} m={m} route={}", route.name());
    let mut worst = (0usize, 0.0f64);
    for i in 0..m * n {
        assert!(!got[i].is_nan(), "{what}: y[{i}] is NaN (never written?), want {}", want[i]);
        let excess = (f64::from(got[i]) - want[i]).abs() / (rel * mag[i] + 1e-30);
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 1.0,
        "{what}: y[{i}] (row {}, col {}) = {} want {} (tolerance {rel} · {})",
        i / n,
        i % n,
        got[i],
        want[i],
        mag[i]
    );
    assert!(got[m * n..].iter().all(|&v| v == SENTINEL), "{what}: wrote past row m");
}

/// f32 FMA accumulation in any order stays within a few ulps of Σ|x·w| per output; a lost or
/// doubled term (≥ Σ|x·w| / k on average) is far above this for every k tested.
const EXACT_REL: f64 = 2e-6;

/// Every route that supports `w`, for every m, against one reference.
fn all_routes(gpu: &Gpu, what: &str, x: &[f32], m: usize, w: &LinearWeight, wf: &[f64]) {
    let (n, k) = (w.n(), w.k());
    let xf: Vec<f64> = x[..m * k].iter().map(|&v| f64::from(v)).collect();
    let (want, mag) = reference(&xf, wf, m, n, k);
    let dx = gpu.upload(x).expect("cuda");
    for route in [Route::Gemv, Route::Tiled, Route::Fp8Gemm] {
        if !route.supports(w) {
            continue;
        }
        if route != Route::Fp8Gemm {
            check(gpu, what, &dx, m, w, route, &want, &mag, EXACT_REL);
            continue;
        }
        // The tensor-core route quantizes x per row to e4m3: tight against a reference built
        // from the same quantized x (exact e4m3 products, f32 sums), and within FP8 activation
        // error of the exact product.
        let (qx, sx) = quantize_rows(&x[..m * k], k);
        let xq: Vec<f64> =
            qx.iter().enumerate().map(|(i, &q)| f64::from(e4m3_to_f32(q)) * f64::from(sx[i / k])).collect();
        let (want_q, mag_q) = reference(&xq, wf, m, n, k);
        check(gpu, &format!("{what} (vs quantized x)"), &dx, m, w, route, &want_q, &mag_q, 5e-4);
        // Rounding x to 3 mantissa bits moves each term by ≤ 6.25 % of itself.
        check(gpu, &format!("{what} (vs exact x)"), &dx, m, w, route, &want, &mag, 6.25e-2);
    }
    // The default route is one of the above; run it once more through the public entry point.
    let mut dy = gpu.zeros::<f32>(m * n).expect("cuda");
    linear::linear(gpu, &dx, m, w, &mut dy).expect("cuda");
}

#[test]
fn gpu_linear_f32_weights() {
    let Some(gpu) = gpu_or_skip("gpu_linear_f32_weights") else { return };
    let mut r = rng("gpu_linear_f32_weights");
    for (n, k) in SHAPES {
        let w = randn(&mut r, n * k, 0.5);
        let wf: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
        let dw = LinearWeight::f32(&gpu, &w, n, k).expect("cuda");
        for m in MS {
            let x = randn(&mut r, m * k, 1.0);
            all_routes(&gpu, &format!("f32 [{n}, {k}]"), &x, m, &dw, &wf);
        }
    }
}

#[test]
fn gpu_linear_bf16_weights() {
    let Some(gpu) = gpu_or_skip("gpu_linear_bf16_weights") else { return };
    let mut r = rng("gpu_linear_bf16_weights");
    for (n, k) in SHAPES {
        let bits: Vec<u16> = randn(&mut r, n * k, 0.5).into_iter().map(|v| half::bf16::from_f32(v).to_bits()).collect();
        let wf: Vec<f64> = bits.iter().map(|&b| f64::from(half::bf16::from_bits(b).to_f32())).collect();
        let dw = LinearWeight::bf16(&gpu, &bits, n, k).expect("cuda");
        for m in MS {
            let x = randn(&mut r, m * k, 1.0);
            all_routes(&gpu, &format!("bf16 [{n}, {k}]"), &x, m, &dw, &wf);
        }
    }
}

#[test]
fn gpu_linear_fp8_weights() {
    let Some(gpu) = gpu_or_skip("gpu_linear_fp8_weights") else { return };
    let mut r = rng("gpu_linear_fp8_weights");
    for (n, k) in SHAPES {
        // Codes over the whole e4m3 range (subnormals included), NaN codes excluded.
        let codes: Vec<u8> = (0..n * k)
            .map(|_| {
                let c = r.random_range(0u8..0x7f);
                c | (r.random::<u8>() & 0x80)
            })
            .collect();
        let scale: Vec<f32> = (0..n).map(|_| 1e-3 + r.random::<f32>() * 1e-2).collect();
        let wf: Vec<f64> =
            codes.iter().enumerate().map(|(i, &c)| f64::from(e4m3_to_f32(c)) * f64::from(scale[i / k])).collect();
        let dw = LinearWeight::fp8(&gpu, &codes, &scale, n, k).expect("cuda");
        for m in MS {
            let x = randn(&mut r, m * k, 1.0);
            all_routes(&gpu, &format!("fp8 [{n}, {k}]"), &x, m, &dw, &wf);
        }
    }
}

#[test]
fn gpu_linear_rejects_bad_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_linear_rejects_bad_shapes") else { return };
    assert!(LinearWeight::f32(&gpu, &[0.0; 6], 2, 4).is_err());
    assert!(LinearWeight::fp8(&gpu, &[0; 8], &[1.0], 2, 4).is_err());
    let w = LinearWeight::f32(&gpu, &[0.0; 8], 2, 4).expect("cuda");
    let x = gpu.zeros::<f32>(8).expect("cuda");
    let mut y = gpu.zeros::<f32>(3).expect("cuda");
    assert!(linear::linear(&gpu, &x, 2, &w, &mut y).is_err(), "y too short");
    assert!(linear::linear(&gpu, &x, 3, &w, &mut y).is_err(), "x too short");
    assert!(linear::linear_via(&gpu, &x, 1, &w, &mut y, Route::Fp8Gemm).is_err(), "fp8 route on f32");
    // A k that is not a multiple of 4 takes the tiled kernel, even for one row.
    let w = LinearWeight::f32(&gpu, &[1.0; 6], 2, 3).expect("cuda");
    assert_eq!(linear::route(1, &w), Route::Tiled);
    let x = gpu.upload(&[1.0f32, 2.0, 3.0]).expect("cuda");
    let mut y = gpu.upload(&[f32::NAN; 2]).expect("cuda");
    linear::linear(&gpu, &x, 1, &w, &mut y).expect("cuda");
    assert_eq!(gpu.download(&y).expect("cuda"), vec![6.0, 6.0]);
}
