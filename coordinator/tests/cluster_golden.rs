//! Golden files for the cluster state machine: each `tests/data/cluster/*.json` holds a list
//! of commands, the outcome of each, and the final state. Replaying must reproduce both
//! exactly. Run with `HERD_BLESS=1` to rewrite the expectations after a deliberate change
//! (then review the diff).

use herd_coordinator::cluster::{ClusterCommand, ClusterState, Outcome, apply};
use serde_json::{Value, json};
use std::path::Path;

#[test]
fn replaying_golden_command_logs_reproduces_outcomes_and_state() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cluster");
    let bless = std::env::var_os("HERD_BLESS").is_some();
    let mut cases = 0;
    for entry in std::fs::read_dir(&dir).expect("golden dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        cases += 1;
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let commands: Vec<ClusterCommand> = serde_json::from_value(golden["commands"].clone())
            .unwrap_or_else(|e| panic!("{}: commands: {e}", path.display()));
        let mut state = ClusterState::default();
        let outcomes: Vec<Outcome> = commands.iter().cloned().map(|c| apply(&mut state, c)).collect();
        // Applying the same log twice from scratch gives the same state (determinism).
        let mut again = ClusterState::default();
        commands.iter().cloned().for_each(|c| {
            apply(&mut again, c);
        });
        assert_eq!(state, again, "{}: not deterministic", path.display());
        let actual = json!({"commands": golden["commands"], "outcomes": outcomes, "state": state});
        if bless {
            std::fs::write(&path, serde_json::to_string_pretty(&actual).expect("json") + "\n").expect("bless");
            continue;
        }
        assert_eq!(actual["outcomes"], golden["outcomes"], "{}: outcomes", path.display());
        assert_eq!(actual["state"], golden["state"], "{}: final state", path.display());
    }
    assert!(cases >= 2, "expected golden cases in {}", dir.display());
}
