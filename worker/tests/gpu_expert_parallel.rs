//! Expert parallelism on the GPU (feature `cuda`): thread-ranks joined by the local transport,
//! each engine on device 0 holding its placement's share of the routed experts, against one
//! GPU engine holding them all. Prints `SKIPPED` where there is no usable GPU
//! (scripts/gpu-check.sh counts that as a failure; CI, without a GPU, passes it).
#![cfg(feature = "cuda")]

mod support;

use herd_kernels::device::Device;
use herd_worker::engine::EngineConfig;
use herd_worker::engine::device::{self, DeviceOptions};
use herd_worker::engine::request::Event;
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::Placement;
use std::collections::BTreeMap;
use std::sync::Arc;
use support::{requests, run_group, shape, tokens};

fn gpu_or_skip(test: &str) -> Option<DeviceOptions> {
    match herd_kernels::device::probe(Device::Cuda(0)) {
        Ok(_) => Some(DeviceOptions { device: Device::Cuda(0), ..DeviceOptions::default() }),
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            None
        }
    }
}

/// Every request on one GPU engine with all experts (no expert parallelism at all).
fn alone(f: &Frontend, gpu: &DeviceOptions) -> BTreeMap<u64, Vec<Event>> {
    let model = f.load_model(ComputeDtype::F32, None).expect("load");
    let mut engine =
        device::build(Arc::new(model), Arc::clone(&f.tokenizer), f.eos_ids(), EngineConfig::default(), gpu)
            .expect("engine");
    for r in requests(f.config.text.vocab_size as u64) {
        engine.submit(r).expect("submit");
    }
    let mut out: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    while engine.has_work() {
        let (events, _) = engine.step().expect("step");
        for e in events {
            out.entry(e.id()).or_default().push(e);
        }
    }
    out
}

#[test]
fn gpu_ranks_holding_shares_of_the_experts_equal_one_gpu_holding_all() {
    let Some(gpu) = gpu_or_skip("gpu_ranks_holding_shares_of_the_experts_equal_one_gpu_holding_all") else {
        return;
    };
    for name in ["maverick", "scout"] {
        let f = support::frontend(name);
        let reqs = requests(f.config.text.vocab_size as u64);
        let single = alone(&f, &gpu);
        // Every request on rank 0: its batches are the single engine's, and each expert sees
        // the same rows, so the results are the same bits (logits included).
        for world in [2, 3] {
            for placement in [Placement::round_robin(world, &shape(&f)), Placement::skewed(world, &shape(&f))] {
                let group = run_group(&f, world, &placement, &reqs, &gpu, |_| 0);
                assert_eq!(group, single, "{name}, world {world}: {placement}");
            }
        }
        // Requests spread over the ranks and experts replicated: other batch shapes may take
        // other GEMM routes (GEMV or tiled), so the tokens, not the bits, must match.
        let placement = Placement::replicated(2, &shape(&f), 4);
        let spread = run_group(&f, 2, &placement, &reqs, &gpu, |i| i);
        assert_eq!(tokens(&spread), tokens(&single), "{name}, requests spread: {placement}");
    }
}
