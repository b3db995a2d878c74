//! Rotary position embedding on interleaved pairs, as Llama 4 applies it.
//!
//! Elements `(2j, 2j+1)` of each head form one complex number rotated by `pos · ω_j`
//! (transformers' `view_as_complex` convention, not the half-split "rotate_half" one).
//! Frequencies follow transformers' `_compute_*_parameters`, computed in f32 step by step so
//! the band edges of llama3 scaling fall exactly where the reference puts them.

/// How the base frequencies are rescaled for long context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "llama3"`.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
    /// `rope_type: "linear"`: every frequency divided by `factor`.
    Linear { factor: f32 },
}

/// The per-pair angular frequencies of one head.
#[derive(Clone, Debug)]
pub struct RopeFreqs {
    inv_freq: Vec<f32>,
}

impl RopeFreqs {
    pub fn new(head_dim: usize, theta: f32, scaling: Option<&RopeScaling>) -> Self {
        assert!(head_dim.is_multiple_of(2), "rope needs an even head_dim, got {head_dim}");
        let d = head_dim as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|j| {
                let exponent = (2 * j) as f32 / d;
                1.0f32 / ((theta as f64).powf(exponent as f64) as f32)
            })
            .collect();
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    // Negated comparisons on purpose: the reference writes `~(a < b) * ~(a > c)`.
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    *f = if medium {
                        // Only reached when high != low, so the division is defined.
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn pairs(&self) -> usize {
        self.inv_freq.len()
    }

    /// cos and sin of every pair's angle at each position: `[positions, pairs]` each.
    pub fn table(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let p = self.pairs();
        let mut cos = Vec::with_capacity(positions.len() * p);
        let mut sin = Vec::with_capacity(positions.len() * p);
        for &pos in positions {
            for &f in &self.inv_freq {
                // The angle is an f32 product, as in the reference; its cos/sin are then
                // evaluated accurately.
                let angle = (f * pos as f32) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

/// Rotate `x` (`[tokens, heads, head_dim]`) in place with per-token `cos`/`sin`
/// (`[tokens, head_dim / 2]`).
pub fn apply_rope(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let pairs = head_dim / 2;
    assert!(head_dim.is_multiple_of(2) && x.len().is_multiple_of(heads * head_dim));
    let tokens = x.len() / (heads * head_dim);
    assert_eq!(cos.len(), tokens * pairs, "rope table is not [tokens, head_dim/2]");
    assert_eq!(sin.len(), cos.len());
    for t in 0..tokens {
        let (c, s) = (&cos[t * pairs..(t + 1) * pairs], &sin[t * pairs..(t + 1) * pairs]);
        for h in 0..heads {
            let row = &mut x[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
            for j in 0..pairs {
                let (a, b) = (row[2 * j], row[2 * j + 1]);
                row[2 * j] = a * c[j] - b * s[j];
                row[2 * j + 1] = a * s[j] + b * c[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_bands_for_scout_values() {
        // Scout-Instruct: factor 16, low = high = 1, original 8192, theta 5e5, d = 128.
        // Pairs 0..=34 keep their frequency, 35..=63 are divided by 16 (reference §2.3).
        let base = RopeFreqs::new(128, 500000.0, None);
        let s = RopeScaling::Llama3 {
            factor: 16.0,
            low_freq_factor: 1.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192.0,
        };
        let scaled = RopeFreqs::new(128, 500000.0, Some(&s));
        for j in 0..64 {
            let want = if j <= 34 { base.inv_freq()[j] } else { base.inv_freq()[j] / 16.0 };
            assert_eq!(scaled.inv_freq()[j], want, "pair {j}");
        }
    }

    #[test]
    fn pairs_are_interleaved_and_rotate_by_position_times_frequency() {
        // head_dim 4: pair 0 = (x0, x1) at ω0 = 1, pair 1 = (x2, x3) at ω1 = 1/100.
        let f = RopeFreqs::new(4, 10000.0, None);
        assert_eq!(f.inv_freq(), &[1.0, 0.01]);
        let (c, s) = f.table(&[3]);
        let mut x = vec![1.0f32, 0.0, 0.0, 1.0];
        apply_rope(&mut x, 1, 4, &c, &s);
        let want = [3f32.cos(), 3f32.sin(), -(0.03f32).sin(), (0.03f32).cos()];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{x:?} vs {want:?}");
        }
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let f = RopeFreqs::new(8, 10000.0, None);
        let (c0, s0) = f.table(&[0]);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let orig = x.clone();
        apply_rope(&mut x[..8], 1, 8, &c0, &s0);
        assert_eq!(&x[..8], &orig[..8]);
        let (c, s) = f.table(&[7, 9]);
        apply_rope(&mut x, 1, 8, &c, &s);
        for t in 0..2 {
            let n0: f32 = orig[t * 8..t * 8 + 8].iter().map(|v| v * v).sum();
            let n1: f32 = x[t * 8..t * 8 + 8].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-5);
        }
    }
}
