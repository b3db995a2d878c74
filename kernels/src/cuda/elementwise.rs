//! Launchers of `elementwise.cu`: embedding lookup, residual add, SwiGLU rows, the gather and
//! scatter of routed-expert rows, and device-side random fills for benchmarks.

use super::compile::ELEMENTWISE;
use super::{CudaSlice, Gpu, LaunchConfig, driver_err};
use crate::device::DeviceError;
use cudarc::driver::PushKernelArg;

fn invalid(kernel: &'static str, reason: String) -> DeviceError {
    DeviceError::Invalid { kernel, reason }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// An embedding table on the device, `[vocab, hidden]`.
#[derive(Debug)]
pub enum EmbedTable {
    F32(CudaSlice<f32>),
    /// Raw bf16 bits.
    Bf16(CudaSlice<u16>),
}

impl EmbedTable {
    pub fn len(&self) -> usize {
        match self {
            EmbedTable::F32(t) => t.len(),
            EmbedTable::Bf16(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            EmbedTable::F32(t) => t.len() * 4,
            EmbedTable::Bf16(t) => t.len() * 2,
        }
    }
}

/// `out[t] = table[ids[t]]` as f32. `ids`: `[tokens]` (checked < vocab by the caller);
/// `out`: at least `tokens · hidden`.
pub fn embed_rows(
    gpu: &Gpu,
    table: &EmbedTable,
    ids: &CudaSlice<i32>,
    hidden: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let tokens = ids.len();
    if hidden == 0 || !table.len().is_multiple_of(hidden) || out.len() < tokens * hidden {
        return Err(invalid("embed_rows", format!("{tokens} ids, hidden {hidden}, out {}", out.len())));
    }
    if tokens == 0 {
        return Ok(());
    }
    let h = hidden as i32;
    let name = match table {
        EmbedTable::F32(_) => "embed_rows_f32",
        EmbedTable::Bf16(_) => "embed_rows_bf16",
    };
    let f = gpu.function(&ELEMENTWISE, name)?;
    let mut b = gpu.stream().launch_builder(&f);
    match table {
        EmbedTable::F32(t) => b.arg(t),
        EmbedTable::Bf16(t) => b.arg(t),
    };
    b.arg(ids).arg(out).arg(&h);
    // SAFETY: argument list matches the kernel; sizes checked above, ids by the caller.
    unsafe { b.launch(rows_cfg(tokens)) }.map(drop).map_err(driver_err(format!("launching {name}")))
}

/// `x[..n] += y[..n]`.
pub fn add_in_place(gpu: &Gpu, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<(), DeviceError> {
    if x.len() < n || y.len() < n {
        return Err(invalid("add_in_place", format!("n {n}, x {}, y {}", x.len(), y.len())));
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&ELEMENTWISE, "add_in_place")?;
    let n_i = n as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&n_i);
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument list matches the kernel; sizes checked above.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching add_in_place"))
}

/// `out[r, j] = silu(gate_up[r, j]) · gate_up[r, width + j]` for the first `rows` rows.
pub fn swiglu_rows(
    gpu: &Gpu,
    gate_up: &CudaSlice<f32>,
    rows: usize,
    width: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    if gate_up.len() < rows * 2 * width || out.len() < rows * width {
        return Err(invalid("swiglu_rows", format!("{rows} rows × width {width}")));
    }
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let f = gpu.function(&ELEMENTWISE, "swiglu_rows")?;
    let w = width as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(gate_up).arg(out).arg(&w);
    let cfg = LaunchConfig {
        grid_dim: (width.div_ceil(256) as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches the kernel; sizes checked above.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching swiglu_rows"))
}

/// `out[r] = x[token[r]] · score[r]`: the scaled inputs of one expert's routes.
pub fn gather_scaled_rows(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    token: &CudaSlice<i32>,
    score: &CudaSlice<f32>,
    hidden: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let routes = token.len();
    if score.len() != routes || out.len() < routes * hidden || hidden == 0 {
        return Err(invalid("gather_scaled_rows", format!("{routes} routes, hidden {hidden}")));
    }
    if routes == 0 {
        return Ok(());
    }
    let f = gpu.function(&ELEMENTWISE, "gather_scaled_rows")?;
    let h = hidden as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(token).arg(score).arg(out).arg(&h);
    // SAFETY: argument list matches the kernel; sizes checked above, token ids by the caller.
    unsafe { b.launch(rows_cfg(routes)) }.map(drop).map_err(driver_err("launching gather_scaled_rows"))
}

/// `out[token[r]] += y[r]`; the tokens of one call must be distinct.
pub fn scatter_add_rows(
    gpu: &Gpu,
    y: &CudaSlice<f32>,
    token: &CudaSlice<i32>,
    hidden: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let routes = token.len();
    if y.len() < routes * hidden || hidden == 0 {
        return Err(invalid("scatter_add_rows", format!("{routes} routes, hidden {hidden}")));
    }
    if routes == 0 {
        return Ok(());
    }
    let f = gpu.function(&ELEMENTWISE, "scatter_add_rows")?;
    let h = hidden as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(token).arg(out).arg(&h);
    // SAFETY: argument list matches the kernel; sizes checked above, token ids by the caller.
    unsafe { b.launch(rows_cfg(routes)) }.map(drop).map_err(driver_err("launching scatter_add_rows"))
}

fn fill_cfg() -> LaunchConfig {
    LaunchConfig { grid_dim: (132 * 8, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Fills `out` with finite random e4m3 codes (benchmark weights, generated on the device).
pub fn fill_random_e4m3(gpu: &Gpu, out: &mut CudaSlice<u8>, seed: u32) -> Result<(), DeviceError> {
    let f = gpu.function(&ELEMENTWISE, "fill_random_e4m3")?;
    let n = out.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(out).arg(&n).arg(&seed);
    // SAFETY: argument list matches the kernel; the kernel writes exactly `n` bytes.
    unsafe { b.launch(fill_cfg()) }.map(drop).map_err(driver_err("launching fill_random_e4m3"))
}

/// Fills `out` with values uniform in `[-scale, scale)`.
pub fn fill_random_f32(gpu: &Gpu, out: &mut CudaSlice<f32>, seed: u32, scale: f32) -> Result<(), DeviceError> {
    let f = gpu.function(&ELEMENTWISE, "fill_random_f32")?;
    let n = out.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(out).arg(&n).arg(&seed).arg(&scale);
    // SAFETY: argument list matches the kernel; the kernel writes exactly `n` values.
    unsafe { b.launch(fill_cfg()) }.map(drop).map_err(driver_err("launching fill_random_f32"))
}
