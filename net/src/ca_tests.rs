//! The cluster CA on disk: init, issue, load, and every refusal.

use super::*;

fn hosts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn valid_for(files: &TlsFiles, name: &str) -> bool {
    let cert = webpki::EndEntityCert::try_from(&files.chain[0]).expect("parse");
    let name = ServerName::try_from(name).expect("server name");
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

#[test]
fn init_writes_the_ca_and_a_loadable_node_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    let init = init_ca(&dir, &hosts(&["127.0.0.1", "localhost", "::1"])).expect("init");
    assert_eq!(init.ca_cert, dir.join("ca.pem"));
    assert_eq!(init.ca_key, dir.join("ca.key"));
    assert_eq!(init.node.name, "node");
    assert_eq!(init.node.cert, dir.join("node.pem"));
    assert_eq!(init.node.subject_alt_names, ["node", "127.0.0.1", "localhost", "::1"]);
    for path in [&init.ca_cert, &init.ca_key, &init.node.cert, &init.node.key] {
        assert!(path.is_file(), "{} missing", path.display());
    }
    let files = TlsFiles::load(&dir, "node").expect("load");
    assert_eq!(files.name, "node");
    assert_eq!((files.ca.len(), files.chain.len()), (1, 1));
    for name in ["node", "localhost", "127.0.0.1", "::1"] {
        assert!(valid_for(&files, name), "not valid for {name}");
    }
    assert!(!valid_for(&files, "example.com"));
}

#[test]
fn issue_signs_more_nodes_with_the_same_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    init_ca(tmp.path(), &[]).expect("init");
    let issued = issue(tmp.path(), "worker-1", &hosts(&["10.0.0.7", "gpu7.example.net", "worker-1"])).expect("issue");
    assert_eq!(issued.subject_alt_names, ["worker-1", "10.0.0.7", "gpu7.example.net"]);
    let files = TlsFiles::load(tmp.path(), "worker-1").expect("load");
    assert_eq!(files.name, "worker-1");
    assert!(valid_for(&files, "10.0.0.7") && valid_for(&files, "gpu7.example.net"));
    let node = TlsFiles::load(tmp.path(), "node").expect("load node");
    assert_eq!(node.ca, files.ca);

    let again = issue(tmp.path(), "worker-1", &[]).expect_err("re-issue");
    assert!(matches!(again, NetError::Exists { .. }), "{again}");
}

#[test]
fn init_twice_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    init_ca(tmp.path(), &hosts(&["127.0.0.1"])).expect("init");
    let before = fs::read(tmp.path().join("ca.pem")).expect("read");
    let err = init_ca(tmp.path(), &hosts(&["127.0.0.1"])).expect_err("second init");
    assert!(matches!(err, NetError::CaExists { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem") && err.to_string().contains("refusing"), "{err}");
    assert_eq!(fs::read(tmp.path().join("ca.pem")).expect("read"), before);
}

#[cfg(unix)]
#[test]
fn private_keys_are_0600() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fresh");
    init_ca(&dir, &[]).expect("init");
    issue(&dir, "coord-1", &[]).expect("issue");
    let mode = |name: &str| fs::metadata(dir.join(name)).expect("stat").permissions().mode() & 0o777;
    for key in ["ca.key", "node.key", "coord-1.key"] {
        assert_eq!(mode(key), 0o600, "{key}");
    }
    assert_eq!(fs::metadata(&dir).expect("stat").permissions().mode() & 0o777, 0o700);
    assert_eq!(mode("ca.pem") & 0o600, 0o600);
}

#[test]
fn bad_names_and_hosts_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = init_ca(tmp.path(), &hosts(&["no spaces"])).expect_err("bad host");
    assert!(matches!(err, NetError::BadName { what: "host", .. }), "{err}");
    assert!(!tmp.path().join("ca.pem").exists());
    init_ca(tmp.path(), &[]).expect("init");
    for name in ["ca", "", "../escape", "a/b", "-x", "10.0.0.1", "ünï"] {
        let err = issue(tmp.path(), name, &[]).expect_err(name);
        assert!(matches!(err, NetError::BadName { what: "node name", .. }), "{name}: {err}");
    }
    let err = issue(tmp.path(), "w", &hosts(&[""])).expect_err("empty host");
    assert!(matches!(err, NetError::BadName { what: "host", .. }), "{err}");
}

#[test]
fn issue_without_a_ca_names_the_missing_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = issue(tmp.path(), "worker-1", &[]).expect_err("no CA");
    assert!(err.to_string().contains("ca.pem"), "{err}");
}

#[test]
fn issue_refuses_a_ca_key_that_does_not_belong_to_ca_pem() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    init_ca(a.path(), &[]).expect("init a");
    init_ca(b.path(), &[]).expect("init b");
    fs::remove_file(a.path().join("ca.key")).expect("rm");
    fs::copy(b.path().join("ca.key"), a.path().join("ca.key")).expect("cp");
    let err = issue(a.path(), "worker-1", &[]).expect_err("mismatched key");
    assert!(err.to_string().contains("ca.key") && err.to_string().contains("does not belong"), "{err}");
    assert!(!a.path().join("worker-1.pem").exists());
}

#[test]
fn every_ca_has_a_name_of_its_own() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    init_ca(a.path(), &[]).expect("init a");
    init_ca(b.path(), &[]).expect("init b");
    let cn = |dir: &Path| {
        let ca = read_certs(&dir.join(CA_CERT)).expect("ca.pem");
        let parsed = webpki::EndEntityCert::try_from(&ca[0]).expect("parse");
        identity::common_name(parsed.subject()).expect("common name")
    };
    let (cn_a, cn_b) = (cn(a.path()), cn(b.path()));
    assert!(cn_a.starts_with("herd cluster CA ") && cn_a.len() == "herd cluster CA ".len() + 8, "{cn_a}");
    assert_ne!(cn_a, cn_b);
}

#[test]
fn load_errors_name_the_missing_or_bad_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = TlsFiles::load(tmp.path(), "node").expect_err("nothing there");
    assert!(err.to_string().contains(&tmp.path().join("ca.pem").display().to_string()), "{err}");

    init_ca(tmp.path(), &[]).expect("init");
    fs::remove_file(tmp.path().join("node.key")).expect("rm");
    let err = TlsFiles::load(tmp.path(), "node").expect_err("no key");
    assert!(err.to_string().contains("node.key"), "{err}");

    fs::write(tmp.path().join("node.key"), "-----BEGIN PRIVATE KEY-----\nnot base64!\n").expect("write");
    let err = TlsFiles::load(tmp.path(), "node").expect_err("bad key");
    assert!(err.to_string().contains("node.key"), "{err}");

    let err = TlsFiles::load(tmp.path(), "absent").expect_err("no cert");
    assert!(err.to_string().contains("absent.pem"), "{err}");

    fs::write(tmp.path().join("empty.pem"), "hello\n").expect("write");
    fs::write(tmp.path().join("empty.key"), "hello\n").expect("write");
    let err = TlsFiles::load(tmp.path(), "empty").expect_err("no PEM");
    assert!(err.to_string().contains("empty.pem") && err.to_string().contains("no PEM"), "{err}");
}

#[test]
fn load_refuses_a_certificate_from_another_ca_or_a_foreign_key() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    init_ca(a.path(), &[]).expect("init a");
    init_ca(b.path(), &[]).expect("init b");
    fs::copy(b.path().join("node.pem"), a.path().join("alien.pem")).expect("cp");
    fs::copy(b.path().join("node.key"), a.path().join("alien.key")).expect("cp");
    let err = TlsFiles::load(a.path(), "alien").expect_err("foreign CA");
    assert!(err.to_string().contains("alien.pem"), "{err}");

    issue(a.path(), "w2", &[]).expect("issue");
    fs::copy(a.path().join("node.key"), a.path().join("mixed.key")).expect("cp");
    fs::copy(a.path().join("w2.pem"), a.path().join("mixed.pem")).expect("cp");
    let err = TlsFiles::load(a.path(), "mixed").expect_err("key of another cert");
    assert!(err.to_string().contains("mixed.pem"), "{err}");
}

#[test]
fn civil_dates_from_days() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    assert_eq!(civil_from_days(-1), (1969, 12, 31));
}
