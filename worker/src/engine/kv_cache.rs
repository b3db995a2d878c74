//! Per-sequence key/value history, one growable buffer per layer.
//!
//! Keys are stored after RoPE and QK-norm (what attention consumes); temperature tuning
//! touches only queries. Chunked-attention layers keep only the current chunk: a query at
//! position `p` never looks before `floor(p / chunk) · chunk`, so older rows are dropped as
//! soon as a step starts in a new chunk. (A paged, budgeted cache replaces this with the
//! batching engine.)

use crate::model::config::TextConfig;
use herd_kernels::cpu::attention::KvHistory;

#[derive(Clone, Debug, Default)]
struct LayerKv {
    keys: Vec<f32>,   // [rows, kv_heads · head_dim]
    values: Vec<f32>, // [rows, kv_heads · head_dim]
    /// Absolute position of row 0.
    first_pos: usize,
}

/// The KV history of one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    row: usize,
    len: usize,
}

impl KvCache {
    pub fn new(config: &TextConfig) -> Self {
        Self {
            layers: vec![LayerKv::default(); config.num_hidden_layers],
            row: config.num_key_value_heads * config.head_dim,
            len: 0,
        }
    }

    /// Tokens whose keys and values are in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append the rows of this step's tokens to `layer`, first dropping rows before
    /// `keep_from` (an absolute position; `0` keeps everything).
    pub fn append(&mut self, layer: usize, keys: &[f32], values: &[f32], keep_from: usize) {
        assert_eq!(keys.len(), values.len());
        assert_eq!(keys.len() % self.row, 0);
        let l = &mut self.layers[layer];
        if keep_from > l.first_pos {
            let drop_rows = (keep_from - l.first_pos).min(l.keys.len() / self.row);
            l.keys.drain(..drop_rows * self.row);
            l.values.drain(..drop_rows * self.row);
            l.first_pos += drop_rows;
        }
        l.keys.extend_from_slice(keys);
        l.values.extend_from_slice(values);
    }

    /// The rows of `layer` (including any appended in the current step).
    pub fn history(&self, layer: usize) -> KvHistory<'_> {
        let l = &self.layers[layer];
        KvHistory { keys: &l.keys, values: &l.values, first_pos: l.first_pos }
    }

    /// Mark `n` more tokens as cached once every layer has appended them.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.keys.len() + l.values.len()) * 4).sum()
    }
}
