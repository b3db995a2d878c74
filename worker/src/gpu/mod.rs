//! The text model on one CUDA device (feature `cuda`), with every weight resident there.
//!
//! - [`upload`]: checkpoint weights (as the CPU model holds them, memory-mapped) → device
//!   tensors: float weights keep their dtype (f32 or bf16), FP8 weights keep their codes and
//!   per-channel scales; input-major expert tensors are transposed to nn.Linear layout once.
//! - [`model`]: [`GpuTextModel`]: embedding → decoder layers → final norm → lm_head, one batch
//!   of sequences per [`GpuTextModel::forward`], the same contract as the CPU
//!   [`TextModel::forward`](crate::model::text::TextModel::forward). The KV cache lives on the
//!   device; its block tables are the CPU [`KvPool`](crate::kv_cache::KvPool)'s, kept
//!   in a blocks-only pool.
//! - [`moe`]: a MoE layer on the device: router, host-side top-k (the counts must reach the host
//!   anyway, for the expert-parallel all-to-all), then either the fused FP8 path (dispatch
//!   quantization → grouped FP8 GEMMs → combine) when every expert is FP8, or per-expert float
//!   linears (the f32 path the golden tests compare with transformers). In an expert-parallel
//!   group the routed rows go through the [`ExpertExchange`](crate::model::moe::ExpertExchange) and
//!   the experts this worker holds run the rows its peers send.
//! - [`slice`]: a Maverick slice with random FP8 weights made on the device, for the decode
//!   benchmark of issue 6.
//!
//! Flow of one decode step: token ids → `embed_rows` → per layer {RMSNorm, q/k/v linears,
//! RoPE + QK-norm, KV write, paged attention, o linear + residual, RMSNorm, dense SwiGLU or MoE,
//! residual} → RMSNorm of the rows that need logits → lm_head → logits copied to the host for
//! the sampler.

pub mod model;
pub mod moe;
pub mod slice;
pub mod upload;

pub use model::GpuTextModel;

use herd_kernels::device::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("CUDA: {0}")]
    Driver(#[from] herd_kernels::cuda::cudarc::driver::DriverError),
    #[error("{0} is not supported on CUDA yet")]
    Unsupported(String),
    #[error(transparent)]
    Kv(#[from] crate::kv_cache::KvError),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the KV cache of {bytes} bytes does not fit: {free} bytes of device memory are free")]
    KvTooLarge { bytes: usize, free: usize },
    #[error(transparent)]
    Exchange(#[from] crate::model::moe::ExchangeError),
}

/// A GPU shard's failure as the exchange reports it (the peers' rows could not run here).
impl From<GpuError> for crate::model::moe::ExpertError {
    fn from(e: GpuError) -> Self {
        crate::model::moe::ExpertError::Device(e.to_string())
    }
}

impl From<DeviceError> for crate::model::moe::ExpertError {
    fn from(e: DeviceError) -> Self {
        crate::model::moe::ExpertError::Device(e.to_string())
    }
}
