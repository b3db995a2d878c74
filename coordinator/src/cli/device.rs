//! `--device cpu|cuda[:N]`: the backend a model-running command asks for, checked before any
//! model is loaded so that a wrong device is a one-line error, not a late failure or a panic.

use herd_kernels::device::{self, Device};

/// Checks that `device` can run a model in this build and on this host.
///
/// `cpu` always can. `cuda` is refused by a build without the `cuda` feature, and otherwise names
/// what is missing (driver library, device, NVRTC). On a host where the GPU is usable it is still
/// refused: the kernels exist and are tested (kernels/tests/gpu_parity.rs), but the engine does
/// not run a whole model on the GPU yet, and silently falling back to the CPU would be a lie.
pub fn check(device: Device) -> anyhow::Result<()> {
    let info = device::probe(device).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(_) => anyhow::bail!(
            "--device {device}: found {} but the engine cannot run a model on CUDA yet (only the MoE kernels exist; see docs/kernels.md)",
            info.name
        ),
    }
}
