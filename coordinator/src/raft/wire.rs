//! What travels between coordinators: raft-rs messages, and herd's forwarded proposals.
//!
//! ReadIndex requests need no variant of their own: raft-rs forwards a follower's
//! `MsgReadIndex` to the leader and the answer back inside [`WireMessage::Raft`].

use serde::{Deserialize, Serialize};

use super::RaftError;

/// The largest encoded [`WireMessage`] that [`WireMessage::decode`] accepts (snapshots of the
/// cluster state included).
pub const MAX_WIRE_BYTES: usize = 64 << 20;

/// Something to be replicated through the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proposal {
    /// A state machine command.
    Command(Vec<u8>),
    /// Make a node a voter (single-server membership change).
    AddVoter(u64),
    /// Remove a node from the voters.
    RemoveVoter(u64),
}

/// One message between two coordinators. The sender's id is not inside: the transport knows
/// it (from the peer's certificate) and passes it to [`super::RaftHandle::receive`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMessage {
    /// A raft-rs `eraftpb::Message`, protobuf-encoded.
    Raft(Vec<u8>),
    /// A follower asks the leader to propose on its behalf. `id` is unique among the sender's
    /// requests; the leader tags the log entry with (sender, id) so the sender recognises it.
    Forward { id: u64, proposal: Proposal },
    /// The leader's answer to the sender's `Forward { id, .. }`.
    ForwardReply { id: u64, reply: ForwardReply },
}

/// A leader's answers to a forwarded proposal; a follower may see `Accepted` then `Applied`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Appended to the leader's log at this index and term; not yet committed.
    Accepted { index: u64, term: u64 },
    /// Committed and applied on the leader at `index`, with the state machine's result.
    Applied { index: u64, result: Result<Vec<u8>, RaftError> },
    /// Not proposed, and safe to send again: the receiver is not the leader, or a conf change
    /// is still pending.
    Retry,
    /// Not proposed, and will not be.
    Failed(RaftError),
}

impl WireMessage {
    /// The bytes a network transport sends (bincode 2, standard configuration).
    pub fn encode(&self) -> Result<Vec<u8>, RaftError> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| RaftError::Malformed(format!("encode: {e}")))
    }

    /// Parses bytes from the network. Never panics; rejects oversized or trailing input.
    pub fn decode(bytes: &[u8]) -> Result<Self, RaftError> {
        if bytes.len() > MAX_WIRE_BYTES {
            return Err(RaftError::Malformed(format!("{} bytes is over the limit", bytes.len())));
        }
        let config = bincode::config::standard().with_limit::<MAX_WIRE_BYTES>();
        let (msg, used): (WireMessage, usize) =
            bincode::serde::decode_from_slice(bytes, config).map_err(|e| RaftError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(RaftError::Malformed(format!("{} trailing bytes", bytes.len() - used)));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let msgs = [
            WireMessage::Raft(vec![1, 2, 3]),
            WireMessage::Forward { id: 7, proposal: Proposal::Command(b"set x".to_vec()) },
            WireMessage::Forward { id: 8, proposal: Proposal::RemoveVoter(3) },
            WireMessage::ForwardReply { id: 7, reply: ForwardReply::Accepted { index: 9, term: 2 } },
            WireMessage::ForwardReply { id: 7, reply: ForwardReply::Applied { index: 9, result: Ok(vec![4]) } },
            WireMessage::ForwardReply { id: 8, reply: ForwardReply::Failed(RaftError::Dropped("x".into())) },
        ];
        for m in msgs {
            let bytes = m.encode().expect("encode");
            assert_eq!(WireMessage::decode(&bytes).expect("decode"), m);
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert!(WireMessage::decode(&trailing).is_err());
            for cut in 0..bytes.len() {
                assert!(WireMessage::decode(&bytes[..cut]).is_err(), "prefix {cut} of {m:?}");
            }
        }
        assert!(WireMessage::decode(&[0xff; 16]).is_err());
        // A length prefix claiming far more than the input holds must not allocate it.
        assert!(WireMessage::decode(&[0, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0]).is_err());
    }
}
