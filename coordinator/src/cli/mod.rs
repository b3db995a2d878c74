//! One module per `herd` subcommand (its clap arguments and its `run`), plus what they share.

pub mod bench;
pub mod engine_flags;
pub mod eval;
pub mod generate;
pub mod model_arg;
pub mod synth;
pub mod sys;
pub mod worker;
