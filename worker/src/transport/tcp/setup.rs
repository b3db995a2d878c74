//! Building a TCP group: who dials whom, the handshake, and refusing strangers.
//!
//! For each pair i < j, rank j dials rank i. A rank first dials all lower ranks, then accepts
//! the higher ones; this cannot deadlock because the lowest rank that is still dialing only
//! waits on ranks that have finished dialing and are accepting. The dialer retries until the
//! deadline (its peer may not be listening yet) and sends a hello (world, rank, cluster token);
//! the acceptor checks it and answers with its own hello, which the dialer checks in turn, or
//! with a reject frame naming the reason. A refused connection is logged and setup goes on
//! accepting, so a stray client cannot stop a group from forming; a dialer that is refused gives
//! up at once, because the two sides disagree on the group and retrying cannot fix that.
//!
//! Setup uses blocking sockets with timeouts taken from the deadline; the finished connections
//! are switched to non-blocking for the collectives.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustls::Connection;

use super::conn::Conn;
use super::{Link, TcpOptions};
use crate::transport::TransportError;
use crate::transport::frame::{
    FrameHeader, FrameKind, HEADER_LEN, Hello, MAX_HANDSHAKE_BYTES, MAX_TOKEN_BYTES, encode_reject, tokens_match,
};
use crate::transport::tls::TlsContext;

/// Connects `rank` to every other rank; element p of the result is the link to rank p.
pub(super) fn establish(
    rank: usize,
    world: usize,
    peers: &[SocketAddr],
    listener: TcpListener,
    opts: &TcpOptions,
    deadline: Instant,
) -> Result<Vec<Option<Link>>, TransportError> {
    if world == 0 || rank >= world || peers.len() != world {
        return Err(TransportError::Usage(format!(
            "rank {rank} of world {world} needs a rank below the world size and one address per rank (got {})",
            peers.len()
        )));
    }
    if world > u32::MAX as usize {
        return Err(TransportError::Usage(format!("world {world} does not fit the handshake")));
    }
    if opts.cluster_token.len() > MAX_TOKEN_BYTES {
        return Err(TransportError::Usage(format!(
            "cluster token of {} bytes exceeds {MAX_TOKEN_BYTES}",
            opts.cluster_token.len()
        )));
    }
    let tls = opts.tls.as_ref().map(TlsContext::load).transpose()?;
    let group = Group { rank, world, peers, opts, tls: tls.as_ref(), deadline };
    let mut links: Vec<Option<Link>> = (0..world).map(|_| None).collect();
    for (peer, slot) in links.iter_mut().enumerate().take(rank) {
        *slot = Some(group.dial(peer)?);
    }
    group.accept_higher(&listener, &mut links)?;
    for (peer, link) in links.iter().enumerate() {
        if let Some(link) = link {
            let sock = link.conn.sock();
            sock.set_read_timeout(None)
                .and_then(|()| sock.set_write_timeout(None))
                .and_then(|()| sock.set_nonblocking(true))
                .map_err(|e| setup_err(peer, format!("configuring the connection: {e}")))?;
        }
    }
    Ok(links)
}

fn setup_err(peer: usize, reason: String) -> TransportError {
    TransportError::Setup { peer: Some(peer), reason }
}

struct Group<'a> {
    rank: usize,
    world: usize,
    peers: &'a [SocketAddr],
    opts: &'a TcpOptions,
    tls: Option<&'a TlsContext>,
    deadline: Instant,
}

impl Group<'_> {
    fn hello(&self) -> Hello {
        Hello { world: self.world as u32, rank: self.rank as u32, token: self.opts.cluster_token.clone() }
    }

    /// Time left, never zero (a zero socket timeout is an error).
    fn remaining(&self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Dials rank `peer` (lower than ours) until it answers or the deadline passes.
    fn dial(&self, peer: usize) -> Result<Link, TransportError> {
        let addr = self.peers[peer];
        let mut last = String::from("no attempt made");
        loop {
            let Some(left) = self.remaining() else {
                return Err(setup_err(peer, format!("could not reach {addr} before the deadline: {last}")));
            };
            match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
                Ok(sock) => {
                    let conn = self
                        .greet_as_dialer(sock, peer, addr)
                        .map_err(|reason| setup_err(peer, format!("handshake with {addr}: {reason}")))?;
                    return Ok(Link { conn, addr });
                }
                Err(e) => last = e.to_string(),
            }
            thread::sleep(self.opts.connect_retry.min(self.remaining().unwrap_or_default()));
        }
    }

    fn greet_as_dialer(&self, mut sock: TcpStream, peer: usize, addr: SocketAddr) -> Result<Conn, String> {
        let left = self.remaining().ok_or("deadline passed")?;
        configure_blocking(&sock, left).map_err(|e| e.to_string())?;
        let check = |reply: &Hello| -> Result<(), String> {
            if reply.world as usize != self.world {
                return Err(format!("peer is in a group of {}, we are in one of {}", reply.world, self.world));
            }
            if reply.rank as usize != peer {
                return Err(format!("peer says it is rank {}, expected rank {peer}", reply.rank));
            }
            if !tokens_match(&reply.token, &self.opts.cluster_token) {
                return Err("peer presented a different cluster token".into());
            }
            Ok(())
        };
        match self.tls {
            None => {
                dialer_exchange(&mut sock, &self.hello(), check)?;
                Ok(Conn::Plain(sock))
            }
            Some(tls) => {
                let mut session = tls.client(addr).map_err(|e| e.to_string())?;
                dialer_exchange(&mut rustls::Stream::new(&mut session, &mut sock), &self.hello(), check)?;
                Ok(Conn::Tls { sock, tls: Box::new(Connection::Client(session)), eof: false })
            }
        }
    }

    /// Accepts until every higher rank has connected; refuses anything else.
    fn accept_higher(&self, listener: &TcpListener, links: &mut [Option<Link>]) -> Result<(), TransportError> {
        listener.set_nonblocking(true).map_err(|e| setup_err(self.rank, format!("configuring the listener: {e}")))?;
        let mut refused: Vec<String> = Vec::new();
        while let Some(missing) = (self.rank + 1..self.world).find(|&p| links[p].is_none()) {
            let Some(left) = self.remaining() else {
                let missing: Vec<_> = (self.rank + 1..self.world).filter(|&p| links[p].is_none()).collect();
                let refused =
                    if refused.is_empty() { String::new() } else { format!("; refused: {}", refused.join("; ")) };
                return Err(setup_err(
                    missing[0],
                    format!("ranks {missing:?} did not connect before the deadline{refused}"),
                ));
            };
            match listener.accept() {
                Ok((sock, from)) => match self.greet_as_acceptor(sock, links) {
                    Ok((peer, conn)) => links[peer] = Some(Link { conn, addr: from }),
                    Err(reason) => {
                        tracing::warn!(rank = self.rank, %from, %reason, "refused a data-plane connection");
                        refused.push(format!("{from}: {reason}"));
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(listener, PollFlags::IN)];
                    let timeout = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos().into() };
                    match rustix::event::poll(&mut fds, Some(&timeout)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(setup_err(missing, format!("waiting for connections: {e}"))),
                    }
                }
                // The client gave up before we took it, or a signal: nothing to do with the group.
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => return Err(setup_err(missing, format!("accepting connections: {e}"))),
            }
        }
        Ok(())
    }

    /// Runs the acceptor's half of the handshake; returns the peer's rank, or why it was refused.
    fn greet_as_acceptor(&self, mut sock: TcpStream, links: &[Option<Link>]) -> Result<(usize, Conn), String> {
        let left = self.remaining().ok_or("deadline passed")?.min(self.opts.handshake_timeout);
        sock.set_nonblocking(false).map_err(|e| e.to_string())?;
        configure_blocking(&sock, left).map_err(|e| e.to_string())?;
        let check = |hello: &Hello| -> Result<usize, String> {
            if !tokens_match(&hello.token, &self.opts.cluster_token) {
                return Err("wrong cluster token".into());
            }
            if hello.world as usize != self.world {
                return Err(format!("group of {} ranks, this one has {}", hello.world, self.world));
            }
            let peer = hello.rank as usize;
            if peer <= self.rank || peer >= self.world {
                return Err(format!("rank {peer} may not dial rank {} (only higher ranks dial)", self.rank));
            }
            if links[peer].is_some() {
                return Err(format!("rank {peer} is already connected"));
            }
            Ok(peer)
        };
        match self.tls {
            None => {
                let peer = acceptor_exchange(&mut sock, &self.hello(), check)?;
                Ok((peer, Conn::Plain(sock)))
            }
            Some(tls) => {
                let mut session = tls.server().map_err(|e| e.to_string())?;
                let peer = acceptor_exchange(&mut rustls::Stream::new(&mut session, &mut sock), &self.hello(), check)?;
                Ok((peer, Conn::Tls { sock, tls: Box::new(Connection::Server(session)), eof: false }))
            }
        }
    }
}

fn configure_blocking(sock: &TcpStream, timeout: Duration) -> io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))
}

fn dialer_exchange<S: Read + Write>(
    stream: &mut S,
    ours: &Hello,
    check: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<(), String> {
    stream.write_all(&ours.encode_frame()).and_then(|()| stream.flush()).map_err(|e| format!("sending hello: {e}"))?;
    let (header, payload) = read_handshake_frame(stream)?;
    match header.kind {
        FrameKind::Hello => check(&Hello::decode_payload(&payload)?),
        FrameKind::Reject => Err(format!("refused by the peer: {}", String::from_utf8_lossy(&payload))),
        kind => Err(format!("expected a hello, got a {kind:?} frame")),
    }
}

fn acceptor_exchange<S: Read + Write>(
    stream: &mut S,
    ours: &Hello,
    check: impl FnOnce(&Hello) -> Result<usize, String>,
) -> Result<usize, String> {
    let verdict = read_handshake_frame(stream).and_then(|(header, payload)| {
        if header.kind != FrameKind::Hello {
            return Err(format!("expected a hello, got a {:?} frame", header.kind));
        }
        check(&Hello::decode_payload(&payload)?)
    });
    let reply = match &verdict {
        Ok(_) => ours.encode_frame(),
        Err(reason) => encode_reject(reason),
    };
    // A refused peer gets the reason if it is still listening; failing to tell it changes nothing.
    let sent = stream.write_all(&reply).and_then(|()| stream.flush());
    let peer = verdict?;
    sent.map_err(|e| format!("sending hello: {e}"))?;
    Ok(peer)
}

/// Reads one handshake frame, refusing anything larger than a handshake can be.
fn read_handshake_frame(stream: &mut impl Read) -> Result<(FrameHeader, Vec<u8>), String> {
    let failed = |e: io::Error| match e.kind() {
        // What a socket timeout looks like.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no handshake before the timeout".to_string(),
        _ => format!("reading the handshake: {e}"),
    };
    let mut head = [0u8; HEADER_LEN];
    stream.read_exact(&mut head).map_err(failed)?;
    let header = FrameHeader::decode(&head, MAX_HANDSHAKE_BYTES).map_err(|e| format!("bad handshake frame: {e}"))?;
    if header.seq != 0 {
        return Err(format!("handshake frame with sequence number {}", header.seq));
    }
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload).map_err(failed)?;
    Ok((header, payload))
}
