//! A group of `herd worker` processes on this host, driven over their stdin/stdout control
//! channels (JSON lines of [`Command`] and [`Report`]).
//!
//! Start-up: every worker binds a data-plane port on 127.0.0.1 and reports it
//! (`Listening`); once all have, each gets the full address list (`Peers`), the group
//! connects, and each reports `Ready`. Letting workers pick their own ports avoids the race
//! of choosing free ports for them in advance.

use anyhow::{Context, bail};
use herd_worker::control::{Command, Report, WorkerStats, read_message, write_message};
use std::io::BufReader;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

/// A message from one worker.
#[derive(Debug)]
pub enum WorkerMsg {
    Report(Report),
    /// Its control channel closed (the process exited or crashed).
    Closed,
}

/// How to start the group.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `herd` executable.
    pub exe: PathBuf,
    pub workers: usize,
    pub model_dir: PathBuf,
    /// Extra `herd worker` arguments (placement, dtype, engine flags, timeouts).
    pub worker_args: Vec<String>,
    /// More arguments for rank `i` only (e.g. its `--device`); ranks past the end get none.
    pub rank_args: Vec<Vec<String>>,
    /// Compute threads per worker (`None`: each uses every core, which oversubscribes).
    pub threads: Option<usize>,
    /// How long start-up (model load + connect) may take.
    pub start_timeout: Duration,
}

/// Running worker processes.
#[derive(Debug)]
pub struct LocalCluster {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    rx: Receiver<(usize, WorkerMsg)>,
}

impl LocalCluster {
    /// Spawn the workers and wait until every one is `Ready`.
    pub fn start(opts: &ClusterOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(opts.workers > 0, "--workers must be at least 1");
        let (tx, rx) = channel();
        let mut cluster = Self { children: Vec::new(), stdins: Vec::new(), rx };
        for rank in 0..opts.workers {
            let mut cmd = std::process::Command::new(&opts.exe);
            if let Some(t) = opts.threads {
                cmd.args(["--threads", &t.to_string()]);
            }
            let mut child = cmd
                .arg("worker")
                .args(["--rank", &rank.to_string(), "--world", &opts.workers.to_string()])
                .arg("--model")
                .arg(&opts.model_dir)
                .args(&opts.worker_args)
                .args(opts.rank_args.get(rank).into_iter().flatten())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {rank} ({})", opts.exe.display()))?;
            let stdout = child.stdout.take().context("worker stdout")?;
            cluster.stdins.push(child.stdin.take());
            cluster.children.push(child);
            spawn_reader(rank, stdout, tx.clone());
        }
        drop(tx);
        let deadline = Instant::now() + opts.start_timeout;
        let mut addrs: Vec<Option<SocketAddr>> = vec![None; opts.workers];
        while addrs.iter().any(Option::is_none) {
            match cluster.recv_until(deadline)? {
                (rank, Report::Listening { addr, .. }) => addrs[rank] = Some(addr),
                (rank, other) => bail!("worker {rank} sent {other:?} before reporting its address"),
            }
        }
        let addrs: Vec<SocketAddr> = addrs.into_iter().flatten().collect();
        for rank in 0..opts.workers {
            cluster.send(rank, &Command::Peers { addrs: addrs.clone() })?;
        }
        let mut ready = vec![false; opts.workers];
        while ready.iter().any(|r| !r) {
            match cluster.recv_until(deadline)? {
                (rank, Report::Ready { .. }) => ready[rank] = true,
                (rank, other) => bail!("worker {rank} sent {other:?} before it was ready"),
            }
        }
        Ok(cluster)
    }

    pub fn workers(&self) -> usize {
        self.children.len()
    }

    /// Send a command to one worker.
    pub fn send(&mut self, rank: usize, cmd: &Command) -> anyhow::Result<()> {
        let stdin =
            self.stdins.get_mut(rank).and_then(Option::as_mut).with_context(|| format!("worker {rank} is gone"))?;
        write_message(stdin, cmd).with_context(|| format!("sending to worker {rank}"))
    }

    /// The next message from any worker, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<(usize, WorkerMsg)> {
        self.rx.recv_timeout(timeout).ok()
    }

    fn recv_until(&self, deadline: Instant) -> anyhow::Result<(usize, Report)> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok((rank, WorkerMsg::Report(Report::Fatal { error }))) => bail!("worker {rank} failed: {error}"),
            Ok((rank, WorkerMsg::Report(r))) => Ok((rank, r)),
            Ok((rank, WorkerMsg::Closed)) => bail!("worker {rank} exited during start-up"),
            Err(_) => bail!("workers did not start within the start-up timeout"),
        }
    }

    /// Ask every worker to leave and wait up to `timeout` for them to exit; stragglers are
    /// killed. Returns each worker's exit code (`None` if killed by a signal).
    pub fn shutdown(self, timeout: Duration) -> Vec<Option<i32>> {
        self.shutdown_with_stats(timeout).0
    }

    /// [`shutdown`](Self::shutdown), also collecting the statistics each worker reports as it leaves.
    pub fn shutdown_with_stats(mut self, timeout: Duration) -> (Vec<Option<i32>>, Vec<WorkerStats>) {
        for rank in 0..self.children.len() {
            let _ = self.send(rank, &Command::Shutdown);
        }
        // Closing stdin also tells a worker its driver is gone.
        self.stdins.iter_mut().for_each(|s| drop(s.take()));
        let deadline = Instant::now() + timeout;
        let mut stats = Vec::new();
        let mut closed = vec![false; self.children.len()];
        while closed.iter().any(|c| !c) {
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((_, WorkerMsg::Report(Report::Stats(s)))) => stats.push(s),
                Ok((rank, WorkerMsg::Closed)) => closed[rank] = true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let mut codes = vec![None; self.children.len()];
        for (rank, child) in self.children.iter_mut().enumerate() {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        codes[rank] = status.code();
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        stats.sort_by_key(|s| s.rank);
        (codes, stats)
    }

    /// Kill one worker process (for failure tests).
    pub fn kill(&mut self, rank: usize) -> anyhow::Result<()> {
        self.children.get_mut(rank).context("no such worker")?.kill().context("killing worker")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn_reader(rank: usize, stdout: std::process::ChildStdout, tx: Sender<(usize, WorkerMsg)>) {
    std::thread::spawn(move || {
        let mut input = BufReader::new(stdout);
        loop {
            match read_message::<Report>(&mut input) {
                Ok(report) => {
                    if tx.send((rank, WorkerMsg::Report(report))).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = tx.send((rank, WorkerMsg::Closed));
                    return;
                }
            }
        }
    });
}
