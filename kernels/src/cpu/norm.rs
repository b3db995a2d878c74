//! RMS normalisation, as transformers' `Llama4TextRMSNorm` and `Llama4TextL2Norm` compute it:
//! `x · rsqrt(mean(x²) + eps)`, then (for the weighted form) times the weight.

/// Normalise each row of `x` (`[rows, dim]`) into `out`, scaling by `weight` when given.
pub fn rms_norm(x: &[f32], dim: usize, weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rms_norm: {} elements is not rows of {dim}", x.len());
    assert_eq!(x.len(), out.len());
    if let Some(w) = weight {
        assert_eq!(w.len(), dim, "rms_norm: weight has {} elements, want {dim}", w.len());
    }
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let inv = inv_rms(xr, eps);
        match weight {
            Some(w) => {
                for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
                    *o = (v * inv) * g;
                }
            }
            None => {
                for (o, &v) in or.iter_mut().zip(xr) {
                    *o = v * inv;
                }
            }
        }
    }
}

/// In-place weightless RMS norm over rows of `dim` (the QK-norm of Scout-style models).
pub fn rms_norm_in_place(x: &mut [f32], dim: usize, eps: f32) {
    assert!(dim > 0 && x.len().is_multiple_of(dim));
    for xr in x.chunks_exact_mut(dim) {
        let inv = inv_rms(xr, eps);
        for v in xr.iter_mut() {
            *v *= inv;
        }
    }
}

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    // f64 sum of squares: closer to the exact mean than any f32 order, so it stays within
    // rounding of whatever order the reference used.
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mean = (ss / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_rms_after_norm() {
        let x = [3.0f32, -4.0, 0.0, 5.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = [0.0; 8];
        rms_norm(&x, 4, None, 0.0, &mut out);
        for row in out.chunks(4) {
            let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            assert!((ms - 1.0).abs() < 1e-6);
        }
        let w = [2.0f32, 2.0, 2.0, 2.0];
        let mut weighted = [0.0; 8];
        rms_norm(&x, 4, Some(&w), 0.0, &mut weighted);
        for (a, b) in weighted.iter().zip(out.iter()) {
            assert_eq!(*a, 2.0 * b);
        }
    }

    #[test]
    fn in_place_equals_out_of_place() {
        let x: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.3).collect();
        let mut a = vec![0.0; 12];
        rms_norm(&x, 6, None, 1e-5, &mut a);
        let mut b = x.clone();
        rms_norm_in_place(&mut b, 6, 1e-5);
        assert_eq!(a, b);
    }
}
