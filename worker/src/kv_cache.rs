//! The paged KV cache: one pool of fixed-size blocks under a memory budget, and per
//! sequence a block table for every layer.
//!
//! A block holds `block_tokens` consecutive positions of one layer's keys and values
//! (after RoPE and QK-norm; temperature tuning touches only queries). Full-attention layers
//! keep every block of a sequence. Chunked-attention layers need only the current chunk: a
//! query at position `p` never looks before `floor(p / chunk) · chunk`, so whole blocks
//! before that are returned to the pool as soon as a step starts past them.
//!
//! The engine admits a request only when the pool can hold its worst case
//! ([`KvPool::blocks_for`]), so appends never run out of blocks mid-step.
//!
//! The pool sits below both the model (whose layers append to it and read it) and the engine
//! (which reserves and releases it): it knows only the [`KvLayout`] of the cache, not the model.

use herd_kernels::cpu::attention::KvHistory;

/// What the pool needs to know of a model: how many layers, how wide a key row is, and which
/// layers attend within chunks. `TextConfig::kv_layout` gives it for a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per layer: `Some(chunk)` for chunked attention, `None` for full attention.
    pub chunks: Vec<Option<usize>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache budget of {budget} bytes holds no block of {block} bytes")]
    BudgetTooSmall { budget: usize, block: usize },
    #[error("KV cache pool is out of blocks ({total} in all)")]
    OutOfBlocks { total: usize },
}

#[derive(Clone, Debug, Default)]
struct LayerBlocks {
    blocks: Vec<u32>,
    /// Absolute position of the first row of `blocks[0]` (a multiple of the block size).
    first_pos: usize,
}

/// One sequence's block tables. Create with [`KvPool::new_seq`], free with [`KvPool::release`].
#[derive(Debug)]
pub struct SeqKv {
    layers: Vec<LayerBlocks>,
    len: usize,
}

impl SeqKv {
    /// Positions whose keys and values are cached (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Mark `n` more tokens as cached once every layer has appended them.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Blocks currently held over all layers.
    pub fn blocks(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len()).sum()
    }
}

/// Blocks of keys and values shared by all sequences of one worker.
#[derive(Debug)]
pub struct KvPool {
    block_tokens: usize,
    /// `kv_heads · head_dim`
    row: usize,
    head_dim: usize,
    layers: usize,
    /// Per layer: `Some(chunk)` for chunked attention.
    chunks: Vec<Option<usize>>,
    // Head-major blocks (see `KvHistory::head_major`): a decode job scans one kv head, and
    // this keeps that head's rows of a block in one contiguous run.
    keys: Vec<f32>,   // [blocks, kv_heads, block_tokens, head_dim]
    values: Vec<f32>, // [blocks, kv_heads, block_tokens, head_dim]
    free: Vec<u32>,
    /// `None`: grow on demand (single-sequence tools and tests).
    capacity: Option<usize>,
    /// Blocks created on demand so far (unbounded pools); the next new block's id.
    grown: usize,
}

/// Default positions per block: small enough that a short request wastes little, large
/// enough that block-table lookups stay cheap.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

impl KvPool {
    /// A pool of as many blocks as `budget_bytes` holds.
    pub fn new(layout: &KvLayout, budget_bytes: usize, block_tokens: usize) -> Result<Self, KvError> {
        let mut pool = Self::unbounded(layout, block_tokens);
        let blocks = budget_bytes / pool.block_bytes();
        if blocks == 0 {
            return Err(KvError::BudgetTooSmall { budget: budget_bytes, block: pool.block_bytes() });
        }
        let elems = blocks * block_tokens * pool.row;
        // Zeroed allocations are lazily backed: untouched blocks cost no resident memory.
        pool.keys = vec![0.0; elems];
        pool.values = vec![0.0; elems];
        pool.free = (0..blocks as u32).rev().collect();
        pool.capacity = Some(blocks);
        Ok(pool)
    }

    /// A pool of `blocks` blocks that keeps only the block tables: the keys and values live
    /// elsewhere (in GPU memory, indexed by the same block ids).
    pub fn blocks_only(layout: &KvLayout, blocks: usize, block_tokens: usize) -> Self {
        let mut pool = Self::unbounded(layout, block_tokens);
        pool.free = (0..blocks as u32).rev().collect();
        pool.capacity = Some(blocks);
        pool
    }

    /// A pool that grows as sequences need blocks.
    pub fn unbounded(layout: &KvLayout, block_tokens: usize) -> Self {
        assert!(block_tokens > 0);
        Self {
            block_tokens,
            row: layout.kv_heads * layout.head_dim,
            head_dim: layout.head_dim,
            layers: layout.chunks.len(),
            chunks: layout.chunks.clone(),
            keys: Vec::new(),
            values: Vec::new(),
            free: Vec::new(),
            capacity: None,
            grown: 0,
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Bytes of one block (keys and values of one layer for `block_tokens` positions).
    pub fn block_bytes(&self) -> usize {
        2 * self.block_tokens * self.row * std::mem::size_of::<f32>()
    }

    /// Blocks in the pool (`None` if it grows on demand).
    pub fn total_blocks(&self) -> Option<usize> {
        self.capacity
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn new_seq(&self) -> SeqKv {
        SeqKv { layers: vec![LayerBlocks::default(); self.layers], len: 0 }
    }

    /// The most blocks a sequence of `total_len` positions can hold at once when each step
    /// adds at most `step_tokens` of them: all blocks on full layers; on chunked layers the
    /// current chunk plus one step's tokens, plus one block of misalignment at each end.
    pub fn blocks_for(&self, total_len: usize, step_tokens: usize) -> usize {
        let full = total_len.div_ceil(self.block_tokens);
        self.chunks
            .iter()
            .map(|c| match c {
                None => full,
                Some(chunk) => full.min((chunk + step_tokens).div_ceil(self.block_tokens) + 1),
            })
            .sum()
    }

    /// Write this step's keys and values (`[n, row]` each) of `layer` at positions
    /// `seq.len()..seq.len() + n`, first freeing the layer's blocks that lie wholly before
    /// `keep_from` (an absolute position no query of this step looks before).
    pub fn append(
        &mut self,
        seq: &mut SeqKv,
        layer: usize,
        keys: &[f32],
        values: &[f32],
        keep_from: usize,
    ) -> Result<(), KvError> {
        assert_eq!(keys.len(), values.len());
        assert_eq!(keys.len() % self.row, 0);
        let (bt, row) = (self.block_tokens, self.row);
        let start = seq.len;
        let n = keys.len() / row;
        self.reserve(seq, layer, n, keep_from)?;
        if self.keys.len() < self.grown * bt * row {
            // A pool that grows on demand backs its new blocks here (a blocks-only pool never
            // reaches this: it holds no data).
            self.keys.resize(self.grown * bt * row, 0.0);
            self.values.resize(self.grown * bt * row, 0.0);
        }
        let l = &seq.layers[layer];
        let d = self.head_dim;
        for i in 0..n {
            let idx = start + i - l.first_pos;
            let block = l.blocks[idx / bt] as usize;
            for g in 0..row / d {
                let at = ((block * (row / d) + g) * bt + idx % bt) * d;
                let from = i * row + g * d;
                self.keys[at..at + d].copy_from_slice(&keys[from..from + d]);
                self.values[at..at + d].copy_from_slice(&values[from..from + d]);
            }
        }
        Ok(())
    }

    /// The block bookkeeping of [`append`](Self::append) without the data: frees `layer`'s
    /// blocks wholly before `keep_from` and takes blocks for positions `seq.len()..+n`. A
    /// device-resident cache (the GPU engine) keeps the data and uses [`table`](Self::table)
    /// to find where each position lives.
    pub fn reserve(&mut self, seq: &mut SeqKv, layer: usize, n: usize, keep_from: usize) -> Result<(), KvError> {
        let bt = self.block_tokens;
        let start = seq.len;
        let l = &mut seq.layers[layer];
        while !l.blocks.is_empty() && l.first_pos + bt <= keep_from.min(start) {
            self.free.push(l.blocks.remove(0));
            l.first_pos += bt;
        }
        if l.blocks.is_empty() {
            l.first_pos = start / bt * bt;
        }
        while l.first_pos + l.blocks.len() * bt < start + n {
            let block = match self.free.pop() {
                Some(b) => b,
                None if self.capacity.is_none() => {
                    self.grown += 1;
                    (self.grown - 1) as u32
                }
                None => return Err(KvError::OutOfBlocks { total: self.capacity.unwrap_or(0) }),
            };
            l.blocks.push(block);
        }
        Ok(())
    }

    /// `layer`'s blocks of `seq` in position order, and the absolute position of the first
    /// row of the first block.
    pub fn table<'a>(&self, seq: &'a SeqKv, layer: usize) -> (usize, &'a [u32]) {
        let l = &seq.layers[layer];
        (l.first_pos, &l.blocks)
    }

    /// The cached rows of `layer`, including any appended in the current step (`pending`
    /// rows past `seq.len()`).
    pub fn history<'a>(&'a self, seq: &'a SeqKv, layer: usize, pending: usize) -> KvHistory<'a> {
        let l = &seq.layers[layer];
        KvHistory {
            keys: &self.keys,
            values: &self.values,
            blocks: &l.blocks,
            block_tokens: self.block_tokens,
            first_pos: l.first_pos,
            len: seq.len + pending - l.first_pos,
            head_major: true,
        }
    }

    /// Return every block of `seq` to the pool and reset it.
    pub fn release(&mut self, seq: &mut SeqKv) {
        for l in &mut seq.layers {
            self.free.append(&mut l.blocks);
            l.first_pos = 0;
        }
        seq.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers of one kv head of width 2: a full-attention layer, then a chunked one.
    fn config(chunk: usize) -> KvLayout {
        KvLayout { kv_heads: 1, head_dim: 2, chunks: vec![None, Some(chunk)] }
    }

    fn rows(start: usize, n: usize) -> Vec<f32> {
        (start..start + n).flat_map(|p| [p as f32, -(p as f32)]).collect()
    }

    /// Read back the key rows a history exposes.
    fn read(pool: &KvPool, seq: &SeqKv, layer: usize) -> Vec<f32> {
        let h = pool.history(seq, layer, 0);
        (h.first_pos..h.first_pos + h.len)
            .flat_map(|p| {
                let i = p - h.first_pos;
                let at = (h.blocks[i / h.block_tokens] as usize * h.block_tokens + i % h.block_tokens) * 2;
                h.keys[at..at + 2].to_vec()
            })
            .collect()
    }

    #[test]
    fn full_layers_keep_everything_and_chunked_layers_free_old_chunks() {
        let cfg = config(8);
        let mut pool = KvPool::new(&cfg, 64 * 4 * 2 * 2 * 4, 4).expect("pool");
        assert_eq!(pool.total_blocks(), Some(64));
        let mut seq = pool.new_seq();
        let mut pos = 0;
        for n in [5, 1, 1, 6, 1, 9] {
            for layer in 0..2 {
                let keep = if layer == 1 { pos / 8 * 8 } else { 0 };
                pool.append(&mut seq, layer, &rows(pos, n), &rows(pos, n), keep).expect("append");
            }
            seq.commit(n);
            pos += n;
        }
        assert_eq!(seq.len(), 23);
        assert_eq!(read(&pool, &seq, 0), rows(0, 23));
        // The last step started at 14 (chunk 8..16), so rows before 8 are gone.
        let h = pool.history(&seq, 1, 0);
        assert_eq!(h.first_pos, 8);
        assert_eq!(read(&pool, &seq, 1), rows(8, 15));
        assert_eq!(pool.free_blocks(), 64 - seq.blocks());
        pool.release(&mut seq);
        assert_eq!(pool.free_blocks(), 64);
    }

    #[test]
    fn blocks_only_pools_hand_out_the_tables_a_data_pool_would() {
        // The GPU engine's pool keeps no data; its tables must be the ones `append` would build.
        let cfg = config(8);
        let mut data = KvPool::new(&cfg, 64 * 4 * 2 * 2 * 4, 4).expect("pool");
        let mut tables = KvPool::blocks_only(&cfg, 64, 4);
        let (mut a, mut b) = (data.new_seq(), tables.new_seq());
        let mut pos = 0;
        for n in [5, 1, 1, 6, 1, 9] {
            for layer in 0..2 {
                let keep = if layer == 1 { pos / 8 * 8 } else { 0 };
                data.append(&mut a, layer, &rows(pos, n), &rows(pos, n), keep).expect("append");
                tables.reserve(&mut b, layer, n, keep).expect("reserve");
                assert_eq!(data.table(&a, layer), tables.table(&b, layer));
            }
            a.commit(n);
            b.commit(n);
            pos += n;
        }
        assert_eq!(tables.table(&b, 1).0, 8);
        assert_eq!(tables.free_blocks(), data.free_blocks());
        // A bounded pool runs out instead of growing.
        let mut small = KvPool::blocks_only(&cfg, 2, 4);
        let mut s = small.new_seq();
        assert_eq!(small.reserve(&mut s, 0, 9, 0), Err(KvError::OutOfBlocks { total: 2 }));
    }

    #[test]
    fn unbounded_pools_grow_with_fresh_block_ids() {
        let cfg = config(8);
        let mut pool = KvPool::unbounded(&cfg, 4);
        let mut seq = pool.new_seq();
        pool.append(&mut seq, 0, &rows(0, 9), &rows(0, 9), 0).expect("append");
        pool.append(&mut seq, 1, &rows(0, 9), &rows(0, 9), 0).expect("append");
        seq.commit(9);
        assert_eq!(pool.table(&seq, 0).1, &[0, 1, 2]);
        assert_eq!(pool.table(&seq, 1).1, &[3, 4, 5]);
        assert_eq!(read(&pool, &seq, 0), rows(0, 9));
        assert_eq!(read(&pool, &seq, 1), rows(0, 9));
    }

    #[test]
    fn worst_case_reservation_bounds_what_a_sequence_holds() {
        let cfg = config(8);
        let mut pool = KvPool::new(&cfg, 1 << 20, 4).expect("pool");
        let (total, step) = (50, 6);
        let bound = pool.blocks_for(total, step);
        let mut seq = pool.new_seq();
        let mut peak = 0;
        let mut pos = 0;
        while pos < total {
            let n = step.min(total - pos);
            for layer in 0..2 {
                let keep = if layer == 1 { pos / 8 * 8 } else { 0 };
                pool.append(&mut seq, layer, &rows(pos, n), &rows(pos, n), keep).expect("append");
            }
            seq.commit(n);
            pos += n;
            peak = peak.max(seq.blocks());
        }
        assert!(peak <= bound, "peak {peak} > reserved {bound}");
    }

    #[test]
    fn a_full_pool_is_an_error_and_a_tiny_budget_is_rejected() {
        let cfg = config(8);
        let block = 2 * 4 * 2 * 4;
        assert_eq!(KvPool::new(&cfg, block - 1, 4).err(), Some(KvError::BudgetTooSmall { budget: block - 1, block }));
        let mut pool = KvPool::new(&cfg, block, 4).expect("pool");
        let mut seq = pool.new_seq();
        pool.append(&mut seq, 0, &rows(0, 4), &rows(0, 4), 0).expect("fits");
        assert_eq!(pool.append(&mut seq, 1, &rows(0, 1), &rows(0, 1), 0), Err(KvError::OutOfBlocks { total: 1 }));
    }
}
