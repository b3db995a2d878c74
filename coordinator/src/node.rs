//! The composition root of one coordinator: [`start`] binds its four listeners, wires the
//! Raft node, the scheduler, the control server, the leader duties and both HTTP APIs together,
//! and returns a [`NodeHandle`] whose [`shutdown`](NodeHandle::shutdown) stops them all (as
//! mini-redis's `run(listener, shutdown)`: the I/O comes in as configuration, so tests start
//! real nodes on `127.0.0.1:0`).
//!
//! ```text
//! raft listener ── raft_quic ── RaftNode(ClusterMachine) ── applied states ──▶ Scheduler
//! control listener ── control_server ── Scheduler ◀── leader (verdicts, epochs)
//! api listener ── api (OpenAI) ── ClusterService(Scheduler)
//! admin listener ── admin ── Raft reads and membership changes
//! ```

use crate::admin::{self, AdminState};
use crate::api::{self, ApiConfig, ApiState};
use crate::cluster::{ClusterCommand, ClusterState, CoordinatorInfo, ModelSpec, Outcome};
use crate::control_server;
use crate::data_plane::DataPlanePolicy;
use crate::leader::{self, LeaderConfig};
use crate::raft::{RaftConfig, RaftError, RaftHandle, RaftNode};
use crate::raft_quic::{self, QuicRaftTransport};
use crate::scheduler::{ClusterService, Scheduler};
use crate::state_machine::{ClusterMachine, decode_outcome, encode_command};
use herd_net::TlsFiles;
use herd_worker::frontend::Frontend;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Everything one coordinator is started from (the CLI turns flags and TOML into this).
pub struct NodeConfig {
    /// This coordinator's id (non-zero, unique).
    pub id: u64,
    /// Where the Raft log, hard state and snapshots are kept (under `raft/`).
    pub data_dir: PathBuf,
    /// Every founding coordinator's Raft address (this one included), or with `join` the
    /// current members'.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Join a running cluster instead of founding one.
    pub join: bool,
    pub raft_listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub frontend: Arc<Frontend>,
    pub tls: TlsFiles,
    /// The OpenAI API's settings (served model name, keys, limits).
    pub api: ApiConfig,
    pub admin_key: Option<String>,
    pub min_workers: usize,
    pub step_timeout: Duration,
    pub data_plane: DataPlanePolicy,
    pub suspect_after: Duration,
    pub dead_after: Duration,
    pub raft_tick: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("binding {what} ({addr}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("binding {what} ({addr}): {source}")]
    Quic { what: &'static str, addr: SocketAddr, source: herd_net::NetError },
    #[error("starting the raft node: {0}")]
    Raft(#[from] RaftError),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running coordinator.
pub struct NodeHandle {
    info: CoordinatorInfo,
    raft: RaftHandle<ClusterMachine>,
    /// Kept for its `Drop`, which stops the Raft thread if `shutdown` is never called.
    _node: RaftNode,
    endpoints: Vec<quinn::Endpoint>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle").field("info", &self.info).finish_non_exhaustive()
    }
}

impl NodeHandle {
    /// The addresses this coordinator is bound to (ports chosen by the OS where asked for 0).
    pub fn info(&self) -> &CoordinatorInfo {
        &self.info
    }

    pub fn raft(&self) -> &RaftHandle<ClusterMachine> {
        &self.raft
    }

    /// Stop accepting, let open HTTP requests finish, stop every task and the Raft node.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for e in &self.endpoints {
            e.close(0u32.into(), b"coordinator shutting down");
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.raft.shutdown().await;
    }
}

/// A future that completes once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Run `task` until it ends or the node stops.
fn until_stopped(stop: &watch::Sender<bool>, task: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
    let stop = stop.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = stopped(stop) => {}
        }
    })
}

/// Start a coordinator on the current tokio runtime.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    let me = config.id;
    let quic = |what, addr| {
        herd_net::quic::server_endpoint(addr, &config.tls).map_err(|source| NodeError::Quic { what, addr, source })
    };
    let raft_endpoint = quic("--raft-listen", config.raft_listen)?;
    let control = quic("--control-listen", config.control_listen)?;
    let tcp = |what, addr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { what, addr, source })
    };
    let admin_listener = tcp("--admin-listen", config.admin_listen).await?;
    let api_listener = tcp("--api-listen", config.api_listen).await?;
    let local = |r: std::io::Result<SocketAddr>, asked: SocketAddr| r.unwrap_or(asked);
    let info = CoordinatorInfo {
        id: me,
        raft_addr: local(raft_endpoint.local_addr(), config.raft_listen),
        control_addr: local(control.local_addr(), config.control_listen),
        api_addr: local(api_listener.local_addr(), config.api_listen),
        admin_addr: local(admin_listener.local_addr(), config.admin_listen),
    };
    let (stop, _) = watch::channel(false);
    let mut tasks = Vec::new();

    // Raft over QUIC.
    let others: BTreeMap<u64, SocketAddr> =
        config.peers.iter().filter(|(id, _)| **id != me).map(|(i, a)| (*i, *a)).collect();
    let transport =
        Arc::new(QuicRaftTransport::start(me, others, raft_endpoint.clone(), &tokio::runtime::Handle::current()));
    let founders = if config.join { Vec::new() } else { config.peers.keys().copied().collect() };
    let mut raft_config = RaftConfig::new(me, founders, config.data_dir.join("raft"));
    raft_config.tick = config.raft_tick;
    let (machine, mut applied) = ClusterMachine::new();
    let (node, raft) = RaftNode::spawn(raft_config, machine, Arc::clone(&transport))?;
    tasks.push(until_stopped(&stop, raft_quic::serve(raft_endpoint.clone(), raft.mailbox())));

    // The scheduler and the Raft peers' addresses follow every applied state (a coordinator
    // added later becomes reachable once its address is in the log).
    let scheduler = Scheduler::new(me, config.step_timeout.as_millis() as u64, config.data_plane);
    {
        let (raft, scheduler) = (raft.clone(), Arc::clone(&scheduler));
        let on_state = move |state: &ClusterState| {
            scheduler.set_state(state);
            for c in state.coordinators.values() {
                transport.set_peer(c.id, c.raft_addr);
            }
        };
        on_state(&raft.read(|m| m.state().clone()));
        tasks.push(until_stopped(&stop, async move {
            while applied.changed().await.is_ok() {
                on_state(&raft.read(|m| m.state().clone()));
            }
        }));
    }

    // Worker control channels.
    let control_task = control_server::serve(control.clone(), raft.clone(), Arc::clone(&scheduler), me);
    tasks.push(until_stopped(&stop, control_task));

    // Leader duties.
    let text = &config.frontend.config.text;
    let model = ModelSpec {
        name: config.api.served_model_name.clone(),
        fingerprint: config.frontend.fingerprint(),
        moe_layers: text.moe_layers(),
        experts: text.num_local_experts,
    };
    let leader_config = LeaderConfig {
        me,
        model,
        min_workers: config.min_workers,
        suspect_after: config.suspect_after,
        dead_after: config.dead_after,
        interval: Duration::from_millis(250),
    };
    tasks.push(until_stopped(&stop, leader::run(leader_config, raft.clone(), Arc::clone(&scheduler))));

    // Announce this coordinator's addresses through the log (retried until a leader exists).
    {
        let (raft, info) = (raft.clone(), info.clone());
        tasks.push(until_stopped(&stop, async move {
            loop {
                match raft.propose(encode_command(&ClusterCommand::AddCoordinator(info.clone()))).await {
                    Ok(b) if matches!(decode_outcome(&b), Outcome::Done | Outcome::Unchanged) => return,
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }));
    }

    // Admin API.
    let admin_state = AdminState {
        raft: raft.clone(),
        scheduler: Arc::clone(&scheduler),
        admin_key: config.admin_key.clone(),
        this: info.clone(),
    };
    let admin_stop = stopped(stop.subscribe());
    tasks.push(tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin::router(admin_state)).with_graceful_shutdown(admin_stop).await;
    }));

    // OpenAI API.
    let service = Arc::new(ClusterService(Arc::clone(&scheduler)));
    let state = ApiState::new(config.api, Arc::clone(&config.frontend), service)?;
    let api_stop = stopped(stop.subscribe());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = api::serve(api_listener, state, api_stop).await {
            tracing::error!("the API server stopped: {e}");
        }
    }));

    Ok(NodeHandle { info, raft, _node: node, endpoints: vec![raft_endpoint, control], stop, tasks })
}
