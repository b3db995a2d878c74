//! Sampling: turning one decode step's logits into the next token id.
//!
//! [`SamplingParams`] carries the OpenAI / vLLM request knobs and checks them
//! ([`SamplingParams::validate`]); a [`Sampler`] holds one request's state (its RNG and the token
//! counts the penalties need) and picks tokens. The pipeline follows vLLM's (v0) order:
//!
//! 1. penalties on the raw logits: repetition (over prompt and output tokens), then frequency and
//!    presence (over output tokens only);
//! 2. temperature 0 (below [`GREEDY_TEMPERATURE`]): argmax, lowest index on ties; otherwise
//!    divide by the temperature and softmax;
//! 3. top-k, then top-p on the distribution renormalised over the top-k set, then min-p;
//! 4. draw from what is left (renormalised) with the request's ChaCha8 RNG.
//!
//! Two deliberate differences from vLLM, both in corner cases: top-k keeps exactly `k` tokens
//! (ties at the boundary go to the lower index, so `top_k = 1` is exactly greedy), and min-p runs
//! after top-p as in vLLM v0 (v1 runs it before top-k/top-p; the two differ only when both
//! `top_p` and `min_p` are set).
//!
//! The vocabulary is 202,048 entries, so nothing here sorts it: top-k uses a bounded heap that
//! skips whole lane groups (or a linear-time selection for large `k`), min-p is a threshold, and
//! top-p sorts only the tokens above a guessed probability threshold, or, when those do not
//! reach `top_p` of the mass, only the histogram bucket in which the cumulative mass crosses
//! `top_p`. The passes over the whole vocabulary are written to vectorise, including `exp`,
//! which is computed in plain f32 arithmetic so that a seed gives the same tokens on every
//! machine.
//!
//! NaN logits are treated as -inf. If every logit is -inf (or NaN) there is nothing to draw from
//! and the sampler returns token 0, the same answer greedy's lowest-index rule gives.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use super::logprobs::MAX_TOP_LOGPROBS;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Temperatures below this are greedy: dividing by a smaller number only overflows (vLLM uses the
/// same epsilon).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;
/// Most stop strings one request may carry. OpenAI allows 4; vLLM has no limit. Each one costs a
/// substring search per generated token, so the limit keeps that bounded.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes. It bounds how much text the stop checker may hold back.
pub const MAX_STOP_STRING_BYTES: usize = 1024;
/// `max_tokens` when the request does not say: vLLM's and the OpenAI completions API's default.
/// The chat API layer is expected to replace it with "the rest of the context".
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// OpenAI's bound on `presence_penalty` and `frequency_penalty` (both ways).
pub const MAX_ABS_PENALTY: f32 = 2.0;

/// A request's sampling and stopping knobs, as the OpenAI / vLLM APIs name them.
///
/// Missing fields deserialise to their [`Default`] values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (anything below [`GREEDY_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Keep tokens whose probability is at least `min_p` times the largest; 0 disables.
    pub min_p: f32,
    /// RNG seed; the same seed and logits give the same tokens on every run and machine.
    /// `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// Hugging Face / vLLM repetition penalty over prompt and output tokens: positive logits
    /// are divided by it, negative ones multiplied. 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted once per earlier occurrence in the output.
    pub frequency_penalty: f32,
    /// Most tokens to generate, counting a final EOS or stop token.
    pub max_tokens: usize,
    /// Strings that end generation; the matched string is not part of the output.
    pub stop: Vec<String>,
    /// Token ids that end generation, besides the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's EOS ids (explicit `stop_token_ids` still stop).
    pub ignore_eos: bool,
    /// Report each generated token's logprob and this many alternatives (at most
    /// [`MAX_TOP_LOGPROBS`]); `None` reports nothing.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: plain sampling at temperature 1, no truncation, no penalties, no stop
    /// strings, [`DEFAULT_MAX_TOKENS`] tokens.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: DEFAULT_MAX_TOKENS,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Why a [`SamplingParams`] was rejected. Every message names the offending field, because the
/// API layer returns it to the client as a 400.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    #[error("max_tokens must be at least 1, got 0")]
    MaxTokens,
    #[error("stop: at most {max} stop strings are allowed, got {count}")]
    TooManyStopStrings { count: usize, max: usize },
    #[error("stop[{index}] must not be empty")]
    EmptyStopString { index: usize },
    #[error("stop[{index}] is {len} bytes long; at most {max} are allowed")]
    StopStringTooLong { index: usize, len: usize, max: usize },
    #[error("top_logprobs must be at most {max}, got {got}")]
    TopLogprobs { got: u32, max: u32 },
}

impl SamplingError {
    /// The request field at fault, for the `param` of an OpenAI error object.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Temperature(_) => "temperature",
            Self::TopP(_) => "top_p",
            Self::MinP(_) => "min_p",
            Self::RepetitionPenalty(_) => "repetition_penalty",
            Self::PresencePenalty(_) => "presence_penalty",
            Self::FrequencyPenalty(_) => "frequency_penalty",
            Self::MaxTokens => "max_tokens",
            Self::TooManyStopStrings { .. } | Self::EmptyStopString { .. } | Self::StopStringTooLong { .. } => "stop",
            Self::TopLogprobs { .. } => "top_logprobs",
        }
    }
}

impl SamplingParams {
    /// Checks every field; the first bad one is reported.
    ///
    /// Every check is written as "not inside the valid range" so that NaN fails it too.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(SamplingError::Temperature(t));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(SamplingError::MinP(self.min_p));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(SamplingError::RepetitionPenalty(r));
        }
        let penalty_range = -MAX_ABS_PENALTY..=MAX_ABS_PENALTY;
        if !penalty_range.contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !penalty_range.contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        if self.max_tokens == 0 {
            return Err(SamplingError::MaxTokens);
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(SamplingError::TooManyStopStrings { count: self.stop.len(), max: MAX_STOP_STRINGS });
        }
        if let Some(got) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(SamplingError::TopLogprobs { got, max: MAX_TOP_LOGPROBS });
        }
        for (index, s) in self.stop.iter().enumerate() {
            if s.is_empty() {
                return Err(SamplingError::EmptyStopString { index });
            }
            if s.len() > MAX_STOP_STRING_BYTES {
                return Err(SamplingError::StopStringTooLong { index, len: s.len(), max: MAX_STOP_STRING_BYTES });
            }
        }
        Ok(())
    }

    /// Whether this request picks tokens by argmax.
    pub fn is_greedy(&self) -> bool {
        // NaN counts as greedy rather than poisoning the softmax.
        self.temperature.is_nan() || self.temperature < GREEDY_TEMPERATURE
    }
}

/// One token under consideration: `val` is its logit while top-k selects, its unnormalised
/// probability afterwards (the map is monotone, so the order survives).
#[derive(Clone, Copy, Debug)]
struct Cand {
    val: f32,
    idx: u32,
}

// Better candidates compare *less*, so `sort_unstable` puts the best first, `select_nth_unstable`
// gathers the best `k` in front, and a max-`BinaryHeap` keeps the worst kept one on top.
// Values are never NaN here (the sampler maps NaN to -inf first), and -0.0 == 0.0 falls through
// to the index, matching greedy's tie rule.
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        other.val.partial_cmp(&self.val).unwrap_or(Ordering::Equal).then(self.idx.cmp(&other.idx))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cand {}

/// What one step's filtering left to draw from.
#[derive(Debug, PartialEq)]
enum Pool {
    /// No randomness needed (greedy, or nothing has positive probability).
    Fixed(u32),
    /// The logits slice now holds unnormalised probabilities for the whole vocabulary, with
    /// per-block sums in `Sampler::block_sums`; `total` is their sum.
    Vocab { total: f64 },
    /// `Sampler::cands` holds the survivors with unnormalised probabilities.
    Cands,
}

/// Width of the explicit SIMD-friendly lanes. Float sums are not reassociated by the compiler,
/// so the loops spell out independent accumulators for it to vectorise.
const LANES: usize = 16;
/// Tokens per partial sum kept for the draw, so that a draw walks ~200 sums and one block
/// instead of half the vocabulary.
const DRAW_BLOCK: usize = 1024;
/// Histogram buckets for top-p come from the top bits of the (positive) f32 weight: exponent
/// and 4 mantissa bits, i.e. buckets ~6% wide. Weights are at most 1.0, whose bucket is last.
const HIST_SHIFT: u32 = 19;
const HIST_LEN: usize = (0x3F80_0000 >> HIST_SHIFT) + 1;

/// Picks one request's tokens. Create one per request with [`Sampler::new`], call
/// [`Sampler::sample`] once per step and [`Sampler::accept`] with the token actually appended.
#[derive(Debug)]
pub struct Sampler {
    greedy: bool,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    rng: ChaCha8Rng,
    /// Prompt and output tokens, kept only when the repetition penalty is on.
    seen: HashSet<u32>,
    /// Output token counts, kept only when a presence or frequency penalty is on.
    output_counts: HashMap<u32, u32>,
    // Scratch reused across steps so that sampling does not allocate per token.
    cands: Vec<Cand>,
    boundary: Vec<Cand>,
    block_sums: Vec<f64>,
    hist: Vec<f64>,
}

impl Sampler {
    /// A sampler for one request. `params` should have passed [`SamplingParams::validate`];
    /// out-of-range values do not panic but are only clamped loosely (e.g. `top_p` above 1 is
    /// off, `top_p` at or below 0 keeps the single best token).
    pub fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(entropy_seed);
        let repetition = params.repetition_penalty != 1.0;
        let seen = if repetition { prompt_ids.iter().copied().collect() } else { HashSet::new() };
        Self {
            greedy: params.is_greedy(),
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seen,
            output_counts: HashMap::new(),
            cands: Vec::new(),
            boundary: Vec::new(),
            block_sums: Vec::new(),
            hist: Vec::new(),
        }
    }

    /// Picks the next token from one step's raw logits (`[vocab]`). The slice is used as scratch
    /// and holds garbage afterwards. Does not record the token: call [`Sampler::accept`].
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        match self.filter(logits) {
            Pool::Fixed(token) => token,
            Pool::Vocab { total } => {
                let u = self.rng.random::<f64>() * total;
                draw_blocked(logits, &self.block_sums, u)
            }
            Pool::Cands => {
                let total: f64 = self.cands.iter().map(|c| f64::from(c.val)).sum();
                let u = self.rng.random::<f64>() * total;
                draw(self.cands.iter().map(|c| (c.idx, c.val)), u)
            }
        }
    }

    /// Records a generated token, for the penalties of later steps.
    pub fn accept(&mut self, token: u32) {
        if self.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Everything except the draw: penalties, greedy, temperature, top-k, top-p, min-p.
    fn filter(&mut self, logits: &mut [f32]) -> Pool {
        self.apply_penalties(logits);
        let best = sanitize_and_argmax(logits);
        let max = logits.get(best).copied().unwrap_or(f32::NEG_INFINITY);
        if self.greedy || max == f32::NEG_INFINITY {
            return Pool::Fixed(best as u32);
        }
        // Greedy catches temperatures below GREEDY_TEMPERATURE, so this is finite.
        let inv_t = 1.0 / self.temperature;
        let top_p_on = self.top_p < 1.0;
        let top_p = f64::from(self.top_p);
        // The best token's weight is exactly 1 (see `weight`), so min-p's threshold
        // `min_p * p_max` is `min_p` in weight units.
        let min_w = if self.min_p > 0.0 { self.min_p.min(1.0) } else { 0.0 };

        if self.top_k > 0 && self.top_k < logits.len() {
            self.select_top_k(logits);
            // Sorted best first, so each later filter only shortens a prefix.
            for c in &mut self.cands {
                c.val = weight(c.val, max, inv_t);
            }
            if top_p_on {
                let total: f64 = self.cands.iter().map(|c| f64::from(c.val)).sum();
                let keep = top_p_keep(&self.cands, 0.0, top_p * total, true);
                self.cands.truncate(keep);
            }
            let keep = self.cands.iter().position(|c| !(c.val > 0.0 && c.val >= min_w)).unwrap_or(self.cands.len());
            self.cands.truncate(keep.max(1));
            return Pool::Cands;
        }

        let total = exponentiate(logits, max, inv_t, &mut self.block_sums);
        if top_p_on {
            self.top_p_over_vocab(logits, total, top_p, min_w);
            Pool::Cands
        } else if min_w > 0.0 {
            collect_at_least(logits, min_w, &mut self.cands);
            Pool::Cands
        } else {
            Pool::Vocab { total }
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let r = self.repetition_penalty;
        if r != 1.0 {
            for &token in &self.seen {
                if let Some(x) = logits.get_mut(token as usize) {
                    *x = if *x > 0.0 { *x / r } else { *x * r };
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&token, &count) in &self.output_counts {
                if let Some(x) = logits.get_mut(token as usize) {
                    // Two steps in vLLM's order so the rounding matches.
                    *x -= self.frequency_penalty * count as f32;
                    *x -= self.presence_penalty;
                }
            }
        }
    }

    /// Leaves the `top_k` best logits in `self.cands`, best first. Callers ensure
    /// `0 < top_k < logits.len()`.
    fn select_top_k(&mut self, logits: &[f32]) {
        let k = self.top_k;
        self.cands.clear();
        if k.saturating_mul(16) <= logits.len() {
            // Small k: one pass with a bounded heap. Once it is full, a whole lane group is
            // skipped when none of it beats the worst token kept (an equal value loses: its
            // index is higher), which is almost always, so the pass runs at SIMD speed.
            let mut heap = BinaryHeap::from(std::mem::take(&mut self.cands));
            let (groups, rest) = logits.as_chunks::<LANES>();
            let offer = |heap: &mut BinaryHeap<Cand>, i: usize, x: f32| {
                let c = Cand { val: x, idx: i as u32 };
                if heap.len() < k {
                    heap.push(c);
                } else if let Some(mut worst) = heap.peek_mut()
                    && c < *worst
                {
                    *worst = c;
                }
            };
            for (g, group) in groups.iter().enumerate() {
                if heap.len() == k
                    && let Some(worst) = heap.peek()
                {
                    let floor = worst.val;
                    if !group.iter().fold(false, |any, &x| any | (x > floor)) {
                        continue;
                    }
                }
                for (j, &x) in group.iter().enumerate() {
                    offer(&mut heap, g * LANES + j, x);
                }
            }
            let base = groups.len() * LANES;
            for (j, &x) in rest.iter().enumerate() {
                offer(&mut heap, base + j, x);
            }
            self.cands = heap.into_vec();
        } else {
            self.cands.extend(logits.iter().enumerate().map(|(i, &x)| Cand { val: x, idx: i as u32 }));
            self.cands.select_nth_unstable(k - 1);
            self.cands.truncate(k);
        }
        // A canonical order, so draws do not depend on how std's selection happens to permute.
        self.cands.sort_unstable();
    }

    /// Top-p (then min-p) over the whole vocabulary, whose unnormalised probabilities are in `w`
    /// and sum to `total`. Leaves the survivors in `self.cands`.
    ///
    /// Sorting 200k floats per token is the cost to avoid. If the tokens with probability at
    /// least `t` already reach `top_p` of the mass, the top-p set lies among them (every other
    /// token is less likely than all of them), so only they need sorting. A guess of `t` that
    /// holds for the usual peaked distributions is tried first; when it fails (flat
    /// distributions, where the nucleus is large), a histogram of the mass by weight finds the
    /// bucket where the cumulative mass crosses `top_p`, and only that bucket is sorted.
    fn top_p_over_vocab(&mut self, w: &[f32], total: f64, top_p: f64, min_w: f32) {
        let target = top_p * total;
        let guess = ((1.0 - top_p) / 256.0 * total) as f32;
        let threshold = guess.max(min_w);
        let mass = collect_at_least(w, threshold, &mut self.cands);
        // When min-p sets the threshold, whatever top-p keeps beyond it would go anyway.
        if mass >= target || guess <= min_w {
            self.cands.sort_unstable();
            let keep = top_p_keep(&self.cands, 0.0, target, true);
            self.cands.truncate(keep);
            return;
        }

        self.hist.clear();
        self.hist.resize(HIST_LEN, 0.0);
        for &x in w {
            if x > 0.0
                && let Some(h) = self.hist.get_mut(bucket(x))
            {
                *h += f64::from(x);
            }
        }
        let mut before = 0.0;
        let mut crossing = None;
        for (b, &m) in self.hist.iter().enumerate().rev() {
            if m > 0.0 && before + m >= target {
                crossing = Some(b);
                break;
            }
            before += m;
        }
        let Some(crossing) = crossing else {
            // Only rounding keeps the buckets from reaching top_p of the total: keep all.
            collect_at_least(w, min_w, &mut self.cands);
            return;
        };
        self.cands.clear();
        self.boundary.clear();
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 && x >= min_w {
                let b = bucket(x);
                let c = Cand { val: x, idx: i as u32 };
                if b > crossing {
                    self.cands.push(c);
                } else if b == crossing {
                    self.boundary.push(c);
                }
            }
        }
        self.boundary.sort_unstable();
        let keep = top_p_keep(&self.boundary, before, target, self.cands.is_empty());
        self.cands.extend_from_slice(&self.boundary[..keep]);
    }
}

/// Maps NaN to -inf in place and returns the first index of the maximum (0 when empty, or when
/// everything is -inf).
fn sanitize_and_argmax(logits: &mut [f32]) -> usize {
    // Two branch-free passes that vectorise beat one that tracks indices: the maximum first,
    // then the first lane group holding it.
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let (groups, rest) = logits.as_chunks_mut::<LANES>();
    for group in groups.iter_mut() {
        for (x, m) in group.iter_mut().zip(&mut lanes) {
            *x = if x.is_nan() { f32::NEG_INFINITY } else { *x };
            *m = if *x > *m { *x } else { *m };
        }
    }
    let mut max = lanes.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    for x in rest.iter_mut() {
        *x = if x.is_nan() { f32::NEG_INFINITY } else { *x };
        max = if *x > max { *x } else { max };
    }
    let (groups, _) = logits.as_chunks::<LANES>();
    let start = groups
        .iter()
        .position(|g| g.iter().fold(false, |hit, &x| hit | (x == max)))
        .map_or(groups.len() * LANES, |g| g * LANES);
    logits.get(start..).and_then(|tail| tail.iter().position(|&x| x == max)).map_or(0, |j| start + j)
}

/// Unnormalised probability of logit `x`: `exp((x - max) / t)` is `softmax(x / t)` up to the
/// normaliser, never overflows, and is exactly 1 for the best token. A +inf logit takes all
/// the mass (shared with any other +inf).
fn weight(x: f32, max: f32, inv_t: f32) -> f32 {
    if max == f32::INFINITY { if x == f32::INFINITY { 1.0 } else { 0.0 } } else { exp_nonpositive((x - max) * inv_t) }
}

/// Replaces each logit by its `weight`, records per-[`DRAW_BLOCK`] sums in `block_sums`, and
/// returns the total.
fn exponentiate(logits: &mut [f32], max: f32, inv_t: f32, block_sums: &mut Vec<f64>) -> f64 {
    block_sums.clear();
    let mut total = 0.0;
    for block in logits.chunks_mut(DRAW_BLOCK) {
        let mut sum = 0.0f64;
        if max == f32::INFINITY {
            for x in block {
                *x = weight(*x, max, inv_t);
                sum += f64::from(*x);
            }
        } else {
            let (groups, rest) = block.as_chunks_mut::<LANES>();
            let mut lanes = [0.0f32; LANES];
            for group in groups {
                for (x, acc) in group.iter_mut().zip(&mut lanes) {
                    *x = exp_nonpositive((*x - max) * inv_t);
                    *acc += *x;
                }
            }
            for x in rest {
                *x = exp_nonpositive((*x - max) * inv_t);
                sum += f64::from(*x);
            }
            sum += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
        }
        block_sums.push(sum);
        total += sum;
    }
    total
}

/// `e^s` for `s <= 0` (including -inf), to about 1 ulp, in plain f32 arithmetic (Cephes'
/// `expf`). Written out rather than calling libm's `expf` so that the loop vectorises (~10x
/// faster over 200k logits) and gives the same bits on every machine, which the seeded
/// reproducibility promise needs. Results below e^-86 (~4e-38) are flushed to 0 rather than
/// becoming subnormals, which are slow and meaningless as probabilities.
fn exp_nonpositive(s: f32) -> f32 {
    const MIN: f32 = -86.0;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = s.max(MIN);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // n is in [-124, 0], so 2^n is a normal float built straight from its exponent bits.
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if s < MIN { 0.0 } else { e_r * scale }
}

/// Top-p histogram bucket of a weight in (0, 1]; monotone in the weight.
fn bucket(w: f32) -> usize {
    (w.to_bits() >> HIST_SHIFT) as usize
}

/// Fills `out` with the positive weights `>= threshold`, in index order, and returns their sum.
fn collect_at_least(w: &[f32], threshold: f32, out: &mut Vec<Cand>) -> f64 {
    out.clear();
    let mut mass = 0.0;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 && x >= threshold {
            out.push(Cand { val: x, idx: i as u32 });
            mass += f64::from(x);
        }
    }
    mass
}

/// How many of `sorted` (best first) top-p keeps when `before` is the mass of everything
/// better: a token stays iff the mass strictly before it is below `target`, so the token that
/// crosses `target` is in. With `at_least_one`, the first token stays regardless.
fn top_p_keep(sorted: &[Cand], before: f64, target: f64, at_least_one: bool) -> usize {
    let mut cum = before;
    for (j, c) in sorted.iter().enumerate() {
        if cum >= target && !(j == 0 && at_least_one) {
            return j;
        }
        cum += f64::from(c.val);
    }
    sorted.len()
}

/// Inverse-CDF draw: the first token whose cumulative weight exceeds `u`. Rounding can leave
/// `u` past the end; the last token with positive weight takes it then.
fn draw(weights: impl Iterator<Item = (u32, f32)>, u: f64) -> u32 {
    let mut cum = 0.0f64;
    let mut last = 0;
    for (idx, w) in weights {
        if w > 0.0 {
            cum += f64::from(w);
            last = idx;
            if u < cum {
                return idx;
            }
        }
    }
    last
}

/// [`draw`] over the whole vocabulary, skipping whole blocks by their sums.
fn draw_blocked(w: &[f32], block_sums: &[f64], u: f64) -> u32 {
    let in_block = |b: usize, u: f64| {
        let start = b * DRAW_BLOCK;
        let end = (start + DRAW_BLOCK).min(w.len());
        let tokens = w.get(start..end).unwrap_or_default();
        draw(tokens.iter().enumerate().map(|(i, &x)| ((start + i) as u32, x)), u)
    };
    let mut cum = 0.0;
    for (b, &s) in block_sums.iter().enumerate() {
        if s > 0.0 && u < cum + s {
            return in_block(b, u - cum);
        }
        cum += s;
    }
    // Rounding left `u` past the end.
    block_sums.iter().rposition(|&s| s > 0.0).map_or(0, |b| in_block(b, f64::INFINITY))
}

/// A seed for requests that gave none. `rand` is built here without its `os_rng` feature, but
/// std's `RandomState` keys come from the OS once per thread and change on every call; the
/// counter and the clock separate requests even if that ever changed.
fn entropy_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, AtomicOrdering::Relaxed));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}

#[cfg(test)]
mod tests;
