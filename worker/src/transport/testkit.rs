//! Checks every [`Transport`] must pass, written once and run against each implementation.
//!
//! Each check takes a freshly built group (element r is rank r), runs every rank on its own
//! thread, and asserts on what each rank saw. Payloads are a pure function of (seed, round,
//! source, destination), so a receiver can recompute what it should have got.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Transport, TransportError};

/// Runs `f(rank, transport)` for every rank on its own thread; returns the results in rank order.
/// A panic on any rank is re-raised here, after every thread has finished.
pub(crate) fn run_ranks<T, R, F>(group: Vec<T>, f: F) -> Vec<R>
where
    T: Transport + 'static,
    R: Send + 'static,
    F: Fn(usize, T) -> R + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let handles: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(rank, t)| {
            let f = Arc::clone(&f);
            thread::Builder::new().name(format!("rank-{rank}")).spawn(move || f(rank, t)).expect("spawn a rank thread")
        })
        .collect();
    let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    joined.into_iter().map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
}

fn mix(mut x: u64) -> u64 {
    // splitmix64: cheap, and good enough that a misrouted buffer never matches by accident.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Bytes rank `src` sends rank `dst` in `round`: `len` bytes determined by all four.
pub(crate) fn payload(round: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
    let key = mix(round ^ mix((src as u64) << 32 | dst as u64));
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&mix(key ^ i).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A length mix with empty, tiny, odd and medium buffers.
fn random_len(round: u64, src: usize, dst: usize) -> usize {
    let h = mix(round.wrapping_mul(31) ^ mix((src * 1000 + dst) as u64));
    match h % 5 {
        0 => 0,
        1 => 1 + (h >> 8) as usize % 16,
        2 => 4096,
        _ => (h >> 8) as usize % 300_000,
    }
}

fn generous() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// `rounds` all_to_all_v calls with random-sized buffers, every one checked byte for byte.
pub(crate) fn check_random_exchanges<T: Transport + 'static>(group: Vec<T>, rounds: u64) {
    let world = group.len();
    run_ranks(group, move |rank, mut t| {
        assert_eq!((t.rank(), t.world()), (rank, world));
        for round in 0..rounds {
            let send = (0..world).map(|dst| payload(round, rank, dst, random_len(round, rank, dst))).collect();
            let recv = t.all_to_all_v(send, generous()).unwrap_or_else(|e| panic!("rank {rank} round {round}: {e}"));
            assert_eq!(recv.len(), world);
            for (src, got) in recv.iter().enumerate() {
                let want = payload(round, src, rank, random_len(round, src, rank));
                assert!(*got == want, "rank {rank} round {round}: wrong {} bytes from rank {src}", got.len());
            }
        }
    });
}

/// Rank 0 sends 64 MiB to the last rank (to itself when alone) while everyone else exchanges
/// small buffers, both ways at once so that a rank that wrote everything before reading would
/// deadlock.
pub(crate) fn check_large_exchange<T: Transport + 'static>(group: Vec<T>) {
    const LARGE: usize = 64 << 20;
    let world = group.len();
    let len = move |src: usize, dst: usize| {
        if (src == 0 && dst == world - 1) || (src == world - 1 && dst == 0) { LARGE } else { random_len(9, src, dst) }
    };
    run_ranks(group, move |rank, mut t| {
        let send = (0..world).map(|dst| payload(9, rank, dst, len(rank, dst))).collect();
        let recv = t.all_to_all_v(send, generous()).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        for (src, got) in recv.iter().enumerate() {
            assert!(*got == payload(9, src, rank, len(src, rank)), "rank {rank}: wrong {} bytes from {src}", got.len());
        }
        if world > 1 && (rank == 0 || rank == world - 1) {
            assert!(t.stats().bytes_received >= LARGE as u64, "{:?}", t.stats());
            assert!(t.stats().bytes_sent >= LARGE as u64, "{:?}", t.stats());
        }
    });
}

/// `n` tiny collectives in a row (the decode-step pattern), with a barrier every 100.
pub(crate) fn check_many_small<T: Transport + 'static>(group: Vec<T>, n: u32) {
    let world = group.len();
    run_ranks(group, move |rank, mut t| {
        for round in 0..n {
            let send = (0..world)
                .map(|dst| [round.to_le_bytes(), (rank as u32).to_le_bytes(), (dst as u32).to_le_bytes()].concat())
                .collect();
            let recv = t.all_to_all_v(send, generous()).unwrap_or_else(|e| panic!("rank {rank} round {round}: {e}"));
            for (src, got) in recv.iter().enumerate() {
                let want = [round.to_le_bytes(), (src as u32).to_le_bytes(), (rank as u32).to_le_bytes()].concat();
                assert_eq!(*got, want, "rank {rank} round {round} from {src}");
            }
            if round % 100 == 99 {
                t.barrier(generous()).unwrap_or_else(|e| panic!("rank {rank} barrier after {round}: {e}"));
            }
        }
        let stats = t.stats();
        assert_eq!(stats.collectives, u64::from(n + n / 100));
        assert!(stats.busy > Duration::ZERO);
    });
}

/// Rank r enters the barrier r × 100 ms late; nobody may leave before the last one entered.
pub(crate) fn check_barrier<T: Transport + 'static>(group: Vec<T>) {
    let world = group.len();
    let start = Instant::now();
    let step = Duration::from_millis(100);
    run_ranks(group, move |rank, mut t| {
        thread::sleep(step * rank as u32);
        t.barrier(generous()).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        let left = start.elapsed();
        assert!(left >= step * (world as u32 - 1), "rank {rank} left the barrier at {left:?}");
        // And a second one right after, to check barriers stay in step.
        t.barrier(generous()).unwrap_or_else(|e| panic!("rank {rank} second barrier: {e}"));
    });
}

/// `absent` holds its transport but never calls; everyone else must get `Timeout` naming it,
/// within the 300 ms deadline plus slack.
pub(crate) fn check_absent_rank_times_out<T: Transport + 'static>(group: Vec<T>, absent: usize) {
    let world = group.len();
    let results = run_ranks(group, move |rank, mut t| {
        if rank == absent {
            thread::sleep(Duration::from_millis(1500));
            return (None, t);
        }
        let started = Instant::now();
        let r = t.all_to_all_v(vec![vec![7u8; 100]; world], Instant::now() + Duration::from_millis(300));
        (Some((r, started.elapsed())), t)
    });
    for (rank, (outcome, _t)) in results.into_iter().enumerate() {
        let Some((r, took)) = outcome else { continue };
        match r {
            Err(TransportError::Timeout { peer, .. }) => assert_eq!(peer, absent, "rank {rank} blamed the wrong rank"),
            other => panic!("rank {rank}: expected a timeout, got {other:?}"),
        }
        assert!(took >= Duration::from_millis(290), "rank {rank} gave up early: {took:?}");
        assert!(took < Duration::from_secs(2), "rank {rank} returned {took:?} after a 300 ms deadline");
    }
}

/// After `after` good collectives, `victim` drops its transport `linger` after the others start
/// the next one; every other rank must get `PeerLost` naming it, well before the deadline.
pub(crate) fn check_dropped_rank_is_lost<T: Transport + 'static>(group: Vec<T>, victim: usize, after: u64) {
    check_dropped_rank_is_lost_after(group, victim, after, Duration::ZERO);
}

pub(crate) fn check_dropped_rank_is_lost_after<T: Transport + 'static>(
    group: Vec<T>,
    victim: usize,
    after: u64,
    linger: Duration,
) {
    let world = group.len();
    let results = run_ranks(group, move |rank, mut t| {
        for round in 0..after {
            let send = (0..world).map(|dst| payload(round, rank, dst, 1000)).collect();
            t.all_to_all_v(send, generous()).unwrap_or_else(|e| panic!("rank {rank} round {round}: {e}"));
        }
        if rank == victim {
            thread::sleep(linger);
            drop(t);
            return None;
        }
        let started = Instant::now();
        let r = t.all_to_all_v(vec![vec![1u8; 1000]; world], Instant::now() + Duration::from_secs(10));
        // Survivors keep their transports until every rank is done, so that the only loss any
        // of them can see is the victim's.
        Some((r, started.elapsed(), t))
    });
    for (rank, outcome) in results.into_iter().enumerate() {
        let Some((r, took, _t)) = outcome else { continue };
        match r {
            Err(TransportError::PeerLost { peer, .. }) => assert_eq!(peer, victim, "rank {rank} blamed the wrong rank"),
            other => panic!("rank {rank}: expected PeerLost, got {other:?}"),
        }
        assert!(took < Duration::from_secs(3), "rank {rank} took {took:?} to notice");
    }
}

/// After a timeout, every later call fails at once with the first error.
pub(crate) fn check_poisoning<T: Transport + 'static>(group: Vec<T>) {
    let world = group.len();
    let results = run_ranks(group, move |rank, mut t| {
        if rank != 0 {
            thread::sleep(Duration::from_millis(800));
            return (None, t);
        }
        let first = t.all_to_all_v(vec![Vec::new(); world], Instant::now() + Duration::from_millis(200));
        let started = Instant::now();
        let again = t.all_to_all_v(vec![Vec::new(); world], Instant::now() + Duration::from_secs(10));
        let barrier = t.barrier(Instant::now() + Duration::from_secs(10));
        (Some((first, again, barrier, started.elapsed(), t.stats().collectives)), t)
    });
    let (Some((first, again, barrier, took, collectives)), _) = &results[0] else { unreachable!("rank 0 reports") };
    let first = first.as_ref().expect_err("rank 1 never joined");
    assert!(matches!(first, TransportError::Timeout { .. }), "{first}");
    assert_eq!(again.as_ref().expect_err("poisoned"), &TransportError::Poisoned(Box::new(first.clone())));
    assert_eq!(barrier.as_ref().expect_err("poisoned"), &TransportError::Poisoned(Box::new(first.clone())));
    assert!(*took < Duration::from_millis(50), "poisoned calls must fail fast, took {took:?}");
    assert_eq!(*collectives, 1, "poisoned calls are not collectives");
}
