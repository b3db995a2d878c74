//! A real cluster on loopback: 3 coordinators (Raft over QUIC) and 2 workers (expert-parallel
//! over TCP), all separate `herd` processes, serving the golden Maverick-shaped model in f32.
//!
//! 1. A greedy chat completion through the cluster returns exactly what `herd generate` gives.
//! 2. kill -9 the Raft leader under a stream of requests to a follower: a new leader within a
//!    few seconds, the requests keep succeeding, the answer is unchanged.
//! 3. Restart the killed coordinator from its data directory: it catches up.
//! 4. kill -9 a worker: its requests fail fast with a clear error, it is judged dead, /health
//!    says so, and after the leader re-plans onto the survivor the cluster serves again.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const HERD: &str = env!("CARGO_BIN_EXE_herd");

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/maverick/model")
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// Minimal HTTP/1.1 request; returns (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

struct Coordinator {
    id: u64,
    raft: SocketAddr,
    control: SocketAddr,
    api: SocketAddr,
    admin: SocketAddr,
    data: PathBuf,
    child: Option<Child>,
}

struct Cluster {
    dir: tempfile::TempDir,
    coordinators: Vec<Coordinator>,
    workers: Vec<Option<Child>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.coordinators.iter_mut().filter_map(|c| c.child.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for w in self.workers.iter_mut().flatten() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Cluster {
    fn tls(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    fn start_coordinator(&mut self, i: usize) {
        let peers: Vec<String> = self.coordinators.iter().map(|c| format!("{}={}", c.id, c.raft)).collect();
        let c = &self.coordinators[i];
        let child = Command::new(HERD)
            .arg("coordinator")
            .args(["--id", &c.id.to_string(), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(&c.data)
            .args(["--raft-listen", &c.raft.to_string(), "--control-listen", &c.control.to_string()])
            .args(["--api-listen", &c.api.to_string(), "--admin-listen", &c.admin.to_string()])
            .arg("--model")
            .arg(model())
            .args(["--served-model-name", "golden", "--min-workers", "2", "--step-timeout-ms", "3000"])
            .args(["--suspect-after-ms", "1000", "--dead-after-ms", "2500", "--raft-tick-ms", "50"])
            .arg("--tls-dir")
            .arg(self.tls())
            .stdin(Stdio::null())
            .spawn()
            .expect("start coordinator");
        self.coordinators[i].child = Some(child);
    }

    fn start_worker(&mut self, j: usize) -> Child {
        let controls: Vec<String> = self.coordinators.iter().map(|c| c.control.to_string()).collect();
        Command::new(HERD)
            .args(["--threads", "1", "worker", "--coordinators", &controls.join(",")])
            .arg("--tls-dir")
            .arg(self.tls())
            .arg("--model")
            .arg(model())
            .args([
                "--name",
                &format!("w{j}"),
                "--dtype",
                "f32",
                "--kv-cache-bytes",
                "64M",
                "--step-timeout-ms",
                "3000",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("start worker")
    }

    fn status(&self, i: usize) -> Option<Value> {
        let (code, body) =
            http(self.coordinators[i].admin, "GET", "/admin/status", None, Duration::from_secs(3)).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    fn health(&self, i: usize) -> Option<(u16, String)> {
        http(self.coordinators[i].api, "GET", "/health", None, Duration::from_secs(3)).ok()
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat_request(max_tokens: usize) -> Value {
    json!({
        "model": "golden",
        "messages": [{"role": "user", "content": "Tell me about mixtures of experts."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// A greedy completion's text, or the error.
fn chat(api: SocketAddr, max_tokens: usize) -> Result<String, String> {
    let (code, body) =
        http(api, "POST", "/v1/chat/completions", Some(&chat_request(max_tokens)), Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{code}: {e}: {body}"))?;
    if code != 200 {
        return Err(format!("{code}: {}", v["error"]["message"]));
    }
    Ok(v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_owned())
}

/// A streamed greedy completion: the raw event stream. `first` gets a message as soon as
/// a chunk with generated text has arrived (so its worker has produced a token).
fn stream_chat(api: SocketAddr, max_tokens: usize, first: std::sync::mpsc::Sender<()>) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = chat_request(max_tokens);
    req["stream"] = json!(true);
    let payload = req.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )?;
    let (mut raw, mut buf, mut signalled) = (Vec::new(), [0u8; 4096], false);
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if !signalled {
            let text = String::from_utf8_lossy(&raw);
            let token = text.lines().filter_map(|l| l.strip_prefix("data: ")).any(|d| {
                serde_json::from_str::<Value>(d)
                    .ok()
                    .and_then(|v| v["choices"][0]["delta"]["content"].as_str().map(|c| !c.is_empty()))
                    .unwrap_or(false)
            });
            if token {
                let _ = first.send(());
                signalled = true;
            }
        }
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn leader_of(s: &Value) -> Option<u64> {
    s["leader"].as_u64()
}

#[test]
fn leader_and_worker_failures_keep_the_cluster_serving_identical_tokens() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Command::new(HERD)
        .args(["ca", "init", "--dir"])
        .arg(dir.path().join("tls"))
        .args(["--hosts", "127.0.0.1,localhost"])
        .output()
        .expect("herd ca init");
    assert!(ca.status.success(), "{}", String::from_utf8_lossy(&ca.stderr));
    let coordinators = (1..=3)
        .map(|id| Coordinator {
            id,
            raft: free_addr(),
            control: free_addr(),
            api: free_addr(),
            admin: free_addr(),
            data: dir.path().join(format!("c{id}")),
            child: None,
        })
        .collect();
    let mut cluster = Cluster { dir, coordinators, workers: Vec::new() };
    for i in 0..3 {
        cluster.start_coordinator(i);
    }
    for j in 0..2 {
        let w = cluster.start_worker(j);
        cluster.workers.push(Some(w));
    }
    for i in 0..3 {
        wait_for("every coordinator healthy", Duration::from_secs(60), || cluster.health(i).filter(|(c, _)| *c == 200));
    }

    // 1. Same tokens as a local run.
    let local = Command::new(HERD)
        .arg("generate")
        .arg("--model")
        .arg(model())
        .args(["--dtype", "f32", "--chat", "Tell me about mixtures of experts.", "--max-tokens", "24"])
        .args(["--temperature", "0", "--ignore-eos"])
        .output()
        .expect("herd generate");
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let local = String::from_utf8_lossy(&local.stdout).into_owned();
    let reference = local.rsplit_once("\n[herd]").map(|(t, _)| t.to_owned()).expect("generated text");
    let first = chat(cluster.coordinators[0].api, 24).expect("chat through the cluster");
    assert_eq!(first, reference, "cluster output differs from herd generate");
    // CPU workers: the coordinators chose TCP for the group (NCCL needs a GPU per member).
    let status = cluster.status(0).expect("admin status");
    assert_eq!(status["placement"]["data_plane"], "tcp", "{status}");

    // 2. Kill the leader under a stream of requests to a follower.
    let leader = wait_for("a leader", Duration::from_secs(10), || cluster.status(0).and_then(|s| leader_of(&s)));
    let li = cluster.coordinators.iter().position(|c| c.id == leader).expect("leader index");
    let fi = (li + 1) % 3;
    let follower_api = cluster.coordinators[fi].api;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let reference = reference.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match chat(follower_api, 24) {
                    Ok(text) if text == reference => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request during failover: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let child = cluster.coordinators[li].child.as_mut().expect("leader process");
    child.kill().expect("kill -9 leader");
    let _ = child.wait();
    cluster.coordinators[li].child = None;
    let killed = Instant::now();
    let new_leader = wait_for("a new leader", Duration::from_secs(15), || {
        cluster.status(fi).and_then(|s| leader_of(&s)).filter(|&l| l != leader)
    });
    let failover = killed.elapsed();
    eprintln!("leader {leader} killed; coordinator {new_leader} leads after {failover:?}");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    assert!(ok.load(Ordering::Relaxed) > 0, "no request succeeded during the failover");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests to a surviving coordinator failed");
    assert!(failover < Duration::from_secs(10), "failover took {failover:?}");
    assert_eq!(chat(follower_api, 24).expect("after failover"), reference);

    // 3. Restart the old leader from its disk: it catches up.
    cluster.start_coordinator(li);
    let target = cluster.status(fi).expect("follower status")["raft"]["commit"].as_u64().unwrap_or(0);
    wait_for("the restarted coordinator to catch up", Duration::from_secs(30), || {
        cluster.status(li).filter(|s| {
            s["raft"]["applied"].as_u64().unwrap_or(0) >= target && s["leader"].as_u64() == Some(new_leader)
        })
    });

    // 4. Kill a worker under load: its requests fail fast; the survivor takes over. The kill
    // waits for the long request's first token: a request that has produced none is retried
    // on the survivor (and then finishes), one that has must fail.
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let long = {
        let api = follower_api;
        std::thread::spawn(move || {
            let started = Instant::now();
            (stream_chat(api, 4000, first_tx), started.elapsed())
        })
    };
    first_rx.recv_timeout(Duration::from_secs(30)).expect("the long request's first token");
    let mut w0 = cluster.workers[0].take().expect("worker 0");
    w0.kill().expect("kill -9 worker");
    let _ = w0.wait();
    let (result, took) = long.join().expect("long request");
    let events = result.expect("the stream of the long request");
    assert!(
        !events.contains("\"finish_reason\":\"length\"") && events.contains("\"error\""),
        "a request on the failed group cannot finish: {events}"
    );
    assert!(took < Duration::from_secs(30), "the failed request took {took:?}");
    eprintln!("request on the failed group ended after {took:?}");
    // /health names w0: as the reason for a 503 while its epoch is broken, then in the
    // `not_live` list once the survivor serves a new epoch.
    wait_for("/health to report the dead worker", Duration::from_secs(15), || {
        cluster.health(fi).filter(|(_, body)| body.contains("\"w0\""))
    });
    // The leader re-plans as soon as w0 stops being live (suspect), and judges it dead a
    // little later.
    wait_for("a new epoch on the survivor", Duration::from_secs(30), || {
        cluster.status(fi).filter(|s| s["placement"]["members"].as_array().is_some_and(|m| m.len() == 1))
    });
    wait_for("w0 judged dead", Duration::from_secs(15), || {
        cluster.status(fi).filter(|s| {
            s["workers"].as_array().into_iter().flatten().any(|w| w["name"] == "w0" && w["verdict"] == "dead")
        })
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.health(fi).is_none_or(|(c, _)| c != 200) {
        assert!(
            Instant::now() < deadline,
            "health never returned to ok: {:?}\nstatus: {}",
            cluster.health(fi),
            cluster.status(fi).map(|s| s.to_string()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(chat(follower_api, 24).expect("after the worker failure"), reference);
}
