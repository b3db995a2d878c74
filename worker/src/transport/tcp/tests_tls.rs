//! The TCP transport inside mutual TLS, with a throwaway cluster CA made by rcgen.

use std::net::TcpListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::tests::{group_with, in_secs, latency, throughput};
use super::*;
use crate::transport::Transport;
use crate::transport::testkit;

type Ca = CertifiedIssuer<'static, KeyPair>;

fn make_ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert");
    std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).expect("write CA");
    ca
}

/// A worker certificate for 127.0.0.1 and "herd-worker", signed by `ca`, trusting `trust_ca`.
fn node(dir: &Path, ca: &Ca, name: &str, trust_ca: &str) -> TlsConfig {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "herd-worker".to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("sign");
    let (cert_path, key_path) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    TlsConfig::new(dir.join(format!("{trust_ca}.pem")), cert_path, key_path)
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = make_ca(dir.path(), "cluster-ca");
        Pki { dir, ca }
    }

    fn opts(&self, rank: usize) -> TcpOptions {
        let tls = node(self.dir.path(), &self.ca, &format!("worker-{rank}"), "cluster-ca");
        TcpOptions { cluster_token: b"tls-cluster".to_vec(), tls: Some(tls), ..TcpOptions::default() }
    }

    fn group(&self, world: usize) -> Vec<TcpTransport> {
        group_with(world, |rank| self.opts(rank))
    }
}

/// Sets up a world-2 group with per-rank options; returns both ranks' setup results.
fn try_pair(opts: [TcpOptions; 2], within: Duration) -> [Result<TcpTransport, TransportError>; 2] {
    let deadline = Instant::now() + within;
    let listeners: Vec<_> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .zip(opts)
        .enumerate()
        .map(|(rank, (listener, opts))| {
            let peers = peers.clone();
            thread::spawn(move || TcpTransport::connect(rank, 2, &peers, listener, opts, deadline))
        })
        .collect();
    let mut results = handles.into_iter().map(|h| h.join().expect("setup thread"));
    [results.next().expect("rank 0"), results.next().expect("rank 1")]
}

#[test]
fn random_exchanges_over_mutual_tls() {
    let pki = Pki::new();
    for world in [2, 3] {
        testkit::check_random_exchanges(pki.group(world), 3);
    }
}

#[test]
fn large_payload_over_mutual_tls() {
    testkit::check_large_exchange(Pki::new().group(2));
}

#[test]
fn many_small_collectives_over_mutual_tls() {
    testkit::check_many_small(Pki::new().group(3), 300);
}

#[test]
fn failures_over_tls_name_the_peer() {
    let pki = Pki::new();
    testkit::check_absent_rank_times_out(pki.group(3), 2);
    testkit::check_dropped_rank_is_lost(pki.group(3), 0, 3);
    testkit::check_dropped_rank_is_lost_after(pki.group(2), 1, 2, Duration::from_millis(100));
}

#[test]
fn checked_server_name_works_and_a_wrong_one_fails() {
    let pki = Pki::new();
    let named = |rank: usize, name: &str| {
        let mut opts = pki.opts(rank);
        if let Some(tls) = &mut opts.tls {
            tls.server_name = Some(name.to_string());
        }
        opts
    };
    let [zero, one] = try_pair([named(0, "herd-worker"), named(1, "herd-worker")], Duration::from_secs(10));
    let (mut zero, mut one) = (zero.expect("rank 0"), one.expect("rank 1"));
    let t = thread::spawn(move || zero.all_to_all_v(vec![Vec::new(), vec![1; 10]], in_secs(10)));
    assert_eq!(one.all_to_all_v(vec![vec![2; 5], Vec::new()], in_secs(10)).expect("exchange")[0], vec![1; 10]);
    assert_eq!(t.join().expect("rank 0").expect("exchange")[1], vec![2; 5]);

    let [_, one] = try_pair([named(0, "herd-worker"), named(1, "someone-else")], Duration::from_millis(1500));
    let err = one.expect_err("the certificate does not name someone-else");
    assert!(matches!(&err, TransportError::Setup { peer: Some(0), reason } if reason.contains("certificate")), "{err}");
}

#[test]
fn a_dialer_with_a_foreign_certificate_is_refused() {
    let pki = Pki::new();
    let rogue_ca = make_ca(pki.dir.path(), "rogue-ca");
    let mut rogue = pki.opts(1);
    // Signed by another CA, though it trusts the cluster's.
    rogue.tls = Some(node(pki.dir.path(), &rogue_ca, "rogue", "cluster-ca"));
    let started = Instant::now();
    let [zero, one] = try_pair([pki.opts(0), rogue], Duration::from_millis(1500));
    let zero = zero.expect_err("rank 0 refuses the rogue");
    assert!(matches!(&zero, TransportError::Setup { peer: Some(1), reason } if reason.contains("refused")), "{zero}");
    assert!(zero.to_string().to_lowercase().contains("certificate"), "{zero}");
    assert!(matches!(one, Err(TransportError::Setup { peer: Some(0), .. })), "{one:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
}

#[test]
fn an_acceptor_with_a_foreign_certificate_is_refused() {
    let pki = Pki::new();
    let rogue_ca = make_ca(pki.dir.path(), "rogue-ca");
    let mut rogue = pki.opts(0);
    rogue.tls = Some(node(pki.dir.path(), &rogue_ca, "rogue", "rogue-ca"));
    let [_, one] = try_pair([rogue, pki.opts(1)], Duration::from_millis(1500));
    let err = one.expect_err("rank 1 refuses the rogue's certificate");
    assert!(matches!(&err, TransportError::Setup { peer: Some(0), reason } if reason.contains("certificate")), "{err}");
}

#[test]
fn a_plaintext_dialer_is_refused_by_a_tls_group() {
    let pki = Pki::new();
    let plain = TcpOptions { cluster_token: b"tls-cluster".to_vec(), ..TcpOptions::default() };
    let [zero, one] = try_pair([pki.opts(0), plain], Duration::from_millis(1500));
    assert!(matches!(zero, Err(TransportError::Setup { peer: Some(1), .. })), "{zero:?}");
    assert!(matches!(one, Err(TransportError::Setup { peer: Some(0), .. })), "{one:?}");
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn measure_loopback_tls() {
    let pki = Pki::new();
    for world in [2, 4] {
        for bytes in [0, 8 << 10] {
            let median = latency(pki.group(world), bytes, 2000);
            println!("tls   world {world}: {bytes:>5} B all_to_all_v median {median:?}");
        }
    }
    let rate = throughput(pki.group(2), 64 << 20, 5);
    println!("tls   world 2: 64 MiB each way, {:.2} GB/s each way", rate / 1e9);
}
