//! Launchers of the MoE kernels: dispatch quantization, the grouped FP8 GEMMs, the combine.
//!
//! Data flow of one MoE layer on one GPU (shapes per kernel in kernels/cuda/*.cu):
//! `x [tokens, hidden] f32` → [`quant_dispatch`] → `A [routes, hidden] e4m3 + [routes] scales`
//! (routes packed by expert) → [`gemm_swiglu`] (gate_up) → `h [routes, width] e4m3 +
//! [routes, width/64] scales` → [`gemm`] (down) → `y [routes, hidden] f32` → [`combine`] with the
//! shared expert's output → `[tokens, hidden] f32`.
//!
//! The grouped GEMMs have two implementations with the same semantics: `moe_gemm.cu` (mma.sync,
//! every FP8 device) and `moe_gemm_sm90.cu` (TMA + wgmma, sm_90a: H100/H200), chosen per device
//! with [`Gpu::set_moe_gemm`](super::Gpu::set_moe_gemm).

use super::compile::{MOE_COMBINE, MOE_DISPATCH, MOE_GEMM, MOE_GEMM_SM90};
use super::{CudaSlice, Gpu, LaunchConfig, driver_err};
use crate::device::DeviceError;
use cudarc::driver::{DevicePtr, PushKernelArg, sys};

/// Row tile of the grouped GEMM (BM in moe_gemm.cu).
pub const TILE_ROWS: usize = 64;
/// Column tile of the down GEMM (BN); N must be a multiple of it.
pub const TILE_COLS: usize = 128;
/// K granularity (BK); K must be a multiple of it.
pub const TILE_K: usize = 64;
/// Columns of the intermediate per re-quantization scale group (one gate_up block).
pub const H_GROUP: usize = 64;

/// Row tile of the sm_90a grouped GEMM (BM in moe_gemm_sm90.cu: two consumer warpgroups × 64).
const SM90_TILE_ROWS: usize = 128;
/// Threads per block of the sm_90a GEMM: one producer and two consumer warpgroups.
const SM90_THREADS: u32 = 384;
/// Its dynamic shared memory (SMEM_BYTES in moe_gemm_sm90.cu: 6 stages × 32 KB, 1 KB alignment
/// slack, 12 mbarriers).
const SM90_SMEM: u32 = 6 * 32768 + 1024 + 2 * 6 * 8;

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
/// and `tile_offsets[e]` counts the 64-row tiles of the experts before e (`tile_offsets_128`:
/// the 128-row tiles of the sm_90a kernels).
#[derive(Debug)]
pub struct Groups {
    row_offsets: CudaSlice<i32>,
    tile_offsets: CudaSlice<i32>,
    tile_offsets_128: CudaSlice<i32>,
    pub rows: usize,
    pub experts: usize,
    tiles: usize,
    tiles_128: usize,
}

impl Groups {
    /// From rows per expert (known on the host: the all-to-all's counts travel before its data).
    pub fn from_counts(gpu: &Gpu, counts: &[usize]) -> Result<Self, DeviceError> {
        let (mut rows, mut tiles, mut tiles_128) = (vec![0i32], vec![0i32], vec![0i32]);
        for &c in counts {
            rows.push(rows[rows.len() - 1] + c as i32);
            tiles.push(tiles[tiles.len() - 1] + c.div_ceil(TILE_ROWS) as i32);
            tiles_128.push(tiles_128[tiles_128.len() - 1] + c.div_ceil(SM90_TILE_ROWS) as i32);
        }
        let n = counts.len();
        Ok(Groups {
            rows: rows[n] as usize,
            tiles: tiles[n] as usize,
            tiles_128: tiles_128[n] as usize,
            experts: n,
            row_offsets: gpu.upload(&rows)?,
            tile_offsets: gpu.upload(&tiles)?,
            tile_offsets_128: gpu.upload(&tiles_128)?,
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

/// A `CUtensorMap` (128 opaque bytes) passed by value as the kernel's `const __grid_constant__
/// TmaMap`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes with the layout and alignment of the kernel parameter type.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// The TMA descriptor of a K-major e4m3 matrix `[rows, k]` at `ptr`, read in boxes of 64 rows ×
/// 128 bytes with the 128-byte swizzle (what the sm_90a kernels' wgmma descriptors expect);
/// reads past either bound are zero-filled.
fn tensor_map(kernel: &'static str, ptr: sys::CUdeviceptr, rows: usize, k: usize) -> Result<TensorMap, DeviceError> {
    let dims = [k as u64, rows as u64];
    let strides = [k as u64]; // bytes between rows (dimension 0 is implicitly dense)
    let boxes = [128u32, 64];
    let elem_strides = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's length and outlives the call; `map` is written by it.
    let rc = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return Err(DeviceError::Driver {
            doing: format!("encoding the tensor map of a [{rows}, {k}] e4m3 operand for {kernel}"),
            message: format!("{rc:?}"),
        });
    }
    // SAFETY: initialised by the successful call (and zeroed before it).
    Ok(TensorMap(unsafe { map.assume_init() }.opaque))
}

/// Whether the grouped GEMMs run the sm_90a kernels (TMA + wgmma) on this device.
fn use_sm90(gpu: &Gpu) -> bool {
    gpu.moe_gemm() == super::MoeGemmKernel::Sm90
}

/// What a launch of one of the sm_90a kernels needs besides its scalar and buffer arguments:
/// the kernel, the tensor maps of A and of the weights (its first two parameters) and the grid of
/// 128-row tiles × `col_blocks`.
struct Sm90Launch {
    f: cudarc::driver::CudaFunction,
    ta: TensorMap,
    tb: TensorMap,
    cfg: LaunchConfig,
}

fn sm90_launch(
    gpu: &Gpu,
    kernel: &'static str,
    (a_ptr, w_ptr): (sys::CUdeviceptr, sys::CUdeviceptr),
    w: &Fp8Experts,
    groups: &Groups,
    col_blocks: usize,
) -> Result<Sm90Launch, DeviceError> {
    let f = gpu.function(&MOE_GEMM_SM90, kernel)?;
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, SM90_SMEM as i32)
        .map_err(driver_err(format!("raising the shared-memory limit of {kernel}")))?;
    Ok(Sm90Launch {
        f,
        ta: tensor_map(kernel, a_ptr, groups.rows, w.k)?,
        tb: tensor_map(kernel, w_ptr, w.experts * w.n, w.k)?,
        cfg: LaunchConfig {
            // One dimension, expert-major (see find_tile in moe_gemm_sm90.cu).
            grid_dim: ((groups.tiles_128 * col_blocks) as u32, 1, 1),
            block_dim: (SM90_THREADS, 1, 1),
            shared_mem_bytes: SM90_SMEM,
        },
    })
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
    let (kg, e, wd, k) = (kgroups as i32, groups.experts as i32, width as i32, w.k as i32);
    if use_sm90(gpu) {
        const K90: &str = "moe_gemm_fp8_swiglu_sm90";
        let stream = gpu.stream();
        // The guards order the stream after the buffers' last writes; they live past the launch.
        let ((a_ptr, _a_sync), (w_ptr, _w_sync)) = (a.device_ptr(stream), w.w.device_ptr(stream));
        let l = sm90_launch(gpu, K90, (a_ptr, w_ptr), w, groups, width / 64)?;
        let mut b = stream.launch_builder(&l.f);
        b.arg(&l.ta).arg(&l.tb).arg(a_scale).arg(&kg).arg(&w.scale).arg(&groups.row_offsets);
        b.arg(&groups.tile_offsets_128).arg(&e).arg(h).arg(h_scale).arg(&wd).arg(&k);
        // SAFETY: argument list matches the kernel; shapes checked above; the tensor maps cover
        // exactly the A and weight buffers, alive until the launch is enqueued.
        return unsafe { b.launch(l.cfg) }.map(drop).map_err(driver_err(format!("launching {K90}")));
    }
    let f = gpu.function(&MOE_GEMM, K)?;
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
    let (kg, e, n, k) = (kgroups as i32, groups.experts as i32, w.n as i32, w.k as i32);
    if use_sm90(gpu) {
        const K90: &str = "moe_gemm_fp8_sm90";
        let stream = gpu.stream();
        let ((a_ptr, _a_sync), (w_ptr, _w_sync)) = (a.device_ptr(stream), w.w.device_ptr(stream));
        let l = sm90_launch(gpu, K90, (a_ptr, w_ptr), w, groups, w.n / TILE_COLS)?;
        let mut b = stream.launch_builder(&l.f);
        b.arg(&l.ta).arg(&l.tb).arg(a_scale).arg(&kg).arg(&w.scale).arg(&groups.row_offsets);
        b.arg(&groups.tile_offsets_128).arg(&e).arg(y).arg(&n).arg(&k);
        // SAFETY: as in gemm_swiglu.
        return unsafe { b.launch(l.cfg) }.map(drop).map_err(driver_err(format!("launching {K90}")));
    }
    let f = gpu.function(&MOE_GEMM, K)?;
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
