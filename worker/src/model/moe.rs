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

    /// Top-`top_k` experts of each token by raw logit (`logits`: `[tokens, experts]`), scored
    /// by their sigmoids, sorted by (expert, token).
    pub fn from_logits(logits: &[f32], experts: usize, top_k: usize) -> Self {
        let tokens = logits.len() / experts.max(1);
        let mut routes: Vec<Route> = Vec::with_capacity(tokens * top_k);
        for (t, row) in logits.chunks_exact(experts.max(1)).enumerate() {
            for (expert, logit) in activation::top_k(row, top_k) {
                routes.push(Route { token: t, expert, score: activation::sigmoid(logit) });
            }
        }
        routes.sort_by_key(|r| (r.expert, r.token));
        let mut offsets = vec![0usize; experts + 1];
        for r in &routes {
            offsets[r.expert + 1] += 1;
        }
        for e in 0..experts {
            offsets[e + 1] += offsets[e];
        }
        Routing { routes, offsets }
    }

    /// No routes (a worker with no tokens this step still joins the layer's exchange).
    pub fn empty(experts: usize) -> Self {
        Routing { routes: Vec::new(), offsets: vec![0; experts + 1] }
    }

    /// Tokens per expert (for load statistics).
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// The expert-parallel exchange of one MoE layer, as the model sees it: each route of this
/// worker's tokens goes to a worker holding its expert, the rows the peers send run on `shard`,
/// and each route's expert output comes back.
///
/// The model defines the seam and [`crate::ep::EpRunner`] implements it over a transport. An
/// exchange is a collective: every worker of a group calls it for every MoE layer of every
/// step, with or without routes of its own. A model run with no exchange holds every expert.
pub trait ExpertExchange: Send {
    /// `x`: `[tokens, hidden]` post-norm rows of this worker; returns `[routes, hidden]`, the
    /// expert output of each route of `routing`, in `routing` order.
    fn exchange(&mut self, layer: usize, shard: &dyn ExpertShard, x: &[f32], routing: &Routing) -> ExchangeResult;
}

/// The routed experts one worker holds, as the expert-parallel exchange runs them on the rows
/// its peers sent: the CPU [`MoeBlock`], or the same layer's experts on a GPU.
pub trait ExpertShard {
    fn hidden(&self) -> usize;
    fn is_local(&self, expert: usize) -> bool;
    /// Runs already-scaled rows `inputs` (`[rows, hidden]`), laid out as `groups` of
    /// `(expert, rows)` in ascending expert order, into `out` (`[rows, hidden]`). Every row is
    /// computed independently of the others, so a row's result does not depend on the batch.
    fn run_groups(&self, groups: &[(usize, usize)], inputs: &[f32], out: &mut [f32]) -> Result<(), ExpertError>;
}

impl ExpertShard for MoeBlock {
    fn hidden(&self) -> usize {
        self.hidden
    }

    fn is_local(&self, expert: usize) -> bool {
        MoeBlock::is_local(self, expert)
    }

    fn run_groups(&self, groups: &[(usize, usize)], inputs: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        let mut start = 0;
        for &(expert, rows) in groups {
            let span = start * self.hidden..(start + rows) * self.hidden;
            self.run_expert(expert, &inputs[span.clone()], &mut out[span])?;
            start += rows;
        }
        Ok(())
    }
}

/// Why this worker's own routed experts could not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpertError {
    #[error("expert {expert} is not held by this worker")]
    NotHeld { expert: usize },
    /// The device the experts live on failed (a GPU shard).
    #[error("{0}")]
    Device(String),
}

/// Whom a failed exchange blames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// A peer closed its connection, sent something malformed, or fell out of step.
    Peer { rank: usize },
    /// A peer missed the collective's deadline.
    Late { rank: usize },
    /// This worker: its experts could not run the rows the peers sent, or its data plane
    /// failed without naming a peer.
    Here,
}

/// Why an expert-parallel exchange failed: whom it blames, and the data plane's own account
/// (it names the layer, the peer and what went wrong).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{detail}")]
pub struct ExchangeError {
    pub blame: Blame,
    pub detail: String,
}

/// Each route's expert output, `[routes, hidden]`, or why the exchange failed.
pub type ExchangeResult = Result<Vec<f32>, ExchangeError>;

/// Add expert output rows into their tokens' rows. Callers visit experts in index order, so
/// with top-k > 1 a token's outputs are summed in the same order as transformers' sum over
/// the expert axis — and in the same order on every worker layout.
pub fn accumulate(routed: &mut [f32], tokens: impl Iterator<Item = usize>, rows: &[f32], hidden: usize) {
    for (t, row) in tokens.zip(rows.chunks_exact(hidden)) {
        for (acc, v) in routed[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
            *acc += v;
        }
    }
}

/// One routed expert's weights, in one of the two checkpoint layouts.
#[derive(Debug)]
enum Expert {
    /// Slices of HF's fused `experts.gate_up_proj` / `experts.down_proj`.
    Fused {
        gate_up: Weight, // [hidden, 2·width], input-major, gate columns first
        down: Weight,    // [width, hidden], input-major
    },
    /// Per-expert nn.Linear modules `experts.{e}.{gate,up,down}_proj` (Meta's FP8 release and
    /// `herd quantize` output; float, FP8 or int4).
    Linear {
        gate: Weight, // [width, hidden]
        up: Weight,   // [width, hidden]
        down: Weight, // [hidden, width]
    },
}

impl Expert {
    /// Expert `e` of the `experts` module `w` is scoped to.
    fn load(w: &WeightLoader<'_>, shape: ExpertShape, e: usize) -> Result<Self, ModelError> {
        let ExpertShape { experts, hidden, width, per_expert } = shape;
        Ok(if per_expert {
            let w = w.pp(e);
            Expert::Linear {
                gate: w.linear("gate_proj", width, hidden)?,
                up: w.linear("up_proj", width, hidden)?,
                down: w.linear("down_proj", hidden, width)?,
            }
        } else {
            Expert::Fused {
                gate_up: w.slice3("gate_up_proj", [experts, hidden, 2 * width], e)?,
                down: w.slice3("down_proj", [experts, width, hidden], e)?,
            }
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Expert::Fused { gate_up, down } => gate_up.bytes() + down.bytes(),
            Expert::Linear { gate, up, down } => gate.bytes() + up.bytes() + down.bytes(),
        }
    }
}

/// One routed expert's weights as stored, for a backend that uploads them (the GPU engine).
#[derive(Clone, Copy, Debug)]
pub enum ExpertWeights<'a> {
    /// The fused checkpoint layout, input-major: `gate_up` `[hidden, 2·width]` (gate columns
    /// first), `down` `[width, hidden]`.
    Fused { gate_up: &'a Weight, down: &'a Weight },
    /// Per-expert nn.Linear modules (quantized checkpoints): `[width, hidden]` ×2, `[hidden, width]`.
    Linear { gate: &'a Weight, up: &'a Weight, down: &'a Weight },
}

#[derive(Clone, Copy)]
struct ExpertShape {
    experts: usize,
    hidden: usize,
    width: usize,
    /// Per-expert nn.Linear tensors rather than fused ones.
    per_expert: bool,
}

/// Whether the `experts` module `w` is scoped to stores per-expert nn.Linear modules.
fn per_expert_layout(w: &WeightLoader<'_>) -> bool {
    let gate = w.pp("0.gate_proj");
    gate.contains("weight") || gate.contains("weight_packed")
}

#[derive(Debug)]
pub struct MoeBlock {
    router: Weight, // [experts, hidden]
    /// Only the experts this worker holds are loaded (`None` elsewhere).
    local: Vec<Option<Expert>>,
    shared: Mlp,
    experts: usize,
    top_k: usize,
    hidden: usize,
    width: usize,
    /// Bytes of one expert as stored (for bandwidth accounting).
    expert_bytes: usize,
}

/// Which routed experts a layer loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertSubset<'a> {
    All,
    Only(&'a [usize]),
}

impl MoeBlock {
    /// Load the `feed_forward` module `w` is scoped to: `router.weight`, the shared expert,
    /// and the routed experts in `subset` (slices of `experts.{gate_up_proj,down_proj}`, or
    /// the per-expert modules `experts.{e}.{gate,up,down}_proj`; only their bytes are mapped).
    pub fn load(
        w: &WeightLoader<'_>,
        hidden: usize,
        width: usize,
        experts: usize,
        top_k: usize,
        subset: ExpertSubset<'_>,
    ) -> Result<Self, ModelError> {
        let routed = w.pp("experts");
        let shape = ExpertShape { experts, hidden, width, per_expert: per_expert_layout(&routed) };
        let mut local: Vec<Option<Expert>> = (0..experts).map(|_| None).collect();
        let mut expert_bytes = 0;
        for (e, slot) in local.iter_mut().enumerate() {
            if let ExpertSubset::Only(list) = subset
                && !list.contains(&e)
            {
                continue;
            }
            let expert = Expert::load(&routed, shape, e)?;
            expert_bytes = expert.bytes();
            *slot = Some(expert);
        }
        if expert_bytes == 0 && experts > 0 {
            // A worker holding no expert of this layer still checks the tensors exist.
            expert_bytes = Expert::load(&routed, shape, 0)?.bytes();
        }
        Ok(Self {
            router: w.weight("router.weight", &[experts, hidden])?,
            local,
            shared: Mlp::load(&w.pp("shared_expert"), hidden, width)?,
            experts,
            top_k,
            hidden,
            width,
            expert_bytes,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.experts
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Columns of each expert's intermediate (and of the shared expert's).
    pub fn width(&self) -> usize {
        self.width
    }

    /// `[experts, hidden]`
    pub fn router(&self) -> &Weight {
        &self.router
    }

    pub fn shared_expert(&self) -> &Mlp {
        &self.shared
    }

    /// Expert `e`'s weights, if this worker holds it.
    pub fn expert_weights(&self, e: usize) -> Option<ExpertWeights<'_>> {
        Some(match self.local.get(e)?.as_ref()? {
            Expert::Fused { gate_up, down } => ExpertWeights::Fused { gate_up, down },
            Expert::Linear { gate, up, down } => ExpertWeights::Linear { gate, up, down },
        })
    }

    pub fn is_local(&self, expert: usize) -> bool {
        self.local.get(expert).is_some_and(Option::is_some)
    }

    /// `x`: `[tokens, hidden]` → `out`: `[tokens, hidden]` (shared + routed experts). With an
    /// `exchange` the routed experts run wherever the group's placement puts them; without
    /// one every expert must be held here.
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        out: &mut [f32],
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<Routing, ModelError> {
        // The router and the shared expert's gate/up read the same `x`: one parallel region.
        let tokens = x.len() / self.hidden;
        let mut logits = vec![0.0f32; tokens * self.experts]; // [tokens, experts]
        self.shared.forward_with(x, out, Some((self.router.matrix(), &mut logits)));
        let routing = self.route_logits(&logits);
        let mut routed = vec![0.0f32; x.len()]; // [tokens, hidden]
        match exchange {
            Some(exchange) => {
                let y = exchange.exchange(layer, self, x, &routing)?; // [routes, hidden]
                // The combine in route order (expert, then token), as the local path sums.
                accumulate(&mut routed, routing.routes.iter().map(|r| r.token), &y, self.hidden);
            }
            None => self.run_local(x, &routing, &mut routed)?,
        }
        for (o, r) in out.iter_mut().zip(&routed) {
            *o += r;
        }
        Ok(routing)
    }

    /// Every routed expert in this process: each expert on its gathered rows, added into
    /// `routed` (`[tokens, hidden]`) in expert order.
    fn run_local(&self, x: &[f32], routing: &Routing, routed: &mut [f32]) -> Result<(), ExpertError> {
        for e in 0..self.experts {
            let routes = routing.expert_routes(e);
            if routes.is_empty() {
                continue;
            }
            let inputs = self.gather(x, routes);
            let mut y = vec![0.0f32; inputs.len()];
            self.run_expert(e, &inputs, &mut y)?;
            accumulate(routed, routes.iter().map(|r| r.token), &y, self.hidden);
        }
        Ok(())
    }

    /// Top-k experts of each token by raw router logit; scores are their sigmoids.
    pub fn route(&self, x: &[f32]) -> Routing {
        let tokens = x.len() / self.hidden;
        let mut logits = vec![0.0f32; tokens * self.experts]; // [tokens, experts]
        matmul::matmul_t(x, self.router.matrix(), &mut logits);
        self.route_logits(&logits)
    }

    /// [`route`](Self::route) from router logits already computed: `[tokens, experts]`.
    pub fn route_logits(&self, logits: &[f32]) -> Routing {
        Routing::from_logits(logits, self.experts, self.top_k)
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
    pub fn run_expert(&self, e: usize, inputs: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        let expert = self.local.get(e).and_then(Option::as_ref).ok_or(ExpertError::NotHeld { expert: e })?;
        let n = inputs.len() / self.hidden;
        match expert {
            Expert::Fused { gate_up: gu, down } => {
                let mut gate_up = vec![0.0f32; n * 2 * self.width]; // [n, 2·width] = [gate | up]
                matmul::matmul(inputs, gu.matrix(), &mut gate_up);
                let mut act = vec![0.0f32; n * self.width]; // [n, width]
                activation::swiglu_fused(&gate_up, self.width, &mut act);
                matmul::matmul(&act, down.matrix(), out);
            }
            Expert::Linear { gate: g, up: u, down } => {
                let mut gate = vec![0.0f32; n * self.width]; // [n, width]
                let mut up = vec![0.0f32; n * self.width]; // [n, width]
                matmul::matmul_t(inputs, g.matrix(), &mut gate);
                matmul::matmul_t(inputs, u.matrix(), &mut up);
                activation::swiglu_in_place(&mut gate, &up);
                matmul::matmul_t(&gate, down.matrix(), out);
            }
        }
        Ok(())
    }

    /// Bytes held: the router, the shared expert and the local routed experts.
    pub fn bytes(&self) -> usize {
        let local = self.local.iter().flatten().map(Expert::bytes).sum::<usize>();
        self.router.bytes() + self.shared.bytes() + local
    }

    /// Bytes one token reads: router, shared expert and `top_k` routed experts.
    pub fn active_bytes(&self) -> usize {
        self.router.bytes() + self.shared.bytes() + self.top_k * self.expert_bytes
    }
}
