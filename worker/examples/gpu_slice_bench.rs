//! Decode steps of a Maverick slice on one GPU (issue 6): two decoder layers with Maverick's
//! real dimensions, one dense and one MoE (128 experts, top-1, shared expert), random FP8
//! weights, at batch 1, 16, 64 and 256 and a KV depth of 512. Timed with CUDA events after
//! warm-up; prints one JSON object per batch, then the batch-1 floor: the active weights (and
//! the KV rows one step reads) over the device-to-device copy bandwidth measured in the same run.
//!
//! Usage: gpu_slice_bench [--batches 1,16,64,256] [--depth 512] [--steps 20]

use herd_kernels::cuda::{Gpu, MoeGemmKernel};
use herd_worker::gpu::slice;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let (mut batches, mut depth, mut steps) = (vec![1usize, 16, 64, 256], 512usize, 20usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--batches" => batches = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--depth" => depth = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let gpu = Arc::new(Gpu::open(0, None)?);
    eprintln!("gpu_slice_bench on {} ({})", gpu.info().name, gpu.arch());
    let bw = slice::copy_bandwidth(&gpu)?;
    let started = std::time::Instant::now();
    let model = slice::maverick_slice(Arc::clone(&gpu), 42)?;
    gpu.synchronize()?;
    eprintln!(
        "slice built in {:.1} s: {:.2} GiB of weights",
        started.elapsed().as_secs_f64(),
        model.weight_bytes() as f64 / (1u64 << 30) as f64
    );
    let cfg = model.config().clone();
    let active = slice::active_weight_bytes(&model);
    // On sm_90a both grouped-GEMM implementations are timed (docs/kernels.md: the mma.sync one is
    // the engine's default until the wgmma one has passed its parity tests).
    let kernels: &[MoeGemmKernel] =
        if gpu.arch() == "sm_90a" { &[MoeGemmKernel::Mma, MoeGemmKernel::Sm90] } else { &[MoeGemmKernel::Mma] };
    for &kernel in kernels {
        gpu.set_moe_gemm(kernel)?;
        for &batch in &batches {
            let t = slice::time_decode(&model, batch, depth, 3, steps)?;
            // A step reads each sequence's K and V history in both layers.
            let kv_bytes = batch * depth * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4;
            let floor_ms = if batch == 1 { (active + kv_bytes) as f64 / (bw * 1e9) * 1e3 } else { f64::NAN };
            println!(
                "{{\"bench\":\"maverick_slice_decode\",\"moe_gemm\":\"{kernel:?}\",\"batch\":{batch},\"depth\":{depth},\"median_ms\":{:.4},\"min_ms\":{:.4},\"steps\":{},\"tokens_per_s\":{:.1},\"active_weight_bytes\":{active},\"copy_gbps\":{bw:.0},\"floor_ms\":{},\"ratio_to_floor\":{}}}",
                t.median_ms,
                t.min_ms,
                t.steps,
                batch as f64 / (t.median_ms * 1e-3),
                if floor_ms.is_nan() { "null".to_string() } else { format!("{floor_ms:.4}") },
                if floor_ms.is_nan() { "null".to_string() } else { format!("{:.2}", t.median_ms / floor_ms) },
            );
        }
    }
    Ok(())
}
