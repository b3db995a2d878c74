//! The GPU's side of `herd bench --device cuda[:N]`: the memory bandwidth its decode rate is
//! measured against. (The GPU engine itself is built by `herd_worker::engine::device`.)

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
