//! `herd admin`: operator commands against a coordinator's admin API.

use super::http;
use anyhow::{Context, bail};
use serde_json::Value;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AdminCommand {
    /// Leader, members, workers, placement epoch and load.
    Status {
        /// The coordinator's admin address, e.g. http://127.0.0.1:8001.
        #[arg(long)]
        coordinator: String,
        /// The admin key, if the coordinator requires one.
        #[arg(long)]
        admin_key: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a coordinator started with `herd coordinator --join` as a voting member.
    AddCoordinator {
        /// A member's admin address, e.g. http://127.0.0.1:8001.
        #[arg(long)]
        coordinator: String,
        /// The new coordinator's admin address (its Raft, control and API addresses are read
        /// from there).
        #[arg(long)]
        new: String,
        /// The admin key, if the coordinators require one.
        #[arg(long)]
        admin_key: Option<String>,
    },
    /// Remove a coordinator from the voting members (stop its process afterwards).
    RemoveCoordinator {
        /// A member's admin address, e.g. http://127.0.0.1:8001.
        #[arg(long)]
        coordinator: String,
        /// The id of the coordinator to remove.
        #[arg(long)]
        id: u64,
        /// The admin key, if the coordinators require one.
        #[arg(long)]
        admin_key: Option<String>,
    },
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    match args.command {
        AdminCommand::Status { coordinator, admin_key, json } => {
            let url = format!("{}/admin/status", coordinator.trim_end_matches('/'));
            let (status, body) = http::get(&url, admin_key.as_deref(), Duration::from_secs(10))?;
            let value: Value = serde_json::from_str(&body).with_context(|| format!("{url} did not return JSON"))?;
            if status != 200 {
                let msg = value["error"]["message"].as_str().unwrap_or(&body);
                bail!("{url}: HTTP {status}: {msg}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_table(&value);
            }
            Ok(())
        }
        AdminCommand::AddCoordinator { coordinator, new, admin_key } => {
            let key = admin_key.as_deref();
            let info = call("GET", &format!("{}/admin/self", new.trim_end_matches('/')), key, None)?;
            let url = format!("{}/admin/coordinators", coordinator.trim_end_matches('/'));
            let done = call("POST", &url, key, Some(&info.to_string()))?;
            println!("added coordinator {}; voters now {}", done["added"], done["voters"]);
            Ok(())
        }
        AdminCommand::RemoveCoordinator { coordinator, id, admin_key } => {
            let url = format!("{}/admin/coordinators/{id}", coordinator.trim_end_matches('/'));
            let done = call("DELETE", &url, admin_key.as_deref(), None)?;
            println!("removed coordinator {id}; voters now {}", done["voters"]);
            Ok(())
        }
    }
}

/// One admin call whose answer is JSON; a non-2xx answer becomes an error with its message.
fn call(method: &str, url: &str, key: Option<&str>, body: Option<&str>) -> anyhow::Result<Value> {
    // Conf changes wait for a commit, which may include finding a leader.
    let (status, text) = http::request(method, url, key, body, Duration::from_secs(30))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{url} did not return JSON: {text}"))?;
    if !(200..300).contains(&status) {
        let msg = value["error"]["message"].as_str().unwrap_or(&text);
        bail!("{url}: HTTP {status}: {msg}");
    }
    Ok(value)
}

fn print_table(v: &Value) {
    println!(
        "leader {}  term {}  placement epoch {} (data plane {})  model {}",
        v["leader"],
        v["term"],
        v["placement_epoch"],
        v["placement"]["data_plane"].as_str().unwrap_or("-"),
        v["model"].as_str().unwrap_or("-")
    );
    println!("coordinators:");
    for m in v["members"].as_array().into_iter().flatten() {
        let api = m["addrs"]["api_addr"].as_str().unwrap_or("-");
        println!("  {:>3}  api {api}", m["id"]);
    }
    println!("workers:");
    println!(
        "  {:>3} {:<16} {:<9} {:>9} {:>6} {:>7} {:>6}  reason",
        "id", "name", "verdict", "epoch", "run", "wait", "kv"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        println!(
            "  {:>3} {:<16} {:<9} {:>9} {:>6} {:>7} {:>5.0}%  {}",
            w["id"],
            w["name"].as_str().unwrap_or("-"),
            w["verdict"].as_str().unwrap_or("-"),
            w["serving_epoch"].as_u64().map_or("-".into(), |e| e.to_string()),
            w["running"].as_u64().map_or("-".into(), |e| e.to_string()),
            w["waiting"].as_u64().map_or("-".into(), |e| e.to_string()),
            w["kv_usage"].as_f64().unwrap_or(0.0) * 100.0,
            w["reason"].as_str().unwrap_or(""),
        );
    }
}
