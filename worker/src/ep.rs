//! Expert parallelism: the [`ExpertExchange`] that sends each routed token to a worker holding
//! its expert and brings the result back, over two `all_to_all_v` collectives per MoE layer.
//!
//! ```text
//! route (local) → pick a replica per route (Placement::pick) → pack [expert, score, x] records
//!   → all_to_all_v #1 → group received records by expert → run local experts (ExpertShard)
//!   → all_to_all_v #2 (results in received order) → each route's row in route order
//!   → the model's combine (CPU: `MoeBlock::forward` in route order; GPU: on the device)
//! ```
//! The combine adds each token's expert outputs in (expert, token) order — the order the
//! local runner uses — and every expert computes each row independently of its batch, so a
//! distributed run reproduces a single-process run bit for bit under any placement.

use crate::model::moe::{Blame, ExchangeError, ExchangeResult, ExpertError, ExpertExchange, ExpertShard, Routing};
use crate::placement::Placement;
use crate::transport::{Transport, TransportError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("layer {layer}: rank {peer} sent {len} bytes, not a whole number of {record}-byte records")]
    Ragged { layer: usize, peer: usize, len: usize, record: usize },
    #[error("layer {layer}: rank {peer} sent a token for expert {expert}, which this worker does not hold")]
    NotLocal { layer: usize, peer: usize, expert: usize },
    #[error("layer {layer}: running the local experts: {source}")]
    Experts { layer: usize, source: ExpertError },
    #[error("layer {layer}: rank {peer} returned {got} result rows for {sent} dispatched tokens")]
    ResultCount { layer: usize, peer: usize, got: usize, sent: usize },
}

/// Data-plane counters of one MoE layer, summed over steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerTraffic {
    pub collectives: u64,
    /// Bytes this worker sent to other workers (dispatch + results).
    pub bytes_out: u64,
    /// Time inside the two collectives (waiting for peers included).
    pub exchange: Duration,
    /// Time running local experts on received tokens.
    pub compute: Duration,
    /// Routed tokens this worker computed, per expert.
    pub tokens_per_expert: BTreeMap<usize, u64>,
}

/// A dispatched token as it arrived: from `peer`, as its `pos`-th record.
struct Received<'a> {
    peer: usize,
    pos: usize,
    score: f32,
    /// `[hidden]` little-endian f32, unscaled.
    x: &'a [u8],
}

/// The [`ExpertExchange`] of one worker of an expert-parallel group.
#[derive(Debug)]
pub struct EpRunner {
    transport: Box<dyn Transport>,
    placement: Placement,
    timeout: Duration,
    traffic: BTreeMap<usize, LayerTraffic>,
}

impl EpRunner {
    /// `timeout` bounds each collective: a peer that does not answer within it (dead, hung,
    /// or far slower) fails the step on every worker instead of hanging it.
    pub fn new(transport: Box<dyn Transport>, placement: Placement, timeout: Duration) -> Self {
        Self { transport, placement, timeout, traffic: BTreeMap::new() }
    }

    pub fn transport(&mut self) -> &mut dyn Transport {
        self.transport.as_mut()
    }

    /// The data plane's counters since the group formed.
    pub fn transport_stats(&self) -> crate::transport::TransportStats {
        self.transport.stats()
    }

    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Per-layer traffic since the runner was built.
    pub fn traffic(&self) -> &BTreeMap<usize, LayerTraffic> {
        &self.traffic
    }

    /// Ships each route of `routing` (this worker's tokens `x`, `[tokens, hidden]`) to a
    /// worker holding its expert, runs the rows the peers sent on `shard`, and returns each
    /// route's expert output in `routing` order: `[routes, hidden]`. Every worker of the group
    /// calls this for every MoE layer of every step, with or without routes. (The model calls
    /// it as [`ExpertExchange::exchange`], which classifies the error.)
    pub fn dispatch(
        &mut self,
        layer: usize,
        shard: &dyn ExpertShard,
        x: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, DispatchError> {
        let (rank, world) = (self.transport.rank(), self.transport.world());
        let hidden = shard.hidden();
        let record = 8 + 4 * hidden;
        // Which routes went to which rank, in send order.
        let mut sent: Vec<Vec<usize>> = vec![Vec::new(); world];
        let mut send: Vec<Vec<u8>> = vec![Vec::new(); world];
        let experts = routing.routes.iter().map(|r| r.expert + 1).max().unwrap_or(0);
        let mut nth = vec![0usize; experts]; // routes sent so far, per expert
        for (ri, route) in routing.routes.iter().enumerate() {
            let dest = self.placement.pick(layer, route.expert, rank, nth[route.expert]);
            nth[route.expert] += 1;
            let buf = &mut send[dest];
            buf.extend_from_slice(&(route.expert as u32).to_le_bytes());
            buf.extend_from_slice(&route.score.to_le_bytes());
            buf.extend_from_slice(bytemuck::cast_slice(&x[route.token * hidden..(route.token + 1) * hidden]));
            sent[dest].push(ri);
        }
        let out_bytes: usize = send.iter().enumerate().filter(|(p, _)| *p != rank).map(|(_, b)| b.len()).sum();
        let t0 = Instant::now();
        let recv = self.transport.all_to_all_v(send, Instant::now() + self.timeout)?;
        let t1 = Instant::now();

        // Received records, grouped by expert; each keeps (peer, position) so results go
        // back in the order they came.
        let mut by_expert: BTreeMap<usize, Vec<Received<'_>>> = BTreeMap::new();
        let mut counts = vec![0usize; world];
        for (peer, buf) in recv.iter().enumerate() {
            if buf.len() % record != 0 {
                return Err(DispatchError::Ragged { layer, peer, len: buf.len(), record });
            }
            counts[peer] = buf.len() / record;
            for (pos, rec) in buf.chunks_exact(record).enumerate() {
                let expert = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
                if !shard.is_local(expert) {
                    return Err(DispatchError::NotLocal { layer, peer, expert });
                }
                let score = f32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
                by_expert.entry(expert).or_default().push(Received { peer, pos, score, x: &rec[8..] });
            }
        }
        // One call for every local expert's rows, grouped in ascending expert order.
        let total: usize = by_expert.values().map(Vec::len).sum();
        let mut inputs = Vec::with_capacity(total * hidden); // [received, hidden]
        let mut groups = Vec::with_capacity(by_expert.len());
        for (&expert, rows) in &by_expert {
            for r in rows {
                // The same f32 product as MoeBlock::gather on the token's home worker.
                inputs.extend(r.x.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * r.score));
            }
            groups.push((expert, rows.len()));
        }
        let mut y = vec![0.0f32; inputs.len()]; // [received, hidden]
        if total > 0 {
            shard.run_groups(&groups, &inputs, &mut y).map_err(|source| DispatchError::Experts { layer, source })?;
        }
        let mut results: Vec<Vec<f32>> = counts.iter().map(|&n| vec![0.0f32; n * hidden]).collect();
        let traffic = self.traffic.entry(layer).or_default();
        for (r, row) in by_expert.values().flatten().zip(y.chunks_exact(hidden)) {
            results[r.peer][r.pos * hidden..(r.pos + 1) * hidden].copy_from_slice(row);
        }
        for (&expert, rows) in &by_expert {
            *traffic.tokens_per_expert.entry(expert).or_default() += rows.len() as u64;
        }
        let t2 = Instant::now();
        let back_out: usize = results.iter().enumerate().filter(|(p, _)| *p != rank).map(|(_, r)| r.len() * 4).sum();
        let back: Vec<Vec<u8>> = results.iter().map(|r| bytemuck::cast_slice(r).to_vec()).collect();
        let returned = self.transport.all_to_all_v(back, Instant::now() + self.timeout)?;
        let t3 = Instant::now();

        // Each route's result row, in route order.
        let mut out = vec![0.0f32; routing.routes.len() * hidden]; // [routes, hidden]
        for (peer, buf) in returned.iter().enumerate() {
            let got = buf.len() / (4 * hidden);
            if buf.len() % (4 * hidden) != 0 || got != sent[peer].len() {
                return Err(DispatchError::ResultCount { layer, peer, got, sent: sent[peer].len() });
            }
            for (&ri, row) in sent[peer].iter().zip(buf.chunks_exact(4 * hidden)) {
                for (o, b) in out[ri * hidden..(ri + 1) * hidden].iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }

        let traffic = self.traffic.entry(layer).or_default();
        traffic.collectives += 2;
        traffic.bytes_out += (out_bytes + back_out) as u64;
        traffic.exchange += (t1 - t0) + (t3 - t2);
        traffic.compute += t2 - t1;
        Ok(out)
    }
}

impl ExpertExchange for EpRunner {
    fn exchange(&mut self, layer: usize, shard: &dyn ExpertShard, x: &[f32], routing: &Routing) -> ExchangeResult {
        self.dispatch(layer, shard, x, routing).map_err(ExchangeError::from)
    }
}

impl From<DispatchError> for ExchangeError {
    /// Blames the peer the data plane names: a missed deadline, or any other failure of a
    /// peer (a lost connection, a malformed or out-of-step record).
    fn from(e: DispatchError) -> Self {
        let blame = match &e {
            DispatchError::Transport(t) => match (t.root(), t.peer()) {
                (TransportError::Timeout { peer, .. }, _) => Blame::Late { rank: *peer },
                (_, Some(rank)) => Blame::Peer { rank },
                (_, None) => Blame::Here,
            },
            DispatchError::Ragged { peer, .. }
            | DispatchError::NotLocal { peer, .. }
            | DispatchError::ResultCount { peer, .. } => Blame::Peer { rank: *peer },
            DispatchError::Experts { .. } => Blame::Here,
        };
        ExchangeError { blame, detail: e.to_string() }
    }
}
