//! quinn endpoints with herd's mutual TLS and a transport tuned for control traffic.
//!
//! One endpoint per node serves both roles: [`server_endpoint`] accepts connections and, with the
//! same node certificate as its default client config, dials out too. [`client_endpoint`] only
//! dials. Control channels are mostly idle between bursts, so a keep-alive ping
//! ([`QuicOptions::keep_alive`]) keeps them open, while the idle timeout
//! ([`QuicOptions::idle_timeout`], 30 s by default) notices a vanished peer.
//!
//! Endpoints must be created inside a tokio runtime (quinn spawns its driver there).
//!
//! In TLS 1.3 a client considers the handshake done before the server has checked the client's
//! certificate. A rejected client therefore sees [`connect`] succeed and its first stream
//! operation fail with the server's close reason; the server never hands such a connection out.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Connection, Endpoint, IdleTimeout, ServerConfig, TransportConfig};

use crate::{NetError, TlsFiles, tls};

/// How long [`connect`] waits for a handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport settings for herd's control connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicOptions {
    /// A connection with no traffic (keep-alives included) for this long is closed. The
    /// effective value is the smaller of both peers'.
    pub idle_timeout: Duration,
    /// How often an otherwise idle connection sends a ping; must be below `idle_timeout`.
    pub keep_alive: Duration,
}

impl Default for QuicOptions {
    fn default() -> QuicOptions {
        QuicOptions { idle_timeout: Duration::from_secs(30), keep_alive: Duration::from_secs(5) }
    }
}

impl QuicOptions {
    fn transport(&self) -> Result<Arc<TransportConfig>, NetError> {
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return Err(NetError::Config(format!(
                "the keep-alive interval ({:?}) must be non-zero and below the idle timeout ({:?})",
                self.keep_alive, self.idle_timeout
            )));
        }
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| NetError::Config(format!("idle timeout {:?} is too large", self.idle_timeout)))?;
        let mut transport = TransportConfig::default();
        transport.max_idle_timeout(Some(idle)).keep_alive_interval(Some(self.keep_alive));
        Ok(Arc::new(transport))
    }
}

/// An endpoint bound to `addr` that accepts mutually authenticated connections and can dial out.
pub fn server_endpoint(addr: SocketAddr, files: &TlsFiles) -> Result<Endpoint, NetError> {
    server_endpoint_with(addr, files, &QuicOptions::default())
}

/// [`server_endpoint`] with explicit transport options.
pub fn server_endpoint_with(addr: SocketAddr, files: &TlsFiles, options: &QuicOptions) -> Result<Endpoint, NetError> {
    let transport = options.transport()?;
    let crypto = QuicServerConfig::try_from(tls::server_config(files)?)
        .map_err(|e| NetError::Config(format!("QUIC server TLS: {e}")))?;
    let mut server = ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::clone(&transport));
    let mut endpoint = Endpoint::server(server, addr)?;
    endpoint.set_default_client_config(client_quic_config(files, transport)?);
    Ok(endpoint)
}

/// An endpoint that only dials out, bound to an ephemeral IPv4 port.
pub fn client_endpoint(files: &TlsFiles) -> Result<Endpoint, NetError> {
    client_endpoint_with((Ipv4Addr::UNSPECIFIED, 0).into(), files, &QuicOptions::default())
}

/// [`client_endpoint`] bound to `bind` (an IPv6 address to reach IPv6 peers) with explicit options.
pub fn client_endpoint_with(bind: SocketAddr, files: &TlsFiles, options: &QuicOptions) -> Result<Endpoint, NetError> {
    let mut endpoint = Endpoint::client(bind)?;
    endpoint.set_default_client_config(client_quic_config(files, options.transport()?)?);
    Ok(endpoint)
}

fn client_quic_config(files: &TlsFiles, transport: Arc<TransportConfig>) -> Result<ClientConfig, NetError> {
    let crypto = QuicClientConfig::try_from(tls::client_config(files)?)
        .map_err(|e| NetError::Config(format!("QUIC client TLS: {e}")))?;
    let mut client = ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    Ok(client)
}

/// Dials `addr`, expecting its certificate to be valid for `server_name` (a node name, or a
/// host or IP address from its certificate), within [`CONNECT_TIMEOUT`].
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr, server_name: &str) -> Result<Connection, NetError> {
    connect_within(endpoint, addr, server_name, CONNECT_TIMEOUT).await
}

/// [`connect`] with an explicit timeout.
pub async fn connect_within(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<Connection, NetError> {
    let connecting = endpoint.connect(addr, server_name).map_err(|source| NetError::Connect { addr, source })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(NetError::Timeout { what: format!("connecting to {server_name} at {addr}"), after: timeout }),
    }
}

/// The next incoming connection whose handshake succeeded (client certificate verified), or
/// `Err` for one that failed; `None` once the endpoint is closed. Servers loop on this, logging
/// and skipping errors.
pub async fn accept(endpoint: &Endpoint) -> Option<Result<Connection, NetError>> {
    let incoming = endpoint.accept().await?;
    Some(incoming.await.map_err(NetError::from))
}
