//! Which device runs the math (`--device cpu|cuda[:N]`), and the check that it is usable.
//!
//! Always built, so that a build without the `cuda` feature can parse `--device cuda` and refuse
//! it with a typed error instead of not knowing the word.

use std::fmt;
use std::str::FromStr;

/// A compute device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device {s:?} (use cpu, cuda or cuda:N)")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("this herd was built without the `cuda` feature (rebuild with `--features cuda`)")]
    NotBuilt,
    #[error("no CUDA driver: libcuda.so not found (is the NVIDIA driver installed?)")]
    NoDriver,
    #[error("no CUDA device {ordinal}: the driver reports {count} CUDA device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA device {ordinal} has compute capability {major}.{minor}; herd's kernels need 8.9 or newer (FP8)")]
    TooOld { ordinal: usize, major: i32, minor: i32 },
    #[error(
        "no NVRTC: neither libnvrtc.so.12 nor libnvrtc.so found (install nvidia-cuda-nvrtc-cu12 or the CUDA toolkit; \
         for CUDA 13, link libnvrtc.so to libnvrtc.so.13)"
    )]
    NoNvrtc,
    #[error("compiling {file} for {arch}: {log}")]
    Compile { file: &'static str, arch: String, log: String },
    #[error("invalid arguments to the {kernel} kernel: {reason}")]
    Invalid { kernel: &'static str, reason: String },
    #[error("CUDA error while {doing}: {message}")]
    Driver { doing: String, message: String },
}

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub device: Device,
    /// E.g. "NVIDIA H100 80GB HBM3"; "cpu" for the CPU.
    pub name: String,
    /// `(major, minor)`; `None` for the CPU.
    pub compute_capability: Option<(i32, i32)>,
    /// Device memory in bytes; `None` for the CPU.
    pub total_memory: Option<usize>,
}

/// Checks that `device` can run herd's kernels, without panicking when CUDA is absent.
pub fn probe(device: Device) -> Result<DeviceInfo, DeviceError> {
    match device {
        Device::Cpu => Ok(DeviceInfo { device, name: "cpu".into(), compute_capability: None, total_memory: None }),
        Device::Cuda(ordinal) => probe_cuda(ordinal),
    }
}

/// How many CUDA devices this host has (an error where the build or the host has none).
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Result<usize, DeviceError> {
    crate::cuda::Gpu::count()
}

/// The twin of the `cuda` build's count: a typed refusal.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> Result<usize, DeviceError> {
    Err(DeviceError::NotBuilt)
}

#[cfg(feature = "cuda")]
fn probe_cuda(ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    crate::cuda::Gpu::probe(ordinal)
}

// The twin of the `cuda` build's probe: the same signature, a typed refusal.
#[cfg(not(feature = "cuda"))]
fn probe_cuda(_ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    Err(DeviceError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert!("cuda:".parse::<Device>().is_err());
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!(Device::Cpu.to_string(), "cpu");
    }

    #[test]
    fn cpu_always_probes() {
        assert_eq!(probe(Device::Cpu).expect("cpu").name, "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_typed_refusal() {
        let err = probe(Device::Cuda(0)).expect_err("built without cuda");
        assert!(matches!(err, DeviceError::NotBuilt));
        assert!(err.to_string().starts_with("this herd was built without the `cuda` feature"));
    }
}
