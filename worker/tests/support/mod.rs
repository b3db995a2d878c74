//! What the expert-parallel test binaries share: a golden checkpoint, a mixed request set, and
//! a group of thread-ranks joined by the local transport, running the same lockstep loop and EP
//! runner as `herd worker`, on the CPU or a GPU.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use herd_worker::control::FromWorker;
use herd_worker::engine::EngineConfig;
use herd_worker::engine::device::{self, DeviceOptions};
use herd_worker::engine::request::{Event, Request};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::ep::EpRunner;
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::{MoeShape, Placement};
use herd_worker::runtime::lockstep::{self, GroupCommand, LockstepConfig};
use herd_worker::transport::local::LocalTransport;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::Duration;

/// A golden checkpoint of `testdata/golden` (maverick, scout, scout-v5): under the current
/// directory when run from the repository root (a test binary carried to the GPU machine by
/// scripts/gpu-check.sh, where the build's path does not exist), else beside this crate.
pub fn frontend(name: &str) -> Frontend {
    let rel = Path::new("testdata/golden").join(name).join("model");
    let dir = if rel.is_dir() {
        rel
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden").join(name).join("model")
    };
    Frontend::load(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

pub fn shape(f: &Frontend) -> MoeShape {
    let t = &f.config.text;
    MoeShape { moe_layers: t.moe_layers(), experts: t.num_local_experts }
}

/// Eight requests: prompts of 3 to 66 tokens, greedy and seeded sampling, some asking for
/// prompt logits.
pub fn requests(vocab: u64) -> Vec<Request> {
    (0..8u64)
        .map(|i| Request {
            id: i,
            prompt: (0..3 + i * 9).map(|j| ((j * 31 + i * 7) % (vocab - 10) + 3) as u32).collect(),
            params: SamplingParams {
                temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
                seed: Some(i),
                max_tokens: 12,
                ignore_eos: true,
                ..Default::default()
            },
            prompt_logits: i % 3 == 0,
            images: Vec::new(),
        })
        .collect()
}

/// Runs `reqs` on `world` thread-ranks whose engines run on `device` (request i on rank
/// `home(i)`); events by request.
pub fn run_group(
    f: &Frontend,
    world: usize,
    placement: &Placement,
    reqs: &[Request],
    device: &DeviceOptions,
    home: impl Fn(usize) -> usize,
) -> BTreeMap<u64, Vec<Event>> {
    let transports = LocalTransport::group(world);
    let (report_tx, report_rx) = channel::<(usize, FromWorker)>();
    let mut command_txs = Vec::new();
    let mut handles = Vec::new();
    for (rank, transport) in transports.into_iter().enumerate() {
        let local: BTreeMap<usize, Vec<usize>> =
            placement.layers.keys().map(|&l| (l, placement.local_experts(rank, l))).collect();
        let model = f.load_model(ComputeDtype::F32, Some(&local)).expect("load");
        let mut engine =
            device::build(Arc::new(model), Arc::clone(&f.tokenizer), f.eos_ids(), EngineConfig::default(), device)
                .expect("engine");
        let mut runner = EpRunner::new(Box::new(transport), placement.clone(), Duration::from_secs(20));
        let (tx, rx) = channel::<GroupCommand>();
        command_txs.push(tx);
        let report_tx = report_tx.clone();
        handles.push(std::thread::spawn(move || {
            let mut report = |r: FromWorker| {
                let _ = report_tx.send((rank, r));
            };
            lockstep::run(&mut engine, &mut runner, &rx, &mut report, LockstepConfig::default()).map(|_| ())
        }));
    }
    drop(report_tx);
    for (i, r) in reqs.iter().enumerate() {
        command_txs[home(i) % world].send(GroupCommand::Submit(r.clone())).expect("submit");
    }
    let mut out: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    let mut open = reqs.len();
    while open > 0 {
        let (_, report) = report_rx.recv_timeout(Duration::from_secs(60)).expect("events");
        if let FromWorker::Event(e) = report {
            open -= usize::from(e.is_final());
            out.entry(e.id()).or_default().push(e);
        }
    }
    for tx in &command_txs {
        tx.send(GroupCommand::Drain).expect("drain");
    }
    for h in handles {
        h.join().expect("thread").expect("clean exit");
    }
    out
}

/// Each request's generated token ids.
pub fn tokens(events: &BTreeMap<u64, Vec<Event>>) -> BTreeMap<u64, Vec<u32>> {
    events
        .iter()
        .map(|(&id, ev)| {
            (
                id,
                ev.iter()
                    .filter_map(|e| if let Event::Token { token, .. } = e { Some(*token) } else { None })
                    .collect(),
            )
        })
        .collect()
}
