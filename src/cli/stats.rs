//! `narfs stats`: a running mount's counters, made readable.

use super::fail;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Where narfs is mounted
    mountpoint: PathBuf,
}

pub fn run(a: Args) -> ExitCode {
    match stats(&a.mountpoint) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Prometheus text made readable: names without the prefix, byte counts in MiB.
fn stats(mountpoint: &std::path::Path) -> Result<(), String> {
    let answer = crate::mount::control::request(mountpoint, "metrics")?;
    let mut out = Vec::new();
    for line in crate::mount::control::lines(answer) {
        if line.starts_with('#') || line.contains("_bucket{") {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name.trim_start_matches("narfs_");
        let value = match value.parse::<f64>() {
            Ok(v) if name.contains("bytes") => format!("{value} ({:.1} MiB)", v / 1048576.0),
            _ => value.to_owned(),
        };
        out.push((name.to_owned(), value));
    }
    if out.is_empty() {
        return Err("the mount sent no metrics".into());
    }
    let w = out.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (n, v) in out {
        println!("{n:w$}  {v}");
    }
    Ok(())
}
