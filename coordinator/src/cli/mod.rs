//! One module per `herd` subcommand (its clap arguments and its `run`), plus what they share.

pub mod admin;
pub mod bench;
pub mod ca;
pub mod config_file;
pub mod coordinator;
pub mod device;
pub mod engine_flags;
pub mod eval;
pub mod generate;
pub mod gpu_engine;
pub mod http;
pub mod image_flags;
pub mod membw;
pub mod model_arg;
pub mod quantize;
pub mod runner;
pub mod serve;
pub mod synth;
pub mod sys;
pub mod worker;
pub mod worker_agent;
