//! Matrix products with f32 activations and weights in their stored dtype.
//!
//! Two layouts appear in Llama 4 checkpoints:
//! - [`matmul_t`]: `W` is `[n, k]` (nn.Linear, output-major): `out = x · Wᵀ`.
//! - [`matmul`]: `W` is `[k, n]` (the fused expert tensors, input-major): `out = x · W`.
//!
//! Both are used in their stored layout (weights are memory-mapped; a transposed copy
//! would double their memory). The input-major layout is in fact the natural one for a
//! register-tiled kernel: a row of `W` is contiguous over output columns, so each weight
//! vector is multiplied by a broadcast activation and no horizontal sum is needed.
//!
//! # Accumulation order (the batch-invariance contract)
//!
//! The order of the floating-point operations for output element `(i, j)` depends only on
//! `k` and the instruction set, never on `m`, on the tile a kernel puts `(i, j)` in, or on
//! the threads:
//! - `matmul_t`: eight lane accumulators, lane `l` summing products `p ≡ l (mod 8)` in
//!   increasing `p` (a last partial group of eight is zero-padded), then the fixed tree
//!   `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
//! - `matmul`: one accumulator summing the products in increasing `p`.
//!
//! The AVX2 kernels fuse each multiply-add; the portable ones round the product first. So a
//! row's result is bit-identical whatever batch it is computed in, which is what lets a
//! distributed run equal a local one.
//!
//! # Work split
//!
//! Threads split the output columns (`W` rows or columns), so each thread streams a disjoint
//! part of the weights — the part of decode that is memory-bound. Products under
//! [`SERIAL_WORK`](super::parallel) multiply-adds stay on the calling thread.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;
#[cfg(test)]
mod tests;

use super::parallel::{SERIAL_WORK, SharedOut, block_size};
use super::simd::{Isa, Widen, isa};
use crate::tensor::{Elems, MatRef};
use rayon::prelude::*;

/// `out[m, n] = x[m, k] · W[n, k]ᵀ`, where `m = x.len() / k`.
pub fn matmul_t(x: &[f32], w: MatRef<'_>, out: &mut [f32]) {
    matmul_t_many(x, &mut [(w, out)]);
}

/// Several products of the same activations, `out_i = x · W_iᵀ` (q/k/v, or a router and
/// the gate/up of a shared expert), in one parallel region. At decode each product streams a
/// few megabytes at most, so a region per product would spend a pool wake-up and a join on
/// each; one region over the column blocks of all of them spends one. Every output element
/// is computed exactly as [`matmul_t`] alone computes it.
pub fn matmul_t_many(x: &[f32], products: &mut [(MatRef<'_>, &mut [f32])]) {
    let Some((first, _)) = products.first() else { return };
    let k = first.cols;
    assert!(k > 0 && x.len().is_multiple_of(k), "matmul_t: x has {} elements, not a multiple of k={k}", x.len());
    let m = x.len() / k;
    let mut work = 0;
    for (w, out) in products.iter() {
        assert_eq!(w.cols, k, "matmul_t_many: every weight must have k={k} columns, one has {}", w.cols);
        assert_eq!(out.len(), m * w.rows, "matmul_t: out is {} elements, want {m}x{}", out.len(), w.rows);
        work += m * w.rows * k;
    }
    if m == 0 {
        return;
    }
    // Column blocks of every product: whole register tiles (8 columns for decode, 24 for
    // batches: the 3-wide float tile and the 4-row quantized decode tile both divide them).
    let align = if m == 1 { 8 } else { 24 };
    let mut blocks: Vec<(usize, usize, usize)> = Vec::new(); // (product, j0, j1)
    for (i, (w, _)) in products.iter().enumerate() {
        let n = w.rows;
        let nb = if work < SERIAL_WORK { n.max(1) } else { block_size(n, align, m * n * k) };
        blocks.extend((0..n).step_by(nb.max(1)).map(|j0| (i, j0, (j0 + nb).min(n))));
    }
    let jobs: Vec<(MatRef<'_>, SharedOut)> =
        products.iter_mut().map(|(w, out)| (*w, SharedOut(out.as_mut_ptr()))).collect();
    let isa = isa();
    let run = |&(i, j0, j1): &(usize, usize, usize)| {
        let (w, dst) = jobs[i];
        // SAFETY: each block writes only columns [j0, j1) of its own product's output; blocks
        // are disjoint, and the outputs (borrowed mutably for this call) outlive the region.
        unsafe { cols_t(isa, x, w, m, dst, j0, j1) }
    };
    if blocks.len() == 1 || work < SERIAL_WORK {
        blocks.iter().for_each(run);
    } else {
        blocks.par_iter().for_each(run);
    }
}

/// Columns `[j0, j1)` of `x · Wᵀ` into the `[m, w.rows]` buffer at `dst`, by weight dtype.
///
/// # Safety
/// `dst` points to an `m * w.rows` buffer of which no other thread writes columns `[j0, j1)`.
unsafe fn cols_t(isa: Isa, x: &[f32], w: MatRef<'_>, m: usize, dst: SharedOut, j0: usize, j1: usize) {
    let (n, k) = (w.rows, w.cols);
    // SAFETY (all arms): forwarded from the caller.
    unsafe {
        match w.elems {
            Elems::F32(ws) => run_block(isa, Layout::NK, Job { x, w: ws, m, n, k, dst }, j0, j1),
            Elems::Bf16(ws) => run_block(isa, Layout::NK, Job { x, w: ws, m, n, k, dst }, j0, j1),
            Elems::F16(ws) => run_block(isa, Layout::NK, Job { x, w: ws, m, n, k, dst }, j0, j1),
            Elems::F8E4M3 { codes, scales, .. } => {
                super::matmul_q::fp8_cols(isa, x, codes, scales, m, n, k, j0, j1, dst)
            }
            Elems::Int4 { packed, scales, .. } => {
                super::matmul_q::int4_cols(isa, x, packed, scales, m, n, k, j0, j1, dst)
            }
        }
    }
}

/// `out[m, n] = x[m, k] · W[k, n]`, where `m = x.len() / k`.
pub fn matmul(x: &[f32], w: MatRef<'_>, out: &mut [f32]) {
    let (k, n) = (w.rows, w.cols);
    assert!(k > 0 && x.len().is_multiple_of(k), "matmul: x has {} elements, not a multiple of k={k}", x.len());
    let m = x.len() / k;
    assert_eq!(out.len(), m * n, "matmul: out is {} elements, want {m}x{n}", out.len());
    match w.elems {
        Elems::F32(ws) => split(Layout::KN, x, ws, m, n, k, out),
        Elems::Bf16(ws) => split(Layout::KN, x, ws, m, n, k, out),
        Elems::F16(ws) => split(Layout::KN, x, ws, m, n, k, out),
        // Quantized scales belong to output rows of an output-major [n, k] matrix.
        Elems::F8E4M3 { .. } | Elems::Int4 { .. } => panic!("matmul: quantized weights are [n, k]; use matmul_t"),
    }
}

/// How `W` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `[n, k]`: output-major (nn.Linear).
    NK,
    /// `[k, n]`: input-major (fused experts).
    KN,
}

/// A column range of one product, for one thread. `dst` is the `[m, n]` output.
#[derive(Clone, Copy)]
struct Job<'a, W> {
    x: &'a [f32], // [m, k]
    w: &'a [W],   // [n, k] or [k, n]
    m: usize,
    n: usize,
    k: usize,
    dst: SharedOut,
}

/// Split the output columns over the pool and run each block with the best kernel.
fn split<W: Widen>(layout: Layout, x: &[f32], w: &[W], m: usize, n: usize, k: usize, out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    // Blocks are whole register tiles: 8 columns for decode, 24 (the 3-wide nn.Linear tile
    // and the 8-wide expert tile both divide it) for batches.
    let align = if m == 1 { 8 } else { 24 };
    let mut nb = block_size(n, align, m * n * k);
    if m == 1 && layout == Layout::KN && nb < n {
        // Decode of an input-major matrix walks every weight row: one contiguous column
        // range per thread keeps each row's part one long run.
        nb = n.div_ceil(rayon::current_num_threads()).next_multiple_of(align);
    }
    let job = Job { x, w, m, n, k, dst: SharedOut(out.as_mut_ptr()) };
    let isa = isa();
    let run = |j0: usize| {
        let j1 = (j0 + nb).min(n);
        // SAFETY: this task writes only columns [j0, j1) of `out`; blocks are disjoint, and
        // `out` (borrowed mutably for this call) outlives the parallel region.
        unsafe { run_block(isa, layout, job, j0, j1) }
    };
    if nb >= n {
        run(0);
    } else {
        (0..n.div_ceil(nb)).into_par_iter().for_each(|b| run(b * nb));
    }
}

/// # Safety
/// `job.dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
unsafe fn run_block<W: Widen>(isa: Isa, layout: Layout, job: Job<'_, W>, j0: usize, j1: usize) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2Fma | Isa::Avx512) {
        // SAFETY: AVX2, FMA and F16C were detected at run time; the rest is forwarded.
        return unsafe {
            match layout {
                Layout::NK => avx2::block_nk(job, j0, j1),
                Layout::KN => avx2::block_kn(job, j0, j1),
            }
        };
    }
    let _ = isa;
    // SAFETY: forwarded from the caller.
    unsafe {
        match layout {
            Layout::NK => portable::block_nk(job, j0, j1),
            Layout::KN => portable::block_kn(job, j0, j1),
        }
    }
}
