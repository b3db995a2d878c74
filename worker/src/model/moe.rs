//! Llama 4's mixture-of-experts block: route → group by expert → experts → combine.
//!
//! Routing takes the top-k of the raw router logits; each chosen expert sees the token
//! scaled by `sigmoid(logit)` (the score scales the expert's *input*, not its output), and
//! the shared expert always runs on the unscaled token. The steps are separate functions so
//! that an expert-parallel engine can ship the grouped tokens to the worker holding each
//! expert and run [`MoeBlock::run_expert`] there.

use super::ModelError;
use super::mlp::Mlp;
use super::weights::{Weight, WeightLoader};
use herd_kernels::cpu::{activation, matmul};

/// One token's choice of one expert.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Route {
    pub token: usize,
    pub expert: usize,
    /// `sigmoid(router logit)`, applied to the expert's input.
    pub score: f32,
}

/// Routes sorted by (expert, token), plus where each expert's run starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub routes: Vec<Route>,
    /// `offsets[e]..offsets[e + 1]` are expert `e`'s routes (`num_experts + 1` entries).
    pub offsets: Vec<usize>,
}

impl Routing {
    pub fn expert_routes(&self, e: usize) -> &[Route] {
        &self.routes[self.offsets[e]..self.offsets[e + 1]]
    }

    /// Tokens per expert (for load statistics).
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

#[derive(Debug)]
pub struct MoeBlock {
    router: Weight,  // [experts, hidden]
    gate_up: Weight, // [experts, hidden, 2·width], input-major, gate columns first
    down: Weight,    // [experts, width, hidden], input-major
    shared: Mlp,
    experts: usize,
    top_k: usize,
    hidden: usize,
    width: usize,
}

impl MoeBlock {
    /// Load `{prefix}.router.weight`, `{prefix}.experts.{gate_up_proj,down_proj}` and the shared expert.
    pub fn load(
        w: &WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        width: usize,
        experts: usize,
        top_k: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            router: w.weight(&format!("{prefix}.router.weight"), &[experts, hidden])?,
            gate_up: w.weight(&format!("{prefix}.experts.gate_up_proj"), &[experts, hidden, 2 * width])?,
            down: w.weight(&format!("{prefix}.experts.down_proj"), &[experts, width, hidden])?,
            shared: Mlp::load(w, &format!("{prefix}.shared_expert"), hidden, width)?,
            experts,
            top_k,
            hidden,
            width,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.experts
    }

    /// `x`: `[tokens, hidden]` → `out`: `[tokens, hidden]` (shared + routed experts).
    pub fn forward(&self, x: &[f32], out: &mut [f32]) -> Routing {
        let routing = self.route(x);
        let mut routed = vec![0.0f32; x.len()]; // [tokens, hidden]
        for e in 0..self.experts {
            let routes = routing.expert_routes(e);
            if routes.is_empty() {
                continue;
            }
            let inputs = self.gather(x, routes);
            let mut y = vec![0.0f32; inputs.len()];
            self.run_expert(e, &inputs, &mut y);
            // Experts are visited in index order, so with top-k > 1 a token's expert outputs
            // are summed in the same order as transformers' sum over the expert axis.
            for (r, row) in routes.iter().zip(y.chunks_exact(self.hidden)) {
                for (acc, v) in routed[r.token * self.hidden..(r.token + 1) * self.hidden].iter_mut().zip(row) {
                    *acc += v;
                }
            }
        }
        self.shared.forward(x, out);
        for (o, r) in out.iter_mut().zip(&routed) {
            *o += r;
        }
        routing
    }

    /// Top-k experts of each token by raw router logit; scores are their sigmoids.
    pub fn route(&self, x: &[f32]) -> Routing {
        let tokens = x.len() / self.hidden;
        let mut logits = vec![0.0f32; tokens * self.experts]; // [tokens, experts]
        matmul::matmul_t(x, self.router.matrix(), &mut logits);
        let mut routes: Vec<Route> = Vec::with_capacity(tokens * self.top_k);
        for (t, row) in logits.chunks_exact(self.experts).enumerate() {
            for (expert, logit) in activation::top_k(row, self.top_k) {
                routes.push(Route { token: t, expert, score: activation::sigmoid(logit) });
            }
        }
        routes.sort_by_key(|r| (r.expert, r.token));
        let mut offsets = vec![0usize; self.experts + 1];
        for r in &routes {
            offsets[r.expert + 1] += 1;
        }
        for e in 0..self.experts {
            offsets[e + 1] += offsets[e];
        }
        Routing { routes, offsets }
    }

    /// The expert inputs of `routes`: each token's row scaled by its score. `[routes, hidden]`
    pub fn gather(&self, x: &[f32], routes: &[Route]) -> Vec<f32> {
        let mut inputs = Vec::with_capacity(routes.len() * self.hidden);
        for r in routes {
            inputs.extend(x[r.token * self.hidden..(r.token + 1) * self.hidden].iter().map(|v| v * r.score));
        }
        inputs
    }

    /// Expert `e` on already-scaled inputs: `[n, hidden]` → `[n, hidden]`.
    pub fn run_expert(&self, e: usize, inputs: &[f32], out: &mut [f32]) {
        let n = inputs.len() / self.hidden;
        let mut gate_up = vec![0.0f32; n * 2 * self.width]; // [n, 2·width] = [gate | up]
        matmul::matmul(inputs, self.gate_up.slice3(e), &mut gate_up);
        let mut act = vec![0.0f32; n * self.width]; // [n, width]
        activation::swiglu_fused(&gate_up, self.width, &mut act);
        matmul::matmul(&act, self.down.slice3(e), out);
    }

    /// Bytes of the routed experts, the shared expert and the router.
    pub fn bytes(&self) -> usize {
        self.router.bytes() + self.gate_up.bytes() + self.down.bytes() + self.shared.bytes()
    }

    /// Bytes one token reads: router, shared expert and `top_k` routed experts.
    pub fn active_bytes(&self) -> usize {
        let per_expert = (self.gate_up.bytes() + self.down.bytes()) / self.experts;
        self.router.bytes() + self.shared.bytes() + self.top_k * per_expert
    }
}
