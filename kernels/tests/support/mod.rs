//! What every GPU parity test binary shares: the device or a `SKIPPED` line, a fresh printed
//! seed, random inputs, NaN-poisoned outputs and the element-wise comparison.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use herd_kernels::cuda::{CudaSlice, Gpu};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Device 0, or `None` after printing `SKIPPED <test>: <why>` (scripts/gpu-check.sh fails on any
/// SKIPPED; CI, without a GPU, passes them).
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::open(0, None) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            None
        }
    }
}

/// A generator from a fresh seed, printed so that a failure can be replayed.
pub fn rng(test: &str) -> ChaCha8Rng {
    let seed: u64 = rand::random();
    println!("{test}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`.
pub fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// A device buffer of `n` NaNs: an element a kernel forgot to write fails the comparison.
pub fn nan(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.upload(&vec![f32::NAN; n]).expect("cuda")
}

/// |got - want| ≤ rel · |want| + abs, element-wise, with the worst offender in the message.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (rel * w.abs() + abs);
        assert!(!g.is_nan(), "{what}[{i}] is NaN (never written?), want {w}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}[{i}] = {} want {} (rel {rel}, abs {abs})", got[i], want[i]);
}
