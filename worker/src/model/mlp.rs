//! The SwiGLU feed-forward: dense layers and the shared expert.

use super::ModelError;
use super::weights::{Weight, WeightLoader};
use herd_kernels::cpu::{activation, matmul};

/// `down(silu(gate(x)) · up(x))` with nn.Linear weights.
#[derive(Debug)]
pub struct Mlp {
    gate: Weight, // [width, hidden]
    up: Weight,   // [width, hidden]
    down: Weight, // [hidden, width]
    width: usize,
}

impl Mlp {
    /// Load `{prefix}.gate_proj.weight` etc.
    pub fn load(w: &WeightLoader<'_>, prefix: &str, hidden: usize, width: usize) -> Result<Self, ModelError> {
        Ok(Self {
            gate: w.weight(&format!("{prefix}.gate_proj.weight"), &[width, hidden])?,
            up: w.weight(&format!("{prefix}.up_proj.weight"), &[width, hidden])?,
            down: w.weight(&format!("{prefix}.down_proj.weight"), &[hidden, width])?,
            width,
        })
    }

    /// `x`: `[tokens, hidden]` → `out`: `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let tokens = out.len() / self.down.shape()[0];
        let mut gate = vec![0.0; tokens * self.width]; // [tokens, width]
        let mut up = vec![0.0; tokens * self.width];
        matmul::matmul_t(x, self.gate.matrix(), &mut gate);
        matmul::matmul_t(x, self.up.matrix(), &mut up);
        activation::swiglu_in_place(&mut gate, &up);
        matmul::matmul_t(&gate, self.down.matrix(), out);
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}
