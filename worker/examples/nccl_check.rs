//! GPU check of the NCCL transport on one GPU: `cargo run --release -p herd-worker --features cuda
//! --example nccl_check [-- DEVICE]`.
//!
//! - `roundtrip`: a one-rank group whose own buffer goes through NCCL (a send/recv to itself),
//!   so the header and payload rounds, the device copies and the polling all run: payloads of
//!   0 B, 1 B, 1 MiB and a few odd sizes come back exactly, several collectives in a row, then
//!   a barrier.
//! - `throughput`: one 64 MiB exchange, timed (after a warm-up).
//! - `dead_peer_connect`: a two-rank group whose rank 1 never joins: connecting must fail with
//!   a deadline error within the deadline + 2 s, not hang (the abort path).
//!
//! Prints one line per check, `nccl_check <name>: ok ...` or `nccl_check <name>: FAIL ...`, and
//! exits 1 if any failed (2 if libnccl is missing). Needs `libnccl.so` (a symlink to the wheel's
//! `libnccl.so.2`) on `LD_LIBRARY_PATH`, the NVIDIA driver, and best `NCCL_SOCKET_IFNAME=lo`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use herd_worker::transport::Transport;
use herd_worker::transport::nccl::{NcclId, NcclOptions, NcclTransport};

fn main() -> ExitCode {
    let device: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 0,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            eprintln!("nccl_check: bad device ordinal: {e}");
            return ExitCode::from(2);
        }
    };
    let id = match NcclId::new() {
        Ok(id) => id,
        Err(e) => {
            println!("nccl_check unique_id: FAIL {e}");
            return ExitCode::from(2);
        }
    };
    println!("nccl_check unique_id: ok (nonzero: {})", !id.is_zero());
    let mut failed = false;
    let mut report = |name: &str, result: Result<String, String>| match result {
        Ok(detail) => println!("nccl_check {name}: ok {detail}"),
        Err(why) => {
            failed = true;
            println!("nccl_check {name}: FAIL {why}");
        }
    };

    let opts = NcclOptions { own_buffer_through_nccl: true, ..NcclOptions::default() };
    match NcclTransport::connect_with(0, 1, &id, device, opts, Instant::now() + Duration::from_secs(30)) {
        Ok(mut t) => {
            report("roundtrip", roundtrip(&mut t));
            report("throughput", throughput(&mut t));
        }
        Err(e) => report("connect", Err(e.to_string())),
    }
    report("dead_peer_connect", dead_peer(device));
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Deterministic bytes that differ between sizes and rounds.
fn payload(len: usize, salt: u64) -> Vec<u8> {
    let mut x = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn roundtrip(t: &mut NcclTransport) -> Result<String, String> {
    let sizes = [0usize, 1, 1 << 20, 3, 4096 + 7, 0, 1 << 20, 65_537];
    let deadline = || Instant::now() + Duration::from_secs(20);
    for (round, &len) in sizes.iter().enumerate() {
        let sent = payload(len, round as u64 + 1);
        let got =
            t.all_to_all_v(vec![sent.clone()], deadline()).map_err(|e| format!("round {round} ({len} B): {e}"))?;
        if got.len() != 1 || got[0] != sent {
            let first_diff = got.first().and_then(|g| g.iter().zip(&sent).position(|(a, b)| a != b));
            return Err(format!(
                "round {round} ({len} B): got {} buffers, {} bytes, first differing byte {first_diff:?}",
                got.len(),
                got.first().map_or(0, Vec::len)
            ));
        }
    }
    t.barrier(deadline()).map_err(|e| format!("barrier: {e}"))?;
    let stats = t.stats();
    if stats.collectives != sizes.len() as u64 + 1 {
        return Err(format!("stats count {} collectives, expected {}", stats.collectives, sizes.len() + 1));
    }
    Ok(format!("({} collectives, sizes {sizes:?})", stats.collectives))
}

fn throughput(t: &mut NcclTransport) -> Result<String, String> {
    const LEN: usize = 64 << 20;
    let sent = payload(LEN, 99);
    let deadline = || Instant::now() + Duration::from_secs(30);
    // Warm-up: grows the staging buffers and lets NCCL set up its channels.
    t.all_to_all_v(vec![sent.clone()], deadline()).map_err(|e| format!("warm-up: {e}"))?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let got = t.all_to_all_v(vec![sent.clone()], deadline()).map_err(|e| e.to_string())?;
        best = best.min(started.elapsed());
        if got[0] != sent {
            return Err("64 MiB payload came back different".into());
        }
    }
    let gbps = LEN as f64 / best.as_secs_f64() / 1e9;
    Ok(format!("(64 MiB host→device→NCCL→host in {:.2} ms, {gbps:.2} GB/s, best of 3)", best.as_secs_f64() * 1e3))
}

fn dead_peer(device: usize) -> Result<String, String> {
    let id = NcclId::new().map_err(|e| e.to_string())?;
    let wait = Duration::from_secs(3);
    let started = Instant::now();
    let result = NcclTransport::connect(0, 2, &id, device, started + wait);
    let took = started.elapsed();
    match result {
        Ok(mut t) => {
            // Init may finish lazily; then the first collective must fail instead.
            let err = t
                .all_to_all_v(vec![vec![1], vec![2]], Instant::now() + wait)
                .err()
                .ok_or("a collective with an absent rank succeeded")?;
            let took = started.elapsed();
            check_deadline_error(&err.to_string(), took, 2 * wait)
        }
        Err(e) => check_deadline_error(&e.to_string(), took, wait),
    }
}

fn check_deadline_error(msg: &str, took: Duration, wait: Duration) -> Result<String, String> {
    if took > wait + Duration::from_secs(2) {
        return Err(format!("failed only after {took:?} (deadline {wait:?}): {msg}"));
    }
    if !msg.contains("deadline") {
        return Err(format!("not a deadline error after {took:?}: {msg}"));
    }
    Ok(format!("(failed after {took:?}: {msg})"))
}
