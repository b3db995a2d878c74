//! The cluster CA on disk: create it, issue node certificates, load one node's TLS material.
//!
//! A CA directory holds PEM files:
//! - `ca.pem`, `ca.key`: the self-signed cluster CA (ECDSA P-256). Every node needs `ca.pem`;
//!   only the machine that issues certificates needs `ca.key`.
//! - `NAME.pem`, `NAME.key`: one node's certificate and key. [`init_ca`] writes the first one,
//!   `node`; [`issue`] writes the others.
//!
//! Every node certificate is both a TLS server and a TLS client certificate (serverAuth and
//! clientAuth), because one QUIC endpoint per node both accepts and dials. Its subject
//! alternative names are the node name first (as a DNS name, so that the name is the node's
//! [identity](crate::identity) and a peer can be dialled by name whatever its address),
//! then the hosts: IP addresses where they parse as one, DNS names otherwise.
//!
//! Nothing is ever overwritten: files are created with `create_new`, private keys with mode
//! 0600 in a directory created 0700. Certificates are valid from yesterday (clock skew) for
//! [`VALIDITY_YEARS`].
//!
//! [`issue`] rebuilds the CA's issuer from `ca.key` and the subject shape that [`init_ca`]
//! writes (common name `herd cluster CA <key id>`, organization `herd`; no X.509 parser is
//! linked), checks that `ca.key` belongs to `ca.pem`, and verifies the
//! new certificate against `ca.pem` before writing it, so a CA made by other tools fails with a
//! clear error rather than yielding certificates that no peer accepts.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::{NetError, identity, tls};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA private key's file name in a CA directory.
pub const CA_KEY: &str = "ca.key";
/// The name of the node certificate that [`init_ca`] issues.
pub const FIRST_NODE: &str = "node";
/// How long the CA and node certificates are valid.
pub const VALIDITY_YEARS: i32 = 10;

const CA_COMMON_NAME: &str = "herd cluster CA";
const ORGANIZATION: &str = "herd";

/// One node certificate written to disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The node name (the certificate's common name and first DNS name).
    pub name: String,
    /// `DIR/NAME.pem`.
    pub cert: PathBuf,
    /// `DIR/NAME.key` (mode 0600).
    pub key: PathBuf,
    /// The subject alternative names, in certificate order.
    pub subject_alt_names: Vec<String>,
}

/// What [`init_ca`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaInit {
    /// `DIR/ca.pem`.
    pub ca_cert: PathBuf,
    /// `DIR/ca.key` (mode 0600).
    pub ca_key: PathBuf,
    /// The first node certificate, `node`.
    pub node: IssuedCert,
}

/// Creates the cluster CA in `dir` (created if missing) and a first node certificate named
/// `node` for `hosts`. Refuses to touch a directory that already holds a CA.
pub fn init_ca(dir: &Path, hosts: &[String]) -> Result<CaInit, NetError> {
    let sans = subject_alt_names(FIRST_NODE, hosts)?;
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for path in [&ca_cert, &ca_key] {
        if path.exists() {
            return Err(NetError::CaExists { path: path.clone() });
        }
    }
    let (node_cert, node_key) = node_paths(dir, FIRST_NODE);
    refuse_existing(&[&node_cert, &node_key])?;
    create_dir(dir)?;

    let key = KeyPair::generate()?;
    // A name of its own per CA, so a certificate from another herd cluster's CA is an unknown
    // issuer to this one rather than a bad signature by a namesake.
    let key_id = CertificateParams::default().key_identifier(&key);
    let common_name =
        format!("{CA_COMMON_NAME} {}", key_id.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>());
    let params = ca_params(&common_name);
    let cert = params.self_signed(&key)?;
    write_new(&ca_key, &key.serialize_pem(), true)?;
    write_new(&ca_cert, &cert.pem(), false)?;
    let issuer = Issuer::new(params, key);
    let node = sign_node(FIRST_NODE, &sans, &issuer)?;
    write_node(dir, FIRST_NODE, &node)?;
    Ok(CaInit { ca_cert, ca_key, node: node_summary(dir, FIRST_NODE, &sans) })
}

/// Issues `DIR/NAME.pem` and `DIR/NAME.key`, signed by the CA in `dir`, for `hosts`.
/// Refuses to overwrite an existing certificate of that name.
pub fn issue(dir: &Path, name: &str, hosts: &[String]) -> Result<IssuedCert, NetError> {
    let sans = subject_alt_names(name, hosts)?;
    let (cert_path, key_path) = node_paths(dir, name);
    refuse_existing(&[&cert_path, &key_path])?;
    let ca_cert_path = dir.join(CA_CERT);
    let ca = read_certs(&ca_cert_path)?;
    let issuer = load_issuer(dir, &ca[0])?;
    let node = sign_node(name, &sans, &issuer)?;

    // Only write what every peer will accept.
    let files = TlsFiles {
        name: name.to_string(),
        ca,
        chain: vec![node.cert.der().clone()],
        key: PrivateKeyDer::try_from(node.key.serialize_der())
            .map_err(|e| NetError::Config(format!("the new private key: {e}")))?,
    };
    tls::check_files(&files).map_err(|e| NetError::File {
        path: ca_cert_path.clone(),
        reason: format!(
            "a certificate signed with {CA_KEY} does not verify against it ({e}); was it made by `herd ca init`?"
        ),
    })?;
    write_node(dir, name, &node)?;
    Ok(node_summary(dir, name, &sans))
}

/// One node's TLS material: the cluster CA certificate(s) to trust, the node's certificate
/// chain (leaf first) and its private key.
#[derive(Debug)]
pub struct TlsFiles {
    /// The node's identity as its peers see it ([`identity::cert_identity`] of the leaf).
    pub name: String,
    /// Trusted CA certificates (usually one; several during a CA rotation).
    pub ca: Vec<CertificateDer<'static>>,
    /// The node certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsFiles {
    fn clone(&self) -> TlsFiles {
        TlsFiles { name: self.name.clone(), ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl TlsFiles {
    /// Loads `DIR/ca.pem`, `DIR/NAME.pem` and `DIR/NAME.key`.
    pub fn load(dir: &Path, name: &str) -> Result<TlsFiles, NetError> {
        let (cert, key) = node_paths(dir, name);
        TlsFiles::from_pem_files(&dir.join(CA_CERT), &cert, &key)
    }

    /// Loads TLS material from explicit paths (for certificates laid out by other tools).
    /// Checks that the key belongs to the certificate and that the certificate chains to the CA,
    /// so a misconfigured node fails here, naming the file, rather than in every handshake.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<TlsFiles, NetError> {
        let ca_certs = read_certs(ca)?;
        let chain = read_certs(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| NetError::File { path: key.to_path_buf(), reason: format!("reading a private key: {e}") })?;
        let name = identity::cert_identity(&chain[0])
            .map_err(|e| NetError::File { path: cert.to_path_buf(), reason: e.to_string() })?;
        let files = TlsFiles { name, ca: ca_certs, chain, key: key_der };
        tls::check_files(&files).map_err(|e| NetError::File {
            path: cert.to_path_buf(),
            reason: format!("not usable with {} and {}: {e}", ca.display(), key.display()),
        })?;
        Ok(files)
    }
}

/// `DIR/NAME.pem` and `DIR/NAME.key`.
fn node_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

fn node_summary(dir: &Path, name: &str, sans: &[SanType]) -> IssuedCert {
    let (cert, key) = node_paths(dir, name);
    let subject_alt_names = sans
        .iter()
        .map(|san| match san {
            SanType::DnsName(dns) => dns.as_str().to_string(),
            SanType::IpAddress(ip) => ip.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    IssuedCert { name: name.to_string(), cert, key, subject_alt_names }
}

/// The CA's parameters. [`issue`] rebuilds the issuer from these and the common name in
/// `ca.pem`, so the subject's shape must never change between `init_ca` and `issue`.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params);
    params
}

struct SignedNode {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn sign_node(name: &str, sans: &[SanType], issuer: &Issuer<'_, KeyPair>) -> Result<SignedNode, NetError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    params.subject_alt_names = sans.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(SignedNode { cert, key })
}

fn write_node(dir: &Path, name: &str, node: &SignedNode) -> Result<(), NetError> {
    let (cert_path, key_path) = node_paths(dir, name);
    write_new(&key_path, &node.key.serialize_pem(), true)?;
    write_new(&cert_path, &node.cert.pem(), false)
}

/// Reads `ca.key` and checks it belongs to `ca_cert`.
fn load_issuer(dir: &Path, ca_cert: &CertificateDer<'_>) -> Result<Issuer<'static, KeyPair>, NetError> {
    let key_path = dir.join(CA_KEY);
    let pem = fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, &e))?;
    let key = KeyPair::from_pem(&pem)
        .map_err(|e| NetError::File { path: key_path.clone(), reason: format!("not a usable CA key: {e}") })?;
    let parsed = webpki::EndEntityCert::try_from(ca_cert)
        .map_err(|e| NetError::File { path: dir.join(CA_CERT), reason: format!("not a parsable certificate: {e}") })?;
    if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info().as_slice() {
        return Err(NetError::File { path: key_path, reason: format!("this key does not belong to {CA_CERT}") });
    }
    let common_name = identity::common_name(parsed.subject()).ok_or_else(|| NetError::File {
        path: dir.join(CA_CERT),
        reason: "the CA certificate has no common name; was it made by `herd ca init`?".into(),
    })?;
    Ok(Issuer::new(ca_params(&common_name), key))
}

/// The node name as a DNS name, then each host (IP address or DNS name), without repeats.
fn subject_alt_names(name: &str, hosts: &[String]) -> Result<Vec<SanType>, NetError> {
    validate_name(name)?;
    let mut sans = vec![dns_san(name, "node name")?];
    for host in hosts {
        let host = host.trim();
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if host.is_empty() || !matches!(ServerName::try_from(host), Ok(ServerName::DnsName(_))) {
                    return Err(NetError::BadName {
                        what: "host",
                        value: host.to_string(),
                        reason: "neither an IP address nor a DNS name".into(),
                    });
                }
                dns_san(host, "host")?
            }
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn dns_san(name: &str, what: &'static str) -> Result<SanType, NetError> {
    let ia5 = name.to_string().try_into().map_err(|e: rcgen::Error| NetError::BadName {
        what,
        value: name.to_string(),
        reason: e.to_string(),
    })?;
    Ok(SanType::DnsName(ia5))
}

/// Node names become file names and DNS names: letters, digits, `-` and `.`, not an IP
/// address, and not `ca` (the CA's own files).
fn validate_name(name: &str) -> Result<(), NetError> {
    let bad = |reason: &str| {
        Err(NetError::BadName { what: "node name", value: name.to_string(), reason: reason.to_string() })
    };
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return bad("may hold only ASCII letters, digits, '-' and '.'");
    }
    if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) {
        return bad("must start and end with a letter or digit");
    }
    if name.parse::<IpAddr>().is_ok() {
        return bad("must be a name, not an IP address (pass addresses as hosts)");
    }
    if name == "ca" {
        return bad("`ca` is the name of the CA's own files");
    }
    if !matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_))) {
        return bad("not a valid DNS name");
    }
    Ok(())
}

fn refuse_existing(paths: &[&PathBuf]) -> Result<(), NetError> {
    match paths.iter().find(|p| p.exists()) {
        Some(path) => Err(NetError::Exists { path: (*path).clone() }),
        None => Ok(()),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| NetError::File { path: path.to_path_buf(), reason: format!("reading certificates: {e}") })?;
    if certs.is_empty() {
        return Err(NetError::File { path: path.to_path_buf(), reason: "holds no PEM certificate".into() });
    }
    Ok(certs)
}

fn file_err(path: &Path, e: &std::io::Error) -> NetError {
    NetError::File { path: path.to_path_buf(), reason: e.to_string() }
}

fn create_dir(dir: &Path) -> Result<(), NetError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| file_err(dir, &e))
}

/// Creates `path` (never replacing a file) and writes `contents`; `secret` files get mode 0600.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), NetError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => NetError::Exists { path: path.to_path_buf() },
        _ => file_err(path, &e),
    })?;
    #[cfg(unix)]
    if secret {
        // The umask can only remove bits; make the mode exact anyway.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| file_err(path, &e))?;
    }
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| file_err(path, &e))
}

/// Valid from the start of yesterday (UTC) for [`VALIDITY_YEARS`].
fn set_validity(params: &mut CertificateParams) {
    let today = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    // Day 28 at most: a leap day has no twin ten years on.
    params.not_after = rcgen::date_time_ymd(y + VALIDITY_YEARS, m, d.min(28));
}

/// Days since 1970-01-01 to a (year, month, day) civil date (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month as u8, day as u8)
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
