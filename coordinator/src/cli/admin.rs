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
    }
}

fn print_table(v: &Value) {
    println!(
        "leader {}  term {}  placement epoch {}  model {}",
        v["leader"],
        v["term"],
        v["placement_epoch"],
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
