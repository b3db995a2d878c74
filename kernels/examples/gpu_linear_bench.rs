//! Times `linear` at Maverick's dense shapes with CUDA events after warm-up: FP8 and bf16 weights,
//! m = 1, 16, 64, 256, every route that supports the weights (the default one marked), rotating
//! over enough weight copies (≥ 4, ≥ 200 MB in all) that every call streams W from HBM, not the
//! 50 MB L2. Prints one JSON object per case on stdout, then the device-to-device copy bandwidth
//! (bytes read + written) to compare the GEMV's GB/s against.
//!
//! Usage: gpu_linear_bench [--m 1,16,...] [--iters N] [--default-only]

use herd_kernels::cuda::linear::{self, LinearWeight, Route};
use herd_kernels::cuda::{Gpu, cudarc};

/// [n, k]: wo, wk, dense gate_up, dense down, expert gate_up.
const SHAPES: [(&str, usize, usize); 5] = [
    ("wo", 5120, 5120),
    ("wk", 1024, 5120),
    ("dense_gate_up", 32768, 5120),
    ("dense_down", 5120, 16384),
    ("expert_gate_up", 16384, 5120),
];
const MIN_TOTAL_BYTES: usize = 200 << 20;

/// Cheap deterministic pseudo-random bytes (the values do not change the timing).
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut ms = vec![1usize, 16, 64, 256];
    let mut iters = 20usize;
    let mut default_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--m" => ms = args.next().unwrap_or_default().split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--iters" => iters = args.next().unwrap_or_default().parse()?,
            "--default-only" => default_only = true,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let gpu = Gpu::open(0, None)?;
    eprintln!("gpu_linear_bench on {} ({})", gpu.info().name, gpu.arch());
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let time = |f: &mut dyn FnMut(usize) -> anyhow::Result<()>| -> anyhow::Result<f64> {
        for i in 0..3 {
            f(i)?;
        }
        let (start, end) = (gpu.context().new_event(flags)?, gpu.context().new_event(flags)?);
        start.record(gpu.stream())?;
        for i in 0..iters {
            f(i)?;
        }
        end.record(gpu.stream())?;
        end.synchronize()?;
        Ok(f64::from(start.elapsed_ms(&end)?) / iters as f64)
    };

    let max_m = ms.iter().copied().max().unwrap_or(1);
    for (name, n, k) in SHAPES {
        let x = gpu.upload(&vec![0.5f32; max_m * k])?;
        let mut y = gpu.zeros::<f32>(max_m * n)?;
        for dtype in ["fp8", "bf16"] {
            let one = if dtype == "fp8" { n * k } else { n * k * 2 };
            let copies = MIN_TOTAL_BYTES.div_ceil(one).max(4);
            let mut raw = bytes(one, 7);
            let weights: Vec<LinearWeight> = if dtype == "fp8" {
                // Clear the e4m3 NaN codes (0x7f, 0xff) so the arithmetic stays finite.
                raw.iter_mut().filter(|b| **b & 0x7f == 0x7f).for_each(|b| *b &= 0xbf);
                let scale = vec![1e-2f32; n];
                (0..copies).map(|_| LinearWeight::fp8(&gpu, &raw, &scale, n, k)).collect::<Result<_, _>>()?
            } else {
                // bf16 bits with a tame exponent: high byte 0x3c–0x3f or 0xbc–0xbf.
                let bits: Vec<u16> =
                    raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], (c[1] & 0x83) | 0x3c])).collect();
                (0..copies).map(|_| LinearWeight::bf16(&gpu, &bits, n, k)).collect::<Result<_, _>>()?
            };
            drop(raw);
            for &m in &ms {
                let default = linear::route(m, &weights[0]);
                for route in [Route::Gemv, Route::Tiled, Route::Fp8Gemm] {
                    if !route.supports(&weights[0]) || (default_only && route != default) {
                        continue;
                    }
                    let ms_per =
                        time(&mut |i| Ok(linear::linear_via(&gpu, &x, m, &weights[i % copies], &mut y, route)?))?;
                    let wbytes = weights[0].bytes() as f64;
                    println!(
                        "{{\"bench\":\"linear\",\"layer\":\"{name}\",\"n\":{n},\"k\":{k},\"dtype\":\"{dtype}\",\"m\":{m},\"route\":\"{}\",\"default\":{},\"copies\":{copies},\"ms\":{ms_per:.4},\"weight_gbps\":{:.0},\"tflops\":{:.2}}}",
                        route.name(),
                        route == default,
                        wbytes / (ms_per * 1e-3) / 1e9,
                        2.0 * (m * n * k) as f64 / (ms_per * 1e-3) / 1e12
                    );
                }
            }
        }
    }

    // The reference for streaming: a 1 GiB device-to-device copy, counting bytes read + written.
    let len = 1usize << 30;
    let src = gpu.zeros::<u8>(len)?;
    let mut dst = gpu.zeros::<u8>(len)?;
    let ms_copy = time(&mut |_| Ok(gpu.stream().memcpy_dtod(&src, &mut dst)?))?;
    println!(
        "{{\"bench\":\"dtod_copy\",\"bytes\":{len},\"ms\":{ms_copy:.4},\"read_write_gbps\":{:.0}}}",
        2.0 * len as f64 / (ms_copy * 1e-3) / 1e9
    );
    Ok(())
}
