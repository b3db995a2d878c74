//! raft-rs logs through `slog`; this drain forwards its records to `tracing` (target
//! `herd::raft`). raft-rs's "info" is chatty (every vote and probe), so it maps to debug.

use std::fmt::Write;

use slog::{Drain, KV, Level, Never, OwnedKVList, Record};

pub(crate) fn logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("raft_id" => id))
}

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), Never> {
        let enabled = match record.level() {
            Level::Critical | Level::Error => tracing::enabled!(target: "herd::raft", tracing::Level::ERROR),
            Level::Warning => tracing::enabled!(target: "herd::raft", tracing::Level::WARN),
            Level::Info | Level::Debug => tracing::enabled!(target: "herd::raft", tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: "herd::raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvText(String::new());
        // Formatting into a String cannot fail, and a broken key-value is not worth losing the line.
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let (msg, kv) = (record.msg(), kv.0);
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "herd::raft", "{msg}{kv}"),
            Level::Warning => tracing::warn!(target: "herd::raft", "{msg}{kv}"),
            Level::Info | Level::Debug => tracing::debug!(target: "herd::raft", "{msg}{kv}"),
            Level::Trace => tracing::trace!(target: "herd::raft", "{msg}{kv}"),
        }
        Ok(())
    }
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}
