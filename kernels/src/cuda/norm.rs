//! Launchers of `norm_rope.cu`: RMSNorm and Llama 4's fused RoPE + QK-norm.

use super::compile::NORM_ROPE;
use super::{CudaSlice, Gpu, LaunchConfig, driver_err};
use crate::device::DeviceError;
use cudarc::driver::PushKernelArg;

/// `out = x · rsqrt(mean(x²) + eps) · weight` per row. `x`, `out`: `[rows, dim]`; `weight`: `[dim]`.
pub fn rms_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    weight: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    dim: usize,
    eps: f32,
) -> Result<(), DeviceError> {
    let rows = x.len() / dim.max(1);
    if dim == 0 || x.len() != rows * dim || out.len() != x.len() || weight.is_some_and(|w| w.len() != dim) {
        return Err(DeviceError::Invalid {
            kernel: "rms_norm",
            reason: format!("x {} / out {} elements, dim {dim}", x.len(), out.len()),
        });
    }
    let f = gpu.function(&NORM_ROPE, "rms_norm")?;
    let (dim_i, null) = (dim as i32, 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x);
    match weight {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    b.arg(out).arg(&dim_i).arg(&eps);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument list matches the kernel's signature; sizes checked above.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching rms_norm"))
}

/// Rotates `q` (`[tokens, heads, head_dim]`) in place by `cos`/`sin` (`[tokens, head_dim / 2]`;
/// `None` on NoPE layers) and then, if `qk_norm`, RMS-normalises every head (no weight).
#[allow(clippy::too_many_arguments)]
pub fn rope_qk_norm(
    gpu: &Gpu,
    q: &mut CudaSlice<f32>,
    rope: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    qk_norm: bool,
    eps: f32,
) -> Result<(), DeviceError> {
    let pairs = head_dim / 2;
    let bad_table = rope.is_some_and(|(c, s)| c.len() != tokens * pairs || s.len() != c.len());
    if head_dim == 0
        || !head_dim.is_multiple_of(2)
        || head_dim > 256
        || q.len() != tokens * heads * head_dim
        || bad_table
    {
        return Err(DeviceError::Invalid {
            kernel: "rope_qk_norm",
            reason: format!("q {} elements for {tokens}×{heads}×{head_dim} (head_dim even, ≤ 256)", q.len()),
        });
    }
    let f = gpu.function(&NORM_ROPE, "rope_qk_norm")?;
    let (t, h, d, n, null) = (tokens as i32, heads as i32, head_dim as i32, i32::from(qk_norm), 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(q);
    match rope {
        Some((c, s)) => b.arg(c).arg(s),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&t).arg(&h).arg(&d).arg(&n).arg(&eps);
    let rows = (tokens * heads) as u32;
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(4).max(1), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument list matches the kernel's signature; sizes checked above.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching rope_qk_norm"))
}
