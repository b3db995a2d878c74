//! An engine on the device a command's `--device` names: the CPU, or one CUDA GPU with the
//! model's weights uploaded there (feature `cuda`). Used by every process that runs an engine:
//! a single-process `generate|eval|bench`, and each worker of an expert-parallel group, which
//! uploads only the routed experts its placement gives it.

use super::{Engine, EngineConfig, EngineError};
use crate::kv_cache::KvPool;
use crate::model::moe::ExpertExchange;
use crate::model::text::SeqStep;
use crate::model::text::TextModel;
use crate::tokenizer::Tokenizer;
use herd_kernels::device::Device;
use std::path::PathBuf;
use std::sync::Arc;

/// Where an engine runs and how a GPU engine sizes itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceOptions {
    pub device: Device,
    /// GPU only: the KV cache takes this share of the device memory left free once the weights
    /// are up; `None` keeps [`EngineConfig::kv_cache_bytes`].
    pub gpu_kv_fraction: Option<f64>,
    /// GPU only: where compiled kernels are kept between runs (keyed by source hash, arch and
    /// NVRTC version); `None` compiles them at every start.
    pub kernel_cache: Option<PathBuf>,
}

/// The engine for `model` on `opts.device`. A GPU engine serves text only: the vision tower
/// is not enabled on it, so image requests are refused with a clear error.
pub fn build(
    model: Arc<TextModel>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    opts: &DeviceOptions,
) -> Result<Engine, EngineError> {
    match opts.device {
        Device::Cpu => Engine::new(model, tokenizer, eos, config),
        Device::Cuda(ordinal) => on_gpu(ordinal, model, tokenizer, eos, config, opts),
    }
}

#[cfg(feature = "cuda")]
fn on_gpu(
    ordinal: usize,
    model: Arc<TextModel>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    mut config: EngineConfig,
    opts: &DeviceOptions,
) -> Result<Engine, EngineError> {
    use crate::gpu::{GpuError, GpuTextModel};
    use herd_kernels::cuda::Gpu;
    let gpu = Arc::new(Gpu::open(ordinal, opts.kernel_cache.clone()).map_err(GpuError::from)?);
    let started = std::time::Instant::now();
    let gpu_model = Arc::new(GpuTextModel::upload(Arc::clone(&gpu), &model)?);
    tracing::info!(
        "weights on {} (cuda:{ordinal}): {:.2} GiB in {:.1} s",
        gpu.info().name,
        gpu_model.weight_bytes() as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    if let Some(fraction) = opts.gpu_kv_fraction {
        // The query reads the calling thread's current context: make it this device's.
        gpu.context().bind_to_thread().map_err(GpuError::from)?;
        let (free, _) = herd_kernels::cuda::cudarc::driver::result::mem_get_info().map_err(GpuError::from)?;
        config.kv_cache_bytes = (free as f64 * fraction) as usize;
    }
    Engine::on_gpu(model, gpu_model, tokenizer, eos, config)
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(
    _ordinal: usize,
    _model: Arc<TextModel>,
    _tokenizer: Arc<Tokenizer>,
    _eos: Vec<u32>,
    _config: EngineConfig,
    _opts: &DeviceOptions,
) -> Result<Engine, EngineError> {
    Err(herd_kernels::device::DeviceError::NotBuilt.into())
}

/// The model on a CUDA device, as the engine runs it: the forward pass runs there, with the KV
/// data on the device and the engine's pool keeping only its block tables.
#[cfg(feature = "cuda")]
pub(super) struct GpuBackend {
    pub(super) model: Arc<crate::gpu::GpuTextModel>,
    pub(super) kv: crate::gpu::model::GpuKv,
}

/// Without the `cuda` feature there is no GPU backend: an uninhabited type keeps the engine's
/// code the same in both builds.
#[cfg(not(feature = "cuda"))]
pub(super) enum GpuBackend {}

impl GpuBackend {
    pub(super) fn forward(
        &mut self,
        pool: &mut KvPool,
        steps: &mut [SeqStep<'_>],
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        #[cfg(feature = "cuda")]
        return Ok(self.model.forward(&mut self.kv, pool, steps, exchange)?);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (pool, steps, exchange);
            match *self {}
        }
    }
}
