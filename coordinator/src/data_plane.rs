//! Which transport each placement epoch's group uses for its expert-parallel exchange.
//!
//! Every member of a group must use the same one, so the coordinator decides, from what the
//! workers registered: NCCL when every member drives its own GPU, TCP otherwise. "Its own" is
//! judged by (data-plane IP, CUDA ordinal): two workers of one host on the same GPU cannot share
//! an NCCL communicator (NCCL refuses duplicate GPUs), so such a group falls back to TCP.

use herd_worker::control::{DataPlane, WorkerDevice};
use std::collections::HashSet;
use std::net::SocketAddr;

/// How the coordinator picks a group's data plane (`herd coordinator --data-plane`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DataPlanePolicy {
    /// NCCL when the group has two or more members, each on a GPU of its own; TCP otherwise.
    #[default]
    Auto,
    /// TCP always (e.g. where libnccl is missing or NCCL cannot reach between hosts).
    Tcp,
}

impl DataPlanePolicy {
    /// The flag's value, to pass the policy on to another process.
    pub fn as_arg(self) -> &'static str {
        match self {
            DataPlanePolicy::Auto => "auto",
            DataPlanePolicy::Tcp => "tcp",
        }
    }

    /// The data plane of a group whose members registered these data addresses and devices,
    /// in rank order.
    pub fn choose<'a>(self, members: impl IntoIterator<Item = (SocketAddr, &'a WorkerDevice)>) -> DataPlane {
        if self == DataPlanePolicy::Tcp {
            return DataPlane::Tcp;
        }
        let mut gpus = HashSet::new();
        let mut count = 0usize;
        for (addr, device) in members {
            count += 1;
            let Some(ordinal) = device.cuda_ordinal() else { return DataPlane::Tcp };
            if !gpus.insert((addr.ip(), ordinal)) {
                return DataPlane::Tcp;
            }
        }
        if count >= 2 { DataPlane::Nccl } else { DataPlane::Tcp }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn gpu(ordinal: usize, name: &str) -> WorkerDevice {
        WorkerDevice::Cuda { ordinal, name: name.into() }
    }

    #[test]
    fn nccl_only_when_every_member_has_a_gpu_of_its_own() {
        let auto = DataPlanePolicy::Auto;
        let h100 = "NVIDIA H100 80GB HBM3";
        let (g0, g1, cpu) = (gpu(0, h100), gpu(1, h100), WorkerDevice::Cpu);
        let dgx = [(addr("10.0.0.1:9000"), &g0), (addr("10.0.0.1:9001"), &g1)];
        assert_eq!(auto.choose(dgx), DataPlane::Nccl);
        // Same ordinal on two hosts: two GPUs.
        assert_eq!(auto.choose([(addr("10.0.0.1:9000"), &g0), (addr("10.0.0.2:9000"), &g0)]), DataPlane::Nccl);
        // Two workers sharing one GPU (serve --workers 2 on a one-GPU host).
        assert_eq!(auto.choose([(addr("127.0.0.1:9000"), &g0), (addr("127.0.0.1:9001"), &g0)]), DataPlane::Tcp);
        // Any CPU member, or a group of one.
        assert_eq!(auto.choose([(addr("10.0.0.1:9000"), &g0), (addr("10.0.0.2:9000"), &cpu)]), DataPlane::Tcp);
        assert_eq!(auto.choose([(addr("10.0.0.1:9000"), &g0)]), DataPlane::Tcp);
        assert_eq!(DataPlanePolicy::Tcp.choose(dgx), DataPlane::Tcp);
    }
}
