//! `narfs mount`: its options, and the mount they make: in the foreground, or in the
//! background (`--daemon`, the form mount(8) and fstab use; see `fstab`).

use super::init_logging;
use crate::mount::session::{self, MountOptions};
use clap::ArgAction;
use std::path::PathBuf;
use std::process::ExitCode;

/// The options of a mount, shared by `narfs mount` and `narfs nix-store`.
#[derive(clap::Args)]
pub struct MountFlags {
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
    /// closure is almost always read together) [default: true; false for narfs
    /// nix-store, where nix's sandbox looks into every input]
    #[arg(long, value_name = "BOOL", action = ArgAction::Set)]
    prefetch_references: Option<bool>,
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
    /// Return once serving and keep serving in the background (what mount(8) expects;
    /// the fstab form implies it). Logs go to --log-file.
    #[arg(long)]
    pub daemon: bool,
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
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    flags: MountFlags,
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
    serve(a.flags, |flags| {
        let opts = flags.options(a.cache_url, a.mountpoint, true)?;
        session::run(opts)
    })
}

impl MountFlags {
    /// The cache directory: given, or the user's default.
    pub fn cache_dir(&self) -> Result<PathBuf, String> {
        self.cache_dir
            .clone()
            .or_else(default_cache_dir)
            .ok_or_else(|| "no --cache-dir given and neither XDG_CACHE_HOME nor HOME is set".into())
    }

    /// The options of a mount of `cache_url` at `mountpoint`; reference prefetch is
    /// `prefetch` unless the flags say.
    pub fn options(
        self,
        cache_url: String,
        mountpoint: PathBuf,
        prefetch: bool,
    ) -> Result<MountOptions, session::MountError> {
        let cache_dir = self.cache_dir().map_err(session::MountError::Usage)?;
        let mut keys = self.trusted_public_keys;
        if let Ok(env) = std::env::var("NARFS_TRUSTED_PUBLIC_KEYS") {
            keys.extend(env.split_whitespace().map(str::to_owned));
        }
        Ok(MountOptions {
            cache_url,
            mountpoint,
            trusted_public_keys: keys,
            cache_dir,
            allow_other: self.allow_other,
            negative_ttl: std::time::Duration::from_secs(self.negative_ttl),
            refresh_interval: std::time::Duration::from_secs(self.refresh_interval),
            timeout: std::time::Duration::from_secs(self.timeout.max(1)),
            cache_size: self.cache_size,
            jobs: self.jobs.max(1),
            prefetch_references: self.prefetch_references.unwrap_or(prefetch),
            passthrough: self.passthrough,
            no_open: self.no_open,
            page_cache: self.page_cache,
            noexec: self.noexec,
            metrics_addr: self.metrics_addr,
            netrc_file: self.netrc_file,
            ssl_cert_file: self.ssl_cert_file,
        })
    }
}

/// Runs `work` in the foreground, or with `--daemon` in a background copy of this
/// process that says when it serves (the foreground returns then, or fails with the
/// end of its log): logging set up either way.
pub fn serve(
    flags: MountFlags,
    work: impl FnOnce(MountFlags) -> Result<(), session::MountError>,
) -> ExitCode {
    let child = std::env::var_os(crate::mount::session::READY_ENV).is_some();
    if flags.daemon && !child {
        let cache_dir = match flags.cache_dir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("narfs: {e}");
                return ExitCode::from(2);
            }
        };
        let log = flags
            .log_file
            .clone()
            .unwrap_or(cache_dir.join("narfs.log"));
        return match crate::cli::fstab::daemon(&log) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, msg)) => {
                eprintln!("narfs: {msg}");
                ExitCode::from(code)
            }
        };
    }
    // a background mount's stderr already is its log file
    init_logging(flags.verbose, flags.log_file.as_deref().filter(|_| !child));
    match work(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("narfs: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
