//! The CUDA backend of the kernels (feature `cuda`): one GPU context and its compiled kernels.
//!
//! - [`compile`]: the `.cu` sources (embedded at build time) and NVRTC compilation to a cubin for
//!   the device's exact architecture, cached on disk by source hash.
//! - [`fp8`]: host-side e4m3 encoding/decoding (weight upload and the tests' reference).
//! - [`moe`]: launchers of the MoE kernels: dispatch quantization, grouped FP8 GEMMs, combine.
//! - [`norm`]: launchers of RMSNorm and the fused RoPE + QK-norm.
//!
//! Every CUDA library is dlopened by cudarc on first use; [`Gpu::open`] checks for each one
//! before touching it, because cudarc panics (rather than failing) when a library is missing.

pub mod attention;
pub mod compile;
pub mod elementwise;
pub mod fp8;
pub mod linear;
pub mod moe;
pub mod norm;

use crate::device::{Device, DeviceError, DeviceInfo};
use compile::Source;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, result, sys};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The bindings themselves, for tools (benches) that need events or raw driver calls.
pub use cudarc;
pub use cudarc::driver::{CudaSlice, LaunchConfig};

/// Which implementation the grouped FP8 GEMMs (`moe::gemm`, `moe::gemm_swiglu`) use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeGemmKernel {
    /// mma.sync (`moe_gemm.cu`), any FP8 device. The default: it has passed its parity tests on
    /// an H100; the sm_90a kernels have not yet in their final form (docs/kernels.md).
    #[default]
    Mma,
    /// TMA + wgmma (`moe_gemm_sm90.cu`), sm_90a (H100/H200) only.
    Sm90,
}

/// One CUDA device with a stream and the kernels loaded so far.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    /// NVRTC `--gpu-architecture`: `sm_90a` on H100/H200 (wgmma/TMA available), else `sm_XY`.
    arch: String,
    kernel_cache: Option<PathBuf>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Whether the grouped GEMMs run the sm_90a kernels ([`MoeGemmKernel::Sm90`]).
    moe_gemm_sm90: AtomicBool,
}

pub(crate) fn driver_err(doing: impl Into<String>) -> impl FnOnce(DriverError) -> DeviceError {
    let doing = doing.into();
    move |e| DeviceError::Driver { doing, message: e.to_string() }
}

impl Gpu {
    /// Opens device `ordinal`. `kernel_cache` is where compiled cubins are kept between runs
    /// (none: compile on every start, ~1 s per source file).
    pub fn open(ordinal: usize, kernel_cache: Option<PathBuf>) -> Result<Self, DeviceError> {
        let count = Self::count().map_err(|e| match e {
            DeviceError::NoDevice { count, .. } => DeviceError::NoDevice { ordinal, count },
            e => e,
        })?;
        if ordinal >= count {
            return Err(DeviceError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err(format!("opening CUDA device {ordinal}")))?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err("reading the compute capability"))?;
        // The kernels use the e4m3 conversions and FP8 mma of sm_89 (Ada) and later.
        if (major, minor) < (8, 9) {
            return Err(DeviceError::TooOld { ordinal, major, minor });
        }
        let arch = if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") };
        let info = DeviceInfo {
            device: Device::Cuda(ordinal),
            name: ctx.name().map_err(driver_err("reading the device name"))?,
            compute_capability: Some((major, minor)),
            total_memory: Some(ctx.total_mem().map_err(driver_err("reading the device memory size"))?),
        };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            info,
            arch,
            kernel_cache,
            modules: Mutex::new(HashMap::new()),
            moe_gemm_sm90: AtomicBool::new(false),
        })
    }

    /// How many CUDA devices the driver reports (at least one, else an error saying why none).
    pub fn count() -> Result<usize, DeviceError> {
        // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
        if !unsafe { sys::is_culib_present() } {
            return Err(DeviceError::NoDriver);
        }
        match result::init() {
            Ok(()) => {}
            // A driver without any usable GPU (or with CUDA_VISIBLE_DEVICES hiding them all).
            Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
                return Err(DeviceError::NoDevice { ordinal: 0, count: 0 });
            }
            Err(e) => return Err(driver_err("initialising the CUDA driver")(e)),
        }
        let count = result::device::get_count().map_err(driver_err("counting CUDA devices"))?.max(0) as usize;
        if count == 0 {
            return Err(DeviceError::NoDevice { ordinal: 0, count });
        }
        Ok(count)
    }

    /// Opens the device only to describe it (what `--device cuda` checks at start-up).
    pub fn probe(ordinal: usize) -> Result<DeviceInfo, DeviceError> {
        Ok(Gpu::open(ordinal, None)?.info)
    }

    /// Picks the grouped GEMMs' implementation; [`MoeGemmKernel::Sm90`] needs an sm_90a device.
    pub fn set_moe_gemm(&self, kernel: MoeGemmKernel) -> Result<(), DeviceError> {
        if kernel == MoeGemmKernel::Sm90 && self.arch != "sm_90a" {
            return Err(DeviceError::Invalid {
                kernel: "moe_gemm_fp8_sm90",
                reason: format!("needs an sm_90a device (H100/H200), this one is {}", self.arch),
            });
        }
        self.moe_gemm_sm90.store(kernel == MoeGemmKernel::Sm90, Ordering::Relaxed);
        Ok(())
    }

    pub fn moe_gemm(&self) -> MoeGemmKernel {
        if self.moe_gemm_sm90.load(Ordering::Relaxed) { MoeGemmKernel::Sm90 } else { MoeGemmKernel::Mma }
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream.synchronize().map_err(driver_err("waiting for the GPU"))
    }

    /// Kernel `name` of `source`, compiling and loading the source on first use.
    pub fn function(&self, source: &'static Source, name: &str) -> Result<CudaFunction, DeviceError> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(source.file) {
                Some(m) => Arc::clone(m),
                None => {
                    let cubin = compile::cubin(source, &self.arch, self.kernel_cache.as_deref())?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                        .map_err(driver_err(format!("loading {}", source.file)))?;
                    modules.insert(source.file, Arc::clone(&m));
                    m
                }
            }
        };
        module.load_function(name).map_err(driver_err(format!("finding kernel {name} in {}", source.file)))
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, DeviceError> {
        self.stream.clone_htod(data).map_err(driver_err("copying to the GPU"))
    }

    /// Copies a device buffer back to the host (waits for it).
    pub fn download<T: cudarc::driver::DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>, DeviceError> {
        self.stream.clone_dtoh(data).map_err(driver_err("copying from the GPU"))
    }

    /// A device buffer of `len` zeroed elements.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, DeviceError> {
        self.stream.alloc_zeros(len).map_err(driver_err("allocating GPU memory"))
    }
}
