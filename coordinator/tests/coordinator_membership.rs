//! Changing the coordinator tier while it runs, with real processes on loopback: three founding
//! coordinators, a fourth started with `--join` and added by `herd admin add-coordinator`, then
//! a founder removed by `herd admin remove-coordinator` and stopped. The remaining three keep a
//! quorum, and the joined node serves linearizable reads.

use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HERD: &str = env!("CARGO_BIN_EXE_herd");

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

struct Node {
    id: u64,
    raft: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
}

struct Nodes(Vec<Node>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.0.iter_mut().filter_map(|n| n.child.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(dir: &Path, node: &Node, peers: &str, join: bool) -> Child {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/maverick/model");
    let mut cmd = Command::new(HERD);
    cmd.arg("coordinator")
        .args(["--id", &node.id.to_string(), "--peers", peers])
        .arg("--data-dir")
        .arg(dir.join(format!("c{}", node.id)))
        .args(["--raft-listen", &node.raft.to_string(), "--control-listen", &free_addr().to_string()])
        .args(["--api-listen", &free_addr().to_string(), "--admin-listen", &node.admin.to_string()])
        .arg("--model")
        .arg(model)
        .args(["--raft-tick-ms", "50"])
        .arg("--tls-dir")
        .arg(dir.join("tls"))
        .stdin(Stdio::null());
    if join {
        cmd.arg("--join");
    }
    cmd.spawn().expect("start coordinator")
}

fn admin(args: &[&str]) -> Output {
    Command::new(HERD).arg("admin").args(args).output().expect("herd admin")
}

fn status(node: &Node) -> Option<Value> {
    let out = admin(&["status", "--coordinator", &format!("http://{}", node.admin), "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn member_ids(s: &Value) -> Vec<u64> {
    s["members"].as_array().expect("members").iter().map(|m| m["id"].as_u64().expect("id")).collect()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_coordinator_joins_and_a_founder_leaves() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir: PathBuf = tmp.path().to_owned();
    let ca = Command::new(HERD).args(["ca", "init", "--dir"]).arg(dir.join("tls")).output().expect("ca");
    assert!(ca.status.success(), "{}", String::from_utf8_lossy(&ca.stderr));

    let mut nodes =
        Nodes((1..=4).map(|id| Node { id, raft: free_addr(), admin: free_addr(), child: None }).collect::<Vec<_>>());
    let founders: Vec<String> = nodes.0[..3].iter().map(|n| format!("{}={}", n.id, n.raft)).collect();
    let founders = founders.join(",");
    for i in 0..3 {
        nodes.0[i].child = Some(start(&dir, &nodes.0[i], &founders, false));
    }
    wait_for("a leader among the founders", || status(&nodes.0[0]).filter(|s| s["leader"].as_u64() != Some(0)));

    // The joiner knows the founders' addresses but is not a member: it has no quorum to read.
    nodes.0[3].child = Some(start(&dir, &nodes.0[3], &founders, true));
    let joiner_admin = format!("http://{}", nodes.0[3].admin);
    wait_for("the joiner's admin API", || std::net::TcpStream::connect(nodes.0[3].admin).ok().map(|_| ()));
    assert!(status(&nodes.0[3]).is_none(), "a node that is not a member cannot answer a linearizable read");

    let add =
        admin(&["add-coordinator", "--coordinator", &format!("http://{}", nodes.0[0].admin), "--new", &joiner_admin]);
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    let s =
        wait_for("the joiner to see four members", || status(&nodes.0[3]).filter(|s| member_ids(s) == [1, 2, 3, 4]));
    assert!(s["members"][3]["addrs"]["raft_addr"].as_str().is_some(), "the joiner's addresses are in the log: {s}");

    // Adding a member twice is a clear refusal.
    let again =
        admin(&["add-coordinator", "--coordinator", &format!("http://{}", nodes.0[1].admin), "--new", &joiner_admin]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a member"));

    // Remove founder 2 through the joiner, then stop it: three voters remain, a quorum of two.
    let remove = admin(&["remove-coordinator", "--coordinator", &joiner_admin, "--id", "2"]);
    assert!(remove.status.success(), "{}", String::from_utf8_lossy(&remove.stderr));
    if let Some(mut c) = nodes.0[1].child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let s = wait_for("three members after the removal", || status(&nodes.0[3]).filter(|s| member_ids(s) == [1, 3, 4]));
    assert!(s["leader"].as_u64().is_some_and(|l| [1, 3, 4].contains(&l)), "{s}");

    // Removing a node that is not a member is a 404, reported by the CLI.
    let missing = admin(&["remove-coordinator", "--coordinator", &joiner_admin, "--id", "9"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not a member"));
}
