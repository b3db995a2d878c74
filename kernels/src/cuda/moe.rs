//! Launchers of the MoE kernels: dispatch quantization, the grouped FP8 GEMMs, the combine.
//!
//! Data flow of one MoE layer on one GPU (shapes per kernel in kernels/cuda/*.cu):
//! `x [tokens, hidden] f32` → [`quant_dispatch`] → `A [routes, hidden] e4m3 + [routes] scales`
//! (routes packed by expert) → [`gemm_swiglu`] (gate_up) → `h [routes, width] e4m3 +
//! [routes, width/64] scales` → [`gemm`] (down) → `y [routes, hidden] f32` → [`combine`] with the
//! shared expert's output → `[tokens, hidden] f32`.

use super::compile::{MOE_COMBINE, MOE_DISPATCH, MOE_GEMM};
use super::{CudaSlice, Gpu, LaunchConfig, driver_err};
use crate::device::DeviceError;
use cudarc::driver::PushKernelArg;

/// Row tile of the grouped GEMM (BM in moe_gemm.cu).
pub const TILE_ROWS: usize = 64;
/// Column tile of the down GEMM (BN); N must be a multiple of it.
pub const TILE_COLS: usize = 128;
/// K granularity (BK); K must be a multiple of it.
pub const TILE_K: usize = 64;
/// Columns of the intermediate per re-quantization scale group (one gate_up block).
pub const H_GROUP: usize = 64;

fn invalid(kernel: &'static str, reason: String) -> DeviceError {
    DeviceError::Invalid { kernel, reason }
}

/// Experts' FP8 weights on the device: e4m3 `[experts, n, k]` (K-major, nn.Linear layout) and
/// one f32 scale per output channel `[experts, n]`.
#[derive(Debug)]
pub struct Fp8Experts {
    pub w: CudaSlice<u8>,
    pub scale: CudaSlice<f32>,
    pub experts: usize,
    pub n: usize,
    pub k: usize,
}

impl Fp8Experts {
    pub fn upload(gpu: &Gpu, w: &[u8], scale: &[f32], experts: usize, n: usize, k: usize) -> Result<Self, DeviceError> {
        if w.len() != experts * n * k || scale.len() != experts * n {
            return Err(invalid(
                "moe_gemm",
                format!("weights {} / scales {} for [{experts}, {n}, {k}]", w.len(), scale.len()),
            ));
        }
        Ok(Fp8Experts { w: gpu.upload(w)?, scale: gpu.upload(scale)?, experts, n, k })
    }
}

/// How packed rows split among experts: rows `row_offsets[e]..row_offsets[e+1]` are expert e's,
/// and `tile_offsets[e]` counts the 64-row tiles of the experts before e.
#[derive(Debug)]
pub struct Groups {
    row_offsets: CudaSlice<i32>,
    tile_offsets: CudaSlice<i32>,
    pub rows: usize,
    pub experts: usize,
    tiles: usize,
}

impl Groups {
    /// From rows per expert (known on the host: the all-to-all's counts travel before its data).
    pub fn from_counts(gpu: &Gpu, counts: &[usize]) -> Result<Self, DeviceError> {
        let (mut rows, mut tiles) = (vec![0i32], vec![0i32]);
        for &c in counts {
            rows.push(rows[rows.len() - 1] + c as i32);
            tiles.push(tiles[tiles.len() - 1] + c.div_ceil(TILE_ROWS) as i32);
        }
        Ok(Groups {
            rows: rows[counts.len()] as usize,
            tiles: tiles[counts.len()] as usize,
            experts: counts.len(),
            row_offsets: gpu.upload(&rows)?,
            tile_offsets: gpu.upload(&tiles)?,
        })
    }
}

/// Scales each route's token by its router score, quantizes it to e4m3 with a per-route scale,
/// and writes it at its packed position. `x`: `[tokens, hidden]`; `route_token`, `route_score`:
/// `[routes]` in packed order; `q`: `[routes, hidden]`; `a_scale`: `[routes]`.
pub fn quant_dispatch(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    hidden: usize,
    route_token: &CudaSlice<i32>,
    route_score: &CudaSlice<f32>,
    q: &mut CudaSlice<u8>,
    a_scale: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let routes = route_token.len();
    if !hidden.is_multiple_of(2)
        || !x.len().is_multiple_of(hidden.max(1))
        || route_score.len() != routes
        || q.len() != routes * hidden
        || a_scale.len() != routes
    {
        return Err(invalid("moe_quant_dispatch_fp8", format!("{routes} routes, hidden {hidden}")));
    }
    if routes == 0 {
        return Ok(());
    }
    let f = gpu.function(&MOE_DISPATCH, "moe_quant_dispatch_fp8")?;
    let h = hidden as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(route_token).arg(route_score).arg(q).arg(a_scale).arg(&h);
    let cfg = LaunchConfig { grid_dim: (routes as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument list matches the kernel; sizes checked above (token ids are the caller's).
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching moe_quant_dispatch_fp8"))
}

fn check_gemm(
    kernel: &'static str,
    a: &CudaSlice<u8>,
    a_scale: &CudaSlice<f32>,
    kgroups: usize,
    w: &Fp8Experts,
    g: &Groups,
) -> Result<(), DeviceError> {
    let k = w.k;
    if k == 0
        || !k.is_multiple_of(TILE_K)
        || kgroups == 0
        || !k.is_multiple_of(kgroups)
        || !(k / kgroups).is_multiple_of(TILE_K)
    {
        return Err(invalid(
            kernel,
            format!("K = {k} with {kgroups} scale groups: K and K/groups must be multiples of {TILE_K}"),
        ));
    }
    if g.experts != w.experts || a.len() != g.rows * k || a_scale.len() != g.rows * kgroups {
        return Err(invalid(
            kernel,
            format!(
                "A {} / scales {} for {} rows × {k}; {} experts vs {}",
                a.len(),
                a_scale.len(),
                g.rows,
                g.experts,
                w.experts
            ),
        ));
    }
    Ok(())
}

fn grid_rows(g: &Groups) -> u32 {
    // The counts are on the host here, so the grid is exact. The kernel still bounds-checks, so a
    // caller whose counts live only on the device can launch the upper bound
    // ceil(rows / 64) + experts and let the spare blocks exit.
    g.tiles as u32
}

/// gate_up with the SwiGLU epilogue: `h = e4m3(silu(A·Wgᵀ) · (A·Wuᵀ))` with one scale per
/// (row, 64 columns). `w`: `[experts, 2·width, hidden]` = gate rows then up rows; `a`: `[rows,
/// hidden]` with `kgroups` scales per row; `h`: `[rows, width]`; `h_scale`: `[rows, width / 64]`.
#[allow(clippy::too_many_arguments)] // the kernel's operands; a struct would only rename them
pub fn gemm_swiglu(
    gpu: &Gpu,
    a: &CudaSlice<u8>,
    a_scale: &CudaSlice<f32>,
    kgroups: usize,
    w: &Fp8Experts,
    groups: &Groups,
    h: &mut CudaSlice<u8>,
    h_scale: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    const K: &str = "moe_gemm_fp8_swiglu";
    check_gemm(K, a, a_scale, kgroups, w, groups)?;
    let width = w.n / 2;
    if !w.n.is_multiple_of(2)
        || !width.is_multiple_of(H_GROUP)
        || h.len() != groups.rows * width
        || h_scale.len() != groups.rows * (width / H_GROUP)
    {
        return Err(invalid(K, format!("2·width = {}, h {} elements for {} rows", w.n, h.len(), groups.rows)));
    }
    if groups.rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&MOE_GEMM, K)?;
    let (kg, e, wd, k) = (kgroups as i32, groups.experts as i32, width as i32, w.k as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(a).arg(a_scale).arg(&kg).arg(&w.w).arg(&w.scale).arg(&groups.row_offsets).arg(&groups.tile_offsets);
    b.arg(&e).arg(h).arg(h_scale).arg(&wd).arg(&k);
    let cfg = LaunchConfig {
        grid_dim: (grid_rows(groups), (width / H_GROUP) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches the kernel; shapes checked above.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching moe_gemm_fp8_swiglu"))
}

/// The down GEMM (or any grouped FP8 GEMM with an f32 result): `y = A·Wᵀ` scaled.
/// `a`: `[rows, k]` with `kgroups` scales per row; `w`: `[experts, n, k]`; `y`: `[rows, n]`.
pub fn gemm(
    gpu: &Gpu,
    a: &CudaSlice<u8>,
    a_scale: &CudaSlice<f32>,
    kgroups: usize,
    w: &Fp8Experts,
    groups: &Groups,
    y: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    const K: &str = "moe_gemm_fp8";
    check_gemm(K, a, a_scale, kgroups, w, groups)?;
    if !w.n.is_multiple_of(TILE_COLS) || y.len() != groups.rows * w.n {
        return Err(invalid(K, format!("N = {} (multiple of {TILE_COLS}), y {} elements", w.n, y.len())));
    }
    if groups.rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&MOE_GEMM, K)?;
    let (kg, e, n, k) = (kgroups as i32, groups.experts as i32, w.n as i32, w.k as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(a).arg(a_scale).arg(&kg).arg(&w.w).arg(&w.scale).arg(&groups.row_offsets).arg(&groups.tile_offsets);
    b.arg(&e).arg(y).arg(&n).arg(&k);
    let cfg = LaunchConfig {
        grid_dim: (grid_rows(groups), (w.n / TILE_COLS) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches the kernel; shapes checked above.
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching moe_gemm_fp8"))
}

/// `out[t] = shared[t] + Σ_j expert_out[token_routes[t, j]]` (slot order; -1 = no route).
/// `shared`, `out`: `[tokens, hidden]`; `expert_out`: `[routes, hidden]`; `token_routes`: `[tokens, top_k]`.
pub fn combine(
    gpu: &Gpu,
    shared: Option<&CudaSlice<f32>>,
    expert_out: &CudaSlice<f32>,
    token_routes: &CudaSlice<i32>,
    out: &mut CudaSlice<f32>,
    hidden: usize,
    top_k: usize,
) -> Result<(), DeviceError> {
    let tokens = out.len() / hidden.max(1);
    if !hidden.is_multiple_of(4)
        || out.len() != tokens * hidden
        || token_routes.len() != tokens * top_k
        || shared.is_some_and(|s| s.len() != out.len())
        || !expert_out.len().is_multiple_of(hidden)
    {
        return Err(invalid("moe_combine", format!("{tokens} tokens × {hidden}, top_k {top_k}")));
    }
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&MOE_COMBINE, "moe_combine")?;
    let (h, k, null) = (hidden as i32, top_k as i32, 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    match shared {
        Some(s) => b.arg(s),
        None => b.arg(&null),
    };
    b.arg(expert_out).arg(token_routes).arg(out).arg(&h).arg(&k);
    let cfg = LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument list matches the kernel; shapes checked above (route indices are the caller's).
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching moe_combine"))
}
