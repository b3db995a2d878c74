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

/// The device of each of `workers` worker processes started on this host for `--device`: the
/// CPU for all, or GPUs in turn from the one named (`cuda:1` with 3 workers on a 2-GPU host:
/// 1, 0, 1), so that `serve --workers 8 --device cuda` on a DGX puts one worker on each GPU.
pub fn worker_devices(device: Device, workers: usize) -> Vec<Device> {
    let count = match device {
        Device::Cpu => 1,
        // The device check has already found at least the named GPU.
        Device::Cuda(_) => herd_kernels::device::cuda_device_count().unwrap_or(1),
    };
    (0..workers).map(|i| spread(device, i, count)).collect()
}

/// Worker `i`'s device among `count` GPUs, starting from `device`'s.
fn spread(device: Device, i: usize, count: usize) -> Device {
    match device {
        Device::Cpu => Device::Cpu,
        Device::Cuda(first) => Device::Cuda((first + i) % count.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_take_the_gpus_in_turn_from_the_one_named() {
        let on = |first, count| (0..3).map(|i| spread(Device::Cuda(first), i, count)).collect::<Vec<_>>();
        assert_eq!(on(1, 2), vec![Device::Cuda(1), Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(on(0, 8), vec![Device::Cuda(0), Device::Cuda(1), Device::Cuda(2)]);
        assert_eq!(on(0, 1), vec![Device::Cuda(0); 3]);
        assert_eq!(worker_devices(Device::Cpu, 2), vec![Device::Cpu; 2]);
    }
}
