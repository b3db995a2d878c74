//! FP8 e4m3 (the OCP "e4m3fn" format: no infinities, ±448 max, one NaN pattern per sign) on the
//! host: weights are quantized here before upload, and the GPU tests use it as the reference of
//! the kernels' hardware conversions (`cvt.rn.satfinite.e4m3x2.f32`: round to nearest even,
//! saturate finite values to ±448).

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Below this absmax a row counts as all zeros (the kernels use the same constant).
pub const MIN_ABSMAX: f32 = 1e-12;

/// The value of an e4m3 byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0xf);
    let mant = f32::from(b & 0x7);
    if exp == 0xf && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    let mag = if exp == 0 { mant * 2f32.powi(-9) } else { (1.0 + mant / 8.0) * 2f32.powi(exp - 7) };
    sign * mag
}

/// The nearest e4m3 byte to `x` (ties to even), saturating at ±448; NaN → 0x7f.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // Positive codes 0x00..=0x7e are increasing in value: find the first one ≥ a, then pick the
    // nearer of it and its predecessor, the even code on a tie.
    let hi = (0u8..=0x7e).find(|&c| e4m3_to_f32(c) >= a).unwrap_or(0x7e);
    if hi == 0 {
        return sign;
    }
    let lo = hi - 1;
    let (dlo, dhi) = (a - e4m3_to_f32(lo), e4m3_to_f32(hi) - a);
    let code = if dlo < dhi || (dlo == dhi && lo % 2 == 0) { lo } else { hi };
    sign | code
}

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
    fn known_codes_decode() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn every_finite_code_round_trips() {
        for c in (0u8..=0x7e).chain(0x80..=0xfe) {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(c)), c, "code {c:#04x}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        // 1.0 = 0x38, next 1.125 = 0x39: the midpoint goes to the even code 0x38.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // 1.125 = 0x39, 1.25 = 0x3a: midpoint 1.1875 → 0x3a (even).
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1.05), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-1e6), 0xfe);
        assert_eq!(f32_to_e4m3(2f32.powi(-11)), 0x00); // below half the smallest subnormal
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
    }

    #[test]
    fn row_quantization_maps_absmax_to_448() {
        let (q, s) = quantize_rows(&[1.0, -2.0, 0.5, 0.0, 0.0, 0.0], 3);
        assert_eq!(s, vec![2.0 / 448.0, 1.0]);
        assert_eq!(e4m3_to_f32(q[1]), -448.0);
        assert_eq!(e4m3_to_f32(q[0]) * s[0], 1.0);
        assert!(q[3..].iter().all(|&b| e4m3_to_f32(b) == 0.0));
    }
}
