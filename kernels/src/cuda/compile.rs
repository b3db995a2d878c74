//! Run-time compilation of `kernels/cuda/*.cu` with NVRTC, cached on disk.
//!
//! Why NVRTC at run time rather than cubins built by build.rs: the CUDA 12.x compiler wheels on
//! PyPI ship NVRTC and ptxas but no nvcc, and a default `cargo build` must need no CUDA at all.
//! NVRTC with `--gpu-architecture=sm_XY[a]` emits SASS (a cubin) for the exact device, so there
//! is no PTX JIT and no "PTX too new for this driver" failure; the first start pays ~1 s per
//! source file, later starts read the cubin from the cache (keyed by a hash of the sources, the
//! architecture and the NVRTC version). CI compiles the same sources the same way
//! (scripts/check-cuda-kernels.sh) and fails on errors or spills.

use crate::device::DeviceError;
use cudarc::nvrtc::sys;
use std::ffi::{CString, c_char, c_int};
use std::path::Path;

/// One `.cu` file, embedded in the binary.
#[derive(Debug)]
pub struct Source {
    pub file: &'static str,
    pub text: &'static str,
}

/// The header every source includes as `"common.cuh"`.
const COMMON: &str = include_str!("../../cuda/common.cuh");

pub static MOE_DISPATCH: Source = Source { file: "moe_dispatch.cu", text: include_str!("../../cuda/moe_dispatch.cu") };
pub static MOE_GEMM: Source = Source { file: "moe_gemm.cu", text: include_str!("../../cuda/moe_gemm.cu") };
pub static MOE_GEMM_SM90: Source =
    Source { file: "moe_gemm_sm90.cu", text: include_str!("../../cuda/moe_gemm_sm90.cu") };
pub static MOE_COMBINE: Source = Source { file: "moe_combine.cu", text: include_str!("../../cuda/moe_combine.cu") };
pub static NORM_ROPE: Source = Source { file: "norm_rope.cu", text: include_str!("../../cuda/norm_rope.cu") };
pub static ATTENTION: Source = Source { file: "attention.cu", text: include_str!("../../cuda/attention.cu") };
pub static LINEAR: Source = Source { file: "linear.cu", text: include_str!("../../cuda/linear.cu") };
pub static ELEMENTWISE: Source = Source { file: "elementwise.cu", text: include_str!("../../cuda/elementwise.cu") };

/// Every source, for tools that compile them all.
pub static ALL: [&Source; 8] =
    [&MOE_DISPATCH, &MOE_GEMM, &MOE_GEMM_SM90, &MOE_COMBINE, &NORM_ROPE, &ATTENTION, &LINEAR, &ELEMENTWISE];

/// The cubin of `source` for `arch` (e.g. `sm_90a`), from `cache` when present there.
pub fn cubin(source: &Source, arch: &str, cache: Option<&Path>) -> Result<Vec<u8>, DeviceError> {
    // SAFETY: only tries to dlopen libnvrtc; no NVRTC call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(DeviceError::NoNvrtc);
    }
    let version = nvrtc_version();
    let key = fnv1a(&[COMMON, source.text, arch, &version]);
    let path = cache.map(|dir| dir.join(format!("{}-{arch}-{key:016x}.cubin", source.file.trim_end_matches(".cu"))));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let bytes = nvrtc_cubin(source, arch)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompile next time. Write then rename, so
        // a concurrent reader never sees half a cubin.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(p.parent().unwrap_or(Path::new("."))).is_ok() && std::fs::write(&tmp, &bytes).is_ok()
        {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(bytes)
}

fn nvrtc_version() -> String {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two out-parameters, library presence checked by the caller.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    format!("{major}.{minor}")
}

/// 64-bit FNV-1a over the parts (with a separator), stable across Rust versions, unlike
/// `DefaultHasher`.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_bytes().iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn check(rc: sys::nvrtcResult, source: &Source, arch: &str, what: &str) -> Result<(), DeviceError> {
    if rc == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(DeviceError::Compile { file: source.file, arch: arch.into(), log: format!("{what}: {rc:?}") })
    }
}

fn nvrtc_cubin(source: &Source, arch: &str) -> Result<Vec<u8>, DeviceError> {
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| DeviceError::Compile {
            file: source.file,
            arch: arch.into(),
            log: "source contains a NUL byte".into(),
        })
    };
    let text = cstr(source.text)?;
    let name = cstr(source.file)?;
    let header = cstr(COMMON)?;
    let header_name = cstr("common.cuh")?;
    let opts: Vec<CString> = [format!("--gpu-architecture={arch}"), "--std=c++17".into()]
        .into_iter()
        .map(|o| cstr(&o))
        .collect::<Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a live NUL-terminated string for the duration of the calls; the
    // program is destroyed on every path after creation.
    unsafe {
        let rc = sys::nvrtcCreateProgram(
            &mut prog,
            text.as_ptr(),
            name.as_ptr(),
            1,
            &header.as_ptr(),
            &header_name.as_ptr(),
        );
        check(rc, source, arch, "nvrtcCreateProgram")?;
        let result = (|| {
            let rc = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
            if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                let mut size = 0usize;
                sys::nvrtcGetProgramLogSize(prog, &mut size);
                let mut log = vec![0u8; size];
                sys::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast());
                let log = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string();
                return Err(DeviceError::Compile { file: source.file, arch: arch.into(), log });
            }
            let mut size = 0usize;
            check(sys::nvrtcGetCUBINSize(prog, &mut size), source, arch, "nvrtcGetCUBINSize")?;
            let mut cubin = vec![0u8; size];
            check(sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()), source, arch, "nvrtcGetCUBIN")?;
            Ok(cubin)
        })();
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_includes_the_common_header_by_its_nvrtc_name() {
        for s in ALL {
            assert!(s.text.contains("#include \"common.cuh\""), "{}", s.file);
        }
    }

    #[test]
    fn cache_key_changes_with_any_part() {
        let a = fnv1a(&["x", "sm_90a", "12.9"]);
        assert_ne!(a, fnv1a(&["x", "sm_89", "12.9"]));
        assert_ne!(a, fnv1a(&["x", "sm_90a", "12.8"]));
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
        assert_eq!(a, fnv1a(&["x", "sm_90a", "12.9"]));
    }
}
