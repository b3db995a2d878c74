//! Scaled dot-product attention of new queries over a key/value history, with GQA.
//!
//! Llama 4 has two masks: full causal attention (NoPE layers) and chunked local attention
//! (RoPE layers: a query sees only keys of its own `chunk`-aligned block, up to itself).

use rayon::prelude::*;

/// Which keys a query at absolute position `p` may attend to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnMask {
    /// Keys `0..=p`.
    Causal,
    /// Keys `floor(p / chunk) · chunk ..= p`.
    Chunked { chunk: usize },
}

impl AttnMask {
    /// First absolute key position visible from query position `p`.
    pub fn first_key(self, p: usize) -> usize {
        match self {
            AttnMask::Causal => 0,
            AttnMask::Chunked { chunk } => p / chunk * chunk,
        }
    }
}

/// Head counts of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnHeads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A key/value history stored in fixed-size blocks (a paged KV cache).
///
/// Rows are consecutive absolute positions starting at `first_pos`; row `i` lives in block
/// `blocks[i / block_tokens]` at offset `i % block_tokens`. A contiguous history is the
/// special case of one block holding every row.
#[derive(Clone, Copy, Debug)]
pub struct KvHistory<'a> {
    /// `[pool blocks, block_tokens, kv_heads · head_dim]`, or with `head_major`
    /// `[pool blocks, kv_heads, block_tokens, head_dim]`
    pub keys: &'a [f32],
    /// Laid out as `keys`.
    pub values: &'a [f32],
    /// Block ids in position order.
    pub blocks: &'a [u32],
    pub block_tokens: usize,
    /// Absolute position of the first row of `blocks[0]`.
    pub first_pos: usize,
    /// Valid rows from `first_pos`.
    pub len: usize,
    /// Each block keeps one kv head's rows together. A job reads one kv head, so this turns
    /// its scan into one contiguous run per block instead of a slice of every row (a strided
    /// stream that the hardware prefetcher follows poorly).
    pub head_major: bool,
}

impl<'a> KvHistory<'a> {
    /// A contiguous history (`[len, row]` keys and values) viewed as a single block.
    pub fn contiguous(keys: &'a [f32], values: &'a [f32], row: usize, first_pos: usize) -> Self {
        assert_eq!(keys.len(), values.len());
        let len = keys.len() / row;
        Self { keys, values, blocks: &[0], block_tokens: len.max(1), first_pos, len, head_major: false }
    }

    /// Element offset of kv head `g`'s `head_dim` values at absolute position `pos`.
    #[inline]
    fn head_offset(&self, pos: usize, g: usize, heads: AttnHeads) -> usize {
        let i = pos - self.first_pos;
        let (block, r) = (self.blocks[i / self.block_tokens] as usize, i % self.block_tokens);
        let AttnHeads { kv_heads, head_dim: d, .. } = heads;
        if self.head_major {
            ((block * kv_heads + g) * self.block_tokens + r) * d
        } else {
            (block * self.block_tokens + r) * kv_heads * d + g * d
        }
    }
}

/// Query tokens per attention job: with the `q_heads / kv_heads` heads that share a kv head,
/// a job's queries (8 tokens × 4 heads × 128 × 4 bytes = 16 KiB) stay in L1 while every key
/// and value row they see is loaded once for all of them.
const QUERY_BLOCK: usize = 8;

/// `out[t, h] = softmax(q[t, h] · Kᵀ · scale + mask) · V` for each query token `t` at
/// absolute position `positions[t]`. `q` and `out` are `[tokens, q_heads, head_dim]`.
/// Query head `h` reads kv head `h / (q_heads / kv_heads)` (repeat-interleave order).
///
/// Each query's result is computed by the same operations in the same order (scores in key
/// order, max, exponentials and their sum in key order, weighted values in key order)
/// whatever other queries share the call, so a token's attention output does not depend on
/// how a prompt is chunked or batched.
pub fn attention(
    q: &[f32],
    positions: &[usize],
    kv: KvHistory<'_>,
    heads: AttnHeads,
    scale: f32,
    mask: AttnMask,
    out: &mut [f32],
) {
    let AttnHeads { q_heads, kv_heads, head_dim: d } = heads;
    assert!(kv_heads > 0 && q_heads % kv_heads == 0, "{q_heads} query heads do not group over {kv_heads} kv heads");
    assert_eq!(q.len(), positions.len() * q_heads * d);
    assert_eq!(out.len(), q.len());
    assert_eq!(kv.keys.len(), kv.values.len());
    for &p in positions {
        assert!(
            p >= kv.first_pos && p - kv.first_pos < kv.len,
            "query position {p} outside the key history [{}, {})",
            kv.first_pos,
            kv.first_pos + kv.len
        );
    }
    let tokens = positions.len();
    let group = q_heads / kv_heads;
    // Jobs: (block of query tokens, kv head); each returns `[block tokens, group, head_dim]`.
    let jobs = tokens.div_ceil(QUERY_BLOCK) * kv_heads;
    let job = |j: usize| {
        let (b, g) = (j / kv_heads, j % kv_heads);
        let t0 = b * QUERY_BLOCK;
        let t1 = (t0 + QUERY_BLOCK).min(tokens);
        let spec = Job { q, positions, kv, heads, scale, mask, g, t0, t1 };
        let mut o = vec![0.0f32; (t1 - t0) * group * d];
        run_job(&spec, &mut o);
        o
    };
    let work = tokens * q_heads * d * kv.len;
    let results: Vec<Vec<f32>> = if work < (1 << 15) || jobs == 1 {
        (0..jobs).map(job).collect()
    } else {
        (0..jobs).into_par_iter().map(job).collect()
    };
    for (j, o) in results.iter().enumerate() {
        let (b, g) = (j / kv_heads, j % kv_heads);
        for (i, rows) in o.chunks_exact(group * d).enumerate() {
            let t = b * QUERY_BLOCK + i;
            out[(t * q_heads + g * group) * d..][..group * d].copy_from_slice(rows);
        }
    }
}

/// One attention job: query tokens `[t0, t1)` × the query heads of kv head `g`.
struct Job<'a> {
    q: &'a [f32],
    positions: &'a [usize],
    kv: KvHistory<'a>,
    heads: AttnHeads,
    scale: f32,
    mask: AttnMask,
    g: usize,
    t0: usize,
    t1: usize,
}

fn run_job(job: &Job<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(super::simd::isa(), super::simd::Isa::Avx2Fma | super::simd::Isa::Avx512) {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { run_job_avx2(job, out) };
    }
    run_job_body(job, out, dots, |o, w, v, offs, _| weigh(o, w, v, offs), |_| {})
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_job_avx2(job: &Job<'_>, out: &mut [f32]) {
    // The closures inherit this function's AVX2 and FMA, all that the kernels need.
    run_job_body(
        job,
        out,
        |qs, key, s| dots_avx2(qs, key, s),
        |o, w, v, offs, stream| weigh_avx2(o, w, v, offs, stream),
        prefetch_row,
    )
}

/// Rows ahead that the scan over the history prefetches: a head's slice of a row (512 B at
/// head_dim 128) is only part of the row, so the hardware prefetcher sees a strided stream.
const PREFETCH_ROWS: usize = 6;

/// Prefetch the cache lines of one history row slice.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(row: &[f32]) {
    super::simd::prefetch_lines(row.as_ptr().cast(), std::mem::size_of_val(row));
}

/// `dot` for each query of a group: `qs` is `[group, head_dim]`, `scores` `[group]`.
fn dots(qs: &[f32], key: &[f32], scores: &mut [f32]) {
    for (s, qv) in scores.iter_mut().zip(qs.chunks_exact(key.len())) {
        *s = dot(qv, key);
    }
}

/// `out`: `[t1 - t0, group, head_dim]`.
///
/// The heads of one token share their visible keys, so the scan handles a token's `group`
/// queries together: `dots` is [`dots`] or its AVX2 form, `weigh` [`weigh`] or its AVX2
/// form, and `prefetch` hints a row slice that the scan reaches [`PREFETCH_ROWS`] rows
/// later (or does nothing). Each instruction set fixes every query's operations and their
/// order, so a query's bits do not depend on the job around it.
#[inline(always)]
fn run_job_body(
    job: &Job<'_>,
    out: &mut [f32],
    dots: impl Fn(&[f32], &[f32], &mut [f32]),
    weigh: impl Fn(&mut [f32], &[f32], &[f32], &[usize], bool),
    prefetch: impl Fn(&[f32]),
) {
    let Job { q, positions, kv, heads, scale, mask, g, t0, t1 } = *job;
    let AttnHeads { q_heads, kv_heads, head_dim: d } = heads;
    let group = q_heads / kv_heads;
    // Token `t0 + t` of the job sees keys lo[t]..=hi[t]; its query `h` (head g·group + h)
    // keeps its scores at scores[off[t]·group + h·len[t]..][..len[t]] with len = hi + 1 - lo.
    let tokens = t1 - t0;
    let lo: Vec<usize> = positions[t0..t1].iter().map(|&p| mask.first_key(p).max(kv.first_pos)).collect();
    let hi = &positions[t0..t1];
    let mut off = Vec::with_capacity(tokens + 1);
    off.push(0);
    for t in 0..tokens {
        off.push(off[t] + hi[t] + 1 - lo[t]);
    }
    let first = lo.iter().copied().min().unwrap_or(0);
    let last = hi.iter().copied().max().unwrap_or(0);
    let mut scores = vec![0.0f32; off[tokens] * group];
    let mut max = vec![f32::NEG_INFINITY; tokens * group];
    let mut s = vec![0.0f32; group];
    // Element offset of kv head g's slice at each position first..=last (keys and values).
    let offs: Vec<usize> = (first..=last).map(|pos| kv.head_offset(pos, g, heads)).collect();
    // Pass 1: every key row once, against every query of the job that sees it.
    for pos in first..=last {
        if let Some(&r) = offs.get(pos + PREFETCH_ROWS - first) {
            prefetch(&kv.keys[r..r + d]);
        }
        let r = offs[pos - first];
        let key = &kv.keys[r..r + d];
        for t in 0..tokens {
            if pos < lo[t] || pos > hi[t] {
                continue;
            }
            dots(&q[((t0 + t) * q_heads + g * group) * d..][..group * d], key, &mut s);
            let len = hi[t] + 1 - lo[t];
            for (h, &v) in s.iter().enumerate() {
                let v = v * scale;
                let m = &mut max[t * group + h];
                *m = m.max(v);
                scores[off[t] * group + h * len + pos - lo[t]] = v;
            }
        }
    }
    // Softmax weights, normalised in place.
    for t in 0..tokens {
        let len = hi[t] + 1 - lo[t];
        for h in 0..group {
            let (m, mut sum) = (max[t * group + h], 0.0f32);
            let w = &mut scores[off[t] * group + h * len..][..len];
            for e in w.iter_mut() {
                *e = (*e - m).exp();
                sum += *e;
            }
            w.iter_mut().for_each(|e| *e /= sum);
        }
    }
    // Pass 2: each token's weighted sum of the value rows it sees.
    out.fill(0.0);
    if tokens == 1 {
        // Decode: prefetch the value rows of the scan ahead (one pass in position order).
        for &r in offs.iter().take(PREFETCH_ROWS) {
            prefetch(&kv.values[r..r + d]);
        }
    }
    for t in 0..tokens {
        let len = hi[t] + 1 - lo[t];
        let o = &mut out[t * group * d..][..group * d];
        weigh(o, &scores[off[t] * group..][..group * len], kv.values, &offs[lo[t] - first..][..len], tokens == 1);
    }
}

/// `o[h] += Σ_p w[h, p] · values[offs[p]..][..head_dim]` for each query `h` of a group, in
/// position order (a multiply then an add). `o`: `[group, head_dim]`, `w`: `[group, len]`.
fn weigh(o: &mut [f32], w: &[f32], values: &[f32], offs: &[usize]) {
    let len = offs.len();
    let d = o.len() / (w.len() / len.max(1)).max(1);
    for (p, &r) in offs.iter().enumerate() {
        let v = &values[r..r + d];
        for (h, oh) in o.chunks_exact_mut(d).enumerate() {
            let wp = w[h * len + p];
            for (a, &b) in oh.iter_mut().zip(v) {
                *a += wp * b;
            }
        }
    }
}

/// [`weigh`] with fused multiply-adds in AVX2 registers. Prefill keeps a 16-wide column
/// strip of up to five queries' sums in registers over every position (its jobs' value rows
/// sit in L2); a long decode scan (`stream`, over 256 rows) goes position by position so the
/// value rows stream from memory once. The two orders do the same fused multiply-add per
/// element in position order: same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weigh_avx2(o: &mut [f32], w: &[f32], values: &[f32], offs: &[usize], stream: bool) {
    use std::arch::x86_64::*;
    let len = offs.len();
    if len == 0 {
        return;
    }
    let group = w.len() / len;
    let d = o.len() / group;
    assert!(offs.iter().all(|&r| r + d <= values.len()) && o.len() == group * d);
    let (vp, op) = (values.as_ptr(), o.as_mut_ptr());
    let full = d / 8 * 8;
    if stream && len > 256 {
        for (p, &r) in offs.iter().enumerate() {
            if let Some(&next) = offs.get(p + PREFETCH_ROWS) {
                prefetch_row(&values[next..next + d]);
            }
            for h in 0..group {
                let wp = w[h * len + p];
                let wv = _mm256_set1_ps(wp);
                let mut c = 0;
                while c < full {
                    // SAFETY: r + c + 8 <= r + d <= values.len(); h·d + c + 8 <= o.len().
                    unsafe {
                        let a = _mm256_loadu_ps(op.add(h * d + c));
                        _mm256_storeu_ps(op.add(h * d + c), _mm256_fmadd_ps(wv, _mm256_loadu_ps(vp.add(r + c)), a));
                    }
                    c += 8;
                }
                for c in full..d {
                    o[h * d + c] = wp.mul_add(values[r + c], o[h * d + c]);
                }
            }
        }
        return;
    }
    let mut h0 = 0;
    while h0 < group {
        let hn = (group - h0).min(5);
        match hn {
            1 => weigh_strips::<1>(o, w, values, offs, h0, d),
            2 => weigh_strips::<2>(o, w, values, offs, h0, d),
            3 => weigh_strips::<3>(o, w, values, offs, h0, d),
            4 => weigh_strips::<4>(o, w, values, offs, h0, d),
            _ => weigh_strips::<5>(o, w, values, offs, h0, d),
        }
        h0 += hn;
    }
}

/// Queries `h0..h0 + H` of [`weigh_avx2`], 16 (then 8, then 1) columns at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn weigh_strips<const H: usize>(o: &mut [f32], w: &[f32], values: &[f32], offs: &[usize], h0: usize, d: usize) {
    use std::arch::x86_64::*;
    let len = offs.len();
    let (vp, op, wp) = (values.as_ptr(), o.as_mut_ptr(), w.as_ptr());
    let mut c = 0;
    while c + 16 <= d {
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        for (p, &r) in offs.iter().enumerate() {
            // SAFETY: r + c + 16 <= r + d, checked by the caller against values.len().
            let (v0, v1) = unsafe { (_mm256_loadu_ps(vp.add(r + c)), _mm256_loadu_ps(vp.add(r + c + 8))) };
            for (h, a) in acc.iter_mut().enumerate() {
                // SAFETY: (h0 + h)·len + p < group·len = w.len().
                let wv = _mm256_set1_ps(unsafe { *wp.add((h0 + h) * len + p) });
                a[0] = _mm256_fmadd_ps(wv, v0, a[0]);
                a[1] = _mm256_fmadd_ps(wv, v1, a[1]);
            }
        }
        for (h, a) in acc.iter().enumerate() {
            // SAFETY: (h0 + h)·d + c + 16 <= o.len(); `o` starts at zero, so adding the
            // strip's sums to it is the same first fused step as accumulating into it.
            unsafe {
                let at = op.add((h0 + h) * d + c);
                _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), a[0]));
                _mm256_storeu_ps(at.add(8), _mm256_add_ps(_mm256_loadu_ps(at.add(8)), a[1]));
            }
        }
        c += 16;
    }
    for c in c..d {
        for h in h0..h0 + H {
            let mut a = o[h * d + c];
            for (p, &r) in offs.iter().enumerate() {
                a = w[h * len + p].mul_add(values[r + c], a);
            }
            o[h * d + c] = a;
        }
    }
}

/// [`dots`] in AVX2 registers, four queries at a time so that each key load feeds four
/// independent sums (one query's eight-lane sum is a chain of dependent adds): [`dot`]'s
/// eight partial sums and tree, with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_avx2(qs: &[f32], key: &[f32], scores: &mut [f32]) {
    let d = key.len();
    assert_eq!(qs.len(), scores.len() * d);
    let mut h = 0;
    while h < scores.len() {
        let (qs, out) = (&qs[h * d..], &mut scores[h..]);
        h += match out.len() {
            1 => dots_n::<1>(qs, key, out),
            2 => dots_n::<2>(qs, key, out),
            3 => dots_n::<3>(qs, key, out),
            _ => dots_n::<4>(qs, key, out),
        };
    }
}

/// `N` queries of [`dots_avx2`]; returns `N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn dots_n<const N: usize>(qs: &[f32], key: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let d = key.len();
    assert!(qs.len() >= N * d && out.len() >= N);
    let full = d / 8 * 8;
    let (qp, kp) = (qs.as_ptr(), key.as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let mut p = 0;
    while p < full {
        // SAFETY: p + 8 <= d for the key and for each of the N query rows.
        let k = unsafe { _mm256_loadu_ps(kp.add(p)) };
        for (n, a) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            *a = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(qp.add(n * d + p)) }, k, *a);
        }
        p += 8;
    }
    for (n, a) in acc.iter().enumerate() {
        let mut tail = 0.0;
        for (x, y) in qs[n * d + full..(n + 1) * d].iter().zip(&key[full..]) {
            tail = x.mul_add(*y, tail);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps::<1>(*a)); // [a0+a4, a1+a5, a2+a6, a3+a7]
        let h = _mm_hadd_ps(s, s); // [s0+s1, s2+s3, ..]
        out[n] = (_mm_cvtss_f32(h) + _mm_cvtss_f32(_mm_movehdup_ps(h))) + tail;
    }
    N
}

/// Dot product with eight interleaved partial sums (fixed order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in at.iter().zip(bt) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference with an explicit mask matrix.
    fn reference(q: &[f32], pos: &[usize], k: &[f32], v: &[f32], h: AttnHeads, scale: f64, mask: AttnMask) -> Vec<f64> {
        let d = h.head_dim;
        let row = h.kv_heads * d;
        let mut out = vec![0.0; q.len()];
        for (t, &p) in pos.iter().enumerate() {
            for head in 0..h.q_heads {
                let g = head / (h.q_heads / h.kv_heads);
                let qv = &q[(t * h.q_heads + head) * d..][..d];
                let keys: Vec<usize> = (0..=p).filter(|&kp| kp >= mask.first_key(p)).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&kp| (0..d).map(|i| qv[i] as f64 * k[kp * row + g * d + i] as f64).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (w, &kp) in s.iter().zip(&keys) {
                    for i in 0..d {
                        out[(t * h.q_heads + head) * d + i] += (w - m).exp() / z * v[kp * row + g * d + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_gqa_and_both_masks() {
        let h = AttnHeads { q_heads: 4, kv_heads: 2, head_dim: 5 };
        let len = 11;
        let f = |i: usize| ((i * 7919) % 101) as f32 / 50.0 - 1.0;
        let k: Vec<f32> = (0..len * 10).map(f).collect();
        let v: Vec<f32> = (0..len * 10).map(|i| f(i + 3)).collect();
        let pos = [3usize, 4, 8, 10];
        let q: Vec<f32> = (0..pos.len() * 20).map(|i| f(i + 11)).collect();
        for mask in [AttnMask::Causal, AttnMask::Chunked { chunk: 4 }] {
            let mut out = vec![0.0; q.len()];
            let kv = KvHistory::contiguous(&k, &v, 10, 0);
            attention(&q, &pos, kv, h, 0.3, mask, &mut out);
            let want = reference(&q, &pos, &k, &v, h, 0.3, mask);
            for (g, w) in out.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{mask:?}: {g} vs {w}");
            }
        }
    }

    /// A query's output has the same bits alone as in a prompt-sized batch (the batch
    /// spans several query blocks and both threads).
    #[test]
    fn a_query_gives_identical_bits_in_any_batch() {
        let h = AttnHeads { q_heads: 8, kv_heads: 2, head_dim: 20 };
        let len = 70;
        let f = |i: usize| ((i * 7919) % 211) as f32 / 105.0 - 1.0;
        let k: Vec<f32> = (0..len * 40).map(f).collect();
        let v: Vec<f32> = (0..len * 40).map(|i| f(i + 5)).collect();
        let pos: Vec<usize> = (0..len).collect();
        let q: Vec<f32> = (0..len * 160).map(|i| f(i + 17)).collect();
        for mask in [AttnMask::Causal, AttnMask::Chunked { chunk: 16 }] {
            let kv = KvHistory::contiguous(&k, &v, 40, 0);
            let mut all = vec![0.0; q.len()];
            attention(&q, &pos, kv, h, 0.2, mask, &mut all);
            let want = reference(&q, &pos, &k, &v, h, 0.2, mask);
            for (g, w) in all.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{mask:?}: {g} vs {w}");
            }
            for t in [0, 9, 33, 69] {
                let mut one = vec![0.0; 160];
                attention(&q[t * 160..(t + 1) * 160], &[t], kv, h, 0.2, mask, &mut one);
                assert_eq!(one, all[t * 160..(t + 1) * 160], "{mask:?} token {t}");
            }
        }
    }

    /// The AVX2 kernels compute [`dot`]'s and [`weigh`]'s sums in the same order with each
    /// multiply-add fused: checked against scalar `mul_add` in that order, for both of
    /// `weigh_avx2`'s loop orders.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_fuse_in_the_portable_order() {
        if !matches!(crate::cpu::simd::isa(), crate::cpu::simd::Isa::Avx2Fma | crate::cpu::simd::Isa::Avx512) {
            return;
        }
        let f = |i: usize| ((i * 7919) % 1009) as f32 / 37.0 - 13.0;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for d in [1usize, 7, 8, 9, 24, 88, 128, 131] {
            for group in 1..=6 {
                let qs: Vec<f32> = (0..group * d).map(f).collect();
                let key: Vec<f32> = (0..d).map(|i| f(i + 101) * 1e-3).collect();
                let mut simd = vec![0.0f32; group];
                // SAFETY: AVX2 and FMA were detected above.
                unsafe { dots_avx2(&qs, &key, &mut simd) };
                let want: Vec<f32> = qs
                    .chunks_exact(d)
                    .map(|qv| {
                        let full = d / 8 * 8;
                        let mut lane = [0.0f32; 8];
                        for p in 0..full {
                            lane[p % 8] = qv[p].mul_add(key[p], lane[p % 8]);
                        }
                        let tail = (full..d).fold(0.0f32, |t, p| qv[p].mul_add(key[p], t));
                        let s: Vec<f32> = (0..4).map(|l| lane[l] + lane[l + 4]).collect();
                        ((s[0] + s[1]) + (s[2] + s[3])) + tail
                    })
                    .collect();
                assert_eq!(bits(&simd), bits(&want), "dots: d = {d}, group = {group}");
                for len in [1usize, 5, 300] {
                    let values: Vec<f32> = (0..(len + 3) * d).map(|i| f(i + 7)).collect();
                    let offs: Vec<usize> = (0..len).map(|p| ((p * 5) % (len + 3)) * d).collect();
                    let w: Vec<f32> = (0..group * len).map(|i| f(i + 3) * 1e-2).collect();
                    let mut got = vec![0.0f32; group * d];
                    // SAFETY: as above.
                    unsafe { weigh_avx2(&mut got, &w, &values, &offs, len > 100) };
                    let mut want = vec![0.0f32; group * d];
                    for (h, o) in want.chunks_exact_mut(d).enumerate() {
                        for (p, &r) in offs.iter().enumerate() {
                            for (c, a) in o.iter_mut().enumerate() {
                                *a = w[h * len + p].mul_add(values[r + c], *a);
                            }
                        }
                    }
                    assert_eq!(bits(&got), bits(&want), "weigh: d = {d}, group = {group}, len = {len}");
                }
            }
        }
    }

    #[test]
    fn chunk_start_sees_only_itself() {
        let h = AttnHeads { q_heads: 1, kv_heads: 1, head_dim: 2 };
        let k = vec![1.0f32; 12];
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut out = vec![0.0; 2];
        let kv = KvHistory::contiguous(&k, &v, 2, 0);
        attention(&[1.0, 1.0], &[4], kv, h, 1.0, AttnMask::Chunked { chunk: 4 }, &mut out);
        assert_eq!(out, vec![8.0, 9.0]);
    }

    #[test]
    fn a_history_window_gives_the_same_result_as_the_full_history() {
        let h = AttnHeads { q_heads: 2, kv_heads: 1, head_dim: 3 };
        let k: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin()).collect();
        let v: Vec<f32> = (0..30).map(|i| (i as f32 * 0.11).cos()).collect();
        let q = vec![0.5f32, -0.2, 0.1, 0.3, 0.3, -0.7];
        let mask = AttnMask::Chunked { chunk: 4 };
        let mut full = vec![0.0; 6];
        attention(&q, &[9], KvHistory::contiguous(&k, &v, 3, 0), h, 0.5, mask, &mut full);
        let mut window = vec![0.0; 6];
        let kv = KvHistory::contiguous(&k[8 * 3..], &v[8 * 3..], 3, 8);
        attention(&q, &[9], kv, h, 0.5, mask, &mut window);
        assert_eq!(full, window);
        // The same rows scattered over blocks of 2, in a shuffled pool.
        let order = [3u32, 0, 4, 1, 2];
        let (mut pk, mut pv) = (vec![0.0f32; 30], vec![0.0f32; 30]);
        for (i, &b) in order.iter().enumerate() {
            let src = i * 2 * 3;
            let dst = b as usize * 2 * 3;
            pk[dst..dst + 6].copy_from_slice(&k[src..src + 6]);
            pv[dst..dst + 6].copy_from_slice(&v[src..src + 6]);
        }
        let paged = KvHistory {
            keys: &pk,
            values: &pv,
            blocks: &order,
            block_tokens: 2,
            first_pos: 0,
            len: 10,
            head_major: false,
        };
        let mut out = vec![0.0; 6];
        attention(&q, &[9], paged, h, 0.5, mask, &mut out);
        assert_eq!(full, out);
    }

    /// Head-major blocks hold the same rows regrouped per kv head and give the same bits.
    #[test]
    fn head_major_blocks_give_the_row_major_bits() {
        let h = AttnHeads { q_heads: 6, kv_heads: 3, head_dim: 4 };
        let (row, bt, len) = (12usize, 3usize, 11usize);
        let f = |i: usize| ((i * 7919) % 97) as f32 / 48.0 - 1.0;
        let k: Vec<f32> = (0..len * row).map(f).collect();
        let v: Vec<f32> = (0..len * row).map(|i| f(i + 7)).collect();
        let order = [2u32, 0, 3, 1];
        let (mut pk, mut pv) = (vec![0.0f32; 4 * bt * row], vec![0.0f32; 4 * bt * row]);
        for p in 0..len {
            let b = order[p / bt] as usize;
            for g in 0..3 {
                let dst = ((b * 3 + g) * bt + p % bt) * 4;
                pk[dst..dst + 4].copy_from_slice(&k[p * row + g * 4..][..4]);
                pv[dst..dst + 4].copy_from_slice(&v[p * row + g * 4..][..4]);
            }
        }
        let pos = [5usize, 9, 10];
        let q: Vec<f32> = (0..pos.len() * 24).map(|i| f(i + 31)).collect();
        for mask in [AttnMask::Causal, AttnMask::Chunked { chunk: 4 }] {
            let mut want = vec![0.0; q.len()];
            attention(&q, &pos, KvHistory::contiguous(&k, &v, row, 0), h, 0.4, mask, &mut want);
            let paged = KvHistory {
                keys: &pk,
                values: &pv,
                blocks: &order,
                block_tokens: bt,
                first_pos: 0,
                len,
                head_major: true,
            };
            let mut got = vec![0.0; q.len()];
            attention(&q, &pos, paged, h, 0.4, mask, &mut got);
            assert_eq!(got, want, "{mask:?}");
        }
    }
}
