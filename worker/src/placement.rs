//! The expert placement map: for every (MoE layer, routed expert), which workers hold a replica.
//!
//! Placement is a plain value (serde, printable, diffable) so that the coordinator can own it
//! as versioned cluster state; workers load exactly the experts it assigns them, and the
//! dispatcher reads it to send each routed token to a replica. With several replicas of a hot
//! expert, [`Placement::pick`] spreads tokens over them deterministically, so every run with
//! the same inputs sends the same token to the same worker.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("cannot read placement file {path}: {message}")]
    Read { path: String, message: String },
    #[error("placement file {path} is not valid JSON or TOML: {message}")]
    Parse { path: String, message: String },
    #[error("unknown placement {0:?} (expected round-robin, skewed, replicated or a file path)")]
    UnknownKind(String),
    #[error("placement has world {found}, but the cluster has {expected} workers")]
    World { expected: usize, found: usize },
    #[error("placement covers MoE layers {found:?}, but the model's MoE layers are {expected:?}")]
    Layers { expected: Vec<usize>, found: Vec<usize> },
    #[error("layer {layer}: placement lists {found} experts, the model has {expected}")]
    Experts { layer: usize, expected: usize, found: usize },
    #[error("layer {layer} expert {expert} has no replica")]
    NoReplica { layer: usize, expert: usize },
    #[error("layer {layer} expert {expert} names worker {rank}, outside 0..{world}")]
    BadRank { layer: usize, expert: usize, rank: usize, world: usize },
}

/// Which workers hold each routed expert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Number of workers.
    pub world: usize,
    /// MoE layer index → expert index → ranks holding a replica (sorted, no duplicates).
    pub layers: BTreeMap<usize, Vec<Vec<usize>>>,
}

/// The model facts a placement is built for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeShape {
    pub moe_layers: Vec<usize>,
    pub experts: usize,
}

impl Placement {
    /// Expert `e` on worker `(e + layer) % world`: balanced, and each layer starts on a
    /// different worker so that lightly used experts do not all pile onto rank 0.
    pub fn round_robin(world: usize, shape: &MoeShape) -> Self {
        Self::build(world, shape, |layer, e| vec![(e + layer) % world])
    }

    /// Worker 0 holds every expert except one per other worker (expert `r` on worker `r`):
    /// the most unbalanced placement that still gives every worker work. For tests and for
    /// measuring imbalance.
    pub fn skewed(world: usize, shape: &MoeShape) -> Self {
        Self::build(world, shape, |_, e| if e > 0 && e < world { vec![e] } else { vec![0] })
    }

    /// Round-robin, plus the first `hot` experts of each layer replicated on every worker.
    pub fn replicated(world: usize, shape: &MoeShape, hot: usize) -> Self {
        Self::build(world, shape, |layer, e| if e < hot { (0..world).collect() } else { vec![(e + layer) % world] })
    }

    /// Every expert on every worker (for a single worker, the only placement).
    pub fn everywhere(world: usize, shape: &MoeShape) -> Self {
        Self::build(world, shape, |_, _| (0..world).collect())
    }

    fn build(world: usize, shape: &MoeShape, ranks: impl Fn(usize, usize) -> Vec<usize>) -> Self {
        let layers = shape.moe_layers.iter().map(|&l| (l, (0..shape.experts).map(|e| ranks(l, e)).collect())).collect();
        Self { world, layers }
    }

    /// `round-robin`, `skewed`, `replicated` (2 hot experts per layer), or a JSON/TOML file.
    pub fn from_arg(arg: &str, world: usize, shape: &MoeShape) -> Result<Self, PlacementError> {
        let placement = match arg {
            "round-robin" => Self::round_robin(world, shape),
            "skewed" => Self::skewed(world, shape),
            "replicated" => Self::replicated(world, shape, 2),
            path if Path::new(path).is_file() => Self::from_file(Path::new(path))?,
            other => return Err(PlacementError::UnknownKind(other.to_owned())),
        };
        placement.validate(world, shape)?;
        Ok(placement)
    }

    /// Read a placement written as JSON (`{"world": 2, "layers": {"1": [[0], [1, 0]]}}`) or TOML.
    pub fn from_file(path: &Path) -> Result<Self, PlacementError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PlacementError::Read { path: shown.clone(), message: e.to_string() })?;
        let mut p: Placement = match serde_json::from_str(&text) {
            Ok(p) => p,
            Err(json_err) => toml::from_str(&text).map_err(|toml_err| PlacementError::Parse {
                path: shown.clone(),
                message: format!("as JSON: {json_err}; as TOML: {}", toml_err.message()),
            })?,
        };
        p.normalise();
        Ok(p)
    }

    fn normalise(&mut self) {
        for experts in self.layers.values_mut() {
            for ranks in experts.iter_mut() {
                ranks.sort_unstable();
                ranks.dedup();
            }
        }
    }

    /// Check the placement against the cluster size and the model.
    pub fn validate(&self, world: usize, shape: &MoeShape) -> Result<(), PlacementError> {
        if self.world != world {
            return Err(PlacementError::World { expected: world, found: self.world });
        }
        let found: Vec<usize> = self.layers.keys().copied().collect();
        if found != shape.moe_layers {
            return Err(PlacementError::Layers { expected: shape.moe_layers.clone(), found });
        }
        for (&layer, experts) in &self.layers {
            if experts.len() != shape.experts {
                return Err(PlacementError::Experts { layer, expected: shape.experts, found: experts.len() });
            }
            for (expert, ranks) in experts.iter().enumerate() {
                if ranks.is_empty() {
                    return Err(PlacementError::NoReplica { layer, expert });
                }
                if let Some(&rank) = ranks.iter().find(|&&r| r >= world) {
                    return Err(PlacementError::BadRank { layer, expert, rank, world });
                }
            }
        }
        Ok(())
    }

    /// Workers holding `expert` of `layer` (empty if the layer is not in the map).
    pub fn replicas(&self, layer: usize, expert: usize) -> &[usize] {
        self.layers.get(&layer).and_then(|e| e.get(expert)).map_or(&[], Vec::as_slice)
    }

    /// Experts of `layer` that `rank` holds, ascending.
    pub fn local_experts(&self, rank: usize, layer: usize) -> Vec<usize> {
        self.layers
            .get(&layer)
            .map(|experts| experts.iter().enumerate().filter(|(_, r)| r.contains(&rank)).map(|(e, _)| e).collect())
            .unwrap_or_default()
    }

    /// The replica that serves the `nth` token (within one step) that worker `origin` routes
    /// to `expert`. A local replica always wins (no network hop); otherwise replicas are
    /// taken in turn, offset by the origin so that workers do not all hit the same one first.
    pub fn pick(&self, layer: usize, expert: usize, origin: usize, nth: usize) -> usize {
        let replicas = self.replicas(layer, expert);
        if replicas.contains(&origin) {
            return origin;
        }
        replicas[(origin + nth) % replicas.len()]
    }

    /// `(layer, expert, rank)` triples present in `other` but not in `self` (added), and the reverse (removed).
    pub fn diff(&self, other: &Placement) -> PlacementDiff {
        let triples = |p: &Placement| -> std::collections::BTreeSet<(usize, usize, usize)> {
            p.layers
                .iter()
                .flat_map(|(&l, experts)| {
                    experts.iter().enumerate().flat_map(move |(e, ranks)| ranks.iter().map(move |&r| (l, e, r)))
                })
                .collect()
        };
        let (a, b) = (triples(self), triples(other));
        PlacementDiff { added: b.difference(&a).copied().collect(), removed: a.difference(&b).copied().collect() }
    }

    /// Replicas each worker holds, summed over layers.
    pub fn experts_per_rank(&self) -> Vec<usize> {
        let mut counts = vec![0; self.world];
        for ranks in self.layers.values().flatten() {
            for &r in ranks {
                if let Some(c) = counts.get_mut(r) {
                    *c += 1;
                }
            }
        }
        counts
    }
}

/// What changes between two placements.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementDiff {
    pub added: Vec<(usize, usize, usize)>,
    pub removed: Vec<(usize, usize, usize)>,
}

impl std::fmt::Display for Placement {
    /// One line per MoE layer: `layer 1: w0[0 2 4] w1[1 3 5]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "placement over {} workers (replicas per worker: {:?})", self.world, self.experts_per_rank())?;
        for (layer, experts) in &self.layers {
            write!(f, "layer {layer}:")?;
            for rank in 0..self.world {
                let held: Vec<String> =
                    experts.iter().enumerate().filter(|(_, r)| r.contains(&rank)).map(|(e, _)| e.to_string()).collect();
                write!(f, " w{rank}[{}]", held.join(" "))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> MoeShape {
        MoeShape { moe_layers: vec![1, 3], experts: 6 }
    }

    #[test]
    fn builtin_placements_are_valid_and_cover_every_expert() {
        for world in 1..=4 {
            for p in [
                Placement::round_robin(world, &shape()),
                Placement::skewed(world, &shape()),
                Placement::replicated(world, &shape(), 2),
                Placement::everywhere(world, &shape()),
            ] {
                p.validate(world, &shape()).expect("valid");
                let held: usize = (0..world).map(|r| p.local_experts(r, 1).len()).sum();
                assert!(held >= 6);
            }
        }
        let skewed = Placement::skewed(3, &shape());
        assert_eq!(skewed.local_experts(0, 1), vec![0, 3, 4, 5]);
        assert_eq!(skewed.local_experts(2, 3), vec![2]);
        assert_eq!(Placement::round_robin(2, &shape()).local_experts(0, 1), vec![1, 3, 5]);
    }

    #[test]
    fn pick_prefers_local_then_rotates_deterministically() {
        let p = Placement::replicated(3, &shape(), 2);
        assert_eq!(p.pick(1, 0, 2, 7), 2);
        let rr = Placement { world: 3, layers: [(1, vec![vec![0, 1]])].into_iter().collect() };
        let picks: Vec<usize> = (0..4).map(|n| rr.pick(1, 0, 2, n)).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        assert_eq!(picks, (0..4).map(|n| rr.pick(1, 0, 2, n)).collect::<Vec<_>>());
    }

    #[test]
    fn files_round_trip_in_json_and_toml_and_are_validated() {
        let p = Placement::skewed(2, &shape());
        let dir = tempfile::tempdir().expect("tmp");
        let json = dir.path().join("p.json");
        std::fs::write(&json, serde_json::to_string(&p).expect("json")).expect("write");
        assert_eq!(Placement::from_arg(json.to_str().expect("utf8"), 2, &shape()), Ok(p.clone()));
        let toml_path = dir.path().join("p.toml");
        std::fs::write(
            &toml_path,
            "world = 2\n[layers]\n1 = [[0], [1], [0], [0, 1], [0], [1]]\n3 = [[1], [1], [1], [1], [1], [0]]\n",
        )
        .expect("write");
        let t = Placement::from_arg(toml_path.to_str().expect("utf8"), 2, &shape()).expect("toml");
        assert_eq!(t.replicas(1, 3), &[0, 1]);
        assert_eq!(
            Placement::from_arg(json.to_str().expect("utf8"), 3, &shape()),
            Err(PlacementError::World { expected: 3, found: 2 })
        );
        let mut bad = p.clone();
        bad.layers.get_mut(&3).expect("layer")[4].clear();
        assert_eq!(bad.validate(2, &shape()), Err(PlacementError::NoReplica { layer: 3, expert: 4 }));
        bad.layers.get_mut(&3).expect("layer")[4] = vec![5];
        assert!(matches!(bad.validate(2, &shape()), Err(PlacementError::BadRank { rank: 5, .. })));
        assert!(matches!(Placement::from_arg("sideways", 2, &shape()), Err(PlacementError::UnknownKind(_))));
        std::fs::write(&json, "{not a placement").expect("write");
        assert!(matches!(
            Placement::from_arg(json.to_str().expect("utf8"), 2, &shape()),
            Err(PlacementError::Parse { .. })
        ));
    }

    #[test]
    fn diff_lists_moved_replicas() {
        let a = Placement::round_robin(2, &shape());
        let b = Placement::replicated(2, &shape(), 1);
        let d = a.diff(&b);
        assert_eq!(d.removed, vec![]);
        assert_eq!(d.added, vec![(1, 0, 0), (3, 0, 0)]);
        assert!(a.to_string().contains("layer 1: w0[1 3 5] w1[0 2 4]"), "{a}");
    }
}
