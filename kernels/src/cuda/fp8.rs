//! FP8 e4m3 on the host, as the GPU kernels compute it: per-row dynamic quantization with the
//! kernels' exact f32 operations, the reference of their hardware conversions
//! (`cvt.rn.satfinite.e4m3x2.f32`: round to nearest even, saturate finite values to ±448).

// One e4m3 codec for the whole crate: the CPU kernels' (`crate::quant`), tested there on every
// code, ties and saturation. Re-exported because the GPU parity tests use it as their reference.
pub use crate::quant::{FP8_E4M3_MAX as E4M3_MAX, e4m3_to_f32, f32_to_e4m3};

/// Below this absmax a row counts as all zeros (the kernels use the same constant).
pub const MIN_ABSMAX: f32 = 1e-12;

/// Per-row dynamic quantization with the kernels' exact f32 operations:
/// `scale = absmax / 448`, `q = e4m3(x · (448 / absmax))`. `x`: `[rows, cols]` →
/// (`[rows, cols]` bytes, `[rows]` scales). An all-zero row gets scale 1.
pub fn quantize_rows(x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / cols.max(1));
    for row in x.chunks_exact(cols) {
        let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let zero = m < MIN_ABSMAX;
        let inv = if zero { 0.0 } else { E4M3_MAX / m };
        scales.push(if zero { 1.0 } else { m / E4M3_MAX });
        q.extend(row.iter().map(|v| f32_to_e4m3(v * inv)));
    }
    (q, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_quantization_maps_absmax_to_448() {
        let (q, s) = quantize_rows(&[1.0, -2.0, 0.5, 0.0, 0.0, 0.0], 3);
        assert_eq!(s, vec![2.0 / 448.0, 1.0]);
        assert_eq!(e4m3_to_f32(q[1]), -448.0);
        assert_eq!(e4m3_to_f32(q[0]) * s[0], 1.0);
        assert!(q[3..].iter().all(|&b| e4m3_to_f32(b) == 0.0));
    }
}
