//! Expert parallelism in one process: ranks are threads joined by the local transport. The
//! same lockstep loop and EP runner as `herd worker`, without process start-up, so placements
//! and failure paths can be checked quickly.

use herd_worker::engine::device::DeviceOptions;
use herd_worker::ep::{DispatchError, EpRunner};
use herd_worker::frontend::Frontend;
use herd_worker::model::moe::{Route, Routing};
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::Placement;
use herd_worker::transport::local::LocalTransport;
use herd_worker::transport::{Transport, TransportError};
use std::time::{Duration, Instant};

mod support;

use support::{requests, run_group, shape};

fn frontend() -> Frontend {
    support::frontend("maverick")
}

#[test]
fn thread_ranks_equal_a_single_engine_under_every_placement() {
    let f = frontend();
    let reqs = requests(f.config.text.vocab_size as u64);
    let cpu = DeviceOptions::default();
    let single = run_group(&f, 1, &Placement::round_robin(1, &shape(&f)), &reqs, &cpu, |i| i);
    for world in [2, 3] {
        for placement in [
            Placement::round_robin(world, &shape(&f)),
            Placement::skewed(world, &shape(&f)),
            Placement::replicated(world, &shape(&f), 4),
        ] {
            assert_eq!(run_group(&f, world, &placement, &reqs, &cpu, |i| i), single, "world {world}: {placement}");
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
    let err = runner.dispatch(layer, block, &x, &routing).expect_err("ragged payload");
    assert!(matches!(err, DispatchError::Ragged { peer: 1, len: 3, .. }), "{err}");
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
    let err = runner.dispatch(layer, block, &[], &Routing::default()).expect_err("timeout");
    let took = started.elapsed();
    assert!(matches!(err, DispatchError::Transport(TransportError::Timeout { peer: 1, .. })), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
