//! Dense linear layers on the GPU: `y[m, n] = x[m, k] · Wᵀ` with W in nn.Linear layout `[n, k]`,
//! f32 activations and f32 accumulation, for f32, bf16 and FP8 (e4m3 + per-row scale) weights.
//!
//! Routes ([`route`] picks one; [`linear_via`] forces one, for tests and the bench):
//! - [`Route::Gemv`] (k % 4 == 0; m ≤ [`GEMV_MAX_BATCH`], FP8: m ≤ [`FP8_GEMV_MAX_M`]): the
//!   weight-streaming kernel, one pass over W per 8 activation rows, exact weights. Decode is
//!   bound by reading W; small-m tiled grids cannot keep enough bytes in flight.
//! - [`Route::Fp8Gemm`] (FP8, m > [`FP8_GEMV_MAX_M`], k % 64 == 0, n % 128 == 0): activations
//!   quantized per row to e4m3, then the grouped FP8 tensor-core GEMM of moe_gemm.cu with one
//!   group. The result carries FP8 activation error (each x rounded to 3 mantissa bits).
//! - [`Route::Tiled`] (anything else): the f32 SGEMM, exact weights, any shape.
//!
//! Switch points from gpu_linear_bench on an H100 (2026-11-27; 1 GiB DtoD copy: 3001 GB/s
//! read + written): at m = 1 the GEMV streams bf16 W at 2.7–2.9 TB/s and FP8 W at 2.2–2.5 TB/s
//! on the large layers (1.8 TB/s for the 26 MB wo, where launch latency shows). At m = 16, FP8
//! gate_up shapes run 1.8–2.3× faster on the tensor-core route than as two GEMV passes (wo:
//! even; dense down: GEMV 15 % faster), hence FP8 switches after 8 rows. For bf16 the GEMV beats
//! the tiled kernel 3–6× at m = 16 and is within ±40 % at m = 64, hence 32.

use super::compile::{LINEAR, MOE_DISPATCH, MOE_GEMM};
use super::{CudaSlice, Gpu, LaunchConfig, driver_err};
use crate::device::DeviceError;
use cudarc::driver::PushKernelArg;

/// Activation rows served by one pass of the GEMV kernel (its largest template instance).
pub const GEMV_MAX_M: usize = 8;
/// Up to this many rows f32/bf16 weights take the GEMV route (ceil(m / 8) passes over W); above
/// it, the tiled GEMM.
pub const GEMV_MAX_BATCH: usize = 32;
/// Up to this many rows FP8 weights take the GEMV route (exact f32 activations); above it, the
/// tensor-core route where the shape allows (FP8 activations), else GEMV up to
/// [`GEMV_MAX_BATCH`], else tiled.
pub const FP8_GEMV_MAX_M: usize = 8;
/// Weight rows per warp and warps per block of the GEMV kernel (GEMV_ROWS, GEMV_WARPS in linear.cu).
const GEMV_ROWS: usize = 8;
const GEMV_WARPS: usize = 8;
/// Warps the GEMV grid aims for (~24 per SM on an H100): enough loads in flight to stream HBM.
const GEMV_TARGET_WARPS: usize = 132 * 24;
/// Tile of the tiled kernel (TM = TN in linear.cu).
const TILE: usize = 64;

/// A weight matrix `[n, k]` (row-major, one row per output) on the device.
#[derive(Debug)]
pub enum LinearWeight {
    F32 {
        w: CudaSlice<f32>,
        n: usize,
        k: usize,
    },
    /// Raw bf16 bits.
    Bf16 {
        w: CudaSlice<u16>,
        n: usize,
        k: usize,
    },
    /// e4m3 codes with one f32 scale per output row: `W[n, k] = e4m3(w[n, k]) · scale[n]`.
    Fp8 {
        w: CudaSlice<u8>,
        scale: CudaSlice<f32>,
        n: usize,
        k: usize,
    },
}

fn invalid(reason: String) -> DeviceError {
    DeviceError::Invalid { kernel: "linear", reason }
}

fn check_dims(len: usize, n: usize, k: usize) -> Result<(), DeviceError> {
    // The kernels index rows and columns with i32.
    if n == 0 || k == 0 || n > i32::MAX as usize || k > i32::MAX as usize || len != n * k {
        return Err(invalid(format!("{len} weights for [{n}, {k}]")));
    }
    Ok(())
}

impl LinearWeight {
    pub fn f32(gpu: &Gpu, w: &[f32], n: usize, k: usize) -> Result<Self, DeviceError> {
        check_dims(w.len(), n, k)?;
        Ok(LinearWeight::F32 { w: gpu.upload(w)?, n, k })
    }

    pub fn bf16(gpu: &Gpu, w: &[u16], n: usize, k: usize) -> Result<Self, DeviceError> {
        check_dims(w.len(), n, k)?;
        Ok(LinearWeight::Bf16 { w: gpu.upload(w)?, n, k })
    }

    pub fn fp8(gpu: &Gpu, w: &[u8], scale: &[f32], n: usize, k: usize) -> Result<Self, DeviceError> {
        check_dims(w.len(), n, k)?;
        if scale.len() != n {
            return Err(invalid(format!("{} scales for {n} rows", scale.len())));
        }
        Ok(LinearWeight::Fp8 { w: gpu.upload(w)?, scale: gpu.upload(scale)?, n, k })
    }

    pub fn n(&self) -> usize {
        match self {
            LinearWeight::F32 { n, .. } | LinearWeight::Bf16 { n, .. } | LinearWeight::Fp8 { n, .. } => *n,
        }
    }

    pub fn k(&self) -> usize {
        match self {
            LinearWeight::F32 { k, .. } | LinearWeight::Bf16 { k, .. } | LinearWeight::Fp8 { k, .. } => *k,
        }
    }

    /// Device bytes of the weights and scales (what one pass over W reads).
    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::F32 { w, .. } => w.len() * 4,
            LinearWeight::Bf16 { w, .. } => w.len() * 2,
            LinearWeight::Fp8 { w, scale, .. } => w.len() + scale.len() * 4,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            LinearWeight::F32 { .. } => "f32",
            LinearWeight::Bf16 { .. } => "bf16",
            LinearWeight::Fp8 { .. } => "fp8",
        }
    }
}

/// Which kernel computes a [`linear`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Gemv,
    Tiled,
    Fp8Gemm,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Gemv => "gemv",
            Route::Tiled => "tiled",
            Route::Fp8Gemm => "fp8_gemm",
        }
    }

    /// Whether this route can compute `m` rows with `w` (every route handles m = 0).
    pub fn supports(self, w: &LinearWeight) -> bool {
        let (n, k) = (w.n(), w.k());
        match self {
            Route::Gemv => k.is_multiple_of(4),
            Route::Tiled => true,
            Route::Fp8Gemm => {
                matches!(w, LinearWeight::Fp8 { .. })
                    && k.is_multiple_of(super::moe::TILE_K)
                    && n.is_multiple_of(super::moe::TILE_COLS)
            }
        }
    }
}

/// The route [`linear`] takes for `m` rows: see the module comment.
pub fn route(m: usize, w: &LinearWeight) -> Route {
    if m > FP8_GEMV_MAX_M && Route::Fp8Gemm.supports(w) {
        Route::Fp8Gemm
    } else if m <= GEMV_MAX_BATCH && Route::Gemv.supports(w) {
        Route::Gemv
    } else {
        Route::Tiled
    }
}

/// `y[m, n] = x[m, k] · Wᵀ` (f32 accumulation). `x` has at least m·k elements, `y` at least m·n
/// (only the first m rows are touched).
pub fn linear(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    m: usize,
    w: &LinearWeight,
    y: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    linear_via(gpu, x, m, w, y, route(m, w))
}

/// [`linear`] through a given route (which must [support](Route::supports) `w`).
pub fn linear_via(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    m: usize,
    w: &LinearWeight,
    y: &mut CudaSlice<f32>,
    route: Route,
) -> Result<(), DeviceError> {
    let (n, k) = (w.n(), w.k());
    if x.len() < m * k || y.len() < m * n || m > i32::MAX as usize {
        return Err(invalid(format!("x {} / y {} elements for m = {m}, [{n}, {k}]", x.len(), y.len())));
    }
    if !route.supports(w) {
        return Err(invalid(format!("route {} cannot take {} weights [{n}, {k}]", route.name(), w.name())));
    }
    if m == 0 {
        return Ok(());
    }
    match route {
        Route::Gemv => {
            for m0 in (0..m).step_by(GEMV_MAX_M) {
                let rows = GEMV_MAX_M.min(m - m0);
                gemv(gpu, x, m0, rows, w, y)?;
            }
            Ok(())
        }
        Route::Tiled => tiled(gpu, x, m, w, y),
        Route::Fp8Gemm => fp8_gemm(gpu, x, m, w, y),
    }
}

/// Device pointers of W and its scales (a null scale for f32/bf16: the kernels never read it).
fn push_weight<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, w: &'a LinearWeight, null: &'a u64) {
    match w {
        LinearWeight::F32 { w, .. } => b.arg(w).arg(null),
        LinearWeight::Bf16 { w, .. } => b.arg(w).arg(null),
        LinearWeight::Fp8 { w, scale, .. } => b.arg(w).arg(scale),
    };
}

/// Splits K among up to 8 warps per row group when there are too few row groups to fill the
/// GPU, as long as each warp keeps at least two loop trips.
fn gemv_ksplit(w: &LinearWeight) -> usize {
    let groups = w.n().div_ceil(GEMV_ROWS);
    let per_trip = if matches!(w, LinearWeight::Fp8 { .. }) { 256 } else { 128 };
    let mut ksplit = 1;
    while ksplit < GEMV_WARPS && groups * ksplit < GEMV_TARGET_WARPS && w.k() >= per_trip * ksplit * 4 {
        ksplit *= 2;
    }
    ksplit
}

/// Rows `m0..m0 + rows` (rows ≤ 8) in one pass over W.
fn gemv(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    m0: usize,
    rows: usize,
    w: &LinearWeight,
    y: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let (n, k) = (w.n(), w.k());
    let name = format!("linear_gemv_{}_m{rows}", w.name());
    let f = gpu.function(&LINEAR, &name)?;
    let ksplit = gemv_ksplit(w);
    let rows_per_block = GEMV_ROWS * GEMV_WARPS / ksplit;
    // Offsets of whole rows: k % 4 == 0 keeps the x view 16-byte aligned for the float4 loads.
    let xv = x.slice(m0 * k..(m0 + rows) * k);
    let mut yv = y.slice_mut(m0 * n..(m0 + rows) * n);
    let (ni, ki, ks, null) = (n as i32, k as i32, ksplit as i32, 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&xv);
    push_weight(&mut b, w, &null);
    b.arg(&mut yv).arg(&ni).arg(&ki).arg(&ks);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: ((GEMV_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches the kernel; shapes and k % 4 checked by the caller.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err(format!("launching {name}")))
}

fn tiled(gpu: &Gpu, x: &CudaSlice<f32>, m: usize, w: &LinearWeight, y: &mut CudaSlice<f32>) -> Result<(), DeviceError> {
    let (n, k) = (w.n(), w.k());
    if m.div_ceil(TILE) > 65535 {
        return Err(invalid(format!("m = {m} exceeds the tiled kernel's grid")));
    }
    let name = format!("linear_tiled_{}", w.name());
    let f = gpu.function(&LINEAR, &name)?;
    let (mi, ni, ki, null) = (m as i32, n as i32, k as i32, 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x);
    push_weight(&mut b, w, &null);
    b.arg(y).arg(&mi).arg(&ni).arg(&ki);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches the kernel; shapes checked by the caller.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err(format!("launching {name}")))
}

/// Per-row e4m3 quantization of x (quant_rows_fp8), then moe_gemm_fp8 with a single expert.
/// Allocates the quantized activations and the two offset arrays on each call.
fn fp8_gemm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    m: usize,
    w: &LinearWeight,
    y: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let LinearWeight::Fp8 { w, scale, n, k } = w else { unreachable!("checked by Route::supports") };
    let (n, k) = (*n, *k);
    let mut q = gpu.zeros::<u8>(m * k)?; // [m, k]
    let mut a_scale = gpu.zeros::<f32>(m)?; // [m]
    let quant = gpu.function(&MOE_DISPATCH, "quant_rows_fp8")?;
    let ki = k as i32;
    let mut b = gpu.stream().launch_builder(&quant);
    b.arg(x).arg(&mut q).arg(&mut a_scale).arg(&ki);
    let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument list matches the kernel; x holds m rows of k (even) floats.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching quant_rows_fp8"))?;

    let tiles = m.div_ceil(super::moe::TILE_ROWS);
    let row_offsets = gpu.upload(&[0i32, m as i32])?;
    let tile_offsets = gpu.upload(&[0i32, tiles as i32])?;
    let gemm = gpu.function(&MOE_GEMM, "moe_gemm_fp8")?;
    let (kgroups, experts, ni) = (1i32, 1i32, n as i32);
    let mut b = gpu.stream().launch_builder(&gemm);
    b.arg(&q).arg(&a_scale).arg(&kgroups).arg(w).arg(scale).arg(&row_offsets).arg(&tile_offsets);
    b.arg(&experts).arg(y).arg(&ni).arg(&ki);
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, (n / super::moe::TILE_COLS) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches moe_gemm_fp8; k % 64 == 0 and n % 128 == 0 checked by
    // Route::supports; the kernel writes only rows < m of y.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching moe_gemm_fp8"))
}
