//! Feed-forward blocks on the device: the dense SwiGLU and the MoE layer.
//!
//! MoE data flow for `tokens` rows of `a` (`[tokens, hidden]`, post-norm):
//! ```text
//! shared = down(silu(gate(a)) · up(a))                       (stacked gate|up: one linear)
//! logits = a · routerᵀ → host: top-k, sigmoid scores, routes sorted by (expert, token)
//! FP8 experts:   quant_dispatch(a, routes) → gemm_swiglu → gemm (down) → combine(shared, ·)
//! float experts: per active expert: gather(a·score) → SwiGLU MLP → scatter-add into shared
//! ```
//! The router logits come to the host because the counts per expert must be known there anyway
//! (grid sizes here, the all-to-all's send counts between workers).

use super::GpuError;
use herd_kernels::cpu::activation;
use herd_kernels::cuda::elementwise as ew;
use herd_kernels::cuda::linear::{self, LinearWeight};
use herd_kernels::cuda::{CudaSlice, Gpu, moe as gmoe};

/// A device buffer whose every element the next kernel writes before anything reads it.
pub(crate) fn scratch(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>, GpuError> {
    // SAFETY: callers only pass buffers that a kernel fully writes before any read (each use
    // says which); an uninitialised allocation skips a memset per buffer per layer.
    Ok(unsafe { gpu.stream().alloc::<f32>(n.max(1)) }?)
}

/// `down(silu(gate(x)) · up(x))`; gate and up stacked as one `[2·width, hidden]` weight.
#[derive(Debug)]
pub struct GpuMlp {
    pub gate_up: LinearWeight,
    pub down: LinearWeight,
    pub width: usize,
}

impl GpuMlp {
    /// `x`: `[rows, hidden]` → `out`: `[rows, hidden]` (fully written).
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let mut gu = scratch(gpu, rows * 2 * self.width)?; // [rows, 2·width], written by linear
        linear::linear(gpu, x, rows, &self.gate_up, &mut gu)?;
        let mut act = scratch(gpu, rows * self.width)?; // [rows, width], written by swiglu
        ew::swiglu_rows(gpu, &gu, rows, self.width, &mut act)?;
        linear::linear(gpu, &act, rows, &self.down, out)?;
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// The routed experts of one layer on the device.
#[derive(Debug)]
pub enum RoutedExperts {
    /// Every expert FP8, for the grouped GEMMs: gate_up `[experts, 2·width, hidden]` (gate rows
    /// then up rows), down `[experts, hidden, width]`.
    Fp8 { gate_up: Box<gmoe::Fp8Experts>, down: Box<gmoe::Fp8Experts> },
    /// One float (or mixed) MLP per expert.
    PerExpert(Vec<GpuMlp>),
}

#[derive(Debug)]
pub struct GpuMoe {
    pub router: LinearWeight, // [experts, hidden]
    pub shared: GpuMlp,
    pub routed: RoutedExperts,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub width: usize,
}

/// Routes in packed order (sorted by expert, then token) and where each token's slots went.
#[derive(Debug, PartialEq)]
pub struct HostRouting {
    pub token: Vec<i32>,
    pub score: Vec<f32>,
    /// Routes per expert.
    pub counts: Vec<usize>,
    /// `[tokens, top_k]`: packed index of each token's j-th route.
    pub token_routes: Vec<i32>,
}

/// Top-k by raw logit, sigmoid scores: the CPU `MoeBlock::route_logits`, in packed order.
pub fn route(logits: &[f32], experts: usize, top_k: usize) -> HostRouting {
    let tokens = logits.len() / experts;
    let mut routes: Vec<(usize, usize, usize, f32)> = Vec::with_capacity(tokens * top_k); // (expert, token, slot, score)
    for (t, row) in logits.chunks_exact(experts).enumerate() {
        for (slot, (e, logit)) in activation::top_k(row, top_k).into_iter().enumerate() {
            routes.push((e, t, slot, activation::sigmoid(logit)));
        }
    }
    routes.sort_by_key(|r| (r.0, r.1));
    let mut counts = vec![0usize; experts];
    let mut token_routes = vec![-1i32; tokens * top_k];
    for (i, &(e, t, slot, _)) in routes.iter().enumerate() {
        counts[e] += 1;
        token_routes[t * top_k + slot] = i as i32;
    }
    HostRouting {
        token: routes.iter().map(|r| r.1 as i32).collect(),
        score: routes.iter().map(|r| r.3).collect(),
        counts,
        token_routes,
    }
}

impl GpuMoe {
    /// `a`: `[tokens, hidden]` → `out`: `[tokens, hidden]` = shared + routed (fully written).
    pub fn forward(
        &self,
        gpu: &Gpu,
        a: &CudaSlice<f32>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let mut logits = scratch(gpu, tokens * self.experts)?; // [tokens, experts], written by linear
        linear::linear(gpu, a, tokens, &self.router, &mut logits)?;
        let mut host_logits = gpu.download(&logits)?;
        host_logits.truncate(tokens * self.experts);
        let routing = route(&host_logits, self.experts, self.top_k);
        match &self.routed {
            RoutedExperts::PerExpert(mlps) => {
                self.shared.forward(gpu, a, tokens, out)?;
                let mut start = 0;
                for (e, mlp) in mlps.iter().enumerate() {
                    let n = routing.counts[e];
                    if n == 0 {
                        continue;
                    }
                    let tok = gpu.upload(&routing.token[start..start + n])?;
                    let sc = gpu.upload(&routing.score[start..start + n])?;
                    let mut xe = scratch(gpu, n * self.hidden)?; // [n, hidden], written by gather
                    ew::gather_scaled_rows(gpu, a, &tok, &sc, self.hidden, &mut xe)?;
                    let mut ye = scratch(gpu, n * self.hidden)?; // [n, hidden], written by the MLP
                    mlp.forward(gpu, &xe, n, &mut ye)?;
                    ew::scatter_add_rows(gpu, &ye, &tok, self.hidden, out)?;
                    start += n;
                }
            }
            RoutedExperts::Fp8 { gate_up, down } => {
                let mut shared = scratch(gpu, tokens * self.hidden)?; // written by the MLP
                self.shared.forward(gpu, a, tokens, &mut shared)?;
                let routes = routing.token.len();
                let groups = gmoe::Groups::from_counts(gpu, &routing.counts)?;
                let tok = gpu.upload(&routing.token)?;
                let sc = gpu.upload(&routing.score)?;
                // SAFETY (both): quant_dispatch writes every byte and scale of every route.
                let mut q = unsafe { gpu.stream().alloc::<u8>(routes * self.hidden) }?;
                let mut q_scale = scratch(gpu, routes)?;
                gmoe::quant_dispatch(gpu, a, self.hidden, &tok, &sc, &mut q, &mut q_scale)?;
                let groups_h = self.width / gmoe::H_GROUP;
                // SAFETY (both): gemm_swiglu writes every element of every route's row.
                let mut h = unsafe { gpu.stream().alloc::<u8>(routes * self.width) }?;
                let mut h_scale = scratch(gpu, routes * groups_h)?;
                gmoe::gemm_swiglu(gpu, &q, &q_scale, 1, gate_up, &groups, &mut h, &mut h_scale)?;
                let mut y = scratch(gpu, routes * self.hidden)?; // [routes, hidden], written by gemm
                gmoe::gemm(gpu, &h, &h_scale, groups_h, down, &groups, &mut y)?;
                let token_routes = gpu.upload(&routing.token_routes)?;
                gmoe::combine(gpu, Some(&shared), &y, &token_routes, out, self.hidden, self.top_k)?;
            }
        }
        Ok(())
    }

    /// Bytes one token reads: router, shared expert, `top_k` routed experts.
    pub fn active_bytes(&self) -> usize {
        let expert = match &self.routed {
            RoutedExperts::Fp8 { gate_up, down } => {
                (gate_up.n * gate_up.k + down.n * down.k) + 4 * (gate_up.n + down.n)
            }
            RoutedExperts::PerExpert(m) => m.first().map_or(0, GpuMlp::bytes),
        };
        self.router.bytes() + self.shared.bytes() + self.top_k * expert
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_packed_by_expert_then_token_with_each_slot_found() {
        // 3 tokens, 4 experts, top-2.
        let logits = [0.0, 3.0, 1.0, -1.0, 2.0, 0.5, -2.0, 4.0, 1.0, 0.0, 5.0, 0.2];
        let r = route(&logits, 4, 2);
        // token 0 → experts 1, 2; token 1 → 3, 0; token 2 → 2, 0.
        assert_eq!(r.counts, vec![2, 1, 2, 1]);
        assert_eq!(r.token, vec![1, 2, 0, 0, 2, 1]);
        for (t, slots) in r.token_routes.chunks(2).enumerate() {
            for &i in slots {
                assert_eq!(r.token[i as usize], t as i32);
            }
        }
        assert_eq!(r.score[0], activation::sigmoid(2.0));
    }
}
