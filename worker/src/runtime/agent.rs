//! A worker's side of the control channel, the same in both modes: greet whoever drives the
//! worker, heartbeat, run the [`Group`] each assignment names, and carry requests down to it
//! and its events up.
//!
//! The agent only sees channels ([`Link`]s). A coordinator-managed worker has one link per
//! coordinator, pumped over QUIC by the binary; each coordinator can submit requests, and
//! request ids carry the coordinator's id in their top bits ([`request_coordinator`]), so events
//! go back to whoever asked. A static group's worker has one link, its stdin/stdout, to the
//! process that started it; that driver plays the coordinator's part.
//!
//! An `Assign` with a newer epoch re-forms the group: the current group is told to leave (its
//! requests end with [`AbortReason::EpochChanged`]) and the new one starts. Over NCCL, rank 0
//! creates the group's unique id and sends it to the coordinators, which relay it to the other
//! members; the agent hands an id to the group of its epoch, or keeps it for a group not
//! started yet.

use super::group::{Group, GroupConfig, GroupNote};
use crate::control::{Assignment, FromWorker, NcclId, ToWorker, WorkerHello, request_coordinator};
use crate::engine::request::{AbortReason, Rejection};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One driver connection (a coordinator, or a static group's parent process), as a channel.
#[derive(Debug)]
pub struct Link {
    pub to_coordinator: mpsc::UnboundedSender<FromWorker>,
}

/// What arrives at the agent.
#[derive(Debug)]
pub enum Inbox {
    /// Link `index` is (re)connected; the agent greets it.
    Connected {
        index: usize,
        link: Link,
    },
    Disconnected {
        index: usize,
    },
    Message {
        index: usize,
        message: ToWorker,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("coordinator refused this worker: {0}")]
    Refused(String),
    /// A static group failed (a managed worker waits for the next assignment instead).
    #[error("{error}")]
    GroupFailed { epoch: u64, error: String },
}

/// How long the agent lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Follow the coordinators' placement epochs until a coordinator refuses the worker, one
    /// asks it to shut down, or every link is gone (`herd worker --coordinators`).
    FollowEpochs,
    /// Run one group and end with it: cleanly once it drained, with an error if it failed
    /// (`herd worker --rank/--world`). A driver that goes away drains the group.
    OneGroup,
}

/// Everything the agent needs.
#[derive(Debug)]
pub struct AgentConfig {
    pub hello: WorkerHello,
    pub group: GroupConfig,
    pub heartbeat: Duration,
    pub lifetime: Lifetime,
}

/// One link as the agent keeps it: the coordinator id its `Welcome` named, and its channel.
struct LinkState {
    coordinator: Option<u64>,
    tx: mpsc::UnboundedSender<FromWorker>,
}

struct Agent {
    config: Arc<GroupConfig>,
    hello: WorkerHello,
    lifetime: Lifetime,
    links: BTreeMap<usize, LinkState>,
    group: Option<Group>,
    /// Epoch of the newest assignment taken.
    latest: u64,
    /// An NCCL id that came before its epoch's assignment (coordinators relay independently).
    early_nccl_id: Option<(u64, NcclId)>,
    notes: mpsc::UnboundedSender<GroupNote>,
    /// Asked to stop: the group drains, and the agent ends when it has.
    stopping: bool,
}

/// Run the agent until it is told to stop (Ok), a coordinator refuses the worker or a static
/// group fails (Err), or, for a managed worker, every link is gone and the inbox closes (Ok).
pub async fn run(config: AgentConfig, mut inbox: mpsc::UnboundedReceiver<Inbox>) -> Result<(), AgentError> {
    let (notes_tx, mut notes) = mpsc::unbounded_channel::<GroupNote>();
    let mut agent = Agent {
        config: Arc::new(config.group),
        hello: config.hello,
        lifetime: config.lifetime,
        links: BTreeMap::new(),
        group: None,
        latest: 0,
        early_nccl_id: None,
        notes: notes_tx,
        stopping: false,
    };
    let mut beat = tokio::time::interval(config.heartbeat);
    let mut inbox_open = true;
    loop {
        tokio::select! {
            msg = inbox.recv(), if inbox_open => match msg {
                Some(msg) => agent.on_inbox(msg)?,
                None if agent.lifetime == Lifetime::FollowEpochs => break,
                // A static group's driver is gone: finish what we have, then leave together.
                None => {
                    inbox_open = false;
                    agent.stop();
                }
            },
            note = notes.recv() => {
                if let Some(note) = note {
                    agent.on_note(note)?;
                }
            }
            _ = beat.tick() => agent.heartbeat(),
        }
        if agent.stopping && agent.group.is_none() {
            return Ok(());
        }
    }
    if let Some(g) = agent.group.take() {
        g.leave(AbortReason::ShuttingDown { what: "the worker".into() }).await;
    }
    Ok(())
}

impl Agent {
    fn on_inbox(&mut self, msg: Inbox) -> Result<(), AgentError> {
        match msg {
            Inbox::Connected { index, link } => {
                let _ = link.to_coordinator.send(FromWorker::Hello(self.hello.clone()));
                self.links.insert(index, LinkState { coordinator: None, tx: link.to_coordinator });
            }
            Inbox::Disconnected { index } => {
                self.links.remove(&index);
            }
            Inbox::Message { index, message } => self.on_message(index, message)?,
        }
        Ok(())
    }

    fn on_message(&mut self, index: usize, message: ToWorker) -> Result<(), AgentError> {
        match message {
            ToWorker::Welcome { coordinator_id, .. } => {
                if let Some(l) = self.links.get_mut(&index) {
                    l.coordinator = Some(coordinator_id);
                }
            }
            ToWorker::Refused { reason } => return Err(AgentError::Refused(reason)),
            ToWorker::Assign(a) if a.epoch > self.latest && !self.stopping => self.assign(a),
            ToWorker::Assign(_) => {}
            ToWorker::Submit(req) => match &self.group {
                Some(g) if g.serving() && !self.stopping => g.submit(req),
                _ => {
                    let reason = if self.stopping { Rejection::ShuttingDown } else { Rejection::NotServing };
                    self.send_to(index, FromWorker::Rejected { id: req.id, reason });
                }
            },
            ToWorker::Cancel { id } => {
                if let Some(g) = &self.group {
                    g.cancel(id);
                }
            }
            // Every coordinator relays the id; the group takes the first that arrives.
            ToWorker::NcclId { epoch, id } => match &self.group {
                Some(g) if g.epoch() == epoch => g.nccl_id(id),
                _ if epoch > self.latest => self.early_nccl_id = Some((epoch, id)),
                _ => tracing::debug!(epoch, "ignoring the NCCL id of a past epoch"),
            },
            ToWorker::Shutdown => self.stop(),
        }
        Ok(())
    }

    /// Leave the current group for the newer epoch of `a` and start that epoch's group.
    fn assign(&mut self, a: Assignment) {
        if let Some(g) = self.group.take() {
            // Never block the agent on the old group: it may be waiting out a collective deadline.
            tokio::spawn(g.leave(AbortReason::EpochChanged { epoch: a.epoch }));
        }
        self.latest = a.epoch;
        let early = take_early_id(&mut self.early_nccl_id, a.epoch);
        self.group = Some(Group::start(Arc::clone(&self.config), a, early, self.notes.clone()));
    }

    /// Drain the group (the agent ends once it has left) and take no more work.
    fn stop(&mut self) {
        self.stopping = true;
        if let Some(g) = &self.group {
            g.drain();
        }
    }

    fn on_note(&mut self, note: GroupNote) -> Result<(), AgentError> {
        match note {
            GroupNote::Up(msg) => self.route(msg),
            GroupNote::Formed { .. } => self.heartbeat(),
            GroupNote::NcclId { epoch, id } => self.broadcast(FromWorker::NcclId { epoch, id }),
            GroupNote::Ended { epoch, result } => {
                if self.group.as_ref().is_some_and(|g| g.epoch() == epoch) {
                    self.group = None;
                }
                match result {
                    Ok(stats) => self.broadcast(FromWorker::Stats(stats)),
                    Err(error) => {
                        self.broadcast(FromWorker::GroupFailed { epoch, error: error.clone() });
                        if self.lifetime == Lifetime::OneGroup {
                            return Err(AgentError::GroupFailed { epoch, error });
                        }
                    }
                }
                if self.lifetime == Lifetime::OneGroup && self.group.is_none() {
                    self.stopping = true;
                }
            }
        }
        Ok(())
    }

    fn heartbeat(&self) {
        let status = self.group.as_ref().map(Group::status).unwrap_or_default();
        self.broadcast(FromWorker::Status(status));
    }

    fn broadcast(&self, msg: FromWorker) {
        for l in self.links.values() {
            let _ = l.tx.send(msg.clone());
        }
    }

    fn send_to(&self, index: usize, msg: FromWorker) {
        if let Some(l) = self.links.get(&index) {
            let _ = l.tx.send(msg);
        }
    }

    /// Send a request's event to the coordinator whose id the request id carries (a static
    /// group's single link takes them all).
    fn route(&self, msg: FromWorker) {
        let id = match &msg {
            FromWorker::Event(e) => e.id(),
            FromWorker::Rejected { id, .. } => *id,
            _ => return self.broadcast(msg),
        };
        let owner = request_coordinator(id);
        let link = match self.links.len() {
            1 => self.links.values().next(),
            _ => self.links.values().find(|l| l.coordinator == Some(owner)),
        };
        if let Some(l) = link {
            let _ = l.tx.send(msg);
        }
    }
}

/// The kept NCCL id if it is `epoch`'s; an id of a still newer epoch stays for that epoch's
/// assignment, an older one is dropped.
fn take_early_id(early: &mut Option<(u64, NcclId)>, epoch: u64) -> Option<NcclId> {
    let id = early.filter(|&(e, _)| e == epoch).map(|(_, id)| id);
    *early = early.filter(|&(e, _)| e > epoch);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{CONTROL_VERSION, DataPlane, WorkerDevice};
    use crate::engine::EngineConfig;
    use crate::engine::device::DeviceOptions;
    use crate::frontend::Frontend;
    use crate::model::weights::ComputeDtype;
    use crate::placement::{MoeShape, Placement};
    use crate::transport::tcp::TcpOptions;
    use std::net::TcpListener;

    #[test]
    fn an_early_nccl_id_waits_for_its_own_epoch() {
        let id = NcclId([3; crate::control::NCCL_ID_BYTES]);
        let mut early = Some((7, id));
        assert_eq!(take_early_id(&mut early, 6), None, "an older assignment does not take it");
        assert_eq!(early, Some((7, id)), "and it stays for epoch 7");
        assert_eq!(take_early_id(&mut early, 7), Some(id));
        assert_eq!(early, None);
        let mut stale = Some((5, id));
        assert_eq!(take_early_id(&mut stale, 6), None);
        assert_eq!(stale, None, "an id older than the assignment is dropped");
    }

    // A CPU worker told to run NCCL must fail that group with an error that says why and how
    // to get TCP instead (reported to the coordinators), not hang waiting for an id or a GPU.
    #[test]
    fn a_cpu_worker_fails_an_nccl_group_with_the_way_out() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/scout/model");
        let frontend = Arc::new(Frontend::load(&dir).expect("the golden scout checkpoint"));
        let text = &frontend.config.text;
        let shape = MoeShape { moe_layers: text.moe_layers(), experts: text.num_local_experts };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let data_addr = listener.local_addr().expect("addr");
        let config = AgentConfig {
            hello: WorkerHello {
                name: "w1".into(),
                data_addr,
                memory_bytes: 0,
                device: WorkerDevice::Cpu,
                fingerprint: frontend.fingerprint(),
                version: CONTROL_VERSION,
            },
            group: GroupConfig {
                frontend,
                dtype: ComputeDtype::F32,
                engine: EngineConfig::default(),
                device: DeviceOptions::default(),
                tcp: TcpOptions::default(),
                listener,
                setup_timeout: Duration::from_secs(10),
            },
            heartbeat: Duration::from_millis(50),
            lifetime: Lifetime::FollowEpochs,
        };
        let assignment = Assignment {
            epoch: 3,
            rank: 1,
            members: vec!["127.0.0.1:9".parse().expect("addr"), data_addr],
            placement: Placement::round_robin(2, &shape),
            step_timeout_ms: 1_000,
            data_plane: DataPlane::Nccl,
        };

        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let error = runtime.block_on(async move {
            let (inbox_tx, inbox) = mpsc::unbounded_channel();
            let (to_coordinator, mut from_worker) = mpsc::unbounded_channel();
            let agent = tokio::spawn(run(config, inbox));
            inbox_tx.send(Inbox::Connected { index: 0, link: Link { to_coordinator } }).expect("send");
            let message = ToWorker::Assign(assignment);
            inbox_tx.send(Inbox::Message { index: 0, message }).expect("send");
            let error = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    match from_worker.recv().await.expect("the agent stopped") {
                        FromWorker::GroupFailed { epoch, error } => break (epoch, error),
                        FromWorker::NcclId { .. } => panic!("rank 1 must not make an NCCL id"),
                        _ => {}
                    }
                }
            })
            .await
            .expect("no GroupFailed within 60 s");
            drop(inbox_tx);
            tokio::time::timeout(Duration::from_secs(30), agent)
                .await
                .expect("agent exits")
                .expect("join")
                .expect("ok");
            error
        });
        assert_eq!(error.0, 3);
        assert!(error.1.contains("NCCL") && error.1.contains("--data-plane tcp"), "unhelpful error: {}", error.1);
    }
}
