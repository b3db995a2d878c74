//! Antialiased bilinear resize of 8-bit images, bit-exact with torch's native uint8 kernel.
//!
//! transformers' Llama 4 image processor resizes `uint8` tensors with torchvision, which on a
//! CPU with AVX2 (every x86-64 server herd targets) runs torch's uint8 antialiased kernel
//! (`_upsample_bilinear2d_aa`, `UpSampleKernel.cpp` + `UpSampleKernelAVXAntialias.h`). That
//! kernel is Pillow's algorithm: per axis, a triangle filter stretched by the downscale factor,
//! weights normalised in f64 and then rounded to int16 at the largest precision that keeps the
//! biggest weight below 2^15; each output is an integer dot product plus half an LSB, shifted
//! down and clamped to 0..=255. The horizontal pass runs first, into an 8-bit buffer, then the
//! vertical pass; an axis whose size does not change is skipped.

/// One axis's taps: for output `i`, input indices `first[i]..first[i] + len[i]` with weights
/// `weights[i * taps..]`, all at `precision` fractional bits.
#[derive(Debug)]
struct AxisTaps {
    first: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
    taps: usize,
    precision: u32,
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

impl AxisTaps {
    fn new(input: usize, output: usize) -> Self {
        // align_corners = false and no explicit scale: the scale is input / output.
        let scale = input as f64 / output as f64;
        // Bilinear has interp_size 2, so the support is 1 input pixel (times the downscale).
        let support = if scale >= 1.0 { scale } else { 1.0 };
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let taps = support.ceil() as usize * 2 + 1;
        let mut first = Vec::with_capacity(output);
        let mut len = Vec::with_capacity(output);
        let mut wf = vec![0.0f64; output * taps];
        let mut wt_max = 0.0f64;
        for i in 0..output {
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero, like the C++ static_cast.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize = (((center + support + 0.5) as i64).min(input as i64) - xmin).clamp(0, taps as i64);
            let w = &mut wf[i * taps..(i + 1) * taps];
            let mut total = 0.0;
            for (j, wj) in w.iter_mut().enumerate().take(xsize as usize) {
                *wj = triangle((j as f64 + xmin as f64 - center + 0.5) * invscale);
                total += *wj;
            }
            if total != 0.0 {
                for wj in w.iter_mut().take(xsize as usize) {
                    *wj /= total;
                    wt_max = wt_max.max(*wj);
                }
            }
            first.push(xmin as usize);
            len.push(xsize as usize);
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let weights = wf
            .iter()
            .map(|&w| {
                let v = w * f64::from(1u32 << precision);
                if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 }
            })
            .collect();
        Self { first, len, weights, taps, precision }
    }

    /// Output `i` from `read(k)` = input sample `k`.
    #[inline]
    fn apply(&self, i: usize, read: impl Fn(usize) -> u8) -> u8 {
        let w = &self.weights[i * self.taps..i * self.taps + self.len[i]];
        let mut acc: i32 = 1 << (self.precision - 1);
        for (j, &wj) in w.iter().enumerate() {
            acc += wj * i32::from(read(self.first[i] + j));
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Resize planar 8-bit channels `[channels, height, width]` to `[channels, out_h, out_w]`.
/// Sizes must be non-zero.
pub fn resize_bilinear_aa(
    src: &[u8],
    channels: usize,
    (height, width): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<u8> {
    assert_eq!(src.len(), channels * height * width, "resize: planar buffer size");
    assert!(height > 0 && width > 0 && out_h > 0 && out_w > 0, "resize: empty image");
    let horizontal = if out_w != width {
        let taps = AxisTaps::new(width, out_w);
        let mut out = vec![0u8; channels * height * out_w]; // [channels, height, out_w]
        for (row_out, row_in) in out.chunks_exact_mut(out_w).zip(src.chunks_exact(width)) {
            for (x, o) in row_out.iter_mut().enumerate() {
                *o = taps.apply(x, |k| row_in[k]);
            }
        }
        out
    } else {
        src.to_vec()
    };
    if out_h == height {
        return horizontal;
    }
    let taps = AxisTaps::new(height, out_h);
    let mut out = vec![0u8; channels * out_h * out_w]; // [channels, out_h, out_w]
    for (plane_out, plane_in) in out.chunks_exact_mut(out_h * out_w).zip(horizontal.chunks_exact(height * out_w)) {
        for y in 0..out_h {
            for x in 0..out_w {
                plane_out[y * out_w + x] = taps.apply(y, |k| plane_in[k * out_w + x]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..2 * 3 * 5).map(|v| (v * 7) as u8).collect();
        assert_eq!(resize_bilinear_aa(&src, 2, (3, 5), (3, 5)), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        for (h, w, oh, ow) in [(5, 7, 13, 3), (40, 90, 7, 11), (1, 1, 9, 4)] {
            let src = vec![173u8; h * w];
            assert!(resize_bilinear_aa(&src, 1, (h, w), (oh, ow)).iter().all(|&v| v == 173), "{h}x{w} -> {oh}x{ow}");
        }
    }

    #[test]
    fn weights_sum_to_one_at_their_precision() {
        for (i, o) in [(70, 28), (17, 28), (90, 63), (336, 1000), (1000, 336)] {
            let t = AxisTaps::new(i, o);
            for k in 0..o {
                let s: i32 = t.weights[k * t.taps..k * t.taps + t.len[k]].iter().sum();
                let one = 1i32 << t.precision;
                assert!((s - one).abs() <= t.len[k] as i32, "{i}->{o} output {k}: {s} vs {one}");
            }
        }
    }

    #[test]
    fn matches_torch_on_small_cases() {
        // Reference values: torchvision.transforms.v2.functional.resize(uint8, antialias=True)
        // with torch 2.15 on an AVX2 CPU.
        let src = [10u8, 20, 30, 41, 0, 255];
        assert_eq!(resize_bilinear_aa(&src, 1, (1, 6), (1, 3)), vec![17, 29, 115]);
        let src = [0u8, 255, 7, 100, 50, 3];
        let want = [0u8, 159, 162, 7, 10, 150, 149, 7, 50, 114, 97, 5, 90, 78, 45, 3, 100, 69, 32, 3];
        assert_eq!(resize_bilinear_aa(&src, 1, (2, 3), (5, 4)), want.to_vec());
    }
}
