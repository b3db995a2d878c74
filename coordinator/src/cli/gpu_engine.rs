//! `--device cuda[:N]` for the commands that run an engine in this process (`generate`, `eval`,
//! `bench`): the model's weights are uploaded to the GPU and every forward pass runs there.

use super::engine_flags::EngineFlags;
use herd_worker::engine::scheduler::Engine;
use herd_worker::model::text::TextModel;
use herd_worker::tokenizer::Tokenizer;
use std::sync::Arc;

/// An engine on CUDA device `ordinal`. Without `--kv-cache-bytes` the KV cache takes
/// `--kv-cache-fraction` of the device memory left free once the weights are up.
#[cfg(feature = "cuda")]
pub fn build(
    ordinal: usize,
    model: Arc<TextModel>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    flags: &EngineFlags,
) -> anyhow::Result<Engine> {
    use anyhow::Context;
    use herd_kernels::cuda::Gpu;
    use herd_worker::gpu::GpuTextModel;
    let gpu = Arc::new(Gpu::open(ordinal, None).with_context(|| format!("--device cuda:{ordinal}"))?);
    let started = std::time::Instant::now();
    let gpu_model =
        Arc::new(GpuTextModel::upload(Arc::clone(&gpu), &model).context("uploading the weights to the GPU")?);
    tracing::info!(
        "weights on {}: {:.2} GiB in {:.1} s",
        gpu.info().name,
        gpu_model.weight_bytes() as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    let mut config = flags.config()?;
    if flags.kv_cache_bytes.is_none() {
        gpu.context().bind_to_thread().context("binding the CUDA context")?;
        let (free, _) =
            herd_kernels::cuda::cudarc::driver::result::mem_get_info().context("reading free GPU memory")?;
        config.kv_cache_bytes = (free as f64 * flags.kv_cache_fraction) as usize;
    }
    Ok(Engine::on_gpu(model, gpu_model, tokenizer, eos, config)?)
}

/// Device memory bandwidth in bytes/s: a 1 GiB device-to-device copy, bytes read + written.
#[cfg(feature = "cuda")]
pub fn device_bandwidth(ordinal: usize) -> anyhow::Result<f64> {
    let gpu = herd_kernels::cuda::Gpu::open(ordinal, None)?;
    Ok(herd_worker::gpu::slice::copy_bandwidth(&gpu)? * 1e9)
}

#[cfg(not(feature = "cuda"))]
pub fn device_bandwidth(ordinal: usize) -> anyhow::Result<f64> {
    anyhow::bail!("--device cuda:{ordinal}: {}", herd_kernels::device::DeviceError::NotBuilt)
}

/// The twin of the `cuda` build's: `--device cuda` was already refused by the device check.
#[cfg(not(feature = "cuda"))]
pub fn build(
    ordinal: usize,
    _model: Arc<TextModel>,
    _tokenizer: Arc<Tokenizer>,
    _eos: Vec<u32>,
    _flags: &EngineFlags,
) -> anyhow::Result<Engine> {
    anyhow::bail!("--device cuda:{ordinal}: {}", herd_kernels::device::DeviceError::NotBuilt)
}
