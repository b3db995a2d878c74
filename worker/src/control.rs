//! The control channel between a worker and whoever drives it: requests and cancellations
//! in, engine events and worker status out.
//!
//! The messages are serde values; today they travel as JSON lines over the worker process's
//! stdin/stdout (how `herd eval --workers N` and `herd generate --workers N` drive local
//! worker processes). The coordinator's QUIC control channel carries the same messages.

use crate::engine::request::{Event, Rejection, Request, RequestId};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::net::SocketAddr;

/// Bumped when a message changes shape; both ends must agree.
pub const CONTROL_VERSION: u32 = 1;

/// Largest control line accepted (a prompt of a million tokens fits easily).
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Driver → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// The data-plane addresses of every rank (only when the worker was started without them).
    Peers {
        addrs: Vec<SocketAddr>,
    },
    Submit(Request),
    Cancel {
        id: RequestId,
    },
    /// Finish running requests, then leave the group together with every other worker.
    Shutdown,
}

/// Worker → driver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// The data-plane listener is bound (sent before `Peers` is awaited).
    Listening {
        addr: SocketAddr,
        version: u32,
    },
    /// Model loaded and the group connected: requests may be submitted.
    Ready {
        rank: usize,
        world: usize,
        local_experts: usize,
        weight_bytes: usize,
    },
    Event(Event),
    Rejected {
        id: RequestId,
        reason: Rejection,
    },
    /// The worker is exiting because of this error (its requests got `Aborted` events first).
    Fatal {
        error: String,
    },
    /// Data-plane statistics, sent once when the worker leaves the group cleanly.
    Stats(WorkerStats),
}

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
        let cmds = vec![
            Command::Peers { addrs: vec!["127.0.0.1:9000".parse().expect("addr")] },
            Command::Submit(Request {
                id: 7,
                prompt: vec![1, 2],
                params: SamplingParams::default(),
                prompt_logits: true,
            }),
            Command::Cancel { id: 7 },
            Command::Shutdown,
        ];
        let mut buf = Vec::new();
        for c in &cmds {
            write_message(&mut buf, c).expect("write");
        }
        let mut input = std::io::Cursor::new(buf);
        for c in &cmds {
            assert_eq!(&read_message::<Command>(&mut input).expect("read"), c);
        }
        assert!(matches!(read_message::<Command>(&mut input), Err(ControlError::Closed)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut input = std::io::Cursor::new(b"{\"submit\": 3}\nnot json\n".to_vec());
        assert!(matches!(read_message::<Command>(&mut input), Err(ControlError::Bad(_))));
        assert!(matches!(read_message::<Command>(&mut input), Err(ControlError::Bad(_))));
    }
}
