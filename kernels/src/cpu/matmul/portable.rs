//! Plain-Rust matmul kernels for CPUs without AVX2+FMA: one output element at a time, in
//! the accumulation order the module documents (products rounded, not fused).

use super::Job;
use crate::cpu::simd::Widen;

/// The fixed tree over the eight lane accumulators (the same one the AVX2 kernel's
/// horizontal sum performs).
#[inline(always)]
pub(super) fn tree8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `x · Wᵀ` for columns `[j0, j1)`.
///
/// # Safety
/// `job.dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
pub(super) unsafe fn block_nk<W: Widen>(job: Job<'_, W>, j0: usize, j1: usize) {
    let Job { x, w, m, n, k, dst } = job;
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in j0..j1 {
            let wr = &w[j * k..(j + 1) * k];
            let mut acc = [0.0f32; 8];
            let (xc, xt) = xr.as_chunks::<8>();
            let (wc, wt) = wr.as_chunks::<8>();
            for (xv, wv) in xc.iter().zip(wc) {
                for l in 0..8 {
                    acc[l] += xv[l] * wv[l].widen();
                }
            }
            // The last partial group: lanes past the end would only add 0·0.
            for (l, (xv, wv)) in xt.iter().zip(wt).enumerate() {
                acc[l] += xv * wv.widen();
            }
            // SAFETY: (i, j) lies in this task's column block of the m×n output.
            unsafe { *dst.0.add(i * n + j) = tree8(acc) };
        }
    }
}

/// `x · W` (W input-major) for columns `[j0, j1)`.
///
/// # Safety
/// `job.dst` points to an `m * n` buffer and no other thread writes columns `[j0, j1)`.
pub(super) unsafe fn block_kn<W: Widen>(job: Job<'_, W>, j0: usize, j1: usize) {
    let Job { x, w, m, n, k, dst } = job;
    let width = j1 - j0;
    let mut acc = vec![0.0f32; width];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        acc.fill(0.0);
        // Row p of W is contiguous over the columns, so stream it; each column's sum still
        // runs over p in increasing order.
        for (p, &xv) in xr.iter().enumerate() {
            for (a, wv) in acc.iter_mut().zip(&w[p * n + j0..p * n + j1]) {
                *a += xv * wv.widen();
            }
        }
        for (c, &v) in acc.iter().enumerate() {
            // SAFETY: (i, j0 + c) lies in this task's column block of the m×n output.
            unsafe { *dst.0.add(i * n + j0 + c) = v };
        }
    }
}
