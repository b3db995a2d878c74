//! `herd`: the one binary of the herd inference cluster.
//!
//! Subcommands live in [`cli`], one module each; this file parses the command line, sizes
//! the compute thread pool, and turns any error into one line on stderr and exit code 1.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "herd", version, about = "Distributed inference for Llama 4 mixture-of-experts models")]
#[command(args_override_self = true)]
struct Cli {
    /// Compute threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Read flags from a TOML file (flags on the command line override it).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt or a chat message, streaming it to stdout.
    Generate(cli::generate::GenerateArgs),
    /// Write logits and greedy continuations of a list of prompts (for reference checks).
    Eval(cli::eval::EvalArgs),
    /// Measure prefill and decode throughput (several configurations side by side).
    Bench(cli::bench::BenchArgs),
    /// Write a random-weight Llama 4 checkpoint (HF layout) for tests and benchmarks.
    Synth(cli::synth::SynthArgs),
    /// Convert a float checkpoint's routed experts to FP8 or int4 (loads memory-mapped).
    Quantize(cli::quantize::QuantizeArgs),
    /// Run a whole cluster on this host (coordinators + worker processes) behind one API.
    Serve(cli::serve::ServeArgs),
    /// Operator commands against a coordinator's admin API.
    Admin(cli::admin::AdminArgs),
    /// Run one coordinator of the Raft-replicated control tier.
    Coordinator(cli::coordinator::CoordinatorArgs),
    /// Run one worker of an expert-parallel group (control: JSON lines on stdin/stdout).
    Worker(cli::worker::WorkerArgs),
    /// Create the cluster CA and node certificates.
    Ca(cli::ca::CaArgs),
}

fn main() -> ExitCode {
    let subcommands: Vec<String> =
        <Cli as clap::CommandFactory>::command().get_subcommands().map(|c| c.get_name().to_owned()).collect();
    let names: Vec<&str> = subcommands.iter().map(String::as_str).collect();
    let argv = match cli::config_file::expand(std::env::args_os().collect(), &names) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    let result = init_threads(cli.threads).and_then(|()| match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Synth(args) => cli::synth::run(args),
        Command::Quantize(args) => cli::quantize::run(args),
        Command::Worker(args) => cli::worker::run(args),
        Command::Coordinator(args) => cli::coordinator::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Admin(args) => cli::admin::run(args),
        Command::Ca(args) => cli::ca::run(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// The example configs under deploy/ are what operators copy; they must stay valid.
    #[test]
    fn deploy_example_configs_parse() {
        let names: Vec<String> =
            <Cli as clap::CommandFactory>::command().get_subcommands().map(|c| c.get_name().to_owned()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
        for sub in ["coordinator", "worker"] {
            let file = dir.join(format!("{sub}.toml"));
            let argv: Vec<OsString> = vec!["herd".into(), sub.into(), "--config".into(), file.clone().into()];
            let argv = cli::config_file::expand(argv, &names).expect("expand");
            let parsed = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(parsed.config.is_none(), "--config is consumed by the expansion");
        }
    }
}
