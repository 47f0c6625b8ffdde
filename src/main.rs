//! The `narfs` command line.

use clap::{ArgAction, Parser, Subcommand};
use narfs::mount::{self, MountOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "narfs",
    version,
    about = "Mount a signed Nix binary cache (S3 or file://) as a lazily fetched, verified, read-only Nix store"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount CACHE_URL at MOUNTPOINT (runs in the foreground; Ctrl-C unmounts).
    Mount(MountArgs),
}

#[derive(clap::Args)]
struct MountArgs {
    /// A trusted key, NAME:BASE64, as in nix.conf's trusted-public-keys (repeatable).
    /// Also read from NARFS_TRUSTED_PUBLIC_KEYS (space-separated).
    #[arg(long = "trusted-public-key", value_name = "NAME:BASE64")]
    trusted_public_keys: Vec<String>,
    /// Where verified, unpacked paths are kept across mounts
    /// [default: $XDG_CACHE_HOME/narfs, else ~/.cache/narfs]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    allow_other: bool,
    /// How long a store path the cache does not have is remembered as missing.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    negative_ttl: u64,
    /// How often the cache is listed again so newly pushed paths appear (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    refresh_interval: u64,
    /// Most bytes unpacked paths may take in the cache directory, e.g. 10G or 500M;
    /// least recently used paths are evicted beyond it
    /// [default: 10% of the file system holding the cache directory, at most 10G]
    #[arg(long, value_name = "SIZE", value_parser = narfs::disk_cache::parse_size)]
    cache_size: Option<u64>,
    /// NAR downloads that may run in parallel.
    #[arg(long, value_name = "N", default_value_t = 4)]
    jobs: usize,
    /// When a path is first opened, fetch its references in the background (its
    /// closure is almost always read together).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set)]
    prefetch_references: bool,
    /// Time budget in seconds for fetching one object, retries included; after it the
    /// read fails with EIO and the next access tries afresh.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
    /// s3://BUCKET[/PREFIX]?endpoint=HOST&scheme=http|https&region=R&profile=P, or file:///DIR
    cache_url: String,
    /// An existing, empty directory.
    mountpoint: PathBuf,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "narfs=info",
        1 => "narfs=debug",
        _ => "narfs=trace,fuser=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("narfs"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/narfs"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mount(a) => {
            init_logging(a.verbose);
            let mut keys = a.trusted_public_keys.clone();
            if let Ok(env) = std::env::var("NARFS_TRUSTED_PUBLIC_KEYS") {
                keys.extend(env.split_whitespace().map(str::to_owned));
            }
            let Some(cache_dir) = a.cache_dir.clone().or_else(default_cache_dir) else {
                eprintln!("narfs: no --cache-dir given and neither XDG_CACHE_HOME nor HOME is set");
                return ExitCode::from(2);
            };
            let opts = MountOptions {
                cache_url: a.cache_url,
                mountpoint: a.mountpoint,
                trusted_public_keys: keys,
                cache_dir,
                allow_other: a.allow_other,
                negative_ttl: std::time::Duration::from_secs(a.negative_ttl),
                refresh_interval: std::time::Duration::from_secs(a.refresh_interval),
                timeout: std::time::Duration::from_secs(a.timeout.max(1)),
                cache_size: a.cache_size,
                jobs: a.jobs.max(1),
                prefetch_references: a.prefetch_references,
            };
            match mount::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("narfs: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
