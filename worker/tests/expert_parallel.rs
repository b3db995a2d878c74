//! Expert parallelism in one process: ranks are threads joined by the local transport. The
//! same lockstep loop and EP runner as `herd worker`, without process start-up, so placements
//! and failure paths can be checked quickly.

use herd_worker::control::{Command, Report};
use herd_worker::engine::request::{Event, Request};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::engine::scheduler::{Engine, EngineConfig};
use herd_worker::ep::{DispatchError, EpRunner};
use herd_worker::frontend::Frontend;
use herd_worker::lockstep::{self, LockstepConfig};
use herd_worker::model::moe::{ExpertRunner, Route, Routing};
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::{MoeShape, Placement};
use herd_worker::transport::local::LocalTransport;
use herd_worker::transport::{Transport, TransportError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

fn frontend() -> Frontend {
    Frontend::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/maverick/model")).expect("load")
}

fn shape(f: &Frontend) -> MoeShape {
    let t = &f.config.text;
    MoeShape {
        moe_layers: (0..t.num_hidden_layers).filter(|&l| t.layers[l].moe).collect(),
        experts: t.num_local_experts,
    }
}

fn requests(vocab: u64) -> Vec<Request> {
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

/// Run `reqs` on `world` thread-ranks (request i on rank i % world); events by request.
fn run_group(f: &Frontend, world: usize, placement: &Placement, reqs: &[Request]) -> BTreeMap<u64, Vec<Event>> {
    let transports = LocalTransport::group(world);
    let (report_tx, report_rx) = channel::<(usize, Report)>();
    let mut command_txs = Vec::new();
    let mut handles = Vec::new();
    for (rank, transport) in transports.into_iter().enumerate() {
        let local: BTreeMap<usize, Vec<usize>> =
            placement.layers.keys().map(|&l| (l, placement.local_experts(rank, l))).collect();
        let model = f.load_model(ComputeDtype::F32, Some(&local)).expect("load");
        let mut engine = Engine::new(Arc::new(model), Arc::clone(&f.tokenizer), f.eos_ids(), EngineConfig::default())
            .expect("engine");
        let mut runner = EpRunner::new(Box::new(transport), placement.clone(), Duration::from_secs(20));
        let (tx, rx) = channel::<Command>();
        command_txs.push(tx);
        let report_tx = report_tx.clone();
        handles.push(std::thread::spawn(move || {
            let mut report = |r: Report| {
                let _ = report_tx.send((rank, r));
            };
            lockstep::run(&mut engine, &mut runner, &rx, &mut report, LockstepConfig::default()).map(|_| ())
        }));
    }
    drop(report_tx);
    for (i, r) in reqs.iter().enumerate() {
        command_txs[i % world].send(Command::Submit(r.clone())).expect("submit");
    }
    let mut out: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    let mut open = reqs.len();
    while open > 0 {
        let (_, report) = report_rx.recv_timeout(Duration::from_secs(60)).expect("events");
        if let Report::Event(e) = report {
            open -= usize::from(e.is_final());
            out.entry(e.id()).or_default().push(e);
        }
    }
    for tx in &command_txs {
        tx.send(Command::Shutdown).expect("shutdown");
    }
    for h in handles {
        h.join().expect("thread").expect("clean exit");
    }
    out
}

#[test]
fn thread_ranks_equal_a_single_engine_under_every_placement() {
    let f = frontend();
    let reqs = requests(f.config.text.vocab_size as u64);
    let single = run_group(&f, 1, &Placement::round_robin(1, &shape(&f)), &reqs);
    for world in [2, 3] {
        for placement in [
            Placement::round_robin(world, &shape(&f)),
            Placement::skewed(world, &shape(&f)),
            Placement::replicated(world, &shape(&f), 4),
        ] {
            assert_eq!(run_group(&f, world, &placement, &reqs), single, "world {world}: {placement}");
        }
    }
}

#[test]
fn a_ragged_dispatch_from_a_peer_is_an_error_not_a_panic() {
    let f = frontend();
    let placement = Placement::round_robin(2, &shape(&f));
    let model = f.load_model(ComputeDtype::F32, None).expect("load");
    let layer = placement.layers.keys().copied().next().expect("a MoE layer");
    let mut transports = LocalTransport::group(2);
    let mut rogue = transports.pop().expect("rank 1");
    let honest = transports.pop().expect("rank 0");
    let peer = std::thread::spawn(move || {
        // Three bytes cannot be a whole dispatch record.
        let _ = rogue.all_to_all_v(vec![vec![1, 2, 3], Vec::new()], Instant::now() + Duration::from_secs(5));
        rogue
    });
    let mut runner = EpRunner::new(Box::new(honest), placement, Duration::from_secs(5));
    let hidden = f.config.text.hidden_size;
    let x = vec![0.5f32; hidden];
    let routing = Routing { routes: vec![Route { token: 0, expert: 1, score: 0.5 }], offsets: vec![] };
    let block = model.moe_block(layer).expect("MoE layer");
    let err = runner.run(layer, block, &x, &routing).expect_err("ragged payload");
    let err = err.downcast::<DispatchError>().expect("a dispatch error");
    assert!(matches!(*err, DispatchError::Ragged { peer: 1, len: 3, .. }), "{err}");
    drop(peer.join().expect("rogue thread"));
}

#[test]
fn a_silent_peer_times_out_within_the_deadline() {
    let f = frontend();
    let placement = Placement::round_robin(2, &shape(&f));
    let model = f.load_model(ComputeDtype::F32, None).expect("load");
    let layer = placement.layers.keys().copied().next().expect("a MoE layer");
    let mut transports = LocalTransport::group(2);
    let _silent = transports.pop().expect("rank 1 never joins");
    let mut runner = EpRunner::new(Box::new(transports.pop().expect("rank 0")), placement, Duration::from_millis(300));
    let started = Instant::now();
    let block = model.moe_block(layer).expect("MoE layer");
    let err = runner.run(layer, block, &[], &Routing::default()).expect_err("timeout");
    let took = started.elapsed();
    let err = err.downcast::<DispatchError>().expect("a dispatch error");
    assert!(matches!(*err, DispatchError::Transport(TransportError::Timeout { peer: 1, .. })), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
