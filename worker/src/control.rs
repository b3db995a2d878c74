//! The control channel between a worker and whoever drives it: the one vocabulary of both
//! modes.
//!
//! [`ToWorker`] goes down (registration answers, placement assignments, requests,
//! cancellations, shutdown) and [`FromWorker`] comes up (hello, heartbeats, request events,
//! group failures, statistics). A coordinator-managed worker speaks it in bincode frames over
//! a QUIC channel to each coordinator; a static group's worker (`herd worker --rank/--world`)
//! speaks it as JSON lines on stdin/stdout to the process that started it, which plays the
//! coordinator's part ([`read_message`], [`write_message`]).

use crate::engine::Load;
use crate::engine::request::{Event, Rejection, Request, RequestId};
use herd_kernels::device::Device;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::net::SocketAddr;

/// Bumped when a message changes shape; both ends must agree.
pub const CONTROL_VERSION: u32 = 3;

/// Largest control line accepted (a prompt of a million tokens fits easily).
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// What one worker measured over its life in the group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub rank: usize,
    pub steps: u64,
    pub collectives: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Time inside collectives, waiting for peers included.
    pub busy_ms: f64,
    pub peak_rss_bytes: u64,
    /// Expert-parallel traffic per MoE layer.
    pub layers: Vec<LayerStats>,
}

/// One MoE layer's dispatch/combine traffic on one worker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    pub collectives: u64,
    pub bytes_out: u64,
    pub exchange_ms: f64,
    pub compute_ms: f64,
    pub routed_tokens: u64,
}

// ---------------------------------------------------------------------------------------
// Coordinator ↔ worker, over the QUIC control channel (bincode frames).

/// Worker → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    /// First message on every connection.
    Hello(WorkerHello),
    /// Every heartbeat interval.
    Status(WorkerStatus),
    Event(Event),
    Rejected {
        id: RequestId,
        reason: Rejection,
    },
    /// The worker's lockstep group for `epoch` failed; it waits for a new assignment.
    GroupFailed {
        epoch: u64,
        error: String,
    },
    /// Rank 0 of `epoch` created the group's NCCL unique id; the coordinator relays it to the
    /// other members as [`ToWorker::NcclId`].
    NcclId {
        epoch: u64,
        id: NcclId,
    },
    /// What the worker measured in the group of an epoch, sent when that group ends cleanly.
    Stats(WorkerStats),
}

/// Who a worker is and what it brings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    pub name: String,
    pub data_addr: SocketAddr,
    pub memory_bytes: u64,
    pub device: WorkerDevice,
    /// Hash of the checkpoint's config.json (must match the cluster's model).
    pub fingerprint: String,
    pub version: u32,
}

/// The device a worker's engine runs on, as it registers it (the coordinator picks each
/// group's data plane from these). It travels, and sits in the replicated cluster state, as
/// the string admins read (`cpu`, `cuda:3 (NVIDIA H100 80GB HBM3)`), parsed once on arrival.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkerDevice {
    Cpu,
    Cuda {
        ordinal: usize,
        /// The product name, for people (`NVIDIA H100 80GB HBM3`); empty if unknown.
        name: String,
    },
}

impl WorkerDevice {
    /// `device` as this machine reports it (a GPU's product name from the driver).
    pub fn probe(device: Device) -> Self {
        match device {
            Device::Cpu => WorkerDevice::Cpu,
            Device::Cuda(ordinal) => {
                let name = herd_kernels::device::probe(device).map(|info| info.name).unwrap_or_default();
                WorkerDevice::Cuda { ordinal, name }
            }
        }
    }

    /// The CUDA ordinal, for a GPU worker.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            WorkerDevice::Cpu => None,
            WorkerDevice::Cuda { ordinal, .. } => Some(*ordinal),
        }
    }
}

/// `cpu`, or `cuda:N (NVIDIA H100 80GB HBM3)`: what admins see in the worker list.
impl std::fmt::Display for WorkerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerDevice::Cpu => f.write_str("cpu"),
            WorkerDevice::Cuda { ordinal, name } if name.is_empty() => write!(f, "cuda:{ordinal}"),
            WorkerDevice::Cuda { ordinal, name } => write!(f, "cuda:{ordinal} ({name})"),
        }
    }
}

impl std::str::FromStr for WorkerDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (device, name) = match s.split_once(" (") {
            Some((device, rest)) => {
                let name = rest.strip_suffix(')').ok_or_else(|| format!("{s:?}: the device name lacks its `)`"))?;
                (device, name)
            }
            None => (s, ""),
        };
        match device.parse::<Device>().map_err(|e| format!("{s:?}: {e}"))? {
            Device::Cpu if name.is_empty() => Ok(WorkerDevice::Cpu),
            Device::Cpu => Err(format!("{s:?}: a CPU has no device name")),
            Device::Cuda(ordinal) => Ok(WorkerDevice::Cuda { ordinal, name: name.to_owned() }),
        }
    }
}

impl Serialize for WorkerDevice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WorkerDevice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A worker's load and group state, sent as its heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Epoch of the group the worker is running (0: none).
    pub epoch: u64,
    /// Whether that group is up (formed and stepping).
    pub serving: bool,
    pub load: Load,
}

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Registration accepted: the worker's id, and the sending coordinator's id (request ids
    /// carry it in their top 16 bits, so events find their way back).
    Welcome {
        worker_id: u64,
        coordinator_id: u64,
    },
    /// Registration refused (e.g. another model); the worker exits.
    Refused {
        reason: String,
    },
    /// Join (or re-form) the lockstep group of `epoch`.
    Assign(Assignment),
    Submit(Request),
    Cancel {
        id: RequestId,
    },
    /// The NCCL unique id of the group of `epoch`, for a data plane over NCCL. Rank 0 creates it
    /// (it runs NCCL's bootstrap root) and the coordinator relays it to the other members, so it
    /// only ever crosses the authenticated control channel.
    NcclId {
        epoch: u64,
        id: NcclId,
    },
    /// Finish the running requests, leave the group together with its other members, and
    /// stop (a static group's driver sends it, or closes the channel, when it is done).
    Shutdown,
}

/// NCCL's 128-byte `ncclUniqueId`: the address of the group's bootstrap root plus a random magic.
///
/// Anyone holding it can join the bootstrap of the group, so it travels only over authenticated
/// channels and `Debug` does not print it. It serializes as 256 lowercase hex digits (one JSON
/// string, one bincode string). Creating one needs libnccl: `NcclId::new` in
/// `transport::nccl` (`cuda` builds only).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

/// Size of [`NcclId`] (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

impl NcclId {
    /// Whether every byte is zero (never true of an id NCCL made).
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Result<NcclId, String> {
        let digits = hex.as_bytes();
        if digits.len() != 2 * NCCL_ID_BYTES {
            return Err(format!("an NCCL id is {} hex digits, got {}", 2 * NCCL_ID_BYTES, digits.len()));
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("{:?} is not a hex digit", char::from(c))),
        };
        let mut id = [0u8; NCCL_ID_BYTES];
        for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(NcclId(id))
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(<redacted>)")
    }
}

impl Serialize for NcclId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for NcclId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        NcclId::from_hex(&hex).map_err(serde::de::Error::custom)
    }
}

/// One worker's part in a placement epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub epoch: u64,
    pub rank: usize,
    /// Data-plane addresses of the group, in rank order.
    pub members: Vec<SocketAddr>,
    pub placement: crate::placement::Placement,
    pub step_timeout_ms: u64,
    /// What the group's expert-parallel exchange runs on; the same for every member.
    pub data_plane: DataPlane,
}

/// The transport of a group's expert-parallel exchange. The coordinator picks one per epoch
/// for the whole group, since members on different transports could never meet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    /// One TCP connection per peer pair, to the members' data addresses.
    #[default]
    Tcp,
    /// NCCL between the members' GPUs: rank 0 creates the unique id and the coordinators
    /// relay it ([`FromWorker::NcclId`], [`ToWorker::NcclId`]).
    Nccl,
}

/// The coordinator id encoded in a request id (top 16 bits).
pub fn request_coordinator(id: RequestId) -> u64 {
    id >> 48
}

/// A request id unique across coordinators: `coordinator << 48 | sequence`.
pub fn make_request_id(coordinator: u64, sequence: u64) -> RequestId {
    (coordinator << 48) | (sequence & ((1 << 48) - 1))
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control channel closed")]
    Closed,
    #[error("control line of more than {MAX_LINE_BYTES} bytes")]
    TooLong,
    #[error("bad control message: {0}")]
    Bad(String),
    #[error("control channel I/O: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for ControlError {
    fn from(e: std::io::Error) -> Self {
        ControlError::Io(e)
    }
}

/// Read one JSON-lines message (blank lines are skipped).
pub fn read_message<T: serde::de::DeserializeOwned>(input: &mut impl BufRead) -> Result<T, ControlError> {
    loop {
        let mut line = Vec::new();
        let n = std::io::Read::take(&mut *input, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(ControlError::Closed);
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(ControlError::TooLong);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&line).map_err(|e| ControlError::Bad(e.to_string()));
    }
}

/// Write one message as a JSON line and flush it.
pub fn write_message<T: Serialize>(output: &mut impl Write, message: &T) -> Result<(), ControlError> {
    let mut line = serde_json::to_vec(message).map_err(|e| ControlError::Bad(e.to_string()))?;
    line.push(b'\n');
    output.write_all(&line)?;
    output.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::SamplingParams;

    #[test]
    fn messages_round_trip_as_json_lines() {
        let msgs = vec![
            ToWorker::Welcome { worker_id: 1, coordinator_id: 0 },
            ToWorker::Submit(Request {
                id: 7,
                prompt: vec![1, 2],
                params: SamplingParams::default(),
                prompt_logits: true,
                images: Vec::new(),
            }),
            ToWorker::Cancel { id: 7 },
            ToWorker::Shutdown,
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_message(&mut buf, m).expect("write");
        }
        let mut input = std::io::Cursor::new(buf);
        for m in &msgs {
            assert_eq!(&read_message::<ToWorker>(&mut input).expect("read"), m);
        }
        assert!(matches!(read_message::<ToWorker>(&mut input), Err(ControlError::Closed)));
    }

    #[test]
    fn devices_print_as_admins_read_them() {
        assert_eq!(WorkerDevice::Cpu.to_string(), "cpu");
        let h100 = WorkerDevice::Cuda { ordinal: 3, name: "NVIDIA H100 80GB HBM3".into() };
        assert_eq!(h100.to_string(), "cuda:3 (NVIDIA H100 80GB HBM3)");
        assert_eq!(WorkerDevice::Cuda { ordinal: 0, name: String::new() }.to_string(), "cuda:0");
        assert_eq!((h100.cuda_ordinal(), WorkerDevice::Cpu.cuda_ordinal()), (Some(3), None));
        for d in [WorkerDevice::Cpu, h100, WorkerDevice::Cuda { ordinal: 1, name: String::new() }] {
            assert_eq!(d.to_string().parse::<WorkerDevice>(), Ok(d.clone()));
            let json = serde_json::to_string(&d).expect("serialize");
            assert_eq!(serde_json::from_str::<WorkerDevice>(&json).expect("deserialize"), d);
        }
        assert!("gpu".parse::<WorkerDevice>().is_err() && "cpu (x)".parse::<WorkerDevice>().is_err());
    }

    #[test]
    fn nccl_id_travels_as_hex_and_rejects_bad_input() {
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let id = NcclId(bytes);
        let msg = ToWorker::NcclId { epoch: 4, id };
        let json = serde_json::to_string(&msg).expect("serialize");
        assert!(json.contains(&id.to_hex()), "{json}");
        assert_eq!(serde_json::from_str::<ToWorker>(&json).expect("deserialize"), msg);
        assert!(!format!("{msg:?}").contains(&id.to_hex()[..16]), "Debug must not print the id");
        assert!(NcclId::from_hex("ab").is_err());
        assert!(NcclId::from_hex(&"zz".repeat(NCCL_ID_BYTES)).is_err());
        assert_eq!(NcclId::from_hex(&id.to_hex().to_uppercase()), Ok(id));
        assert!(NcclId([0; NCCL_ID_BYTES]).is_zero() && !id.is_zero());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut input = std::io::Cursor::new(b"{\"submit\": 3}\nnot json\n".to_vec());
        assert!(matches!(read_message::<ToWorker>(&mut input), Err(ControlError::Bad(_))));
        assert!(matches!(read_message::<ToWorker>(&mut input), Err(ControlError::Bad(_))));
    }
}
