//! Quantized weight formats: FP8 e4m3 with one scale per output channel, and int4 with one
//! scale per group of [`INT4_GROUP`] inputs. Encoding, decoding and the row quantizers.
//!
//! Both formats quantize an nn.Linear weight `W[n, k]` (output-major) row by row:
//!
//! - **FP8** (Meta's `Llama-4-Maverick-…-FP8` scheme, compressed-tensors "channel"):
//!   `W[o, :] ≈ e4m3(codes[o, :]) · scale[o]` with `scale[o] = max|W[o, :]| / 448`. Codes are
//!   e4m3fn bytes (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities, NaN
//!   only at `0x7F`/`0xFF`); the encoder rounds to nearest-even and saturates at ±448, so
//!   finite input never gives NaN.
//! - **int4** (symmetric, group-wise, herd's own layout): row `o` is cut into groups of
//!   [`INT4_GROUP`] inputs, the last one possibly shorter when `k % 128 != 0`. Group `g` has
//!   `scale[o, g] = max|group| / 7` and `q = clamp(round(w / scale), -8, 7)`, so the largest
//!   magnitude is exact-ish (±7·scale) and the error is at most `scale / 2`. Values are stored
//!   offset-binary (`q + 8`) as nibbles, two per byte, the even input in the low nibble; a row
//!   of `k` inputs takes `ceil(k / 2)` bytes (an odd `k` leaves the last high nibble 0). For a
//!   `k` divisible by 8 the bytes equal compressed-tensors' little-endian int32 packing.
//!   Dequantised weights are `f32(q) · scale` rounded once to f32.
//!
//! An all-zero row (fp8) or group (int4) gets scale 0 and codes for zero.

/// Largest finite e4m3fn magnitude.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// Inputs per int4 scale group.
pub const INT4_GROUP: usize = 128;

/// Largest positive int4 value; the scale maps a group's max magnitude onto it.
const INT4_QMAX: f32 = 7.0;

/// Every e4m3fn byte decoded to f32 (exact; NaN at `0x7F` and `0xFF`).
pub static E4M3_TO_F32: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut b = 0;
    while b < 256 {
        let exp = (b >> 3) & 0xF;
        let man = b & 0x7;
        let mag = if exp == 0xF && man == 0x7 {
            f32::NAN
        } else if exp == 0 {
            // Subnormal: man · 2⁻⁹.
            man as f32 / 512.0
        } else {
            // (1 + man/8) · 2^(exp − 7), built from the f32 bit pattern.
            f32::from_bits((((exp + 120) as u32) << 23) | ((man as u32) << 20))
        };
        t[b] = if b & 0x80 != 0 { -mag } else { mag };
        b += 1;
    }
    t
}

/// Decode one e4m3fn byte.
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_TO_F32[b as usize]
}

/// Encode `v` as e4m3fn: round to nearest, ties to even; magnitudes ≥ 448 saturate to ±448;
/// NaN gives `0x7F`.
pub fn f32_to_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a >= FP8_E4M3_MAX {
        return sign | 0x7E;
    }
    const MIN_NORMAL: f32 = 1.0 / 64.0; // 2⁻⁶
    if a < MIN_NORMAL {
        // Subnormal step 2⁻⁹; scaling by 512 is exact, and m = 8 is the smallest normal (0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // a = 2^e · f with f in [1, 2); 2^e is exact, so f and the mantissa steps are too.
    let e = ((a.to_bits() >> 23) as i32) - 127;
    let f = a / f32::from_bits(((e + 127) as u32) << 23);
    let mut m = ((f - 1.0) * 8.0).round_ties_even() as u32;
    let mut e = e;
    if m == 8 {
        m = 0;
        e += 1;
    }
    // a < 448 keeps (e, m) at or below (8, 6), the largest finite code.
    sign | (((e + 7) as u8) << 3) | m as u8
}

/// Errors of the row quantizers (shape disagreements).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{what} has {got} elements, expected {want} for a {rows}x{cols} matrix")]
    Length { what: &'static str, got: usize, want: usize, rows: usize, cols: usize },
}

fn check(what: &'static str, got: usize, want: usize, rows: usize, cols: usize) -> Result<(), QuantError> {
    if got == want { Ok(()) } else { Err(QuantError::Length { what, got, want, rows, cols }) }
}

/// Quantize `w[rows, cols]` to FP8 codes `[rows, cols]` and scales `[rows]`.
pub fn quantize_fp8(
    w: &[f32],
    rows: usize,
    cols: usize,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<(), QuantError> {
    check("weights", w.len(), rows * cols, rows, cols)?;
    check("fp8 codes", codes.len(), rows * cols, rows, cols)?;
    check("fp8 scales", scales.len(), rows, rows, cols)?;
    if cols == 0 {
        scales.fill(0.0);
        return Ok(());
    }
    for ((row, out), scale) in w.chunks_exact(cols).zip(codes.chunks_exact_mut(cols)).zip(scales.iter_mut()) {
        let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *scale = max / FP8_E4M3_MAX;
        if *scale == 0.0 {
            out.fill(0);
            continue;
        }
        for (o, v) in out.iter_mut().zip(row) {
            *o = f32_to_e4m3(v / *scale);
        }
    }
    Ok(())
}

/// Packed bytes of one int4 row of `cols` inputs.
pub fn int4_row_bytes(cols: usize) -> usize {
    cols.div_ceil(2)
}

/// Scale groups of one int4 row of `cols` inputs (the last may be partial).
pub fn int4_row_groups(cols: usize) -> usize {
    cols.div_ceil(INT4_GROUP)
}

/// Quantize `w[rows, cols]` to int4: `packed[rows, ceil(cols/2)]`, `scales[rows, ceil(cols/128)]`.
pub fn quantize_int4(
    w: &[f32],
    rows: usize,
    cols: usize,
    packed: &mut [u8],
    scales: &mut [f32],
) -> Result<(), QuantError> {
    let (rb, rg) = (int4_row_bytes(cols), int4_row_groups(cols));
    check("weights", w.len(), rows * cols, rows, cols)?;
    check("int4 packed bytes", packed.len(), rows * rb, rows, cols)?;
    check("int4 scales", scales.len(), rows * rg, rows, cols)?;
    if cols == 0 {
        return Ok(());
    }
    for ((row, out), sc) in w.chunks_exact(cols).zip(packed.chunks_exact_mut(rb)).zip(scales.chunks_exact_mut(rg)) {
        out.fill(0);
        for (g, (group, s)) in row.chunks(INT4_GROUP).zip(sc.iter_mut()).enumerate() {
            let max = group.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *s = max / INT4_QMAX;
            for (i, v) in group.iter().enumerate() {
                let q = if *s == 0.0 { 0.0 } else { (v / *s).round_ties_even().clamp(-8.0, 7.0) };
                let nib = (q as i32 + 8) as u8;
                let p = g * INT4_GROUP + i;
                out[p / 2] |= nib << (4 * (p % 2));
            }
        }
    }
    Ok(())
}

/// Dequantize element `p` of one int4 row (`packed`: the row's bytes, `scales`: its groups).
#[inline(always)]
pub fn int4_get(packed: &[u8], scales: &[f32], p: usize) -> f32 {
    let nib = (packed[p / 2] >> (4 * (p % 2))) & 0xF;
    (nib as i32 - 8) as f32 * scales[p / INT4_GROUP]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn e4m3_table_has_the_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert!(e4m3_to_f32(0x80) == 0.0 && e4m3_to_f32(0x80).is_sign_negative());
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9)); // largest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!((0..=255u8).filter(|&b| e4m3_to_f32(b).is_nan()).count(), 2);
    }

    #[test]
    fn e4m3_encode_round_trips_every_finite_code() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if !v.is_nan() {
                assert_eq!(f32_to_e4m3(v), b, "code {b:#04x} = {v}");
            }
        }
    }

    #[test]
    fn e4m3_encode_rounds_ties_to_even_and_saturates() {
        // Midway between 1.0 (0x38, even mantissa) and 1.125 (0x39): ties to 1.0.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // Midway between 1.125 (0x39) and 1.25 (0x3A): ties to the even 0x3A.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        assert_eq!(f32_to_e4m3(1.05), 0x38);
        assert_eq!(f32_to_e4m3(2f32.powi(-11)), 0x00); // below half the smallest subnormal
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        // Subnormal tie 0.5·2⁻⁹ rounds to 0; 1.5·2⁻⁹ rounds to 2·2⁻⁹.
        assert_eq!(f32_to_e4m3(0.5 / 512.0), 0x00);
        assert_eq!(f32_to_e4m3(1.5 / 512.0), 0x02);
        // Largest subnormal rounding up into the smallest normal.
        assert_eq!(f32_to_e4m3(7.6 / 512.0), 0x08);
        for v in [448.0, 449.0, 464.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_e4m3(v), 0x7E, "{v}");
            assert_eq!(f32_to_e4m3(-v), 0xFE, "-{v}");
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(1e-30), 0x00);
        assert_eq!(f32_to_e4m3(-1e-30), 0x80);
    }

    #[test]
    fn e4m3_encode_is_nearest() {
        let finite: Vec<f32> = (0..=0x7Eu8).map(e4m3_to_f32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..20_000 {
            let v: f32 = rng.random_range(-500.0f32..500.0) * 10f32.powi(rng.random_range(-4..1));
            let got = e4m3_to_f32(f32_to_e4m3(v));
            assert!(!got.is_nan());
            let best = finite.iter().map(|c| (c - v.abs()).abs()).fold(f32::INFINITY, f32::min);
            assert!(((got.abs() - v.abs()).abs() - best).abs() <= f32::EPSILON * best.max(1e-30), "{v} → {got}");
        }
    }

    #[test]
    fn fp8_rows_stay_within_half_a_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (rows, cols) = (7, 333);
        let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        w[cols..2 * cols].fill(0.0); // an all-zero row
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; rows];
        quantize_fp8(&w, rows, cols, &mut codes, &mut scales).expect("shapes");
        assert_eq!(scales[1], 0.0);
        for r in 0..rows {
            let max = w[r * cols..(r + 1) * cols].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for c in 0..cols {
                let deq = e4m3_to_f32(codes[r * cols + c]) * scales[r];
                let v = w[r * cols + c];
                // 3 mantissa bits: relative error ≤ 2⁻⁴ for normals; absolute ≤ 2⁻¹⁰·scale below.
                let tol = (v.abs() / 16.0).max(scales[r] / 1024.0) * 1.0001;
                assert!((deq - v).abs() <= tol, "row {r} col {c}: {v} → {deq}");
                assert!(deq.abs() <= max * 1.0001);
            }
        }
        assert!(quantize_fp8(&w, rows, cols, &mut codes, &mut scales[..1]).is_err());
    }

    #[test]
    fn int4_groups_stay_within_half_a_step_with_a_partial_last_group() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for &(rows, cols) in &[(3, 128), (4, 300), (2, 7), (5, 1), (1, 256)] {
            let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            w[..cols.min(INT4_GROUP)].fill(0.0); // an all-zero group
            let (rb, rg) = (int4_row_bytes(cols), int4_row_groups(cols));
            let mut packed = vec![0u8; rows * rb];
            let mut scales = vec![0f32; rows * rg];
            quantize_int4(&w, rows, cols, &mut packed, &mut scales).expect("shapes");
            assert_eq!(scales[0], 0.0);
            for r in 0..rows {
                let (pr, sr) = (&packed[r * rb..(r + 1) * rb], &scales[r * rg..(r + 1) * rg]);
                for c in 0..cols {
                    let (v, deq) = (w[r * cols + c], int4_get(pr, sr, c));
                    let s = sr[c / INT4_GROUP];
                    assert!((deq - v).abs() <= s * 0.5 * 1.0001, "{rows}x{cols} ({r},{c}): {v} → {deq}");
                }
                if cols % 2 == 1 {
                    assert_eq!(pr[rb - 1] >> 4, 0, "odd k leaves the last high nibble empty");
                }
            }
        }
    }

    #[test]
    fn int4_packing_is_offset_binary_low_nibble_first() {
        // One group: max 7 → scale 1, so q equals w.
        let w = [-8.0, 7.0, 0.0, -1.0];
        let mut packed = [0u8; 2];
        let mut scales = [0f32; 1];
        quantize_int4(&w, 1, 4, &mut packed, &mut scales).expect("shapes");
        assert_eq!(scales[0], 8.0 / 7.0);
        let w = [-7.0, 7.0, 0.0, -1.0];
        quantize_int4(&w, 1, 4, &mut packed, &mut scales).expect("shapes");
        assert_eq!(scales[0], 1.0);
        assert_eq!(packed, [(15 << 4) | 1, (7 << 4) | 8]);
    }
}
