//! The `narfs` command line: one file per subcommand with its arguments and its run;
//! here the dispatch and what several share (trusted keys, logging, the runtime).
//! May use every layer.

mod fstab;
mod index;
mod inspect;
mod keygen;
mod mount;
mod nix_store;
mod prefetch;
mod profile;
mod push;
mod stats;

use crate::formats::keys::{PublicKey, SecretKey, TrustedKeys};
use clap::{ArgAction, Parser, Subcommand};
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
    Mount(mount::Args),
    /// Create a signing key pair in the formats of `nix-store --generate-binary-cache-key`.
    Keygen(keygen::Args),
    /// Push the closures of store paths from the local store to a cache, as
    /// `nix copy --to` does: signed narinfos, NARs, `.ls` listings, nix-cache-info.
    /// Paths the cache already has are skipped.
    Push(push::Args),
    /// Give paths already in a cache (pushed by nix copy, say) a seekable NAR and a
    /// signed file index, so a mount reads their files one at a time. Only unsigned
    /// narinfo fields change (URL, Compression, FileHash, FileSize, NarfsIndex):
    /// every signature stays valid and nix still reads the cache. Paths already
    /// indexed are skipped; old NARs no narinfo names are removed at the end.
    Index(index::Args),
    /// Make nix itself use the lazy store: mount narfs at a hidden directory, a
    /// writable overlayfs over it at the store directory, and register the cache's
    /// paths (their closures, or all) with nix from their verified narinfos, so
    /// `nix-build` and friends use them, fetching files only as they are read. Runs
    /// until SIGTERM; --daemon returns once nix can use the store. Needs root.
    NixStore(nix_store::Args),
    /// Print what `nix-store --load-db` reads to hold the closures of store paths (or
    /// every path) of a cache as valid, from verified narinfos; --sigs DIR also
    /// writes their narinfos for `nix store copy-sigs -s file://DIR`.
    Register(nix_store::RegisterArgs),
    /// Fetch the closures of store paths into a mount's disk cache ahead of use.
    Prefetch(prefetch::Args),
    /// Record a program's start-up reads on a mount, and push them to a cache as a
    /// pack that later mounts fetch in one request when the program starts cold.
    Profile(profile::Args),
    /// Print a running mount's counters (the same as its --metrics-addr serves).
    Stats(stats::Args),
    /// List a store path in a cache without mounting (like `nix store ls --store`).
    Ls(inspect::LsArgs),
    /// Print a file of a store path in a cache without mounting (verified).
    Cat(inspect::CatArgs),
    /// Check signatures and hashes of the given store paths (or of every path the
    /// cache lists); report each failure and exit 1 if there was any.
    Verify(inspect::VerifyArgs),
}

#[derive(clap::Args)]
struct Keys {
    /// A trusted key, NAME:BASE64 (repeatable); also NARFS_TRUSTED_PUBLIC_KEYS.
    #[arg(long = "trusted-public-key", value_name = "NAME:BASE64")]
    trusted_public_keys: Vec<String>,
    /// Credentials for http(s) caches, as nix.conf's netrc-file
    /// [default: /etc/nix/netrc if it exists].
    #[arg(long, value_name = "FILE")]
    netrc_file: Option<PathBuf>,
    /// CA certificates (PEM) https trusts, as nix.conf's ssl-cert-file
    /// [default: NIX_SSL_CERT_FILE, SSL_CERT_FILE, else the system's, as for nix].
    #[arg(long, value_name = "FILE")]
    ssl_cert_file: Option<PathBuf>,
    /// Say what is fetched and verified on stderr (-vv: more)
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

impl Keys {
    fn all(&self) -> Vec<String> {
        let mut keys = self.trusted_public_keys.clone();
        if let Ok(env) = std::env::var("NARFS_TRUSTED_PUBLIC_KEYS") {
            keys.extend(env.split_whitespace().map(str::to_owned));
        }
        keys
    }

    /// The keys given, parsed; `Err` names the one that is not a key.
    fn trusted(&self) -> Result<TrustedKeys, String> {
        let mut trusted = TrustedKeys::default();
        for k in self.all() {
            trusted
                .add(PublicKey::parse(&k).map_err(|e| format!("invalid trusted public key: {e}"))?);
        }
        Ok(trusted)
    }
}

/// The cache a write-side command (`verb`: push, index) writes to, its warnings said:
/// s3:// or file://, never an HTTP cache (narfs does not write over HTTP).
fn writable_cache(
    cache_url: &str,
    verb: &str,
) -> Result<crate::storage::cache_url::Parsed, String> {
    use crate::storage::cache_url;
    let url = cache_url::parse(cache_url).map_err(|e| e.to_string())?;
    for w in &url.warnings {
        eprintln!("narfs: warning: {w}");
    }
    if matches!(url.url, cache_url::CacheUrl::Http { .. }) {
        return Err(format!(
            "{}: narfs does not write to HTTP caches; {verb} the s3:// or file:// cache behind it",
            cache_url::redact(cache_url)
        ));
    }
    Ok(url)
}

/// The secret key in `file` (as `narfs keygen` or nix writes it).
fn secret_key(file: &std::path::Path) -> Result<SecretKey, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    SecretKey::parse(text.trim()).map_err(|e| format!("{}: {e}", file.display()))
}

/// `--jobs`, or as many as there are CPUs.
fn jobs_or_cpus(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    })
}

/// Logging for commands that report as they go (mount, push, index): info and up,
/// more with each `-v`.
fn init_logging(verbose: u8, file: Option<&std::path::Path>) {
    init_logging_at(verbose + 1, file)
}

/// Logging at 0 warn, 1 info, 2 debug, 3 trace; `RUST_LOG` overrides it.
fn init_logging_at(level: u8, file: Option<&std::path::Path>) {
    let default = match level {
        0 => "narfs=warn",
        1 => "narfs=info",
        2 => "narfs=debug",
        _ => "narfs=trace,fuser=debug",
    };
    // an empty RUST_LOG (`RUST_LOG= narfs …`) is as good as none: it must not
    // silence `-v`
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).unwrap_or_else(|e| {
                eprintln!("narfs: RUST_LOG={v}: {e}; logging at {default}");
                tracing_subscriber::EnvFilter::new(default)
            })
        }
        _ => tracing_subscriber::EnvFilter::new(default),
    };
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    let opened = file.map(|f| {
        crate::disk_cache::open_private_file(f)
            .map_err(|e| format!("log file {}: {e}", f.display()))
    });
    match opened {
        Some(Ok(f)) => b
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .init(),
        Some(Err(e)) => {
            eprintln!("narfs: {e}; logging to stderr");
            b.with_writer(std::io::stderr).init()
        }
        None => b
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("narfs: {msg}");
    ExitCode::FAILURE
}

/// glibc raises its mmap threshold each time a large block is freed, so once the first
/// xz dictionaries and decoded blocks (MiBs each) were freed every later one comes from
/// the heap, which keeps its peak for good: a mount of an indexed closure grew to 90–114
/// MB over a traversal and stayed there at rest. With the threshold fixed, blocks of
/// 256 KiB and more go back to the system when freed (46 MB at the peak, 29 MB at rest;
/// issue 20), and FUSE reads (at most 128 KiB) still reuse heap memory.
fn keep_large_allocations_returnable() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

pub fn main() -> ExitCode {
    use clap::CommandFactory;
    keep_large_allocations_returnable();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let subcommands: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .chain(["help".to_owned()])
        .collect();
    let subcommands: Vec<&str> = subcommands.iter().map(String::as_str).collect();
    let cli = if fstab::is_helper_form(&args, &subcommands) {
        let Some(args) = args
            .iter()
            .map(|a| a.to_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
        else {
            eprintln!("narfs: arguments must be UTF-8");
            return ExitCode::from(2);
        };
        match fstab::translate(&args) {
            Ok(a) => Cli::parse_from(a),
            Err(e) => {
                eprintln!("narfs: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        Cli::parse()
    };
    match cli.cmd {
        Cmd::Mount(a) => mount::run(a),
        Cmd::Keygen(a) => keygen::run(a),
        Cmd::Push(a) => push::run(a),
        Cmd::Index(a) => index::run(a),
        Cmd::NixStore(a) => nix_store::run(a),
        Cmd::Register(a) => nix_store::register(a),
        Cmd::Prefetch(a) => prefetch::run(a),
        Cmd::Profile(a) => profile::run(a),
        Cmd::Stats(a) => stats::run(a),
        Cmd::Ls(a) => inspect::ls(a),
        Cmd::Cat(a) => inspect::cat(a),
        Cmd::Verify(a) => inspect::verify(a),
    }
}
