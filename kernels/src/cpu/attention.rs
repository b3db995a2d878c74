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
    /// `[pool blocks, block_tokens, kv_heads · head_dim]`
    pub keys: &'a [f32],
    /// `[pool blocks, block_tokens, kv_heads · head_dim]`
    pub values: &'a [f32],
    /// Block ids in position order.
    pub blocks: &'a [u32],
    pub block_tokens: usize,
    /// Absolute position of the first row of `blocks[0]`.
    pub first_pos: usize,
    /// Valid rows from `first_pos`.
    pub len: usize,
}

impl<'a> KvHistory<'a> {
    /// A contiguous history (`[len, row]` keys and values) viewed as a single block.
    pub fn contiguous(keys: &'a [f32], values: &'a [f32], row: usize, first_pos: usize) -> Self {
        assert_eq!(keys.len(), values.len());
        let len = keys.len() / row;
        Self { keys, values, blocks: &[0], block_tokens: len.max(1), first_pos, len }
    }

    /// Element offset of the row at absolute position `pos`.
    #[inline]
    fn row_offset(&self, pos: usize, row: usize) -> usize {
        let i = pos - self.first_pos;
        (self.blocks[i / self.block_tokens] as usize * self.block_tokens + i % self.block_tokens) * row
    }
}

/// `out[t, h] = softmax(q[t, h] · Kᵀ · scale + mask) · V` for each query token `t` at
/// absolute position `positions[t]`. `q` and `out` are `[tokens, q_heads, head_dim]`.
/// Query head `h` reads kv head `h / (q_heads / kv_heads)` (repeat-interleave order).
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
    let row = kv_heads * d;
    assert_eq!(kv.keys.len(), kv.values.len());
    let len = kv.len;
    let group = q_heads / kv_heads;
    let job = |scores: &mut Vec<f32>, idx: usize, o: &mut [f32]| {
        let (t, h) = (idx / q_heads, idx % q_heads);
        let p = positions[t];
        assert!(
            p >= kv.first_pos && p - kv.first_pos < len,
            "query position {p} outside the key history [{}, {})",
            kv.first_pos,
            kv.first_pos + len
        );
        let lo = mask.first_key(p).max(kv.first_pos);
        let g = h / group;
        let qv = &q[idx * d..(idx + 1) * d];
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for pos in lo..=p {
            let r = kv.row_offset(pos, row) + g * d;
            let s = dot(qv, &kv.keys[r..r + d]) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (i, pos) in (lo..=p).enumerate() {
            let r = kv.row_offset(pos, row) + g * d;
            let w = scores[i] / sum;
            let vv = &kv.values[r..r + d];
            for (a, &b) in o.iter_mut().zip(vv) {
                *a += w * b;
            }
        }
    };
    let work = positions.len() * q_heads * d * len;
    if work < (1 << 15) {
        let mut scores = Vec::new();
        for (idx, o) in out.chunks_exact_mut(d).enumerate() {
            job(&mut scores, idx, o);
        }
    } else {
        out.par_chunks_exact_mut(d).enumerate().for_each_init(Vec::new, |scores, (idx, o)| job(scores, idx, o));
    }
}

/// Dot product with eight interleaved partial sums (fixed order).
#[inline]
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
        let paged = KvHistory { keys: &pk, values: &pv, blocks: &order, block_tokens: 2, first_pos: 0, len: 10 };
        let mut out = vec![0.0; 6];
        attention(&q, &[9], paged, h, 0.5, mask, &mut out);
        assert_eq!(full, out);
    }
}
