//! `--config FILE`: every flag of every subcommand may also come from a TOML file.
//!
//! Keys are flag names without the dashes (`data-dir` or `data_dir`). Top-level keys apply to
//! whatever subcommand runs; a table named after a subcommand (`[coordinator]`, `[worker]`)
//! applies only to it. The file's entries become arguments placed *before* those on the
//! command line, and the parser lets a later occurrence override an earlier one, so flags
//! always win over the file. Arrays become repeated flags; `true` becomes a bare switch.

use anyhow::{Context, bail};
use std::ffi::OsString;

/// Expand `--config FILE` in `argv` (program name first) into the file's flags.
pub fn expand(argv: Vec<OsString>, subcommands: &[&str]) -> anyhow::Result<Vec<OsString>> {
    let Some(pos) = argv.iter().position(|a| a == "--config" || a.to_string_lossy().starts_with("--config=")) else {
        return Ok(argv);
    };
    let arg = argv[pos].to_string_lossy().into_owned();
    let (path, consumed) = match arg.strip_prefix("--config=") {
        Some(p) => (p.to_owned(), 1),
        None => (argv.get(pos + 1).context("--config needs a file")?.to_string_lossy().into_owned(), 2),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {path}"))?;
    let table: toml::Table = text.parse().with_context(|| format!("{path} is not valid TOML"))?;
    let mut rest: Vec<OsString> = argv[..pos].iter().chain(&argv[pos + consumed..]).cloned().collect();
    let Some(sub_at) = rest.iter().position(|a| subcommands.iter().any(|s| a == *s)) else {
        bail!("--config needs a subcommand (one of {})", subcommands.join(", "));
    };
    let sub = rest[sub_at].to_string_lossy().into_owned();
    // Top-level keys first, then the subcommand's table, so the more specific entry wins.
    let mut flags = Vec::new();
    for (key, value) in &table {
        match value {
            toml::Value::Table(_) if subcommands.contains(&key.as_str()) => {}
            other => push_flag(&mut flags, key, other, &path)?,
        }
    }
    if let Some(toml::Value::Table(t)) = table.get(&sub) {
        for (k, v) in t {
            push_flag(&mut flags, k, v, &path)?;
        }
    }
    rest.splice(sub_at + 1..sub_at + 1, flags);
    Ok(rest)
}

fn push_flag(out: &mut Vec<OsString>, key: &str, value: &toml::Value, path: &str) -> anyhow::Result<()> {
    let flag = format!("--{}", key.replace('_', "-"));
    match value {
        toml::Value::Boolean(true) => out.push(flag.into()),
        toml::Value::Boolean(false) => {}
        toml::Value::Array(items) => {
            for item in items {
                push_flag(out, key, item, path)?;
            }
        }
        toml::Value::String(s) => {
            out.push(flag.into());
            out.push(s.into());
        }
        toml::Value::Integer(i) => {
            out.push(flag.into());
            out.push(i.to_string().into());
        }
        toml::Value::Float(f) => {
            out.push(flag.into());
            out.push(f.to_string().into());
        }
        other => bail!("{path}: `{key}` has a value herd cannot turn into a flag: {other}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_entries_come_before_command_line_flags() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            // Keys in sorted order: `toml::Table` iterates sorted or in file order depending on
            // cargo features unified across the workspace, and the test must hold for both.
            "threads = 2\n[coordinator]\nid = 9\n[worker]\nignore_eos = true\npeers = [\"a:1\", \"b:2\"]\nrank = 1\nthreads = 1\nverbose = false\n",
        )
        .expect("write");
        let p = path.to_str().expect("utf8");
        let out = expand(args(&["herd", "worker", "--config", p, "--rank", "3"]), &["worker", "coordinator"])
            .expect("expand");
        let out: Vec<String> = out.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            out,
            [
                "herd",
                "worker",
                "--threads",
                "2",
                "--ignore-eos",
                "--peers",
                "a:1",
                "--peers",
                "b:2",
                "--rank",
                "1",
                "--threads",
                "1",
                "--rank",
                "3"
            ]
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let e = expand(args(&["herd", "worker", "--config", "/nonexistent.toml"]), &["worker"]).expect_err("missing");
        assert!(format!("{e:#}").contains("/nonexistent.toml"));
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "rank = [").expect("write");
        let e =
            expand(args(&["herd", "worker", "--config", path.to_str().expect("utf8")]), &["worker"]).expect_err("bad");
        assert!(format!("{e:#}").contains("not valid TOML"));
    }
}
