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
