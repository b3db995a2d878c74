//! `--device cpu|cuda[:N]`: the backend a model-running command asks for, checked before any
//! model is loaded so that a wrong device is a one-line error, not a late failure or a panic.

use herd_kernels::device::{self, Device};

/// Checks that `device` can run a model in this build and on this host: `cpu` always can;
/// `cuda` is refused by a build without the `cuda` feature, and otherwise the error names what
/// is missing (driver library, device, NVRTC).
pub fn check(device: Device) -> anyhow::Result<()> {
    device::probe(device).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    Ok(())
}

/// [`check`] for the commands whose engines still run only on the CPU: the worker processes of
/// an expert-parallel group (the engine does not drive the NCCL data plane yet) and `serve`,
/// which starts them. Silently falling back to the CPU would be a lie.
pub fn check_cpu_only(device: Device, command: &str) -> anyhow::Result<()> {
    check(device)?;
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(_) => anyhow::bail!(
            "--device {device}: `herd {command}` runs expert-parallel worker processes, which are CPU-only for now \
             (the GPU engine runs in one process: `herd generate|eval|bench --device cuda`; see docs/kernels.md)"
        ),
    }
}
