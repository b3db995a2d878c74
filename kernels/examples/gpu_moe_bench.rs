//! Times the grouped FP8 GEMMs of one MoE layer at Maverick's shapes (hidden 5120, expert width
//! 8192, 128 experts, top-1) with CUDA events after warm-up. Run by scripts/gpu-check.sh; prints
//! one JSON object per (tokens, routing) on stdout.
//!
//! Usage: gpu_moe_bench [--tokens 16,64,...] [--iters N] [--experts 128]
//! Weights are random e4m3 bytes: one expert's worth generated on the host and uploaded for
//! every expert (distinct buffers, so every expert's weights stream from memory); activations
//! are random e4m3 bytes too. On an sm_90a device both implementations are timed (the mma.sync
//! kernels and the TMA + wgmma ones), each line tagged with its `kernel`.

use herd_kernels::cuda::{Gpu, MoeGemmKernel, moe};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HIDDEN: usize = 5120;
const WIDTH: usize = 8192;

fn main() -> anyhow::Result<()> {
    let mut tokens_list = vec![16usize, 64, 256, 1024, 4096, 16384];
    let mut iters = 20usize;
    // 128: all of Maverick's experts on one GPU. 16: one GPU's share under 8-way expert
    // parallelism, where each expert sees 8× more tokens per layer.
    let mut experts = 128usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokens" => {
                tokens_list = args.next().unwrap_or_default().split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--iters" => iters = args.next().unwrap_or_default().parse()?,
            "--experts" => experts = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let gpu = Gpu::open(0, None)?;
    eprintln!("gpu_moe_bench on {} ({})", gpu.info().name, gpu.arch());
    let kernels: Vec<MoeGemmKernel> =
        if gpu.arch() == "sm_90a" { vec![MoeGemmKernel::Mma, MoeGemmKernel::Sm90] } else { vec![MoeGemmKernel::Mma] };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // e4m3 bytes with the sign/exponent range of weights (avoid the 0x7f/0xff NaN codes).
    let mut expert = |n: usize, k: usize| -> Vec<u8> {
        (0..n * k).map(|_| rng.random_range(0x20u8..0x48) | (rng.random::<u8>() & 0x80)).collect()
    };
    let gu_one = expert(2 * WIDTH, HIDDEN);
    let dn_one = expert(HIDDEN, WIDTH);
    let mut gu_w = Vec::with_capacity(experts * gu_one.len());
    let mut dn_w = Vec::with_capacity(experts * dn_one.len());
    for _ in 0..experts {
        gu_w.extend_from_slice(&gu_one);
        dn_w.extend_from_slice(&dn_one);
    }
    let gate_up =
        moe::Fp8Experts::upload(&gpu, &gu_w, &vec![1e-2f32; experts * 2 * WIDTH], experts, 2 * WIDTH, HIDDEN)?;
    let down = moe::Fp8Experts::upload(&gpu, &dn_w, &vec![1e-2f32; experts * HIDDEN], experts, HIDDEN, WIDTH)?;
    drop((gu_w, dn_w));

    for &tokens in &tokens_list {
        for routing in ["uniform", "skewed"] {
            // Top-1: each token goes to one expert. Skewed: half of the tokens to 4 hot experts.
            let mut counts = vec![0usize; experts];
            for t in 0..tokens {
                let e = if routing == "skewed" && t % 2 == 0 { t % 4 } else { rng.random_range(0..experts) };
                counts[e] += 1;
            }
            let groups = moe::Groups::from_counts(&gpu, &counts)?;
            // Random activations (the tensor cores' power, hence their clock, depends on the data).
            let a: Vec<u8> =
                (0..tokens * HIDDEN).map(|_| rng.random_range(0x20u8..0x48) | (rng.random::<u8>() & 0x80)).collect();
            let a = gpu.upload(&a)?;
            let a_scale = gpu.upload(&vec![1e-2f32; tokens])?;
            let mut h = gpu.zeros::<u8>(tokens * WIDTH)?;
            let mut h_scale = gpu.zeros::<f32>(tokens * WIDTH / moe::H_GROUP)?;
            let mut y = gpu.zeros::<f32>(tokens * HIDDEN)?;
            let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
                for _ in 0..3 {
                    f()?;
                }
                let flags = Some(herd_kernels::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let (start, end) = (gpu.context().new_event(flags)?, gpu.context().new_event(flags)?);
                start.record(gpu.stream())?;
                for _ in 0..iters {
                    f()?;
                }
                end.record(gpu.stream())?;
                end.synchronize()?;
                Ok(f64::from(start.elapsed_ms(&end)?) / iters as f64)
            };
            for kernel in &kernels {
                gpu.set_moe_gemm(*kernel)?;
                let gu_ms = time(&mut || {
                    Ok(moe::gemm_swiglu(&gpu, &a, &a_scale, 1, &gate_up, &groups, &mut h, &mut h_scale)?)
                })?;
                let dn_ms =
                    time(&mut || Ok(moe::gemm(&gpu, &h, &h_scale, WIDTH / moe::H_GROUP, &down, &groups, &mut y)?))?;
                let flops = |n: usize, k: usize| 2.0 * tokens as f64 * n as f64 * k as f64;
                let tflops = |f: f64, ms: f64| f / (ms * 1e-3) / 1e12;
                let (gu_f, dn_f) = (flops(2 * WIDTH, HIDDEN), flops(HIDDEN, WIDTH));
                println!(
                    "{{\"bench\":\"grouped_fp8_gemm\",\"kernel\":\"{kernel:?}\",\"experts\":{experts},\"tokens\":{tokens},\"routing\":\"{routing}\",\"active_experts\":{},\"gate_up_ms\":{gu_ms:.4},\"gate_up_tflops\":{:.1},\"down_ms\":{dn_ms:.4},\"down_tflops\":{:.1},\"total_ms\":{:.4},\"total_tflops\":{:.1}}}",
                    counts.iter().filter(|&&c| c > 0).count(),
                    tflops(gu_f, gu_ms),
                    tflops(dn_f, dn_ms),
                    gu_ms + dn_ms,
                    tflops(gu_f + dn_f, gu_ms + dn_ms)
                );
            }
        }
    }
    Ok(())
}
