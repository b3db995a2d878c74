//! Element-wise activations and small reductions.

/// `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU on a fused `[rows, 2·width]` buffer whose row halves are `[gate | up]`:
/// writes `up · silu(gate)` into `out` (`[rows, width]`).
pub fn swiglu_fused(gate_up: &[f32], width: usize, out: &mut [f32]) {
    assert_eq!(gate_up.len(), out.len() * 2);
    for (gu, o) in gate_up.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (g, u) = gu.split_at(width);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = u * silu(g);
        }
    }
}

/// SwiGLU on separate gate and up buffers: `gate ← silu(gate) · up`.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`). NaN never wins.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best
}

/// The `k` largest values with their indices, largest first; ties keep the lower index.
pub fn top_k(x: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (i, x[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_forms_agree() {
        let gu = [0.5f32, -1.0, 2.0, 3.0];
        let mut fused = [0.0; 2];
        swiglu_fused(&gu, 2, &mut fused);
        let mut g = [0.5f32, -1.0];
        swiglu_in_place(&mut g, &[2.0, 3.0]);
        assert_eq!(fused, g);
        assert!((fused[0] - 2.0 * 0.5 / (1.0 + (-0.5f32).exp())).abs() < 1e-7);
    }

    #[test]
    fn argmax_and_top_k_break_ties_low() {
        let x = [1.0, 3.0, 3.0, -1.0];
        assert_eq!(argmax(&x), 1);
        assert_eq!(top_k(&x, 2), vec![(1, 3.0), (2, 3.0)]);
        assert_eq!(top_k(&x, 1), vec![(1, 3.0)]);
    }
}
