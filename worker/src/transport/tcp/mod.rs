//! The CPU data plane: one TCP connection per pair of ranks, raw [`frame`](super::frame)s,
//! optional mutual TLS.
//!
//! Setup ([`TcpTransport::connect`], in `setup`) has each rank dial every lower rank and accept
//! every higher one, with a handshake that checks the group (world size, rank, cluster token).
//!
//! A collective runs on the caller's thread with non-blocking sockets and `poll(2)`: it writes
//! to and reads from every peer at once, so payloads of any size cannot deadlock (a rank that
//! wrote everything before reading would, once the socket buffers fill), and no thread is
//! spawned or woken per call. Reads go straight into the receive buffers, written at most
//! 256 KiB ahead of the bytes that actually arrived, so a peer announcing a large frame and
//! sending little cannot make us commit the memory it announced. A collective returns once it
//! has every peer's frame and the kernel has taken all of ours; the deadline bounds both, and
//! the first peer still owing us data is the one blamed on timeout. When one link fails the
//! collective still finishes with the other peers before the error is returned, so that they
//! are not left waiting on this rank and blame the rank that actually failed.

mod conn;
mod setup;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_tls;

use std::fmt;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use self::conn::{Conn, link_error};
use super::frame::{FrameHeader, FrameKind, HEADER_LEN};
use super::tls::TlsConfig;
use super::{Collective, Lockstep, TransportError};

/// Default [`TcpOptions::max_frame_bytes`]: 1 GiB.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 1 << 30;

/// How much of a receive buffer is zeroed ahead of the data that fills it.
const RECV_CHUNK: usize = 256 << 10;

/// Settings every rank of a group must agree on (except `tls` paths and timeouts).
#[derive(Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// Identifies the cluster: a connection presenting another token is rejected, so a worker
    /// of another cluster (or a stray client) cannot join. Up to 256 bytes; without TLS it
    /// travels in the clear.
    pub cluster_token: Vec<u8>,
    /// Largest payload a peer may announce; a bigger frame is [`TransportError::Malformed`]
    /// before anything is allocated, and sending one is a usage error.
    pub max_frame_bytes: u64,
    /// Mutual TLS from the cluster CA; `None` sends frames in the clear.
    pub tls: Option<TlsConfig>,
    /// Pause between attempts to reach a peer that is not listening yet.
    pub connect_retry: Duration,
    /// How long setup waits for one accepted connection's handshake, so that a stray client
    /// that connects and says nothing cannot hold up the real peers for the whole deadline.
    pub handshake_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            cluster_token: Vec::new(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            tls: None,
            connect_retry: Duration::from_millis(50),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for TcpOptions {
    // The token may be a shared secret; keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpOptions")
            .field("cluster_token", &format_args!("<{} bytes>", self.cluster_token.len()))
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("tls", &self.tls)
            .field("connect_retry", &self.connect_retry)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// A connection to one peer.
struct Link {
    conn: Conn,
    addr: SocketAddr,
}

/// One rank of a group connected over TCP.
pub struct TcpTransport {
    lockstep: Lockstep,
    /// `links[p]`: the connection to rank p (`None` for ourselves).
    links: Vec<Option<Link>>,
    max_frame_bytes: u64,
    tls: bool,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peers: Vec<_> = self.links.iter().map(|l| l.as_ref().map(|l| l.addr)).collect();
        f.debug_struct("TcpTransport")
            .field("rank", &self.lockstep.rank())
            .field("world", &self.lockstep.world())
            .field("tls", &self.tls)
            .field("peers", &peers)
            .field("poisoned", &self.lockstep.poisoned())
            .finish_non_exhaustive()
    }
}

impl TcpTransport {
    /// Joins the group: `peers[r]` is rank r's listen address and `listener` is already bound
    /// to ours (so tests can bind `127.0.0.1:0` first). Dials every lower rank, retrying until
    /// `deadline` since processes start at different times, and accepts every higher rank.
    /// Connections that fail the handshake (another cluster's token, another world size,
    /// garbage) are refused and do not stop setup.
    pub fn connect(
        rank: usize,
        world: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        opts: TcpOptions,
        deadline: Instant,
    ) -> Result<TcpTransport, TransportError> {
        let links = setup::establish(rank, world, peers, listener, &opts, deadline)?;
        Ok(TcpTransport {
            lockstep: Lockstep::new(rank, world),
            links,
            max_frame_bytes: opts.max_frame_bytes,
            tls: opts.tls.is_some(),
        })
    }

    /// [`TcpTransport::connect`] after binding `peers[rank]`.
    pub fn bind_and_connect(
        rank: usize,
        peers: &[SocketAddr],
        opts: TcpOptions,
        deadline: Instant,
    ) -> Result<TcpTransport, TransportError> {
        let addr = *peers.get(rank).ok_or_else(|| {
            TransportError::Usage(format!("rank {rank} has no address in a list of {} peers", peers.len()))
        })?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| TransportError::Setup { peer: Some(rank), reason: format!("binding {addr}: {e}") })?;
        TcpTransport::connect(rank, peers.len(), peers, listener, opts, deadline)
    }

    fn exchange(
        &mut self,
        op: Collective,
        send: Vec<Vec<u8>>,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let seq = self.lockstep.begin((op == Collective::AllToAll).then_some(send.as_slice()))?;
        let send = if op == Collective::Barrier { vec![Vec::new(); self.lockstep.world()] } else { send };
        let started = Instant::now();
        let mut bytes = Bytes::default();
        let result = self.exchange_inner(op, seq, send, started, deadline, &mut bytes);
        self.lockstep.end(started, bytes.sent, bytes.received, result)
    }

    fn exchange_inner(
        &mut self,
        op: Collective,
        seq: u64,
        send: Vec<Vec<u8>>,
        started: Instant,
        deadline: Instant,
        bytes: &mut Bytes,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let rank = self.lockstep.rank();
        if let Some((peer, len)) =
            send.iter().enumerate().map(|(p, b)| (p, b.len() as u64)).find(|&(_, len)| len > self.max_frame_bytes)
        {
            return Err(TransportError::Usage(format!(
                "a {len}-byte buffer for rank {peer} exceeds max_frame_bytes ({})",
                self.max_frame_bytes
            )));
        }
        let kind = FrameKind::for_collective(op);
        let mut recv: Vec<Vec<u8>> = vec![Vec::new(); send.len()];
        let mut exchanges = Vec::with_capacity(send.len().saturating_sub(1));
        for (peer, payload) in send.into_iter().enumerate() {
            if peer == rank {
                recv[peer] = payload;
            } else {
                exchanges.push(PeerExchange::new(peer, op, seq, kind, payload));
            }
        }
        let max_len = self.max_frame_bytes;
        let mut first_error: Option<TransportError> = None;
        loop {
            let mut open = false;
            for ex in exchanges.iter_mut().filter(|ex| !ex.failed) {
                let step = match self.links[ex.peer].as_mut() {
                    Some(link) => {
                        ex.pump_send(&mut link.conn, bytes).and_then(|()| ex.pump_recv(&mut link.conn, max_len, bytes))
                    }
                    None => Err(missing_link(ex.peer)),
                };
                if let Err(err) = step {
                    // Finish with everyone else before reporting: a rank that stopped here would
                    // leave its other peers waiting for its frame, and they would blame it
                    // instead of the peer that actually failed.
                    ex.failed = true;
                    first_error.get_or_insert(err);
                    continue;
                }
                open |= !ex.done();
            }
            if !open {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(first_error.unwrap_or_else(|| {
                    let live = || exchanges.iter().filter(|ex| !ex.failed);
                    let blamed = live().find(|ex| !ex.rx_done()).or_else(|| live().find(|ex| !ex.done()));
                    let peer = blamed.map_or(rank, |ex| ex.peer);
                    TransportError::Timeout { peer, op, seq, waited: started.elapsed() }
                }));
            }
            self.wait(&mut exchanges, deadline - now)?;
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        for ex in exchanges {
            let peer = ex.peer;
            recv[peer] = ex.into_payload();
        }
        Ok(recv)
    }

    /// Sleeps in `poll(2)` until a blocked socket can move or `timeout` passes.
    fn wait(&self, exchanges: &mut [PeerExchange], timeout: Duration) -> Result<(), TransportError> {
        let mut fds = Vec::with_capacity(exchanges.len());
        let mut who = Vec::with_capacity(exchanges.len());
        for (i, ex) in exchanges.iter().enumerate().filter(|(_, ex)| !ex.failed) {
            let mut events = PollFlags::empty();
            if !ex.rx_done() {
                events |= PollFlags::IN;
            }
            if !ex.tx_done {
                events |= PollFlags::OUT;
            }
            if events.is_empty() {
                continue;
            }
            let link = self.links[ex.peer].as_ref().ok_or_else(|| missing_link(ex.peer))?;
            fds.push(PollFd::new(link.conn.sock(), events));
            who.push(i);
        }
        let timeout =
            Timespec { tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64, tv_nsec: timeout.subsec_nanos().into() };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                let peer = exchanges.first().map_or(self.lockstep.rank(), |ex| ex.peer);
                return Err(TransportError::Io {
                    peer,
                    kind: io::Error::from(e).kind(),
                    message: format!("poll: {e}"),
                });
            }
        }
        for (fd, &i) in fds.iter().zip(&who) {
            let ready = fd.revents();
            if ready.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) {
                exchanges[i].rx_ready = true;
            }
            if ready.intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP) {
                exchanges[i].tx_ready = true;
            }
        }
        Ok(())
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        for link in self.links.iter_mut().flatten() {
            link.conn.close();
        }
    }
}

crate::transport::lockstep_transport!(TcpTransport);

fn missing_link(peer: usize) -> TransportError {
    TransportError::PeerLost { peer, reason: "no connection to this rank".into() }
}

/// Wire bytes moved by one collective.
#[derive(Default)]
struct Bytes {
    sent: u64,
    received: u64,
}

/// Where the frame from one peer stands.
enum Incoming {
    Header {
        buf: [u8; HEADER_LEN],
        filled: usize,
    },
    /// `data[..filled]` has arrived; `data.len()` is how far the buffer has been zeroed.
    Payload {
        data: Vec<u8>,
        filled: usize,
        len: usize,
    },
    Done(Vec<u8>),
}

/// One collective's traffic with one peer: our frame out, theirs in.
struct PeerExchange {
    peer: usize,
    op: Collective,
    seq: u64,
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    /// Bytes of header + payload written so far.
    written: usize,
    tx_done: bool,
    incoming: Incoming,
    /// Whether trying the socket may make progress (false after it would block, until poll).
    tx_ready: bool,
    rx_ready: bool,
    /// This peer's link failed during the collective; the others are still finished.
    failed: bool,
}

impl PeerExchange {
    fn new(peer: usize, op: Collective, seq: u64, kind: FrameKind, payload: Vec<u8>) -> Self {
        let header = FrameHeader { kind, seq, len: payload.len() as u64 }.encode();
        PeerExchange {
            peer,
            op,
            seq,
            header,
            payload,
            written: 0,
            tx_done: false,
            incoming: Incoming::Header { buf: [0; HEADER_LEN], filled: 0 },
            tx_ready: true,
            rx_ready: true,
            failed: false,
        }
    }

    fn rx_done(&self) -> bool {
        matches!(self.incoming, Incoming::Done(_))
    }

    fn done(&self) -> bool {
        self.tx_done && self.rx_done()
    }

    fn into_payload(self) -> Vec<u8> {
        match self.incoming {
            Incoming::Done(data) => data,
            Incoming::Header { .. } | Incoming::Payload { .. } => Vec::new(),
        }
    }

    /// Writes until our frame is out or the socket is full.
    fn pump_send(&mut self, conn: &mut Conn, bytes: &mut Bytes) -> Result<(), TransportError> {
        let total = HEADER_LEN + self.payload.len();
        while !self.tx_done && self.tx_ready {
            let step = if self.written < total {
                let bufs = if self.written < HEADER_LEN {
                    [IoSlice::new(&self.header[self.written..]), IoSlice::new(&self.payload)]
                } else {
                    [IoSlice::new(&self.payload[self.written - HEADER_LEN..]), IoSlice::new(&[])]
                };
                conn.write_vectored(&bufs)
                    .and_then(|n| if n == 0 { Err(io::ErrorKind::WriteZero.into()) } else { Ok(n) })
            } else {
                conn.flush().map(|()| 0)
            };
            match step {
                Ok(n) => {
                    self.written += n;
                    bytes.sent += n as u64;
                    if self.written == total && !conn.has_unflushed() {
                        self.tx_done = true;
                        // Our copy is no longer needed; free a large one now rather than at the end.
                        self.payload = Vec::new();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tx_ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let context = format!("sending {} #{} ({} of {total} bytes sent)", self.op, self.seq, self.written);
                    return Err(link_error(self.peer, e, &context));
                }
            }
        }
        Ok(())
    }

    /// Reads until the peer's frame is in or the socket is empty.
    fn pump_recv(&mut self, conn: &mut Conn, max_len: u64, bytes: &mut Bytes) -> Result<(), TransportError> {
        while self.rx_ready && !self.rx_done() {
            let (peer, op, seq) = (self.peer, self.op, self.seq);
            let read = match &mut self.incoming {
                Incoming::Header { buf, filled } => conn.read(&mut buf[*filled..]),
                Incoming::Payload { data, filled, len } => {
                    if *filled == data.len() {
                        data.resize((*filled + RECV_CHUNK).min(*len), 0);
                    }
                    conn.read(&mut data[*filled..])
                }
                Incoming::Done(_) => Ok(0),
            };
            let n = match read {
                Ok(0) => return Err(self.closed()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rx_ready = false;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(link_error(peer, e, &self.receive_context())),
            };
            bytes.received += n as u64;
            match &mut self.incoming {
                Incoming::Header { buf, filled } => {
                    *filled += n;
                    if *filled == HEADER_LEN {
                        self.incoming = start_payload(peer, op, seq, buf, max_len)?;
                    }
                }
                Incoming::Payload { data, filled, len } => {
                    *filled += n;
                    if *filled == *len {
                        self.incoming = Incoming::Done(std::mem::take(data));
                    }
                }
                Incoming::Done(_) => {}
            }
        }
        Ok(())
    }

    fn receive_context(&self) -> String {
        let (op, seq) = (self.op, self.seq);
        match &self.incoming {
            Incoming::Header { filled, .. } => {
                format!("reading the header of {op} #{seq} ({filled} of {HEADER_LEN} bytes)")
            }
            Incoming::Payload { filled, len, .. } => {
                format!("reading the payload of {op} #{seq} ({filled} of {len} bytes)")
            }
            Incoming::Done(_) => format!("after {op} #{seq}"),
        }
    }

    /// The peer closed its end (or ended its TLS session) before its frame was complete.
    fn closed(&self) -> TransportError {
        let (op, seq) = (self.op, self.seq);
        let reason = match &self.incoming {
            Incoming::Header { filled: 0, .. } => format!("connection closed while waiting for {op} #{seq}"),
            Incoming::Header { filled, .. } => {
                format!("connection closed after {filled} of {HEADER_LEN} header bytes of {op} #{seq}")
            }
            Incoming::Payload { filled, len, .. } => {
                format!("connection closed after {filled} of {len} payload bytes of {op} #{seq} (truncated frame)")
            }
            Incoming::Done(_) => format!("connection closed after {op} #{seq}"),
        };
        TransportError::PeerLost { peer: self.peer, reason }
    }
}

/// Checks a complete header against the collective we are in and sets up its payload buffer.
fn start_payload(
    peer: usize,
    op: Collective,
    seq: u64,
    buf: &[u8; HEADER_LEN],
    max_len: u64,
) -> Result<Incoming, TransportError> {
    let header = FrameHeader::decode(buf, max_len)
        .map_err(|e| TransportError::Malformed { peer, reason: format!("{e} (in the header of {op} #{seq})") })?;
    let Some(got) = header.kind.collective() else {
        return Err(TransportError::Malformed {
            peer,
            reason: format!("unexpected {:?} frame during {op} #{seq}", header.kind),
        });
    };
    if got != op || header.seq != seq {
        return Err(TransportError::Desync { peer, expected: op, expected_seq: seq, got, got_seq: header.seq });
    }
    if got == Collective::Barrier && header.len != 0 {
        return Err(TransportError::Malformed {
            peer,
            reason: format!("barrier #{seq} frame carries {} bytes", header.len),
        });
    }
    if header.len == 0 {
        return Ok(Incoming::Done(Vec::new()));
    }
    // `len <= max_len` was checked above; reserve address space only, the pages are touched
    // as data arrives.
    let len = usize::try_from(header.len).map_err(|_| TransportError::Malformed {
        peer,
        reason: format!("payload of {} bytes does not fit in memory", header.len),
    })?;
    let mut data = Vec::new();
    data.try_reserve_exact(len).map_err(|e| TransportError::Io {
        peer,
        kind: io::ErrorKind::OutOfMemory,
        message: format!("allocating {len} bytes for {op} #{seq}: {e}"),
    })?;
    Ok(Incoming::Payload { data, filled: 0, len })
}
