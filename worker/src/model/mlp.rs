//! The SwiGLU feed-forward: dense layers and the shared expert.

use super::ModelError;
use super::weights::{Weight, WeightLoader};
use herd_kernels::MatRef;
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
    /// Load the module `w` is scoped to: `gate_proj`, `up_proj`, `down_proj`, float or
    /// quantized (see [`WeightLoader::linear`]).
    pub fn load(w: &WeightLoader<'_>, hidden: usize, width: usize) -> Result<Self, ModelError> {
        Ok(Self {
            gate: w.linear("gate_proj", width, hidden)?,
            up: w.linear("up_proj", width, hidden)?,
            down: w.linear("down_proj", hidden, width)?,
            width,
        })
    }

    /// `x`: `[tokens, hidden]` → `out`: `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        self.forward_with(x, out, None);
    }

    /// [`forward`](Self::forward), also computing `x · extraᵀ` into `extra_out` in the same
    /// parallel region as gate and up (a MoE layer's router reads the same `x`).
    pub fn forward_with(&self, x: &[f32], out: &mut [f32], extra: Option<(MatRef<'_>, &mut [f32])>) {
        let tokens = out.len() / self.down.shape()[0];
        let mut gate = vec![0.0; tokens * self.width]; // [tokens, width]
        let mut up = vec![0.0; tokens * self.width];
        let mut products = vec![(self.gate.matrix(), &mut gate[..]), (self.up.matrix(), &mut up[..])];
        products.extend(extra);
        matmul::matmul_t_many(x, &mut products);
        activation::swiglu_in_place(&mut gate, &up);
        matmul::matmul_t(&gate, self.down.matrix(), out);
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `(gate, up, down)`: `[width, hidden]`, `[width, hidden]`, `[hidden, width]`.
    pub fn weights(&self) -> (&Weight, &Weight, &Weight) {
        (&self.gate, &self.up, &self.down)
    }

    pub fn width(&self) -> usize {
        self.width
    }
}
