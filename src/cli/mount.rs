//! `narfs mount`: its options, and the mount they make: in the foreground, or in the
//! background (`--daemon`, the form mount(8) and fstab use; see `fstab`).

use super::init_logging;
use crate::mount::session::{self, MountOptions};
use clap::ArgAction;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
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
    #[arg(long, value_name = "SIZE", value_parser = crate::disk_cache::parse_size)]
    cache_size: Option<u64>,
    /// NAR downloads that may run in parallel.
    #[arg(long, value_name = "N", default_value_t = 4)]
    jobs: usize,
    /// When a path is first opened, fetch its references in the background (its
    /// closure is almost always read together).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set)]
    prefetch_references: bool,
    /// Serve reads with FUSE passthrough: at open narfs hands the kernel the unpacked
    /// file and reads bypass narfs (default: reads reach narfs once, then stay in the
    /// kernel's page cache).
    #[arg(long, conflicts_with = "no_open")]
    passthrough: bool,
    /// Tell the kernel opens need no answer: no round trip per opened file (the
    /// fastest warm reads). Listings are then not used, so the first look inside a
    /// path fetches its NAR: only verified attributes ever reach the kernel.
    /// [default for caches with file indexes, whose nix-cache-info says NarfsIndexes: 1]
    #[arg(long)]
    no_open: bool,
    /// Each open waits for narfs (reads then stay in the kernel's page cache) and
    /// `.ls` listings are used [default for caches without file indexes].
    #[arg(long, conflicts_with_all = ["no_open", "passthrough"])]
    page_cache: bool,
    /// Mount noexec: programs in the store cannot be run from the mount.
    #[arg(long)]
    noexec: bool,
    /// Time budget in seconds for fetching one object, retries included; after it the
    /// read fails with EIO and the next access tries afresh.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
    /// Return once mounted and keep serving in the background (what mount(8) expects;
    /// the fstab form implies it). Logs go to --log-file.
    #[arg(long)]
    daemon: bool,
    /// Write logs to FILE (appending) instead of stderr
    /// [default with --daemon: narfs.log in the cache directory].
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Credentials for http(s) caches, as nix.conf's netrc-file: keeps passwords out
    /// of the URL [default: /etc/nix/netrc if it exists].
    #[arg(long, value_name = "FILE")]
    netrc_file: Option<PathBuf>,
    /// CA certificates (PEM) https trusts, as nix.conf's ssl-cert-file: for a cache
    /// or S3 endpoint behind a private CA [default: NIX_SSL_CERT_FILE,
    /// SSL_CERT_FILE, else the system's, as for nix].
    #[arg(long, value_name = "FILE")]
    ssl_cert_file: Option<PathBuf>,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
    /// s3://BUCKET[/PREFIX]?endpoint=HOST&scheme=http|https&region=R&profile=P, or file:///DIR
    cache_url: String,
    /// An existing, empty directory.
    mountpoint: PathBuf,
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("narfs"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/narfs"))
}

pub fn run(a: Args) -> ExitCode {
    let child = std::env::var_os(crate::mount::session::READY_ENV).is_some();
    if a.daemon && !child {
        let Some(cache_dir) = a.cache_dir.clone().or_else(default_cache_dir) else {
            eprintln!("narfs: no --cache-dir given and neither XDG_CACHE_HOME nor HOME is set");
            return ExitCode::from(2);
        };
        let log = a.log_file.clone().unwrap_or(cache_dir.join("narfs.log"));
        return match crate::cli::fstab::daemon(&log) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, msg)) => {
                eprintln!("narfs: {msg}");
                ExitCode::from(code)
            }
        };
    }
    // a background mount's stderr already is its log file
    init_logging(a.verbose, a.log_file.as_deref().filter(|_| !child));
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
        passthrough: a.passthrough,
        no_open: a.no_open,
        page_cache: a.page_cache,
        noexec: a.noexec,
        metrics_addr: a.metrics_addr,
        netrc_file: a.netrc_file,
        ssl_cert_file: a.ssl_cert_file,
    };
    match session::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("narfs: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
