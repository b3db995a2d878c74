//! `herd serve`: a whole cluster on one host — coordinators and worker processes, a fresh
//! cluster CA, ports on 127.0.0.1 — behind one OpenAI-compatible address.
//!
//! Children are `herd coordinator` and `herd worker --coordinators` processes of this same
//! executable, so what runs here is exactly what runs on a multi-host cluster.

use super::engine_flags::EngineFlags;
use super::image_flags::ImageFlags;
use super::{http, model_arg, sys};
use anyhow::{Context, bail};
use herd_coordinator::data_plane::DataPlanePolicy;
use herd_worker::model::weights::ComputeDtype;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint directory, or a synth preset (tiny, scout-mini, maverick-mini).
    #[arg(long)]
    model: String,
    /// Worker processes (expert-parallel, one lockstep group).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Coordinator processes (3 to try leader failover on one host).
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// The OpenAI-compatible API address (of the first coordinator).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Where the cluster keeps its CA and Raft data (default: a fresh directory removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The model id clients name (default: the --model argument's last component).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, default_value = "bf16")]
    dtype: ComputeDtype,
    #[command(flatten)]
    engine: EngineFlags,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long)]
    api_key: Option<String>,
    /// Prompt plus completion tokens one request may use (default: the model's context length).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Largest API request body in bytes (base64 images count here first).
    #[arg(long, default_value_t = herd_coordinator::api::ApiConfig::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    #[command(flatten)]
    images: ImageFlags,
    /// Deadline of each data-plane collective between workers.
    #[arg(long, default_value_t = 60_000)]
    step_timeout_ms: u64,
    /// The workers' data plane: `auto` (NCCL when each worker has a GPU of its own) or `tcp`.
    #[arg(long, value_enum, default_value_t = DataPlanePolicy::Auto)]
    data_plane: DataPlanePolicy,
    /// Directory where presets are synthesised (default ~/.cache/herd).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// A free port on 127.0.0.1 (the OS picks; there is a small window before the child binds it).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    super::device::check(args.engine.device)?; // before any model is loaded
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(args.coordinators > 0, "--coordinators must be at least 1");
    let model_dir = model_arg::resolve(&args.model, args.cache_dir.as_deref())?;
    let served = args.served_model_name.clone().unwrap_or_else(|| {
        Path::new(&args.model).file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let (data_dir, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("herd-serve-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let result = run_in(&args, &model_dir, &served, &data_dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

fn run_in(args: &ServeArgs, model_dir: &Path, served: &str, data_dir: &Path) -> anyhow::Result<()> {
    let tls = data_dir.join("tls");
    if !tls.join(herd_net::ca::CA_CERT).exists() {
        herd_net::init_ca(&tls, &["127.0.0.1".into(), "localhost".into()]).context("creating the cluster CA")?;
    }
    let exe = std::env::current_exe().context("locating the herd executable")?;
    let coords: Vec<[SocketAddr; 4]> = (0..args.coordinators)
        .map(|i| -> anyhow::Result<[SocketAddr; 4]> {
            let api = if i == 0 { args.listen } else { free_port()? };
            Ok([free_port()?, free_port()?, api, free_port()?])
        })
        .collect::<anyhow::Result<_>>()?;
    let peers: Vec<String> = coords.iter().enumerate().map(|(i, a)| format!("{}={}", i + 1, a[0])).collect();
    let controls: Vec<String> = coords.iter().map(|a| a[1].to_string()).collect();
    let mut children = Children(Vec::new());
    for (i, [raft, control, api, admin]) in coords.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.arg("coordinator")
            .args(["--id", &(i + 1).to_string(), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(data_dir.join(format!("coordinator-{}", i + 1)))
            .args(["--raft-listen", &raft.to_string(), "--control-listen", &control.to_string()])
            .args(["--api-listen", &api.to_string(), "--admin-listen", &admin.to_string()])
            .arg("--model")
            .arg(model_dir)
            .args(["--served-model-name", served, "--min-workers", &args.workers.to_string()])
            .args(["--step-timeout-ms", &args.step_timeout_ms.to_string()])
            .args(["--data-plane", args.data_plane.as_arg()])
            .arg("--tls-dir")
            .arg(&tls)
            .args(["--max-body-bytes", &args.max_body_bytes.to_string()])
            .args(args.images.to_args());
        if let Some(key) = &args.api_key {
            cmd.args(["--api-key", key]);
        }
        if let Some(len) = args.max_model_len {
            cmd.args(["--max-model-len", &len.to_string()]);
        }
        sys::terminate_with_parent(&mut cmd);
        children.0.push((
            format!("coordinator {}", i + 1),
            cmd.stdin(Stdio::null()).spawn().context("starting a coordinator")?,
        ));
    }
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / args.workers).max(1);
    let devices = super::device::worker_devices(args.engine.device, args.workers);
    for (j, device) in devices.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.args(["--threads", &threads.to_string(), "worker", "--coordinators", &controls.join(",")])
            .arg("--tls-dir")
            .arg(&tls)
            .arg("--model")
            .arg(model_dir)
            .args(["--name", &format!("worker-{j}"), "--listen", "127.0.0.1:0", "--dtype", &args.dtype.to_string()])
            .args(["--step-timeout-ms", &args.step_timeout_ms.to_string()])
            .args(args.engine.to_args())
            .args(["--device", &device.to_string()]);
        sys::terminate_with_parent(&mut cmd);
        children.0.push((format!("worker {j}"), cmd.stdin(Stdio::null()).spawn().context("starting a worker")?));
    }

    // Ready when the first coordinator's /health says every worker serves the current epoch.
    let health = format!("http://{}/health", args.listen);
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http::get(&health, None, Duration::from_secs(2)) {
            break;
        }
        for (name, child) in &mut children.0 {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited during start-up ({status})");
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the cluster did not become healthy within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "herd serve: OpenAI API at http://{}/v1 (model {served}), {} coordinator(s), {} worker(s); admin at http://{}; ready in {:.1} s",
        args.listen,
        args.coordinators,
        args.workers,
        coords[0][3],
        started.elapsed().as_secs_f64()
    );
    for (i, c) in coords.iter().enumerate().skip(1) {
        println!("  coordinator {}: API http://{}/v1, admin http://{}", i + 1, c[2], c[3]);
    }
    // Serve until interrupted; children that exit are reported but the rest keep serving.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook_like::SIGINT, signal_hook_like::SIGTERM] {
        signal_hook_like::register(sig, std::sync::Arc::clone(&stop));
    }
    let mut reported = vec![false; children.0.len()];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (k, (name, child)) in children.0.iter_mut().enumerate() {
            if !reported[k]
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("[herd serve] {name} exited ({status})");
                reported[k] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("[herd serve] shutting down");
    Ok(())
}

/// Ctrl-C / SIGTERM into a flag, with tokio's signal support on a small runtime thread.
mod signal_hook_like {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;

    pub fn register(sig: i32, flag: Arc<AtomicBool>) {
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let kind = tokio::signal::unix::SignalKind::from_raw(sig);
                if let Ok(mut s) = tokio::signal::unix::signal(kind) {
                    s.recv().await;
                    flag.store(true, Ordering::Relaxed);
                }
            });
        });
    }
}
