//! `herd-net`: the secure networking that coordinators and workers share.
//!
//! Coordinators talk Raft to each other, and coordinators and workers talk over control
//! channels; all of it runs over QUIC with mutual TLS from one cluster CA. A connection is made
//! in four steps, one module each:
//!
//! 1. [`ca`]: the cluster CA on disk. `herd ca init` writes `ca.pem`/`ca.key` and a first node
//!    certificate, `herd ca issue` the others; [`TlsFiles::load`] reads one node's material.
//! 2. [`tls`]: rustls configurations from those files: the server *requires* a client
//!    certificate chaining to the cluster CA, the client trusts only the cluster CA and presents
//!    its node certificate. ALPN [`tls::ALPN`], the `ring` provider passed explicitly.
//! 3. [`quic`]: one quinn endpoint per node that both accepts and dials, with keep-alives so idle
//!    control channels stay open; [`quic::connect`] bounds the handshake with a timeout.
//! 4. [`channel`]: an ordered, bidirectional channel of typed messages over one QUIC stream,
//!    each message one [`frame`] (magic, protocol version, bounded length, bincode payload).
//!
//! [`identity`] names the node at the other end of a connection from its certificate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herd_net::NetError> {
//! use herd_net::{Channel, FrameCodec, TlsFiles, quic};
//! let files = TlsFiles::load("/etc/herd/pki".as_ref(), "worker-1")?;
//! let endpoint = quic::server_endpoint("10.0.0.5:7100".parse().expect("address"), &files)?;
//! let conn = quic::connect(&endpoint, "10.0.0.2:7100".parse().expect("address"), "coord-1").await?;
//! let mut channel: Channel<String, String> = Channel::open(&conn, FrameCodec::default()).await?;
//! channel.send(&"hello".to_string()).await?;
//! let reply: Option<String> = channel.recv().await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::Duration;

pub mod ca;
pub mod channel;
pub mod frame;
pub mod identity;
pub mod quic;
pub mod tls;

pub use ca::{CaInit, IssuedCert, TlsFiles, init_ca, issue};
pub use channel::{Channel, ChannelReceiver, ChannelSender};
pub use frame::{FrameCodec, PROTOCOL_VERSION};
pub use identity::{cert_identity, peer_identity};

/// Everything that can go wrong in herd's networking, typed so callers can tell a bad peer from
/// a bad local configuration.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A CA or certificate file is missing, unreadable or malformed.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// `init_ca` found an existing CA and left it alone.
    #[error("a cluster CA already exists at {}; refusing to overwrite it", path.display())]
    CaExists { path: PathBuf },
    /// A node certificate or key would be overwritten.
    #[error("{} already exists; refusing to overwrite it (remove it first to re-issue)", path.display())]
    Exists { path: PathBuf },
    /// A node name or host that cannot go into a certificate.
    #[error("invalid {what} {value:?}: {reason}")]
    BadName { what: &'static str, value: String, reason: String },
    /// rcgen could not build or sign a certificate.
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    /// A configuration that cannot work (TLS, QUIC transport, frame limits).
    #[error("configuration: {0}")]
    Config(String),
    /// rustls refused something (a key that does not match its certificate, a bad chain).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A socket or (synchronous) stream error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A connection could not even be started (bad server name, endpoint closed).
    #[error("connecting to {addr}: {source}")]
    Connect { addr: std::net::SocketAddr, source: quinn::ConnectError },
    /// The QUIC connection failed or was closed (handshake rejected, peer gone, idle timeout).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Something did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// Writing to a QUIC stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a QUIC stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The local half of a stream was already finished or reset.
    #[error("stream: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    /// The peer speaks another frame protocol version.
    #[error("protocol version mismatch: ours is {ours}, the peer's is {theirs}")]
    Version { ours: u16, theirs: u16 },
    /// The stream does not start with herd's frame magic: not a herd peer, or out of sync.
    #[error("bad frame magic {found:02x?} (expected \"HRDC\")")]
    BadMagic { found: [u8; 4] },
    /// A frame longer than the codec's limit (checked before anything is allocated).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: u64, max: u32 },
    /// The stream ended inside a frame.
    #[error("truncated frame: the stream ended after {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    /// A message could not be encoded.
    #[error("encoding a message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// A frame's payload is not a valid message of the expected type.
    #[error("decoding a message: {0}")]
    Decode(String),
    /// The peer's certificate names no node.
    #[error("peer identity: {0}")]
    Identity(String),
}

impl From<bincode::error::DecodeError> for NetError {
    fn from(e: bincode::error::DecodeError) -> NetError {
        NetError::Decode(e.to_string())
    }
}
