//! The cluster state as a Raft state machine: commands and outcomes travel as bincode, and
//! every applied entry bumps a watch channel so the rest of the coordinator can react to
//! new epochs, verdicts and registrations.

use crate::cluster::{self, ClusterCommand, ClusterState, Outcome};
use crate::raft::StateMachine;
use tokio::sync::watch;

/// [`ClusterState`] behind the Raft log.
#[derive(Debug)]
pub struct ClusterMachine {
    state: ClusterState,
    applied: watch::Sender<u64>,
}

impl ClusterMachine {
    /// A machine and a receiver that sees the index of every applied entry.
    pub fn new() -> (Self, watch::Receiver<u64>) {
        let (applied, rx) = watch::channel(0);
        (Self { state: ClusterState::default(), applied }, rx)
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode_command(cmd: &ClusterCommand) -> Vec<u8> {
    // Encoding a plain enum of owned data cannot fail.
    bincode::serde::encode_to_vec(cmd, config()).unwrap_or_default()
}

pub fn decode_outcome(bytes: &[u8]) -> Outcome {
    bincode::serde::decode_from_slice(bytes, config())
        .map(|(o, _)| o)
        .unwrap_or_else(|e| Outcome::Rejected { reason: format!("undecodable outcome: {e}") })
}

impl StateMachine for ClusterMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let outcome = match bincode::serde::decode_from_slice::<ClusterCommand, _>(command, config()) {
            Ok((cmd, _)) => cluster::apply(&mut self.state, cmd),
            Err(e) => Outcome::Rejected { reason: format!("undecodable command: {e}") },
        };
        self.applied.send_replace(index);
        bincode::serde::encode_to_vec(&outcome, config()).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(&self.state, config()).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) {
        match bincode::serde::decode_from_slice::<ClusterState, _>(snapshot, config()) {
            Ok((state, _)) => {
                self.state = state;
                self.applied.send_modify(|i| *i += 1);
            }
            Err(e) => tracing::error!("ignoring an undecodable cluster snapshot: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ModelSpec;

    #[test]
    fn commands_apply_through_bytes_and_snapshots_restore() {
        let (mut m, rx) = ClusterMachine::new();
        let cmd = ClusterCommand::SetModel(ModelSpec {
            name: "m".into(),
            fingerprint: "f".into(),
            moe_layers: vec![1],
            experts: 2,
        });
        assert_eq!(decode_outcome(&m.apply(7, &encode_command(&cmd))), Outcome::Done);
        assert_eq!(*rx.borrow(), 7);
        assert!(matches!(decode_outcome(&m.apply(8, b"garbage")), Outcome::Rejected { .. }));
        let (mut copy, _) = ClusterMachine::new();
        copy.restore(&m.snapshot());
        assert_eq!(copy.state(), m.state());
    }
}
