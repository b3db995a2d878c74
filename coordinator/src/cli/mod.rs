//! One module per `herd` subcommand: its clap arguments and its `run`.

pub mod synth;
