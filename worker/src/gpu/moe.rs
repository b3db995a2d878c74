//! Feed-forward blocks on the device: the dense SwiGLU and the MoE layer.
//!
//! MoE data flow for `tokens` rows of `a` (`[tokens, hidden]`, post-norm):
//! ```text
//! shared = down(silu(gate(a)) · up(a))                       (stacked gate|up: one linear)
//! logits = a · routerᵀ → host: top-k, sigmoid scores, routes sorted by (expert, token)
//! FP8 experts:   quant_dispatch(a, routes) → gemm_swiglu → gemm (down) → combine(shared, ·)
//! float experts: per active expert: gather(a·score) → SwiGLU MLP → scatter-add into shared
//! expert-parallel: a → host → ExpertExchange::exchange (peers' rows run here on GpuShard)
//!                  → each route's output row → device → combine(shared, ·)
//! ```
//! The router logits come to the host because the counts per expert must be known there anyway
//! (grid sizes here, the all-to-all's send counts between workers).
//!
//! Expert parallelism reproduces the single-GPU result bit for bit: the rows a peer sends are
//! `x · score` in f32 (the product `quant_dispatch` and `gather_scaled_rows` form on the
//! device), every GEMM row is computed independently of its batch, and both paths sum a
//! token's outputs with the same combine order (expert order, as the CPU runner).

use super::GpuError;
use crate::model::moe::{ExpertError, ExpertExchange, ExpertShard, Routing};
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
    /// Every held expert FP8, for the grouped GEMMs: gate_up `[held, 2·width, hidden]` (gate
    /// rows then up rows), down `[held, hidden, width]`, in ascending expert order.
    Fp8 { gate_up: Box<gmoe::Fp8Experts>, down: Box<gmoe::Fp8Experts> },
    /// One float (or mixed) MLP per held expert, in ascending expert order.
    PerExpert(Vec<GpuMlp>),
}

#[derive(Debug)]
pub struct GpuMoe {
    pub router: LinearWeight, // [experts, hidden]
    pub shared: GpuMlp,
    pub routed: RoutedExperts,
    pub experts: usize,
    /// `held[e]`: expert `e`'s index in `routed`, `None` where another worker holds it.
    pub held: Vec<Option<usize>>,
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
    /// `[tokens, top_k]`: packed index of each token's routes, in expert order (the order the
    /// combine sums them, as the CPU runner does).
    pub token_routes: Vec<i32>,
}

impl HostRouting {
    pub fn new(routing: &Routing, tokens: usize, top_k: usize) -> Self {
        let mut token_routes = vec![-1i32; tokens * top_k];
        let mut filled = vec![0usize; tokens];
        for (i, r) in routing.routes.iter().enumerate() {
            token_routes[r.token * top_k + filled[r.token]] = i as i32;
            filled[r.token] += 1;
        }
        HostRouting {
            token: routing.routes.iter().map(|r| r.token as i32).collect(),
            score: routing.routes.iter().map(|r| r.score).collect(),
            counts: routing.counts(),
            token_routes,
        }
    }
}

impl GpuMoe {
    /// `a`: `[tokens, hidden]` → `out`: `[tokens, hidden]` = shared + routed (fully written).
    /// With `ep` (this layer's index and the group's runner) the routed experts run wherever
    /// the placement puts them; without it every expert must be held here.
    pub fn forward(
        &self,
        gpu: &Gpu,
        a: &CudaSlice<f32>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
        ep: Option<(usize, &mut dyn ExpertExchange)>,
    ) -> Result<(), GpuError> {
        if tokens == 0 {
            // Nothing of ours to run, but the group's exchange still needs this worker.
            if let Some((layer, runner)) = ep {
                runner.exchange(layer, &GpuShard { gpu, moe: self }, &[], &Routing::empty(self.experts))?;
            }
            return Ok(());
        }
        let mut logits = scratch(gpu, tokens * self.experts)?; // [tokens, experts], written by linear
        linear::linear(gpu, a, tokens, &self.router, &mut logits)?;
        let mut host_logits = gpu.download(&logits)?;
        host_logits.truncate(tokens * self.experts);
        let routing = Routing::from_logits(&host_logits, self.experts, self.top_k);
        let host = HostRouting::new(&routing, tokens, self.top_k);
        if let Some((layer, runner)) = ep {
            let mut shared = scratch(gpu, tokens * self.hidden)?; // written by the MLP
            self.shared.forward(gpu, a, tokens, &mut shared)?;
            let mut x = gpu.download(a)?;
            x.truncate(tokens * self.hidden);
            let y = runner.exchange(layer, &GpuShard { gpu, moe: self }, &x, &routing)?; // [routes, hidden]
            let y = gpu.upload(&y)?;
            let token_routes = gpu.upload(&host.token_routes)?;
            gmoe::combine(gpu, Some(&shared), &y, &token_routes, out, self.hidden, self.top_k)?;
            return Ok(());
        }
        if self.held.iter().any(Option::is_none) {
            return Err(GpuError::Unsupported(
                "a worker holding only some routed experts outside an expert-parallel group".into(),
            ));
        }
        match &self.routed {
            RoutedExperts::PerExpert(mlps) => {
                self.shared.forward(gpu, a, tokens, out)?;
                let mut start = 0;
                for (e, mlp) in mlps.iter().enumerate() {
                    let n = host.counts[e];
                    if n == 0 {
                        continue;
                    }
                    let tok = gpu.upload(&host.token[start..start + n])?;
                    let sc = gpu.upload(&host.score[start..start + n])?;
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
                let tok = gpu.upload(&host.token)?;
                let sc = gpu.upload(&host.score)?;
                let y = self.fp8_experts(gpu, (gate_up, down), a, &tok, &sc, &host.counts)?;
                let token_routes = gpu.upload(&host.token_routes)?;
                gmoe::combine(gpu, Some(&shared), &y, &token_routes, out, self.hidden, self.top_k)?;
            }
        }
        Ok(())
    }

    /// The grouped FP8 experts over rows `x[tok[i]] · sc[i]`, packed by held expert (`counts`
    /// per held expert): `[routes, hidden]`.
    fn fp8_experts(
        &self,
        gpu: &Gpu,
        (gate_up, down): (&gmoe::Fp8Experts, &gmoe::Fp8Experts),
        x: &CudaSlice<f32>,
        tok: &CudaSlice<i32>,
        sc: &CudaSlice<f32>,
        counts: &[usize],
    ) -> Result<CudaSlice<f32>, GpuError> {
        let routes: usize = counts.iter().sum();
        let groups = gmoe::Groups::from_counts(gpu, counts)?;
        // SAFETY (both): quant_dispatch writes every byte and scale of every route.
        let mut q = unsafe { gpu.stream().alloc::<u8>((routes * self.hidden).max(1)) }?;
        let mut q_scale = scratch(gpu, routes)?;
        gmoe::quant_dispatch(gpu, x, self.hidden, tok, sc, &mut q, &mut q_scale)?;
        let groups_h = self.width / gmoe::H_GROUP;
        // SAFETY (both): gemm_swiglu writes every element of every route's row.
        let mut h = unsafe { gpu.stream().alloc::<u8>((routes * self.width).max(1)) }?;
        let mut h_scale = scratch(gpu, routes * groups_h)?;
        gmoe::gemm_swiglu(gpu, &q, &q_scale, 1, gate_up, &groups, &mut h, &mut h_scale)?;
        let mut y = scratch(gpu, routes * self.hidden)?; // [routes, hidden], written by gemm
        gmoe::gemm(gpu, &h, &h_scale, groups_h, down, &groups, &mut y)?;
        Ok(y)
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

/// One MoE layer's held experts on the device, running the rows peers sent
/// ([`ExpertExchange::exchange`]): up, experts, down.
struct GpuShard<'a> {
    gpu: &'a Gpu,
    moe: &'a GpuMoe,
}

impl ExpertShard for GpuShard<'_> {
    fn hidden(&self) -> usize {
        self.moe.hidden
    }

    fn is_local(&self, expert: usize) -> bool {
        self.moe.held.get(expert).is_some_and(Option::is_some)
    }

    fn run_groups(&self, groups: &[(usize, usize)], inputs: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        let (gpu, moe, hidden) = (self.gpu, self.moe, self.moe.hidden);
        let rows = inputs.len() / hidden;
        if rows == 0 {
            return Ok(());
        }
        let slot = |e: usize| moe.held.get(e).copied().flatten().ok_or(ExpertError::NotHeld { expert: e });
        match &moe.routed {
            RoutedExperts::Fp8 { gate_up, down } => {
                let mut counts = vec![0usize; moe.held.iter().flatten().count()];
                for &(e, n) in groups {
                    counts[slot(e)?] += n;
                }
                // The rows arrive scaled: identity gather, unit scores (x · 1 is exact).
                let x = gpu.upload(inputs)?;
                let tok = gpu.upload(&(0..rows as i32).collect::<Vec<_>>())?;
                let sc = gpu.upload(&vec![1.0f32; rows])?;
                let y = moe.fp8_experts(gpu, (gate_up, down), &x, &tok, &sc, &counts)?;
                let host = gpu.download(&y)?;
                out.copy_from_slice(&host[..rows * hidden]);
            }
            RoutedExperts::PerExpert(mlps) => {
                let mut start = 0;
                for &(e, n) in groups {
                    let span = start * hidden..(start + n) * hidden;
                    let x = gpu.upload(&inputs[span.clone()])?;
                    let mut y = scratch(gpu, n * hidden)?; // [n, hidden], written by the MLP
                    mlps[slot(e)?].forward(gpu, &x, n, &mut y)?;
                    out[span].copy_from_slice(&gpu.download(&y)?[..n * hidden]);
                    start += n;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_kernels::cpu::activation;

    #[test]
    fn routes_are_packed_by_expert_then_token_with_each_slot_found() {
        // 3 tokens, 4 experts, top-2.
        let logits = [0.0, 3.0, 1.0, -1.0, 2.0, 0.5, -2.0, 4.0, 1.0, 0.0, 5.0, 0.2];
        let r = HostRouting::new(&Routing::from_logits(&logits, 4, 2), 3, 2);
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
