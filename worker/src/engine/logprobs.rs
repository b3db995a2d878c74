//! Log-probabilities of generated tokens, as the OpenAI API reports them.
//!
//! Like vLLM's default (`raw_logprobs`), they come from the model's raw logits of the step:
//! `log_softmax(logits)`, before penalties, temperature and truncation. So they describe the
//! model, not the sampler, and greedy and sampled requests report the same numbers for the
//! same prefix.

use serde::{Deserialize, Serialize};

/// Most alternatives a request may ask for per token (vLLM's default `max_logprobs`; OpenAI's
/// chat API allows 20).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// `log p(token)` under the step's raw distribution.
    pub logprob: f32,
    /// The `top` most likely tokens, best first (ties: lower id first), with their logprobs.
    pub top: Vec<(u32, f32)>,
}

/// Logprob of `token` and the `top` best entries of `log_softmax(logits)`; `logits` is `[vocab]`.
/// NaN logits count as -inf, as in the sampler.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let max = logits.iter().copied().map(clean).fold(f32::NEG_INFINITY, f32::max);
    let log_z = if max == f32::NEG_INFINITY {
        0.0
    } else {
        let sum: f64 = logits.iter().map(|&v| f64::from(clean(v) - max).exp()).sum();
        f64::from(max) + sum.ln()
    };
    let lp = |v: f32| (f64::from(clean(v)) - log_z) as f32;
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&v| lp(v));
    TokenLogprobs { logprob, top: best(logits, top, clean).into_iter().map(|i| (i as u32, lp(logits[i]))).collect() }
}

/// Indices of the `k` largest values, best first, ties to the lower index.
fn best(values: &[f32], k: usize, clean: impl Fn(f32) -> f32) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    // A sorted buffer of at most k entries: k ≤ 20, so insertion beats a heap.
    let mut out: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        let v = clean(v);
        if out.len() == k && v <= out[k - 1].0 {
            continue;
        }
        let at = out.partition_point(|&(w, _)| w >= v);
        out.insert(at, (v, i));
        out.truncate(k);
    }
    out.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(logits: &[f32]) -> Vec<f64> {
        let z: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
        logits.iter().map(|&v| f64::from(v) - z.ln()).collect()
    }

    #[test]
    fn matches_a_naive_log_softmax() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
        let want = naive(&logits);
        let got = token_logprobs(&logits, 17, 5);
        assert!((f64::from(got.logprob) - want[17]).abs() < 1e-5);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let ids: Vec<u32> = got.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, order[..5].iter().map(|&i| i as u32).collect::<Vec<_>>());
        for &(i, lp) in &got.top {
            assert!((f64::from(lp) - want[i as usize]).abs() < 1e-5);
        }
        let total: f64 = want.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn ties_go_to_the_lower_id_and_zero_top_is_empty() {
        let logits = [1.0, 3.0, 3.0, -1.0, 3.0];
        let got = token_logprobs(&logits, 0, 2);
        assert_eq!(got.top.iter().map(|&(i, _)| i).collect::<Vec<_>>(), [1, 2]);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        // Asking for more than the vocabulary returns all of it.
        assert_eq!(token_logprobs(&logits, 0, 9).top.len(), 5);
    }

    #[test]
    fn nan_and_infinite_logits_do_not_poison_the_rest() {
        let logits = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0];
        let got = token_logprobs(&logits, 1, 4);
        assert!((got.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(got.top[0].0, 1);
        assert_eq!(token_logprobs(&logits, 0, 0).logprob, f32::NEG_INFINITY);
        let all_dead = [f32::NEG_INFINITY; 3];
        assert_eq!(token_logprobs(&all_dead, 1, 1).logprob, f32::NEG_INFINITY);
    }
}
