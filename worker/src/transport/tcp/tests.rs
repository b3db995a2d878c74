//! TCP transport over real loopback sockets: the shared conformance checks, setup, and a
//! latency/throughput measurement (ignored by default; run it with `--ignored --nocapture`).

use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::transport::Transport;
use crate::transport::testkit;

/// Binds `world` listeners on 127.0.0.1 and connects them as a group, one thread per rank.
pub(super) fn group(world: usize, opts: TcpOptions) -> Vec<TcpTransport> {
    group_with(world, |_| opts.clone())
}

/// Like [`group`], with per-rank options.
pub(super) fn group_with(world: usize, opts: impl Fn(usize) -> TcpOptions) -> Vec<TcpTransport> {
    let listeners: Vec<TcpListener> =
        (0..world).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().expect("local addr")).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (addrs, opts) = (addrs.clone(), opts(rank));
            thread::spawn(move || TcpTransport::connect(rank, world, &addrs, listener, opts, deadline))
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(rank, h)| h.join().expect("setup thread").unwrap_or_else(|e| panic!("rank {rank} setup: {e}")))
        .collect()
}

pub(super) fn in_secs(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

#[test]
fn random_exchanges_for_worlds_1_to_4() {
    for world in 1..=4 {
        testkit::check_random_exchanges(group(world, TcpOptions::default()), 3);
    }
}

#[test]
fn large_payload_both_ways_at_world_2() {
    testkit::check_large_exchange(group(2, TcpOptions::default()));
}

#[test]
fn large_payload_among_small_ones_at_world_4() {
    testkit::check_large_exchange(group(4, TcpOptions::default()));
}

#[test]
fn a_thousand_small_collectives() {
    testkit::check_many_small(group(4, TcpOptions::default()), 1000);
}

#[test]
fn barrier_waits_for_the_last_rank() {
    testkit::check_barrier(group(3, TcpOptions::default()));
}

#[test]
fn absent_rank_times_out_everyone_within_the_deadline() {
    testkit::check_absent_rank_times_out(group(3, TcpOptions::default()), 1);
}

#[test]
fn closed_rank_is_peer_lost() {
    testkit::check_dropped_rank_is_lost(group(4, TcpOptions::default()), 1, 5);
}

#[test]
fn rank_closed_with_unread_data_is_peer_lost() {
    // Closing a socket with unread data sends a reset instead of a FIN.
    testkit::check_dropped_rank_is_lost_after(group(3, TcpOptions::default()), 2, 3, Duration::from_millis(150));
}

#[test]
fn errors_poison_the_transport() {
    testkit::check_poisoning(group(2, TcpOptions::default()));
}

#[test]
fn stats_count_wire_bytes() {
    let results = testkit::run_ranks(group(2, TcpOptions::default()), |rank, mut t| {
        t.all_to_all_v(vec![vec![rank as u8; 100], vec![rank as u8; 100]], in_secs(10)).expect("exchange");
        t.barrier(in_secs(10)).expect("barrier");
        t.stats()
    });
    for stats in results {
        assert_eq!(stats.collectives, 2);
        // One 100-byte frame and one empty barrier frame each way; our own buffer never counts.
        assert_eq!(stats.bytes_sent, (HEADER_LEN + 100 + HEADER_LEN) as u64);
        assert_eq!(stats.bytes_received, stats.bytes_sent);
    }
}

#[test]
fn oversized_send_is_a_usage_error_before_anything_is_sent() {
    let opts = TcpOptions { max_frame_bytes: 10, ..TcpOptions::default() };
    let results = testkit::run_ranks(group(2, opts), |rank, mut t| {
        if rank == 0 {
            let r = t.all_to_all_v(vec![Vec::new(), vec![0; 11]], in_secs(10));
            (Some(r), t)
        } else {
            let r = t.all_to_all_v(vec![Vec::new(), Vec::new()], Instant::now() + Duration::from_millis(300));
            (Some(r), t)
        }
    });
    let err = results[0].0.as_ref().and_then(|r| r.as_ref().err()).expect("rank 0 fails");
    assert!(matches!(err, TransportError::Usage(m) if m.contains("max_frame_bytes")), "{err}");
    let err = results[1].0.as_ref().and_then(|r| r.as_ref().err()).expect("rank 1 hears nothing");
    assert!(matches!(err, TransportError::Timeout { peer: 0, .. }), "{err}");
}

#[test]
fn wrong_buffer_count_is_a_usage_error() {
    let mut group = group(1, TcpOptions::default());
    let err = group[0].all_to_all_v(vec![Vec::new(), Vec::new()], in_secs(1)).expect_err("two buffers for world 1");
    assert!(matches!(err, TransportError::Usage(_)), "{err}");
}

#[test]
fn setup_arguments_are_checked() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let err = TcpTransport::connect(2, 2, &[addr, addr], listener, TcpOptions::default(), in_secs(1))
        .expect_err("rank 2 of 2");
    assert!(matches!(err, TransportError::Usage(_)), "{err}");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let opts = TcpOptions { cluster_token: vec![0; 257], ..TcpOptions::default() };
    let err = TcpTransport::connect(0, 1, &[addr], listener, opts, in_secs(1)).expect_err("long token");
    assert!(matches!(err, TransportError::Usage(_)), "{err}");
}

#[test]
fn dialing_retries_until_the_peer_listens() {
    // Reserve a port, free it, and let rank 0 bind it only after rank 1 has started dialing.
    let port_holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addrs = vec![port_holder.local_addr().expect("addr"), "127.0.0.1:0".parse().expect("addr")];
    drop(port_holder);
    let late_addrs = addrs.clone();
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(400));
        TcpTransport::bind_and_connect(0, &late_addrs, TcpOptions::default(), in_secs(10))
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let started = Instant::now();
    let mut one = TcpTransport::connect(1, 2, &addrs, listener, TcpOptions::default(), in_secs(10)).expect("rank 1");
    assert!(started.elapsed() >= Duration::from_millis(300), "rank 0 was not listening yet");
    let mut zero = late.join().expect("rank 0 thread").expect("rank 0");
    let t = thread::spawn(move || zero.all_to_all_v(vec![vec![0], vec![1]], in_secs(10)));
    assert_eq!(one.all_to_all_v(vec![vec![2], vec![3]], in_secs(10)).expect("exchange")[0], vec![1]);
    assert_eq!(t.join().expect("rank 0").expect("exchange")[1], vec![2]);
}

#[test]
fn missing_peer_fails_setup_at_the_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addrs = vec![listener.local_addr().expect("addr"), "127.0.0.1:9".parse().expect("addr")];
    let started = Instant::now();
    let err = TcpTransport::connect(
        0,
        2,
        &addrs,
        listener,
        TcpOptions::default(),
        Instant::now() + Duration::from_millis(300),
    )
    .expect_err("rank 1 never dials");
    assert!(matches!(err, TransportError::Setup { peer: Some(1), .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    // And the dialing side: nobody listens on the discard port.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addrs = vec!["127.0.0.1:9".parse().expect("addr"), listener.local_addr().expect("addr")];
    let started = Instant::now();
    let err = TcpTransport::connect(
        1,
        2,
        &addrs,
        listener,
        TcpOptions::default(),
        Instant::now() + Duration::from_millis(300),
    )
    .expect_err("rank 0 never listens");
    assert!(
        matches!(&err, TransportError::Setup { peer: Some(0), reason } if reason.contains("could not reach")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

const CHILD_ENV: &str = "HERD_TRANSPORT_TEST_PARENT";

/// Rank 1 of [`killed_process_is_peer_lost`], run in a child process: exchanges until killed.
#[test]
#[ignore = "runs only as the child process of killed_process_is_peer_lost"]
fn child_rank() {
    let Some(parent) = std::env::var(CHILD_ENV).ok().and_then(|a| a.parse::<SocketAddr>().ok()) else { return };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let peers = [parent, listener.local_addr().expect("addr")];
    let mut t = TcpTransport::connect(1, 2, &peers, listener, TcpOptions::default(), in_secs(20)).expect("setup");
    // Stops when the parent goes away (or after a while if it hangs).
    while t.all_to_all_v(vec![vec![1; 1000], vec![1; 1000]], in_secs(20)).is_ok() {}
}

#[test]
fn killed_process_is_peer_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "transport::tcp::tests::child_rank", "--ignored", "--quiet"])
        .env(CHILD_ENV, addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child rank");
    let peers = [addr, "127.0.0.1:9".parse().expect("addr")];
    let mut t = TcpTransport::connect(0, 2, &peers, listener, TcpOptions::default(), in_secs(30)).expect("setup");
    for _ in 0..20 {
        let recv = t.all_to_all_v(vec![vec![0; 1000], vec![0; 1000]], in_secs(20)).expect("exchange");
        assert_eq!(recv[1], vec![1; 1000]);
    }
    child.kill().expect("SIGKILL the child");
    let started = Instant::now();
    // The child may have sent its next frame before it died; the loss shows on a later call.
    let err = loop {
        if let Err(e) = t.all_to_all_v(vec![vec![0; 1000], vec![0; 1000]], in_secs(10)) {
            break e;
        }
    };
    assert!(matches!(err, TransportError::PeerLost { peer: 1, .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    child.wait().expect("reap the child");
}

/// Median time of `iters` all_to_all_v calls of `bytes` per peer, measured on rank 0.
pub(super) fn latency(group: Vec<TcpTransport>, bytes: usize, iters: usize) -> Duration {
    let world = group.len();
    let mut times = testkit::run_ranks(group, move |rank, mut t| {
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters + 50 {
            let send = vec![vec![rank as u8; bytes]; world];
            let started = Instant::now();
            let recv = t.all_to_all_v(send, in_secs(30)).expect("exchange");
            if i >= 50 {
                times.push(started.elapsed());
            }
            assert_eq!(recv[(rank + 1) % world].len(), bytes);
        }
        times
    })
    .swap_remove(0);
    times.sort();
    times[times.len() / 2]
}

/// Bytes per second each way of one `bytes`-sized exchange at world 2 (best of `reps`).
pub(super) fn throughput(group: Vec<TcpTransport>, bytes: usize, reps: usize) -> f64 {
    let best = testkit::run_ranks(group, move |rank, mut t| {
        let mut best = Duration::MAX;
        for _ in 0..reps {
            let send = vec![vec![rank as u8; bytes], vec![rank as u8; bytes]];
            t.barrier(in_secs(30)).expect("barrier");
            let started = Instant::now();
            let recv = t.all_to_all_v(send, in_secs(60)).expect("exchange");
            best = best.min(started.elapsed());
            assert_eq!(recv[1 - rank].len(), bytes);
        }
        best
    });
    bytes as f64 / best[0].as_secs_f64()
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn measure_loopback() {
    for world in [2, 4] {
        for bytes in [0, 8 << 10] {
            let median = latency(group(world, TcpOptions::default()), bytes, 2000);
            println!("plain world {world}: {bytes:>5} B all_to_all_v median {median:?}");
        }
    }
    let rate = throughput(group(2, TcpOptions::default()), 64 << 20, 5);
    println!("plain world 2: 64 MiB each way, {:.2} GB/s each way", rate / 1e9);
}
