//! `narfs prefetch`: asks a running mount (over its control socket) to fetch closures
//! ahead of use, and shows its progress.

use super::fail;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Where narfs is mounted
    mountpoint: PathBuf,
    /// Store paths (/nix/store/HASH-NAME or HASH-NAME)
    #[arg(required = true)]
    paths: Vec<String>,
}

pub fn run(a: Args) -> ExitCode {
    match prefetch(&a.mountpoint, &a.paths) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => fail(format!("{n} paths could not be fetched")),
        Err(e) => fail(e),
    }
}

/// The store path basename in `/nix/store/HASH-NAME[/...]`, `MNT/HASH-NAME` or
/// `HASH-NAME`.
fn basename_of(arg: &str) -> Option<String> {
    arg.split('/')
        .find(|c| crate::formats::store_path::StorePath::from_basename(c).is_ok())
        .map(str::to_owned)
}

fn prefetch(mountpoint: &std::path::Path, paths: &[String]) -> Result<usize, String> {
    let mut names = Vec::new();
    for p in paths {
        names.push(basename_of(p).ok_or_else(|| format!("'{p}' is not a store path"))?);
    }
    let answer =
        crate::mount::control::request(mountpoint, &format!("prefetch {}", names.join(" ")))?;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} paths {msg}")
                .expect("progress template"),
        );
        b
    });
    let mut failed = None;
    for line in crate::mount::control::lines(answer) {
        let mut w = line.splitn(3, ' ');
        match (w.next(), w.next(), w.next()) {
            (Some("closure"), Some(n), Some(bytes)) => {
                let n: u64 = n.parse().unwrap_or(0);
                let mib = bytes.parse::<u64>().unwrap_or(0) >> 20;
                match &bar {
                    Some(b) => b.set_length(n),
                    None => eprintln!("prefetching {n} paths ({mib} MiB of NAR)"),
                }
            }
            (Some("ok"), Some(name), _) => match &bar {
                Some(b) => {
                    b.inc(1);
                    b.set_message(name.to_owned());
                }
                None => eprintln!("fetched /nix/store/{name}"),
            },
            (Some("failed"), Some(name), why) => {
                let msg = format!("FAILED /nix/store/{name}: {}", why.unwrap_or(""));
                match &bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
            }
            (Some("end"), Some(n), _) => failed = n.parse().ok(),
            _ => return Err(format!("unexpected answer from the mount: {line}")),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    failed.ok_or_else(|| "the mount stopped answering".to_owned())
}
