//! Tests of the sampler: exactness of greedy, seeds, each filter against a full sort, penalties, validation.

use super::*;

fn params() -> SamplingParams {
    SamplingParams { seed: Some(7), ..SamplingParams::default() }
}

/// `params()` with one change.
fn with(change: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = params();
    change(&mut p);
    p
}

fn sampler(p: &SamplingParams) -> Sampler {
    Sampler::new(p, &[])
}

fn sample_once(s: &mut Sampler, logits: &[f32]) -> u32 {
    s.sample(&mut logits.to_vec())
}

/// Deterministic pseudo-random logits in [-scale, scale].
fn random_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// The tokens `filter` leaves, sorted by id.
fn kept(s: &mut Sampler, logits: &[f32]) -> Vec<u32> {
    let mut l = logits.to_vec();
    let mut ids: Vec<u32> = match s.filter(&mut l) {
        Pool::Fixed(t) => vec![t],
        Pool::Vocab { .. } => (0..l.len() as u32).filter(|&i| l[i as usize] > 0.0).collect(),
        Pool::Cands => s.cands.iter().map(|c| c.idx).collect(),
    };
    ids.sort_unstable();
    ids
}

/// The obvious implementation: full softmax, full sort, then top-k, top-p, min-p.
fn reference_kept(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The same weights as the sampler, so that only the filtering is compared.
    let probs: Vec<f64> = logits.iter().map(|&x| f64::from(weight(x, max, 1.0 / p.temperature))).collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    let z: f64 = order.iter().map(|&i| probs[i]).sum();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = 0;
        for &i in &order {
            if keep > 0 && cum >= f64::from(p.top_p) * z {
                break;
            }
            cum += probs[i];
            keep += 1;
        }
        order.truncate(keep);
    }
    let pmax = probs[order[0]];
    order.retain(|&i| probs[i] > 0.0 && probs[i] >= f64::from(p.min_p) * pmax);
    let mut ids: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn greedy_is_argmax_with_lowest_index_on_ties() {
    let p = with(|p| p.temperature = 0.0);
    let mut s = sampler(&p);
    assert_eq!(sample_once(&mut s, &[0.1, 2.0, -1.0, 1.9]), 1);
    assert_eq!(sample_once(&mut s, &[0.1, 3.0, 3.0, 1.0, 3.0]), 1);
    assert_eq!(sample_once(&mut s, &[5.0, 5.0]), 0);
    assert_eq!(sample_once(&mut s, &[-3.0, -2.0, -2.0]), 1);
    assert_eq!(sample_once(&mut s, &[-0.0, 0.0]), 0);
    let big = random_logits(202_048, 3, 10.0);
    let want = big
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
        .0;
    assert_eq!(sample_once(&mut s, &big) as usize, want);
}

#[test]
fn argmax_finds_the_first_maximum_across_lanes() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for len in 0..120 {
        for _ in 0..20 {
            // Few distinct values, so ties are everywhere; NaN and -0.0 too.
            let mut v: Vec<f32> = (0..len)
                .map(|_| match rng.random_range(0..8u32) {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => f32::NEG_INFINITY,
                    n => n as f32 - 4.0,
                })
                .collect();
            let mut want = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[want] || v[want].is_nan() && !x.is_nan() {
                    want = i;
                }
            }
            let want = if v.iter().all(|x| x.is_nan() || *x == f32::NEG_INFINITY) { 0 } else { want };
            assert_eq!(sanitize_and_argmax(&mut v), want, "{v:?}");
            assert!(v.iter().all(|x| !x.is_nan()));
        }
    }
}

#[test]
fn tiny_temperature_is_greedy() {
    let p = with(|p| p.temperature = 1e-7);
    assert!(p.is_greedy());
    let mut s = sampler(&p);
    for _ in 0..20 {
        assert_eq!(sample_once(&mut s, &[1.0, 1.0001, 0.5]), 1);
    }
}

#[test]
fn same_seed_same_sequence_different_seed_different() {
    let logits = random_logits(64, 1, 2.0);
    let run = |seed: u64| -> Vec<u32> {
        let mut s = sampler(&with(|p| p.seed = Some(seed)));
        (0..100).map(|_| sample_once(&mut s, &logits)).collect()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn seeded_draws_are_pinned() {
    // Any change to the RNG stream, the exp or the draw shows up here: a seed must keep
    // giving the same tokens across versions and machines.
    let logits = random_logits(64, 1, 2.0);
    let run = |p: SamplingParams| -> Vec<u32> {
        let mut s = sampler(&p);
        (0..12).map(|_| sample_once(&mut s, &logits)).collect()
    };
    let plain = run(with(|p| p.seed = Some(42)));
    let nucleus = run(SamplingParams { seed: Some(42), top_p: 0.8, temperature: 0.7, ..params() });
    assert_eq!(plain, [37, 61, 26, 35, 19, 10, 21, 48, 46, 14, 33, 54]);
    assert_eq!(nucleus, [35, 54, 37, 10, 2, 61, 26, 17, 52, 2, 22, 8]);
}

#[test]
fn unseeded_samplers_differ() {
    let logits = random_logits(64, 1, 1.0);
    let run = || -> Vec<u32> {
        let mut s = sampler(&SamplingParams::default());
        (0..50).map(|_| sample_once(&mut s, &logits)).collect()
    };
    assert_ne!(run(), run());
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    for (case, &temperature) in [0.5f32, 1.0, 3.0, 100.0].iter().enumerate() {
        let p = SamplingParams { temperature, top_k: 1, ..params() };
        let mut s = sampler(&p);
        for i in 0..50 {
            let logits = random_logits(1000, (case * 100 + i) as u64, 4.0);
            let mut g = sampler(&with(|p| p.temperature = 0.0));
            assert_eq!(sample_once(&mut s, &logits), sample_once(&mut g, &logits));
        }
        // Ties go to the lower index, as in greedy.
        assert_eq!(sample_once(&mut s, &[0.0, 2.0, 2.0, 1.0]), 1);
    }
}

#[test]
fn tiny_top_p_is_always_the_max() {
    let p = SamplingParams { top_p: 1e-6, temperature: 2.0, ..params() };
    let mut s = sampler(&p);
    let logits = random_logits(5000, 9, 1.0);
    let max = kept(&mut sampler(&with(|p| p.temperature = 0.0)), &logits);
    for _ in 0..200 {
        assert_eq!(vec![sample_once(&mut s, &logits)], max);
    }
}

#[test]
fn min_p_one_keeps_only_the_most_likely() {
    let p = with(|p| p.min_p = 1.0);
    let mut s = sampler(&p);
    let logits = [1.0, 3.0, 2.9, 3.0, -1.0];
    assert_eq!(kept(&mut s, &logits), vec![1, 3]);
    for _ in 0..100 {
        let t = sample_once(&mut s, &logits);
        assert!(t == 1 || t == 3, "{t}");
    }
}

/// Draw counts over `n` samples, as frequencies.
fn frequencies(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[sample_once(s, logits) as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
    let e: Vec<f64> = logits.iter().map(|&x| f64::from(x / t).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < tol, "token {i}: frequency {g}, probability {w}");
    }
}

#[test]
fn frequencies_match_softmax() {
    // Fixed seed: the counts are the same on every run, so this cannot flake.
    let logits = [1.0, 2.0, 0.5, -1.0, 1.5];
    let mut s = sampler(&params());
    assert_close(&frequencies(&mut s, &logits, 20_000), &softmax(&logits, 1.0), 0.01);
    let mut s = sampler(&with(|p| p.temperature = 0.5));
    assert_close(&frequencies(&mut s, &logits, 20_000), &softmax(&logits, 0.5), 0.01);
}

#[test]
fn truncation_renormalises() {
    let logits = [1.0, 2.0, 0.5, -1.0, 1.5];
    // top-k 2 keeps tokens 1 and 4.
    let mut s = sampler(&with(|p| p.top_k = 2));
    let want = softmax(&[2.0, 1.5], 1.0);
    let got = frequencies(&mut s, &logits, 20_000);
    assert_close(&got, &[0.0, want[0], 0.0, 0.0, want[1]], 0.01);
    // Probabilities ~ [.16, .44, .10, .02, .27]: .44 + .27 >= .7, so top-p 0.7 keeps two.
    let mut s = sampler(&with(|p| p.top_p = 0.7));
    let got = frequencies(&mut s, &logits, 20_000);
    assert_close(&got, &[0.0, want[0], 0.0, 0.0, want[1]], 0.01);
    // min-p 0.3 keeps p >= 0.3 * .44: tokens 0, 1, 4.
    let mut s = sampler(&with(|p| p.min_p = 0.3));
    let want = softmax(&[1.0, 2.0, 1.5], 1.0);
    let got = frequencies(&mut s, &logits, 20_000);
    assert_close(&got, &[want[0], want[1], 0.0, 0.0, want[2]], 0.01);
}

#[test]
fn top_p_keeps_the_token_that_crosses_the_threshold() {
    // Probabilities .5, .3, .2: top-p .5 is reached by the first token alone; .51 needs two.
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let mut s = sampler(&with(|p| p.top_p = 0.5));
    assert_eq!(kept(&mut s, &logits), vec![0]);
    let mut s = sampler(&with(|p| p.top_p = 0.51));
    assert_eq!(kept(&mut s, &logits), vec![0, 1]);
}

#[test]
fn fast_filters_agree_with_the_full_sort() {
    let mut checked = 0;
    for (seed, n, scale) in [(1, 1000, 8.0), (2, 1000, 1.0), (3, 4096, 0.05), (4, 300, 20.0)] {
        let logits = random_logits(n, seed, scale);
        for top_k in [0, 1, 5, 40, 63, 64, 65, n / 2, n - 1, n, n + 5] {
            for top_p in [1.0, 0.95, 0.5, 0.1] {
                for min_p in [0.0, 0.05, 0.5] {
                    for temperature in [0.7, 1.0, 1.5] {
                        let p = SamplingParams { temperature, top_k, top_p, min_p, ..params() };
                        let got = kept(&mut sampler(&p), &logits);
                        assert_eq!(got, reference_kept(&logits, &p), "{p:?} seed {seed}");
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 1000);
}

#[test]
fn top_p_histogram_path_matches_the_full_sort() {
    // One token with half the mass and 1999 that share the rest: each is below the guessed
    // threshold ((1 - .9) / 256), so the histogram has to find the nucleus.
    let n = 2000;
    let mut logits = vec![0.0f32; n];
    logits[17] = (1999.0f32).ln();
    let p = with(|p| p.top_p = 0.9);
    let got = kept(&mut sampler(&p), &logits);
    assert_eq!(got, reference_kept(&logits, &p));
    // .5 + k / 3998 >= .9 needs k = 1600 of the small ones (lowest ids first on ties).
    assert_eq!(got.len(), 1 + 1600);
}

#[test]
fn exp_is_accurate_to_a_few_ulp() {
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_nonpositive(-86.5), 0.0);
    let mut worst = 0.0f64;
    for i in 0..=1_000_000 {
        let s = -86.0 * i as f32 / 1_000_000.0;
        let want = f64::from(s).exp();
        let got = f64::from(exp_nonpositive(s));
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
}

#[test]
fn blocked_draw_matches_softmax_over_a_large_vocab() {
    // Three live tokens in different draw blocks among 5000 that are ~impossible.
    let mut logits = vec![-40.0f32; 5000];
    logits[10] = 1.0;
    logits[2500] = 2.0;
    logits[4999] = 0.0;
    let mut s = sampler(&params());
    let got = frequencies(&mut s, &logits, 20_000);
    let want = softmax(&[1.0, 2.0, 0.0], 1.0);
    assert_close(&[got[10], got[2500], got[4999]], &want, 0.01);
    // Past the end by rounding: the last live token.
    let w = [0.5, 0.0, 0.25, 0.0];
    assert_eq!(draw_blocked(&w, &[0.75], 0.8), 2);
    assert_eq!(draw_blocked(&w, &[0.75], 0.6), 2);
    assert_eq!(draw_blocked(&w, &[0.75], 0.4), 0);
    assert_eq!(draw_blocked(&[], &[], 0.4), 0);
}

#[test]
fn repetition_penalty_over_prompt_and_output() {
    let p = SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..params() };
    let mut s = Sampler::new(&p, &[0, 1]);
    s.accept(2);
    s.accept(2);
    let mut logits = vec![4.0, -4.0, 3.0, 0.0, 5.0];
    s.apply_penalties(&mut logits);
    // Seen (prompt 0, 1; output 2) once each, however often; token 3 and 4 unseen.
    assert_eq!(logits, vec![2.0, -8.0, 1.5, 0.0, 5.0]);
    // Greedy reads the penalised logits: the prompt's token 0 falls from 6 to 3, below 5.
    let mut logits = vec![6.0, 1.0, 5.0];
    assert_eq!(Sampler::new(&p, &[0]).sample(&mut logits), 2);
}

#[test]
fn presence_and_frequency_count_output_only() {
    let p = SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..params() };
    let mut s = Sampler::new(&p, &[0, 1, 1, 1]);
    s.accept(1);
    s.accept(2);
    s.accept(2);
    s.accept(2);
    let mut logits = vec![1.0; 4];
    s.apply_penalties(&mut logits);
    // 0: prompt only. 1: once in output. 2: three times. 3: never.
    assert_eq!(logits, vec![1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.75 - 0.5, 1.0]);
    // Negative penalties encourage.
    let p = SamplingParams { temperature: 0.0, presence_penalty: -2.0, ..params() };
    let mut s = Sampler::new(&p, &[]);
    s.accept(0);
    assert_eq!(s.sample(&mut [1.0, 2.5]), 0);
}

#[test]
fn penalties_ignore_out_of_range_tokens() {
    let p = SamplingParams { repetition_penalty: 1.5, presence_penalty: 1.0, ..params() };
    let mut s = Sampler::new(&p, &[99]);
    s.accept(1000);
    let t = s.sample(&mut [0.0, 1.0]);
    assert!(t < 2);
}

#[test]
fn nan_and_infinite_logits_do_not_panic() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    for p in [
        with(|p| p.temperature = 0.0),
        params(),
        with(|p| p.top_k = 2),
        SamplingParams { top_p: 0.5, min_p: 0.1, ..params() },
        SamplingParams { min_p: 0.1, repetition_penalty: 1.3, ..params() },
    ] {
        let mut s = Sampler::new(&p, &[0, 1]);
        // NaN never wins while a real number is available.
        for _ in 0..20 {
            assert_eq!(sample_once(&mut s, &[nan, 1.0, nan, -inf]), 1);
        }
        // Nothing drawable: the lowest index, like greedy.
        assert_eq!(sample_once(&mut s, &[nan, nan]), 0);
        assert_eq!(sample_once(&mut s, &[-inf, -inf, nan]), 0);
        // +inf takes all the mass.
        assert_eq!(sample_once(&mut s, &[1.0, inf, 3.0, nan]), 1);
        assert_eq!(sample_once(&mut s, &[]), 0);
    }
}

#[test]
fn validation_rejects_each_bad_field() {
    assert_eq!(SamplingParams::default().validate(), Ok(()));
    let ok_edges = [
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            ..params()
        },
        with(|p| p.stop = vec!["x".repeat(MAX_STOP_STRING_BYTES); MAX_STOP_STRINGS]),
    ];
    for p in ok_edges {
        assert_eq!(p.validate(), Ok(()));
    }
    let bad: Vec<(SamplingParams, &str)> = vec![
        (with(|p| p.temperature = -0.1), "temperature"),
        (with(|p| p.temperature = f32::NAN), "temperature"),
        (with(|p| p.temperature = f32::INFINITY), "temperature"),
        (with(|p| p.top_p = 0.0), "top_p"),
        (with(|p| p.top_p = 1.01), "top_p"),
        (with(|p| p.top_p = f32::NAN), "top_p"),
        (with(|p| p.min_p = -0.01), "min_p"),
        (with(|p| p.min_p = 1.5), "min_p"),
        (with(|p| p.min_p = f32::NAN), "min_p"),
        (with(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
        (with(|p| p.repetition_penalty = -1.0), "repetition_penalty"),
        (with(|p| p.repetition_penalty = f32::NAN), "repetition_penalty"),
        (with(|p| p.presence_penalty = 2.5), "presence_penalty"),
        (with(|p| p.presence_penalty = f32::NAN), "presence_penalty"),
        (with(|p| p.frequency_penalty = -2.01), "frequency_penalty"),
        (with(|p| p.frequency_penalty = f32::NAN), "frequency_penalty"),
        (with(|p| p.max_tokens = 0), "max_tokens"),
        (with(|p| p.stop = vec!["a".into(); MAX_STOP_STRINGS + 1]), "stop"),
        (with(|p| p.stop = vec!["a".into(), String::new()]), "stop"),
        (with(|p| p.stop = vec!["x".repeat(MAX_STOP_STRING_BYTES + 1)]), "stop"),
    ];
    for (p, field) in bad {
        let err = p.validate().expect_err(field);
        assert_eq!(err.field(), field, "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn params_deserialise_with_defaults() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.2, "stop": ["\n"]}"#).expect("parses");
    assert_eq!(p, SamplingParams { temperature: 0.2, stop: vec!["\n".into()], ..SamplingParams::default() });
}

#[test]
fn full_vocab_sampling_stays_in_the_nucleus() {
    // Llama 4's vocabulary size, through every filtering path.
    let logits = random_logits(202_048, 11, 12.0);
    for p in [
        SamplingParams { top_p: 0.9, temperature: 0.8, ..params() },
        SamplingParams { top_k: 50, temperature: 0.8, ..params() },
        SamplingParams { top_k: 50_000, top_p: 0.95, ..params() },
        with(|p| p.min_p = 0.05),
        params(),
    ] {
        let want = reference_kept(&logits, &p);
        let mut s = sampler(&p);
        assert_eq!(kept(&mut s, &logits), want, "{p:?}");
        for _ in 0..20 {
            let t = sample_once(&mut s, &logits);
            assert!(want.binary_search(&t).is_ok(), "{p:?}: {t}");
        }
    }
}
