//! Raft traffic between coordinators over QUIC with mutual TLS.
//!
//! Each coordinator keeps one outgoing connection per peer, opened lazily and reopened
//! after failures; messages queue in an unbounded channel per peer and are dropped when the
//! peer is unreachable (Raft retries). The first frame on a stream names the sender; the
//! connection itself is authenticated by the cluster CA.

use crate::raft::{Mailbox, RaftTransport, WireMessage};
use herd_net::{Channel, FrameCodec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// A frame between coordinators.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftFrame {
    Hello { from: u64 },
    Message(WireMessage),
}

/// Frames carry raft snapshots of the cluster state, which stay small.
fn codec() -> FrameCodec {
    FrameCodec::new(64 << 20)
}

/// The sending side: one queue and connection task per peer. Peers can be added while running
/// (a coordinator that joins later), from the coordinator addresses in the cluster state.
#[derive(Debug)]
pub struct QuicRaftTransport {
    me: u64,
    endpoint: quinn::Endpoint,
    rt: tokio::runtime::Handle,
    queues: Mutex<BTreeMap<u64, Peer>>,
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    queue: mpsc::UnboundedSender<WireMessage>,
}

impl QuicRaftTransport {
    /// Start a sender task per peer (`peers` excludes this node).
    pub fn start(
        me: u64,
        peers: BTreeMap<u64, SocketAddr>,
        endpoint: quinn::Endpoint,
        rt: &tokio::runtime::Handle,
    ) -> Self {
        let transport = Self { me, endpoint, rt: rt.clone(), queues: Mutex::new(BTreeMap::new()) };
        for (id, addr) in peers {
            transport.set_peer(id, addr);
        }
        transport
    }

    /// Send to `id` at `addr` from now on: starts a sender for a new peer, or replaces the one
    /// of a peer whose address changed (dropping its queue ends its old task).
    pub fn set_peer(&self, id: u64, addr: SocketAddr) {
        if id == self.me {
            return;
        }
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        queues.insert(id, Peer { addr, queue: tx });
        self.rt.spawn(sender(self.me, id, addr, self.endpoint.clone(), rx));
    }
}

impl RaftTransport for QuicRaftTransport {
    fn send(&self, to: u64, msg: WireMessage) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = queues.get(&to) {
            let _ = p.queue.send(msg);
        }
    }
}

async fn sender(
    me: u64,
    peer: u64,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    mut rx: mpsc::UnboundedReceiver<WireMessage>,
) {
    loop {
        let conn = match herd_net::quic::connect(&endpoint, addr, &addr.ip().to_string()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer, %addr, "raft peer unreachable: {e}");
                drain_for(&mut rx, Duration::from_millis(500)).await;
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        let Ok(mut ch) = Channel::<RaftFrame, RaftFrame>::open(&conn, codec()).await else { continue };
        if ch.send(&RaftFrame::Hello { from: me }).await.is_err() {
            continue;
        }
        while let Some(msg) = rx.recv().await {
            if let Err(e) = ch.send(&RaftFrame::Message(msg)).await {
                tracing::debug!(peer, "raft stream to peer broke: {e}");
                break;
            }
        }
        if rx.is_closed() {
            return;
        }
    }
}

/// Drop queued messages for a while (the peer is down; Raft resends what matters).
async fn drain_for(rx: &mut mpsc::UnboundedReceiver<WireMessage>, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {}
}

/// Accept raft connections from peers and deliver their messages.
pub async fn serve(endpoint: quinn::Endpoint, mailbox: Mailbox) {
    while let Some(incoming) = herd_net::quic::accept(&endpoint).await {
        let Ok(conn) = incoming else { continue };
        let mailbox = mailbox.clone();
        tokio::spawn(async move {
            while let Ok(mut ch) = Channel::<RaftFrame, RaftFrame>::accept(&conn, codec()).await {
                let mailbox = mailbox.clone();
                tokio::spawn(async move {
                    let from = match ch.recv().await {
                        Ok(Some(RaftFrame::Hello { from })) => from,
                        _ => return,
                    };
                    while let Ok(Some(RaftFrame::Message(msg))) = ch.recv().await {
                        mailbox.deliver(from, msg);
                    }
                });
            }
        });
    }
}
