//! GPU kernels against the CPU reference (the spec). Needs a CUDA device: on a machine without
//! one every test prints `SKIPPED <name>: <why>` and returns, so a pass here means nothing was
//! checked. scripts/gpu-check.sh runs this binary on a GPU machine and fails on any SKIPPED.
//!
//! Inputs are fresh random values each run (the seed is printed); outputs are poisoned (NaN /
//! e4m3 NaN) before each launch so that an element the kernel forgot to write fails the check.
#![cfg(feature = "cuda")]

use herd_kernels::cpu::{norm, rope};
use herd_kernels::cuda::fp8::{e4m3_to_f32, quantize_rows};
use herd_kernels::cuda::{Gpu, MoeGemmKernel, moe, norm as gnorm};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

mod support;
use support::{assert_close, gpu_or_skip, randn, rng};

#[test]
fn gpu_quant_dispatch_matches_host_quantization() {
    let Some(gpu) = gpu_or_skip("gpu_quant_dispatch_matches_host_quantization") else { return };
    let mut r = rng("gpu_quant_dispatch");
    let (tokens, hidden, routes) = (23, 5120, 40);
    let x = randn(&mut r, tokens * hidden, 3.0);
    let route_token: Vec<i32> = (0..routes).map(|_| r.random_range(0..tokens as i32)).collect();
    let route_score: Vec<f32> = (0..routes).map(|_| r.random::<f32>()).collect();
    let mut scaled = Vec::new();
    for (&t, &s) in route_token.iter().zip(&route_score) {
        scaled.extend(x[t as usize * hidden..(t as usize + 1) * hidden].iter().map(|v| v * s));
    }
    let (q_ref, s_ref) = quantize_rows(&scaled, hidden);

    let (dx, dt, ds) = (
        gpu.upload(&x).expect("cuda"),
        gpu.upload(&route_token).expect("cuda"),
        gpu.upload(&route_score).expect("cuda"),
    );
    let mut dq = gpu.upload(&vec![0x7fu8; routes * hidden]).expect("cuda");
    let mut dsc = gpu.upload(&vec![f32::NAN; routes]).expect("cuda");
    moe::quant_dispatch(&gpu, &dx, hidden, &dt, &ds, &mut dq, &mut dsc).expect("cuda");
    let (q, s) = (gpu.download(&dq).expect("cuda"), gpu.download(&dsc).expect("cuda"));
    assert_close("a_scale", &s, &s_ref, 0.0, 0.0);
    // Same f32 operations and the same rounding: the bytes must agree exactly.
    let diff = q.iter().zip(&q_ref).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{diff} of {} e4m3 bytes differ from the host conversion", q.len());
}

/// Random e4m3 operands with row scales: (bytes, scales).
fn fp8_matrix(r: &mut ChaCha8Rng, rows: usize, cols: usize, groups: usize) -> (Vec<u8>, Vec<f32>) {
    let x = randn(r, rows * cols, 1.0);
    let (q, _) = quantize_rows(&x, cols);
    let s: Vec<f32> = (0..rows * groups).map(|_| 0.01 + r.random::<f32>() * 0.02).collect();
    (q, s)
}

/// f64 reference of the grouped GEMM: out[r][n] = sw[e,n]·Σ_g sa[r,g]·Σ_k A·W, and beside it
/// the same sum over |terms| (the L1 norm that bounds the tensor cores' rounding, see
/// [`mma_tol`]).
#[allow(clippy::too_many_arguments)] // the GEMM's operands, as the kernel takes them
fn gemm_ref(
    a: &[u8],
    sa: &[f32],
    kgroups: usize,
    w: &[u8],
    sw: &[f32],
    counts: &[usize],
    n: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows: usize = counts.iter().sum();
    let mut out = vec![0.0f32; rows * n];
    let mut l1 = vec![0.0f32; rows * n];
    let gk = k / kgroups;
    let mut row = 0;
    for (e, &c) in counts.iter().enumerate() {
        for _ in 0..c {
            for j in 0..n {
                let wrow = &w[(e * n + j) * k..(e * n + j + 1) * k];
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for g in 0..kgroups {
                    let (mut part, mut part_abs) = (0.0f64, 0.0f64);
                    for kk in g * gk..(g + 1) * gk {
                        let p = f64::from(e4m3_to_f32(a[row * k + kk])) * f64::from(e4m3_to_f32(wrow[kk]));
                        part += p;
                        part_abs += p.abs();
                    }
                    acc += part * f64::from(sa[row * kgroups + g]);
                    abs += part_abs * f64::from(sa[row * kgroups + g]).abs();
                }
                out[row * n + j] = (acc * f64::from(sw[e * n + j])) as f32;
                l1[row * n + j] = (abs * f64::from(sw[e * n + j]).abs()) as f32;
            }
            row += 1;
        }
    }
    (out, l1)
}

/// Per-element tolerance of a grouped FP8 GEMM result: f32 summation-order noise (1e-4 relative,
/// 1e-5 of the largest magnitude) plus 2^-11 of the L1 norm of its terms. The last is for
/// Hopper's FP8 tensor cores (wgmma, the sm_90a kernels): within an instruction they add the
/// products aligned to the largest exponent with ~14 significant bits (truncated), not in f32 —
/// the reason the kernels promote partial sums to f32 every 128 K. Measured on an H100 (first
/// sm_90a run, 2026-11-27): worst errors 2^-14.5 (K = 512) and 2^-14.9 (K = 320) of the L1 norm
/// with one scale group, 2^-18.3 at K = 8192 with groups of 64; an indexing bug errs by ~|want|.
/// The mma.sync kernels accumulate in f32, so theirs is only summation-order noise (2^-16 of
/// the L1 norm covers √K·ε for K up to 2^16).
fn mma_tol(kernel: MoeGemmKernel, want: &[f32], l1: &[f32]) -> Vec<f32> {
    let mag = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let l1_share = match kernel {
        MoeGemmKernel::Sm90 => 2f32.powi(-11),
        MoeGemmKernel::Mma => 2f32.powi(-16),
    };
    want.iter().zip(l1).map(|(w, l)| 1e-4 * w.abs() + 1e-5 * mag + l * l1_share).collect()
}

/// |got - want| ≤ tol, element-wise, with the worst offender in the message.
fn assert_within(what: &str, got: &[f32], want: &[f32], tol: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0usize, 0.0f32);
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(!g.is_nan(), "{what}[{i}] is NaN (never written?), want {w}");
        if (g - w).abs() - t > worst.1 {
            worst = (i, (g - w).abs() - t);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}[{i}] = {} want {} (tolerance {})", got[i], want[i], tol[i]);
}

#[test]
fn gpu_grouped_gemm_down_matches_reference() {
    let Some(gpu) = gpu_or_skip("gpu_grouped_gemm_down_matches_reference") else { return };
    let mut r = rng("gpu_grouped_gemm_down");
    // Empty experts, a single row, exactly one tile, one past a tile, several tiles.
    let counts = [0usize, 1, 64, 65, 0, 130, 7];
    for kgroups in [1, 4] {
        check_down(&gpu, &mut r, &counts, 256, 512, kgroups);
    }
}

#[test]
fn gpu_grouped_gemm_swiglu_requant_matches_reference() {
    let Some(gpu) = gpu_or_skip("gpu_grouped_gemm_swiglu_requant_matches_reference") else { return };
    let mut r = rng("gpu_grouped_gemm_swiglu");
    check_swiglu(&gpu, &mut r, &[3, 0, 64, 100], 256, 320, 1);
}

/// One grouped down GEMM (f32 out) against [`gemm_ref`].
fn check_down(gpu: &Gpu, r: &mut ChaCha8Rng, counts: &[usize], n: usize, k: usize, kgroups: usize) {
    let rows: usize = counts.iter().sum();
    let (a, sa) = fp8_matrix(r, rows, k, kgroups);
    let (w, _) = fp8_matrix(r, counts.len() * n, k, 1);
    let sw: Vec<f32> = (0..counts.len() * n).map(|_| 0.5 + r.random::<f32>()).collect();
    let (want, l1) = gemm_ref(&a, &sa, kgroups, &w, &sw, counts, n, k);
    let experts = moe::Fp8Experts::upload(gpu, &w, &sw, counts.len(), n, k).expect("cuda");
    let groups = moe::Groups::from_counts(gpu, counts).expect("cuda");
    let (da, dsa) = (gpu.upload(&a).expect("cuda"), gpu.upload(&sa).expect("cuda"));
    for kernel in kernels(gpu) {
        gpu.set_moe_gemm(kernel).expect("kernel choice");
        let mut dy = gpu.upload(&vec![f32::NAN; rows * n]).expect("cuda");
        moe::gemm(gpu, &da, &dsa, kgroups, &experts, &groups, &mut dy).expect("cuda");
        let got = gpu.download(&dy).expect("cuda");
        let what = format!("{kernel:?} y ({counts:?}, n {n}, k {k}, kgroups {kgroups})");
        assert_within(&what, &got, &want, &mma_tol(kernel, &want, &l1));
    }
    gpu.set_moe_gemm(MoeGemmKernel::default()).expect("kernel choice");
}

/// Every implementation of the grouped GEMMs this device runs.
fn kernels(gpu: &Gpu) -> Vec<MoeGemmKernel> {
    if gpu.arch() == "sm_90a" { vec![MoeGemmKernel::Mma, MoeGemmKernel::Sm90] } else { vec![MoeGemmKernel::Mma] }
}

/// One grouped gate_up GEMM with the SwiGLU epilogue against [`gemm_ref`] + the CPU SwiGLU.
fn check_swiglu(gpu: &Gpu, r: &mut ChaCha8Rng, counts: &[usize], width: usize, k: usize, kgroups: usize) {
    let rows: usize = counts.iter().sum();
    let (a, sa) = fp8_matrix(r, rows, k, kgroups);
    let (w, _) = fp8_matrix(r, counts.len() * 2 * width, k, 1);
    let sw: Vec<f32> = (0..counts.len() * 2 * width).map(|_| 0.5 + r.random::<f32>()).collect();
    let (gu, l1) = gemm_ref(&a, &sa, kgroups, &w, &sw, counts, 2 * width, k);
    let mut h = vec![0.0f32; rows * width];
    herd_kernels::cpu::activation::swiglu_fused(&gu, width, &mut h);
    // How far h may move with gate and up inside their GEMM tolerance (|silu'| < 1.1).
    let h_err_of = |kernel| {
        let gu_tol = mma_tol(kernel, &gu, &l1);
        (0..rows * width)
            .map(|i| {
                let (r, c) = (i / width, i % width);
                let (g, u) = (gu[r * 2 * width + c], gu[r * 2 * width + width + c]);
                let (tg, tu) = (gu_tol[r * 2 * width + c], gu_tol[r * 2 * width + width + c]);
                (g / (1.0 + (-g).exp())).abs() * tu + 1.1 * (u.abs() + tu) * tg
            })
            .collect::<Vec<f32>>()
    };
    let experts = moe::Fp8Experts::upload(gpu, &w, &sw, counts.len(), 2 * width, k).expect("cuda");
    let groups = moe::Groups::from_counts(gpu, counts).expect("cuda");
    let (da, dsa) = (gpu.upload(&a).expect("cuda"), gpu.upload(&sa).expect("cuda"));
    let ng = width / moe::H_GROUP;
    for kernel in kernels(gpu) {
        gpu.set_moe_gemm(kernel).expect("kernel choice");
        let h_err = h_err_of(kernel);
        let mut dh = gpu.upload(&vec![0x7fu8; rows * width]).expect("cuda");
        let mut dhs = gpu.upload(&vec![f32::NAN; rows * ng]).expect("cuda");
        moe::gemm_swiglu(gpu, &da, &dsa, kgroups, &experts, &groups, &mut dh, &mut dhs).expect("cuda");
        let (hq, hs) = (gpu.download(&dh).expect("cuda"), gpu.download(&dhs).expect("cuda"));
        let got: Vec<f32> = hq
            .iter()
            .enumerate()
            .map(|(i, &b)| e4m3_to_f32(b) * hs[(i / width) * ng + (i % width) / moe::H_GROUP])
            .collect();
        // Each group's scale is its absmax / 448, so the quantization error is at most half an e4m3
        // step: 2^-4 relative for normals, 2^-10 · 448 · scale absolute for subnormals; on top, h's
        // own tolerance (h_err) from the GEMM.
        let want_scales: Vec<f32> =
            h.chunks_exact(moe::H_GROUP).map(|g| g.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 448.0).collect();
        let scale_tol: Vec<f32> = want_scales
            .iter()
            .zip(h_err.chunks_exact(moe::H_GROUP))
            .map(|(s, d)| 1e-4 * s + d.iter().fold(0.0f32, |m, &v| m.max(v)) / 448.0)
            .collect();
        let what = format!("{kernel:?} ({counts:?}, width {width}, k {k}, kgroups {kgroups})");
        assert_within(&format!("h_scale {what}"), &hs, &want_scales, &scale_tol);
        let max_scale = want_scales.iter().fold(0.0f32, |m, &v| m.max(v));
        let h_tol: Vec<f32> = h
            .iter()
            .zip(&h_err)
            .map(|(v, d)| (0.0625 + 1e-4) * v.abs() + max_scale * 2f32.powi(-9) + 1.07 * d)
            .collect();
        assert_within(&format!("h {what}"), &got, &h, &h_tol);
    }
    gpu.set_moe_gemm(MoeGemmKernel::default()).expect("kernel choice");
}

/// The tile edges of the sm_90a kernels (128-row tiles of two 64-row halves, 128-byte K stages)
/// and of the mma.sync ones: 63/64/65, 127/128/129 and 200 rows; K a multiple of 64 but not of
/// 128; activation-scale groups of 64 (two promotions per K stage) and of 128.
#[test]
fn gpu_grouped_gemm_tile_edges_match_reference() {
    let Some(gpu) = gpu_or_skip("gpu_grouped_gemm_tile_edges_match_reference") else { return };
    let mut r = rng("gpu_grouped_gemm_tile_edges");
    let counts = [63usize, 0, 128, 1, 129, 200, 64, 127, 65];
    for (k, kgroups) in [(320, 1), (320, 5), (512, 8), (512, 4)] {
        check_down(&gpu, &mut r, &counts, 128, k, kgroups);
    }
    for (k, kgroups) in [(384, 1), (384, 6), (256, 2)] {
        check_swiglu(&gpu, &mut r, &counts, 128, k, kgroups);
    }
}

/// Maverick's K (hidden 5120 for gate_up with per-row scales; width 8192 for down with one
/// scale per 64 columns of h) at a few rows, so that the pipeline wraps its stages many times.
#[test]
fn gpu_grouped_gemm_maverick_k_matches_reference() {
    let Some(gpu) = gpu_or_skip("gpu_grouped_gemm_maverick_k_matches_reference") else { return };
    let mut r = rng("gpu_grouped_gemm_maverick_k");
    let counts = [3usize, 0, 70, 1];
    check_down(&gpu, &mut r, &counts, 128, 8192, 8192 / moe::H_GROUP);
    check_swiglu(&gpu, &mut r, &counts, 128, 5120, 1);
}

#[test]
fn gpu_combine_matches_cpu_sum() {
    let Some(gpu) = gpu_or_skip("gpu_combine_matches_cpu_sum") else { return };
    let mut r = rng("gpu_combine");
    let (tokens, hidden, top_k, routes) = (9, 512, 2, 14);
    let shared = randn(&mut r, tokens * hidden, 1.0);
    let y = randn(&mut r, routes * hidden, 1.0);
    let token_routes: Vec<i32> =
        (0..tokens * top_k).map(|i| if i % 5 == 4 { -1 } else { r.random_range(0..routes as i32) }).collect();
    let mut want = shared.clone();
    for t in 0..tokens {
        for j in 0..top_k {
            let rt = token_routes[t * top_k + j];
            if rt >= 0 {
                for c in 0..hidden {
                    want[t * hidden + c] += y[rt as usize * hidden + c];
                }
            }
        }
    }
    let (ds, dy, dr) =
        (gpu.upload(&shared).expect("cuda"), gpu.upload(&y).expect("cuda"), gpu.upload(&token_routes).expect("cuda"));
    let mut dout = gpu.upload(&vec![f32::NAN; tokens * hidden]).expect("cuda");
    moe::combine(&gpu, Some(&ds), &dy, &dr, &mut dout, hidden, top_k).expect("cuda");
    // Same order of f32 additions as above: exact.
    assert_close("combine", &gpu.download(&dout).expect("cuda"), &want, 0.0, 0.0);
}

#[test]
fn gpu_rms_norm_and_rope_qk_norm_match_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_rms_norm_and_rope_qk_norm_match_cpu") else { return };
    let mut r = rng("gpu_norm_rope");
    let (tokens, hidden, heads, d, eps) = (5, 5120, 8, 128, 1e-5);
    let x = randn(&mut r, tokens * hidden, 2.0);
    let weight = randn(&mut r, hidden, 1.0);
    let mut want = vec![0.0f32; x.len()];
    norm::rms_norm(&x, hidden, Some(&weight), eps, &mut want);
    let (dx, dw) = (gpu.upload(&x).expect("cuda"), gpu.upload(&weight).expect("cuda"));
    let mut dout = gpu.upload(&vec![f32::NAN; x.len()]).expect("cuda");
    gnorm::rms_norm(&gpu, &dx, Some(&dw), &mut dout, hidden, eps).expect("cuda");
    assert_close("rms_norm", &gpu.download(&dout).expect("cuda"), &want, 1e-5, 1e-6);

    let freqs = rope::RopeFreqs::new(d, 500000.0, None);
    let positions: Vec<usize> = (0..tokens).map(|_| r.random_range(0..100_000)).collect();
    let (cos, sin) = freqs.table(&positions);
    for qk_norm in [false, true] {
        let q = randn(&mut r, tokens * heads * d, 1.0);
        let mut want = q.clone();
        rope::apply_rope(&mut want, heads, d, &cos, &sin);
        if qk_norm {
            norm::rms_norm_in_place(&mut want, d, eps);
        }
        let mut dq = gpu.upload(&q).expect("cuda");
        let (dc, dsn) = (gpu.upload(&cos).expect("cuda"), gpu.upload(&sin).expect("cuda"));
        gnorm::rope_qk_norm(&gpu, &mut dq, Some((&dc, &dsn)), tokens, heads, d, qk_norm, eps).expect("cuda");
        assert_close(&format!("rope (qk_norm {qk_norm})"), &gpu.download(&dq).expect("cuda"), &want, 1e-5, 1e-6);
    }
}
