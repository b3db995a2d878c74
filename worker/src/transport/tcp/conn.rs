//! One peer connection in non-blocking mode, plain or inside TLS, behind one read/write surface.
//!
//! The collective loop drives every peer from one thread: it writes and reads until the socket
//! would block, then polls. For TLS the rustls session sits between the loop and the socket:
//! reads pull ciphertext only when no decrypted bytes are left, writes stop when rustls's
//! outgoing buffer (64 KiB by default) is full, so memory stays bounded for any payload size.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

use rustls::Connection;

use crate::transport::TransportError;

pub(super) enum Conn {
    Plain(TcpStream),
    Tls {
        sock: TcpStream,
        tls: Box<Connection>,
        /// The socket reported end of file (rustls then reports how the session ended).
        eof: bool,
    },
}

impl Conn {
    pub(super) fn sock(&self) -> &TcpStream {
        match self {
            Conn::Plain(sock) | Conn::Tls { sock, .. } => sock,
        }
    }

    /// Reads decrypted bytes without blocking. `Ok(0)` is a clean end of stream; `WouldBlock`
    /// means nothing more until the socket is readable.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(sock) => sock.read(buf),
            Conn::Tls { sock, tls, eof } => loop {
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if *eof {
                    // rustls should have reported the end already; never spin on it.
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                if tls.read_tls(sock)? == 0 {
                    *eof = true;
                }
                if let Err(e) = tls.process_new_packets() {
                    // Tell the peer why (best effort: the session is dead either way).
                    let _ = tls.write_tls(sock);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
                }
            },
        }
    }

    /// Writes bytes without blocking; returns how many were taken (for TLS: encrypted into the
    /// session's buffer, which [`Conn::flush`] pushes out).
    pub(super) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Plain(sock) => sock.write_vectored(bufs),
            Conn::Tls { sock, tls, .. } => loop {
                let taken = tls.writer().write_vectored(bufs)?;
                if taken > 0 || bufs.iter().all(|b| b.is_empty()) {
                    return Ok(taken);
                }
                // The session's buffer is full: make room, or report that the socket is full.
                if !tls.wants_write() {
                    return Err(io::Error::other("TLS session accepts no data and has none to send"));
                }
                tls.write_tls(sock)?;
            },
        }
    }

    /// Pushes out what the TLS session holds, until it is empty (`Ok`) or the socket is full
    /// (`WouldBlock`). Plain sockets hold nothing.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if let Conn::Tls { sock, tls, .. } = self {
            while tls.wants_write() {
                tls.write_tls(sock)?;
            }
        }
        Ok(())
    }

    pub(super) fn has_unflushed(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls { tls, .. } => tls.wants_write(),
        }
    }

    /// Ends a TLS session cleanly if the socket takes the alert right away; plain sockets just
    /// close when dropped.
    pub(super) fn close(&mut self) {
        if let Conn::Tls { sock, tls, .. } = self {
            tls.send_close_notify();
            let _ = tls.write_tls(sock);
        }
    }
}

/// Classifies a socket error on the link to `peer`. `context` says what we were doing.
pub(super) fn link_error(peer: usize, err: io::Error, context: &str) -> TransportError {
    use io::ErrorKind as K;
    match err.kind() {
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::NotConnected => {
            TransportError::PeerLost { peer, reason: format!("{context}: {err}") }
        }
        K::InvalidData => TransportError::Malformed { peer, reason: format!("{context}: {err}") },
        kind => TransportError::Io { peer, kind, message: format!("{context}: {err}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_are_classified() {
        let lost = link_error(3, io::ErrorKind::ConnectionReset.into(), "reading");
        assert!(matches!(lost, TransportError::PeerLost { peer: 3, .. }), "{lost}");
        let bad = link_error(1, io::Error::new(io::ErrorKind::InvalidData, "TLS: bad record mac"), "reading");
        assert!(matches!(&bad, TransportError::Malformed { peer: 1, reason } if reason.contains("bad record")));
        let other = link_error(2, io::ErrorKind::PermissionDenied.into(), "writing");
        assert!(matches!(other, TransportError::Io { peer: 2, kind: io::ErrorKind::PermissionDenied, .. }));
    }
}
