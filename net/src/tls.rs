//! rustls configurations for mutual TLS inside the cluster.
//!
//! - The server *requires* a client certificate that chains to the cluster CA
//!   (`WebPkiClientVerifier` over a root store holding only the CA).
//! - The client trusts only the cluster CA (no system roots) and presents the node certificate.
//! - Both speak TLS 1.3 only (QUIC requires it) with ALPN [`ALPN`], on the `ring` provider handed
//!   to each builder explicitly: no process-wide default provider is ever installed or relied on.
//! - No session tickets or resumption: control connections are long-lived, and every new one
//!   re-checks the peer's certificate against the current CA files.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{NetError, TlsFiles};

/// The ALPN protocol herd's QUIC connections negotiate; a peer without it is refused.
pub const ALPN: &[u8] = b"herd/1";

/// The crypto provider every herd TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that accepts only clients presenting a certificate from the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, NetError> {
    let provider = provider();
    let verifier = client_verifier(files, Arc::clone(&provider))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(files.chain.clone(), files.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config that trusts only the cluster CA and authenticates with the node certificate.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, NetError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(files)?)
        .with_client_auth_cert(files.chain.clone(), files.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Checks that the key belongs to the leaf certificate and that the chain verifies against the
/// CA for client use (serverAuth is checked by the dialling peer, together with the name).
pub fn check_files(files: &TlsFiles) -> Result<(), NetError> {
    let Some((leaf, intermediates)) = files.chain.split_first() else {
        return Err(NetError::Config("no node certificate".into()));
    };
    let provider = provider();
    rustls::sign::CertifiedKey::from_der(files.chain.clone(), files.key.clone_key(), &provider)?;
    client_verifier(files, provider)?.verify_client_cert(leaf, intermediates, UnixTime::now())?;
    Ok(())
}

fn root_store(files: &TlsFiles) -> Result<RootCertStore, NetError> {
    if files.ca.is_empty() {
        return Err(NetError::Config("no CA certificate to trust".into()));
    }
    let mut roots = RootCertStore::empty();
    for ca in &files.ca {
        roots.add(ca.clone())?;
    }
    Ok(roots)
}

fn client_verifier(files: &TlsFiles, provider: Arc<CryptoProvider>) -> Result<Arc<dyn ClientCertVerifier>, NetError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(files)?), provider)
        .build()
        .map_err(|e| NetError::Config(format!("client certificate verifier: {e}")))
}
