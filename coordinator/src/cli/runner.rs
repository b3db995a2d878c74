//! Where `generate`, `eval` and `bench` run their requests: an engine in this process
//! (`--workers 0`), or a static group of `--workers N` processes served by a scheduler of its
//! own. Either way requests go through the API's `InferenceService` seam, driven by a
//! [`BlockingClient`].

use super::engine_flags::{ClusterFlags, EngineFlags};
use anyhow::Context;
use herd_coordinator::api::{InferenceService, LocalService};
use herd_coordinator::blocking::BlockingClient;
use herd_coordinator::local_cluster::{ClusterOptions, LocalCluster};
use herd_worker::control::WorkerStats;
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::placement::{MoeShape, Placement};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A running service and the client that drives it.
#[derive(Debug)]
pub struct Runner {
    pub client: BlockingClient,
    group: Option<LocalCluster>,
}

impl Runner {
    /// The service the flags ask for.
    pub fn start(
        dir: &Path,
        frontend: &Frontend,
        dtype: ComputeDtype,
        engine: &EngineFlags,
        cluster: &ClusterFlags,
    ) -> anyhow::Result<Self> {
        if cluster.workers == 0 {
            let model = Arc::new(frontend.load_model(dtype, None)?);
            let opts = engine.device_options();
            let mut built = herd_worker::engine::device::build(
                model,
                Arc::clone(&frontend.tokenizer),
                frontend.eos_ids(),
                engine.config()?,
                &opts,
            )
            .with_context(|| format!("starting the engine on --device {}", engine.device))?;
            // The vision tower runs on the CPU engine; a GPU engine refuses image prompts.
            if engine.device == herd_kernels::device::Device::Cpu
                && let Some((vision, patch)) = frontend.load_vision(dtype)?
            {
                built.enable_vision(Arc::new(vision), patch);
            }
            let service: Arc<dyn InferenceService> =
                Arc::new(LocalService::start(built, usize::MAX).context("starting the engine thread")?);
            return Ok(Self { client: BlockingClient::new(service, None)?, group: None });
        }
        let text = &frontend.config.text;
        let shape = MoeShape { moe_layers: text.moe_layers(), experts: text.num_local_experts };
        let mut worker_args = vec!["--dtype".to_string(), dtype.to_string()];
        worker_args.extend(engine.to_args());
        let step_timeout = Duration::from_millis(cluster.step_timeout_ms);
        let opts = ClusterOptions {
            exe: std::env::current_exe().context("locating the herd executable")?,
            workers: cluster.workers,
            model_dir: dir.to_path_buf(),
            placement: Placement::from_arg(&cluster.placement, cluster.workers, &shape)?,
            step_timeout,
            worker_args,
            // Worker i runs on the i-th GPU from --device's (several share a GPU when there are fewer).
            rank_args: super::device::worker_devices(engine.device, cluster.workers)
                .iter()
                .map(|d| vec!["--device".to_string(), d.to_string()])
                .collect(),
            // Workers on one host share its cores.
            threads: Some((rayon::current_num_threads() / cluster.workers).max(1)),
            start_timeout: Duration::from_secs(600),
            observe: false,
        };
        let group = LocalCluster::start(&opts)?;
        let service: Arc<dyn InferenceService> = Arc::new(group.service());
        // A group that has sent nothing for several collective deadlines is stuck.
        let timeout = step_timeout.max(Duration::from_secs(1)) * 4;
        Ok(Self { client: BlockingClient::new(service, Some(timeout))?, group: Some(group) })
    }

    /// Stop, returning what each worker measured (empty in process).
    pub fn close(self) -> Vec<WorkerStats> {
        drop(self.client);
        self.group.map(|g| g.shutdown_with_stats(Duration::from_secs(30)).1).unwrap_or_default()
    }
}
