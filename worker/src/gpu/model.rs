//! [`GpuTextModel`]: the Llama 4 text model with its weights on one CUDA device.
//!
//! The same per-layer math as the CPU [`TextModel`] (see crate::model::text), kernel for
//! kernel: RMSNorm, q/k/v linears, RoPE + QK-norm, temperature tuning on NoPE layers, KV write
//! into head-major blocks, paged attention with the chunk mask, o linear, residual, RMSNorm,
//! dense SwiGLU or MoE, residual. Activations stay f32 on the device from the embedding to the
//! logits; only the router logits (for routing) and the requested logits leave it.

use super::GpuError;
use super::moe::{GpuMlp, GpuMoe, RoutedExperts, scratch};
use super::upload;
use crate::kv_cache::{KvPool, SeqKv};
use crate::model::config::{LayerAttention, LayerSpec, TextConfig};
use crate::model::moe::ExpertExchange;
use crate::model::moe::{ExpertWeights, MoeBlock};
use crate::model::text::{FfnWeights, LogitsFor, SeqStep, TextModel};
use herd_kernels::Elems;
use herd_kernels::cpu::attention::{AttnHeads, AttnMask};
use herd_kernels::cpu::rope::RopeFreqs;
use herd_kernels::cuda::attention::{self as gattn, AttnBatch};
use herd_kernels::cuda::elementwise::{self as ew, EmbedTable};
use herd_kernels::cuda::linear::{self, LinearWeight};
use herd_kernels::cuda::{CudaSlice, Gpu, moe as gmoe, norm};
use std::sync::Arc;

#[derive(Debug)]
pub enum GpuFfn {
    Dense(Box<GpuMlp>),
    Moe(Box<GpuMoe>),
}

#[derive(Debug)]
pub struct GpuLayer {
    pub spec: LayerSpec,
    pub input_norm: CudaSlice<f32>,
    pub post_norm: CudaSlice<f32>,
    pub q: LinearWeight, // [q_heads · head_dim, hidden]
    pub k: LinearWeight, // [kv_heads · head_dim, hidden]
    pub v: LinearWeight, // [kv_heads · head_dim, hidden]
    pub o: LinearWeight, // [hidden, q_heads · head_dim]
    pub ffn: GpuFfn,
}

/// The KV cache's storage on the device; block ids (and tables) come from a [`KvPool`].
#[derive(Debug)]
pub struct GpuKv {
    pub keys: CudaSlice<f32>,   // [blocks, kv_heads, 16, head_dim]
    pub values: CudaSlice<f32>, // [blocks, kv_heads, 16, head_dim]
    pub blocks: usize,
}

impl GpuKv {
    /// Bytes of one block (keys and values).
    pub fn block_bytes(config: &TextConfig) -> usize {
        2 * gattn::BLOCK_TOKENS * config.num_key_value_heads * config.head_dim * 4
    }

    /// As many blocks as `bytes` holds, refused if the device has not that much free memory.
    pub fn new(gpu: &Gpu, config: &TextConfig, bytes: usize) -> Result<Self, GpuError> {
        // The query reads the calling thread's current context: make it this device's.
        gpu.context().bind_to_thread()?;
        let (free, _) = herd_kernels::cuda::cudarc::driver::result::mem_get_info()?;
        if bytes > free {
            return Err(GpuError::KvTooLarge { bytes, free });
        }
        let blocks = (bytes / Self::block_bytes(config)).max(1);
        let elems = blocks * gattn::BLOCK_TOKENS * config.num_key_value_heads * config.head_dim;
        Ok(Self { keys: gpu.zeros(elems)?, values: gpu.zeros(elems)?, blocks })
    }

    /// The matching blocks-only pool (block tables for every sequence).
    pub fn pool(&self, config: &TextConfig) -> KvPool {
        KvPool::blocks_only(&config.kv_layout(), self.blocks, gattn::BLOCK_TOKENS)
    }
}

/// The text model on one GPU.
#[derive(Debug)]
pub struct GpuTextModel {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) config: TextConfig,
    /// `None` in a slice without a vocabulary (benchmarks feed hidden states directly).
    pub(crate) embed: Option<EmbedTable>,
    pub(crate) layers: Vec<GpuLayer>,
    pub(crate) norm: CudaSlice<f32>,
    pub(crate) lm_head: Option<LinearWeight>,
    pub(crate) rope: RopeFreqs,
}

/// One step's host-side plan for a layer: where new keys go and what each sequence sees.
struct LayerPlan {
    slots: CudaSlice<i32>,
    batch: AttnBatch,
}

impl GpuTextModel {
    /// Uploads `cpu`'s weights: only the routed experts it holds (all of them on a single
    /// worker; a member of an expert-parallel group holds its placement's share).
    pub fn upload(gpu: Arc<Gpu>, cpu: &TextModel) -> Result<Self, GpuError> {
        let config = cpu.config().clone();
        let (embed, norm, lm_head) = cpu.outer_weights();
        let embed_table = match embed.elems() {
            Elems::F32(v) => EmbedTable::F32(gpu.upload(v)?),
            Elems::Bf16(v) => EmbedTable::Bf16(gpu.upload(&v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())?),
            Elems::F16(v) => EmbedTable::F32(gpu.upload(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>())?),
            _ => return Err(GpuError::Unsupported("a quantized embedding".into())),
        };
        // A tied head is uploaded a second time as a linear weight (an extra vocab × hidden on the
        // device; Llama 4 checkpoints do not tie).
        let lm_head = upload::linear(&gpu, lm_head.unwrap_or(embed))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = cpu.layer_weights(i);
            let ffn = match l.ffn {
                FfnWeights::Dense(m) => GpuFfn::Dense(Box::new(mlp(&gpu, m)?)),
                FfnWeights::Moe(m) => GpuFfn::Moe(Box::new(moe(&gpu, m)?)),
            };
            layers.push(GpuLayer {
                spec: l.spec,
                input_norm: gpu.upload(l.input_norm)?,
                post_norm: gpu.upload(l.post_norm)?,
                q: upload::linear(&gpu, l.q)?,
                k: upload::linear(&gpu, l.k)?,
                v: upload::linear(&gpu, l.v)?,
                o: upload::linear(&gpu, l.o)?,
                ffn,
            });
        }
        let rope = RopeFreqs::new(config.head_dim, config.rope_theta, config.rope_scaling.as_ref());
        Ok(Self {
            norm: gpu.upload(norm)?,
            gpu,
            config,
            embed: Some(embed_table),
            layers,
            lm_head: Some(lm_head),
            rope,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Weight bytes on the device.
    pub fn weight_bytes(&self) -> usize {
        let ffn = |f: &GpuFfn| match f {
            GpuFfn::Dense(m) => m.bytes(),
            GpuFfn::Moe(m) => {
                m.router.bytes()
                    + m.shared.bytes()
                    + match &m.routed {
                        RoutedExperts::Fp8 { gate_up, down } => gate_up.w.len() + down.w.len(),
                        RoutedExperts::PerExpert(v) => v.iter().map(GpuMlp::bytes).sum(),
                    }
            }
        };
        let layers: usize =
            self.layers.iter().map(|l| l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + ffn(&l.ffn)).sum();
        layers + self.embed.as_ref().map_or(0, EmbedTable::bytes) + self.lm_head.as_ref().map_or(0, LinearWeight::bytes)
    }

    /// Runs new tokens of every sequence in `batch` (the CPU `TextModel::forward` contract):
    /// each sequence's requested logits as `[rows, vocab]`. With `ep` the routed experts run
    /// across the expert-parallel group, whose every member calls this each step, with or
    /// without tokens.
    pub fn forward(
        &self,
        kv: &mut GpuKv,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        mut ep: Option<&mut dyn ExpertExchange>,
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        let cfg = &self.config;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        if batch.iter().any(|s| s.images.is_some()) {
            return Err(GpuError::Unsupported("image prompts".into()));
        }
        for step in batch.iter() {
            if let Some(&id) = step.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(GpuError::TokenOutOfRange { id, vocab });
            }
        }
        let (Some(embed), Some(head)) = (&self.embed, &self.lm_head) else {
            return Err(GpuError::Unsupported("a model slice without embedding or head".into()));
        };
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            if let Some(ep) = ep.as_deref_mut() {
                self.join_exchanges(ep)?;
            }
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }
        let gpu = &*self.gpu;
        let ids: Vec<i32> = batch.iter().flat_map(|s| s.tokens.iter().map(|&t| t as i32)).collect();
        let mut x = scratch(gpu, total * h)?; // [tokens, hidden], written by embed_rows
        ew::embed_rows(gpu, embed, &gpu.upload(&ids)?, h, &mut x)?;
        let mut seqs: Vec<(usize, &mut SeqKv)> = batch.iter_mut().map(|s| (s.tokens.len(), &mut *s.kv)).collect();
        self.run_layers(kv, pool, &mut seqs, &mut x, ep)?;

        // The rows whose logits were asked for, gathered, normed, projected.
        let mut rows: Vec<i32> = Vec::new();
        let mut per_seq = Vec::with_capacity(batch.len());
        let mut start = 0;
        for s in batch.iter() {
            let n = s.tokens.len();
            let r = match s.logits {
                LogitsFor::None => start..start,
                LogitsFor::Last if n > 0 => start + n - 1..start + n,
                LogitsFor::Last => start..start,
                LogitsFor::All => start..start + n,
            };
            per_seq.push(r.len());
            rows.extend(r.map(|i| i as i32));
            start += n;
        }
        if rows.is_empty() {
            return Ok(per_seq.iter().map(|_| Vec::new()).collect());
        }
        let r = rows.len();
        let mut picked = scratch(gpu, r * h)?; // [rows, hidden], written by the gather
        ew::gather_scaled_rows(gpu, &x, &gpu.upload(&rows)?, &gpu.upload(&vec![1.0f32; r])?, h, &mut picked)?;
        let mut normed = scratch(gpu, r * h)?; // written by rms_norm
        norm::rms_norm(gpu, &picked, Some(&self.norm), &mut normed, h, cfg.rms_norm_eps)?;
        let mut logits = scratch(gpu, r * vocab)?; // [rows, vocab], written by linear
        linear::linear(gpu, &normed, r, head, &mut logits)?;
        let host = gpu.download(&logits)?;
        let mut out = Vec::with_capacity(per_seq.len());
        let mut at = 0;
        for n in per_seq {
            out.push(host[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        Ok(out)
    }

    /// A step without tokens in an expert-parallel group: this worker still joins every MoE
    /// layer's exchange, running the rows its peers send.
    fn join_exchanges(&self, ep: &mut dyn ExpertExchange) -> Result<(), GpuError> {
        for (li, layer) in self.layers.iter().enumerate() {
            if let GpuFfn::Moe(m) = &layer.ffn {
                // Zero tokens: `forward` touches neither buffer, it only joins the exchange.
                let (empty, mut out) = (scratch(&self.gpu, 0)?, scratch(&self.gpu, 0)?);
                m.forward(&self.gpu, &empty, 0, &mut out, Some((li, &mut *ep)))?;
            }
        }
        Ok(())
    }

    /// Every decoder layer over `x` (`[tokens, hidden]`, updated in place); `seqs` are (new
    /// tokens, block tables) in the order of `x`'s rows. Commits the new tokens to each sequence.
    pub fn run_layers(
        &self,
        kv: &mut GpuKv,
        pool: &mut KvPool,
        seqs: &mut [(usize, &mut SeqKv)],
        x: &mut CudaSlice<f32>,
        mut ep: Option<&mut dyn ExpertExchange>,
    ) -> Result<(), GpuError> {
        let cfg = &self.config;
        let gpu = &*self.gpu;
        let positions: Vec<usize> = seqs.iter().flat_map(|(n, kv)| kv.len()..kv.len() + n).collect();
        let total = positions.len();
        if total == 0 {
            return Ok(());
        }
        let (cos, sin) = self.rope.table(&positions);
        let rope = (gpu.upload(&cos)?, gpu.upload(&sin)?);
        let pos_dev = gpu.upload(&positions.iter().map(|&p| p as i32).collect::<Vec<_>>())?;
        for (li, layer) in self.layers.iter().enumerate() {
            let mask = match (layer.spec.attention, cfg.attention_chunk_size) {
                (LayerAttention::Chunked, Some(chunk)) => AttnMask::Chunked { chunk },
                _ => AttnMask::Causal,
            };
            let plan = self.plan_layer(pool, seqs, li, mask)?;
            let ep = ep.as_mut().map(|r| (li, &mut **r as _));
            self.layer_forward(layer, kv, &plan, mask, x, total, &rope, &pos_dev, ep)?;
        }
        for (n, s) in seqs.iter_mut() {
            s.commit(*n);
        }
        Ok(())
    }

    /// Takes blocks for the new tokens of layer `li` and lays out where they go.
    fn plan_layer(
        &self,
        pool: &mut KvPool,
        seqs: &mut [(usize, &mut SeqKv)],
        li: usize,
        mask: AttnMask,
    ) -> Result<LayerPlan, GpuError> {
        let bt = gattn::BLOCK_TOKENS;
        let mut slots = Vec::new();
        let (mut q_lens, mut q_pos0, mut tables) = (Vec::new(), Vec::new(), Vec::new());
        for (n, s) in seqs.iter_mut() {
            let start = s.len();
            pool.reserve(s, li, *n, mask.first_key(start))?;
            let (first_pos, blocks) = pool.table(s, li);
            // Positions before `first_pos` were freed (chunked layers): their table entries
            // are never read under the mask, so block 0 stands in for them.
            let mut table = vec![0u32; first_pos / bt];
            table.extend_from_slice(blocks);
            slots.extend((start..start + *n).map(|p| (table[p / bt] as usize * bt + p % bt) as i32));
            q_lens.push(*n);
            q_pos0.push(start);
            tables.push(table);
        }
        let gpu = &*self.gpu;
        Ok(LayerPlan { slots: gpu.upload(&slots)?, batch: AttnBatch::upload(gpu, &q_lens, &q_pos0, &tables)? })
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &GpuLayer,
        kv: &mut GpuKv,
        plan: &LayerPlan,
        mask: AttnMask,
        x: &mut CudaSlice<f32>,
        total: usize,
        rope: &(CudaSlice<f32>, CudaSlice<f32>),
        positions: &CudaSlice<i32>,
        ep: Option<(usize, &mut dyn ExpertExchange)>,
    ) -> Result<(), GpuError> {
        let cfg = &self.config;
        let gpu = &*self.gpu;
        let (h, d, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let spec = layer.spec;

        let mut a = scratch(gpu, total * h)?; // [tokens, hidden], written by rms_norm
        norm::rms_norm(gpu, x, Some(&layer.input_norm), &mut a, h, eps)?;
        let mut q = scratch(gpu, total * nq * d)?; // [tokens, q_heads, head_dim], written by linear
        let mut k = scratch(gpu, total * nkv * d)?; // [tokens, kv_heads, head_dim]
        let mut v = scratch(gpu, total * nkv * d)?;
        linear::linear(gpu, &a, total, &layer.q, &mut q)?;
        linear::linear(gpu, &a, total, &layer.k, &mut k)?;
        linear::linear(gpu, &a, total, &layer.v, &mut v)?;
        if spec.uses_rope || spec.qk_norm {
            let table = spec.uses_rope.then_some((&rope.0, &rope.1));
            norm::rope_qk_norm(gpu, &mut q, table, total, nq, d, spec.qk_norm, eps)?;
            norm::rope_qk_norm(gpu, &mut k, table, total, nkv, d, spec.qk_norm, eps)?;
        }
        if spec.temperature_tuning {
            gattn::attn_temperature(gpu, &mut q, positions, total, nq, d, cfg.attn_scale, cfg.floor_scale)?;
        }
        gattn::kv_write(gpu, &k, &v, &plan.slots, &mut kv.keys, &mut kv.values, nkv, d)?;
        let heads = AttnHeads { q_heads: nq, kv_heads: nkv, head_dim: d };
        let scale = (d as f64).powf(-0.5) as f32;
        let chunk = match mask {
            AttnMask::Chunked { chunk } => Some(chunk),
            AttnMask::Causal => None,
        };
        let mut attn = scratch(gpu, total * nq * d)?; // [tokens, q_heads, head_dim], written by attention
        gattn::attention(gpu, &q, &plan.batch, &kv.keys, &kv.values, heads, scale, chunk, &mut attn)?;
        let mut o = scratch(gpu, total * h)?; // [tokens, hidden], written by linear
        linear::linear(gpu, &attn, total, &layer.o, &mut o)?;
        ew::add_in_place(gpu, x, &o, total * h)?;

        norm::rms_norm(gpu, x, Some(&layer.post_norm), &mut a, h, eps)?;
        match &layer.ffn {
            GpuFfn::Dense(m) => m.forward(gpu, &a, total, &mut o)?,
            GpuFfn::Moe(m) => m.forward(gpu, &a, total, &mut o, ep)?,
        }
        ew::add_in_place(gpu, x, &o, total * h)?;
        Ok(())
    }
}

fn mlp(gpu: &Gpu, m: &crate::model::mlp::Mlp) -> Result<GpuMlp, GpuError> {
    let (gate, up, down) = m.weights();
    Ok(GpuMlp { gate_up: upload::stacked(gpu, &[gate, up])?, down: upload::linear(gpu, down)?, width: m.width() })
}

fn moe(gpu: &Gpu, m: &MoeBlock) -> Result<GpuMoe, GpuError> {
    let (experts, hidden, width) = (m.num_experts(), m.hidden(), m.width());
    // The experts this worker holds, in ascending order; the others run on its peers.
    let weights: Vec<ExpertWeights<'_>> = (0..experts).filter_map(|e| m.expert_weights(e)).collect();
    let mut held = vec![None; experts];
    for (slot, e) in (0..experts).filter(|&e| m.is_local(e)).enumerate() {
        held[e] = Some(slot);
    }
    let is_fp8 = |w: &crate::model::weights::Weight| matches!(w.elems(), Elems::F8E4M3 { .. });
    let all_fp8 = !weights.is_empty()
        && weights.iter().all(|w| match w {
            ExpertWeights::Linear { gate, up, down } => is_fp8(gate) && is_fp8(up) && is_fp8(down),
            ExpertWeights::Fused { .. } => false,
        });
    // The grouped GEMMs tile K by 64 and the down GEMM's N by 128.
    let gemm_shapes = hidden.is_multiple_of(gmoe::TILE_COLS)
        && hidden.is_multiple_of(gmoe::TILE_K)
        && width.is_multiple_of(gmoe::H_GROUP)
        && width.is_multiple_of(gmoe::TILE_K);
    let routed = if all_fp8 && gemm_shapes {
        let (mut gu_w, mut gu_s, mut dn_w, mut dn_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for w in &weights {
            let ExpertWeights::Linear { gate, up, down } = w else { unreachable!("checked all FP8 Linear") };
            let push = |part: &crate::model::weights::Weight, codes: &mut Vec<u8>, scales: &mut Vec<f32>| {
                if let Elems::F8E4M3 { codes: c, scales: s, .. } = part.elems() {
                    codes.extend_from_slice(c);
                    scales.extend_from_slice(s);
                }
            };
            push(gate, &mut gu_w, &mut gu_s);
            push(up, &mut gu_w, &mut gu_s);
            push(down, &mut dn_w, &mut dn_s);
        }
        RoutedExperts::Fp8 {
            gate_up: Box::new(gmoe::Fp8Experts::upload(gpu, &gu_w, &gu_s, weights.len(), 2 * width, hidden)?),
            down: Box::new(gmoe::Fp8Experts::upload(gpu, &dn_w, &dn_s, weights.len(), hidden, width)?),
        }
    } else {
        let mut mlps = Vec::with_capacity(weights.len());
        for w in weights {
            mlps.push(match w {
                ExpertWeights::Fused { gate_up, down } => {
                    let (gu, r, c) = upload::HostMat::transposed(gate_up)?;
                    let (dn, dr, dc) = upload::HostMat::transposed(down)?;
                    GpuMlp { gate_up: gu.upload(gpu, r, c)?, down: dn.upload(gpu, dr, dc)?, width }
                }
                ExpertWeights::Linear { gate, up, down } => {
                    GpuMlp { gate_up: upload::stacked(gpu, &[gate, up])?, down: upload::linear(gpu, down)?, width }
                }
            });
        }
        RoutedExperts::PerExpert(mlps)
    };
    Ok(GpuMoe {
        router: upload::linear(gpu, m.router())?,
        shared: mlp(gpu, m.shared_expert())?,
        routed,
        experts,
        held,
        top_k: m.top_k(),
        hidden,
        width,
    })
}
