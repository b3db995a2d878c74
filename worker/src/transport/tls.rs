//! Mutual TLS for the TCP data plane, for fabrics the cluster does not trust.
//!
//! Every worker holds a certificate signed by the cluster CA and accepts only peers whose
//! certificate chains to that CA: the lower rank of each pair is the TLS server and requires a
//! client certificate, the higher rank is the client and checks the server's. rustls runs on the
//! `ring` provider (no aws-lc build), handed to each config explicitly so that no process-wide
//! default provider has to be installed.
//!
//! Session tickets and resumption are off: connections live as long as the group and are never
//! re-established, and without tickets the only post-handshake records are application data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::TransportError;

/// Where a worker's TLS material lives (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The cluster CA certificate(s) that every peer's certificate must chain to.
    pub ca_cert_pem: PathBuf,
    /// This worker's certificate chain, leaf first. It is used both as a server certificate
    /// (towards higher ranks) and as a client certificate (towards lower ranks), so it needs
    /// both the serverAuth and clientAuth extended key usages if it lists any.
    pub cert_pem: PathBuf,
    /// This worker's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: PathBuf,
    /// The name every worker certificate carries as a subject alternative name, checked by the
    /// connecting side. `None` checks the peer's IP address from the peer list instead.
    pub server_name: Option<String>,
}

impl TlsConfig {
    pub fn new(ca_cert_pem: impl Into<PathBuf>, cert_pem: impl Into<PathBuf>, key_pem: impl Into<PathBuf>) -> Self {
        TlsConfig {
            ca_cert_pem: ca_cert_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            server_name: None,
        }
    }
}

/// Loaded rustls configurations, built once per transport.
#[derive(Debug)]
pub(crate) struct TlsContext {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: Option<ServerName<'static>>,
}

fn setup_err(reason: String) -> TransportError {
    TransportError::Setup { peer: None, reason }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| setup_err(format!("reading {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(setup_err(format!("{what} {} holds no certificate", path.display())));
    }
    Ok(certs)
}

impl TlsContext {
    pub(crate) fn load(config: &TlsConfig) -> Result<TlsContext, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&config.ca_cert_pem, "CA certificate")? {
            roots.add(ca).map_err(|e| setup_err(format!("CA certificate {}: {e}", config.ca_cert_pem.display())))?;
        }
        let roots = Arc::new(roots);
        let certs = read_certs(&config.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&config.key_pem)
            .map_err(|e| setup_err(format!("reading private key {}: {e}", config.key_pem.display())))?;
        let tls_err = |side: &str, e: &dyn std::fmt::Display| setup_err(format!("TLS {side} configuration: {e}"));

        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|e| tls_err("client verifier", &e))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("server", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| tls_err("server", &e))?;
        server.send_tls13_tickets = 0;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("client", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| tls_err("client", &e))?;
        client.resumption = Resumption::disabled();

        let server_name = match &config.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone()).map_err(|e| setup_err(format!("TLS server name {name:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(TlsContext { client: Arc::new(client), server: Arc::new(server), server_name })
    }

    /// A client session towards the peer listening at `addr`.
    pub(crate) fn client(&self, addr: SocketAddr) -> Result<ClientConnection, TransportError> {
        let name = self.server_name.clone().unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        ClientConnection::new(Arc::clone(&self.client), name)
            .map_err(|e| setup_err(format!("starting a TLS session to {addr}: {e}")))
    }

    pub(crate) fn server(&self) -> Result<ServerConnection, TransportError> {
        ServerConnection::new(Arc::clone(&self.server)).map_err(|e| setup_err(format!("starting a TLS session: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_setup_errors_naming_the_file() {
        let cfg = TlsConfig::new("/nonexistent/ca.pem", "/nonexistent/cert.pem", "/nonexistent/key.pem");
        let err = TlsContext::load(&cfg).expect_err("no files");
        assert!(matches!(err, TransportError::Setup { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem file\n").expect("write");
        let cfg = TlsConfig::new(&empty, &empty, &empty);
        let err = TlsContext::load(&cfg).expect_err("no certificates");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }
}
