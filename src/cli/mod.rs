//! The `narfs` command line.

pub mod fstab;
pub mod inspect;

use crate::mount::session::{self as mount, MountOptions};
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
    Mount(MountArgs),
    /// Create a signing key pair in the formats of `nix-store --generate-binary-cache-key`.
    Keygen {
        /// The key's name, e.g. cache.example.org-1
        name: String,
        /// Where the secret key goes (created with mode 0600)
        secret_file: PathBuf,
        /// Where the public key goes
        public_file: PathBuf,
    },
    /// Push the closures of store paths from the local store to a cache, as
    /// `nix copy --to` does: signed narinfos, NARs, `.ls` listings, nix-cache-info.
    /// Paths the cache already has are skipped.
    Push {
        /// Sign with this secret key (as from `narfs keygen` or
        /// `nix-store --generate-binary-cache-key`); existing signatures are kept.
        /// Also taken from the URL's secret-key= parameter, as nix copy does.
        #[arg(long, value_name = "SECRET_FILE")]
        key_file: Option<PathBuf>,
        /// How NARs are compressed in the cache [default: the URL's compression=,
        /// else xz].
        #[arg(long, value_name = "xz|zstd|none")]
        compression: Option<String>,
        /// The local store to read, as nix's --store (e.g. local?root=/some/dir);
        /// default: nix's own.
        #[arg(long, value_name = "STORE")]
        store: Option<String>,
        /// Paths packed and uploaded in parallel [default: the number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Do not write signed file indexes (by default each path gets one, with
        /// --key-file, so a narfs mount can read single files without the whole NAR;
        /// nix ignores them).
        #[arg(long)]
        no_index: bool,
        /// s3://BUCKET[/PREFIX]?endpoint=...&region=... or file:///DIR
        cache_url: String,
        /// Store paths (or symlinks to them, such as ./result)
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Give paths already in a cache (pushed by nix copy, say) a seekable NAR and a
    /// signed file index, so a mount reads their files one at a time. Only unsigned
    /// narinfo fields change (URL, Compression, FileHash, FileSize, NarfsIndex):
    /// every signature stays valid and nix still reads the cache. Paths already
    /// indexed are skipped; old NARs no narinfo names are removed at the end.
    Index {
        /// Sign the indexes with this secret key (its public key must be trusted by
        /// the mounts that are to use them).
        #[arg(long, value_name = "SECRET_FILE")]
        key_file: PathBuf,
        #[command(flatten)]
        keys: Keys,
        /// How the blocks are compressed [default: xz; zstd for zstd NARs].
        #[arg(long, value_name = "xz|zstd|none")]
        compression: Option<String>,
        /// Paths indexed in parallel [default: the number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Only say what would be indexed.
        #[arg(long)]
        dry_run: bool,
        /// s3://BUCKET[/PREFIX]?endpoint=...&region=... or file:///DIR
        cache_url: String,
        /// Store paths to index [default: every path in the cache]
        paths: Vec<String>,
    },
    /// Fetch the closures of store paths into a mount's disk cache ahead of use.
    Prefetch {
        /// Where narfs is mounted
        mountpoint: PathBuf,
        /// Store paths (/nix/store/HASH-NAME or HASH-NAME)
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Print a running mount's counters (the same as its --metrics-addr serves).
    Stats {
        /// Where narfs is mounted
        mountpoint: PathBuf,
    },
    /// List a store path in a cache without mounting (like `nix store ls --store`).
    Ls {
        #[command(flatten)]
        keys: Keys,
        /// Long listing: type, mode, size and link targets
        #[arg(short, long)]
        long: bool,
        /// Recurse into directories
        #[arg(short = 'R', long)]
        recursive: bool,
        cache_url: String,
        /// /nix/store/<hash>-<name>[/SUBPATH]
        path: String,
    },
    /// Print a file of a store path in a cache without mounting (verified).
    Cat {
        #[command(flatten)]
        keys: Keys,
        cache_url: String,
        /// /nix/store/<hash>-<name>/FILE
        path: String,
    },
    /// Check signatures and hashes of the given store paths (or of every path the
    /// cache lists); report each failure and exit 1 if there was any.
    Verify {
        #[command(flatten)]
        keys: Keys,
        cache_url: String,
        paths: Vec<String>,
    },
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("narfs"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/narfs"))
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

fn keygen(name: &str, secret: &std::path::Path, public: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        return Err(format!(
            "invalid key name '{name}': it may not be empty or contain ':' or spaces"
        ));
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let sk = crate::formats::keys::SecretKey::from_seed(name, seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret)
        .map_err(|e| format!("{}: {e}", secret.display()))?;
    std::io::Write::write_all(&mut f, sk.to_nix_string().as_bytes())
        .map_err(|e| format!("{}: {e}", secret.display()))?;
    std::fs::write(public, sk.public().to_nix_string())
        .map_err(|e| format!("{}: {e}", public.display()))
}

/// A bar on a terminal; a line per path otherwise (logs, CI).
struct PushProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl crate::publish::push::Progress for PushProgress {
    fn start(&self, paths: usize, bytes: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(bytes);
                b.set_message(format!("{paths} paths"));
            }
            None => eprintln!("pushing {paths} paths ({} MiB of NAR)", bytes >> 20),
        }
    }
    fn done(&self, path: &crate::formats::store_path::StorePath, nar: u64, file: u64) {
        match &self.bar {
            Some(b) => {
                b.inc(nar);
                b.set_message(path.name().to_owned());
            }
            None => eprintln!("pushed {path} ({nar} bytes of NAR, {file} uploaded)"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A query parameter of a cache URL (`nix copy --to` takes `secret-key=` and
/// `compression=` there).
fn url_param(url: &str, name: &str) -> Option<String> {
    let (_, q) = url.split_once('?')?;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn push(
    key_file: Option<PathBuf>,
    compression: Option<String>,
    store: Option<String>,
    jobs: Option<usize>,
    no_index: bool,
    cache_url: &str,
    paths: &[String],
) -> Result<crate::publish::push::Summary, String> {
    use crate::formats::narinfo::Compression;
    let url = crate::storage::cache_url::parse(cache_url).map_err(|e| e.to_string())?;
    for w in &url.warnings {
        eprintln!("narfs: warning: {w}");
    }
    if matches!(url.url, crate::storage::cache_url::CacheUrl::Http { .. }) {
        return Err(format!(
            "{}: narfs does not write to HTTP caches; push to the s3:// or file:// cache behind it",
            crate::storage::cache_url::redact(cache_url)
        ));
    }
    let compression = compression
        .or_else(|| url_param(cache_url, "compression"))
        .unwrap_or_else(|| "xz".to_owned());
    let key_file = key_file.or_else(|| url_param(cache_url, "secret-key").map(PathBuf::from));
    let compression = match compression.as_str() {
        "xz" => Compression::Xz,
        "zstd" => Compression::Zstd,
        "none" => Compression::None,
        other => return Err(format!("unknown compression '{other}' (xz, zstd or none)")),
    };
    let key = match &key_file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            Some(
                crate::formats::keys::SecretKey::parse(text.trim())
                    .map_err(|e| format!("{}: {e}", f.display()))?,
            )
        }
        None => None,
    };
    let infos = crate::publish::push::query_closure(store.as_deref(), paths)?;
    let opts = crate::publish::push::PushOptions {
        store,
        key,
        compression,
        jobs: jobs.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        }),
        index: !no_index,
    };
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("progress template"),
        );
        b
    });
    let progress = PushProgress { bar };
    runtime().block_on(async {
        let storage = crate::storage::open(&url.url, None, None).await?;
        crate::publish::push::push(storage, infos, &opts, &progress).await
    })
}

/// `narfs index`; `Ok` has how many paths failed.
fn index(
    key_file: &std::path::Path,
    keys: &Keys,
    compression: Option<&str>,
    jobs: Option<usize>,
    dry_run: bool,
    cache_url: &str,
    paths: &[String],
) -> Result<usize, String> {
    use crate::formats::file_index::BlockCompression;
    use crate::publish::index::Done;
    let url = crate::storage::cache_url::parse(cache_url).map_err(|e| e.to_string())?;
    for w in &url.warnings {
        eprintln!("narfs: warning: {w}");
    }
    if matches!(url.url, crate::storage::cache_url::CacheUrl::Http { .. }) {
        return Err(format!(
            "{}: narfs does not write to HTTP caches; index the s3:// or file:// cache behind it",
            crate::storage::cache_url::redact(cache_url)
        ));
    }
    let text =
        std::fs::read_to_string(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let key = crate::formats::keys::SecretKey::parse(text.trim())
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let mut trusted = crate::formats::keys::TrustedKeys::default();
    for k in keys.all() {
        trusted.add(
            crate::formats::keys::PublicKey::parse(&k)
                .map_err(|e| format!("invalid trusted public key: {e}"))?,
        );
    }
    let compression = match compression {
        None => None,
        Some("xz") => Some(BlockCompression::Xz),
        Some("zstd") => Some(BlockCompression::Zstd),
        Some("none") => Some(BlockCompression::None),
        Some(other) => return Err(format!("unknown compression '{other}' (xz, zstd or none)")),
    };
    let mut hashes = Vec::new();
    for p in paths {
        let (sp, sub) = crate::cli::inspect::split_path(p)?;
        if !sub.is_empty() {
            return Err(format!("'{p}': name a store path, not a file inside one"));
        }
        hashes.push(sp.hash_part().to_owned());
    }
    let opts = crate::publish::index::IndexOptions {
        key,
        trusted,
        compression,
        jobs: jobs.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        }),
        dry_run,
    };
    let report = |hash: &str, r: &crate::publish::index::Outcome| match r {
        Ok((
            sp,
            Done::Indexed {
                old_size,
                new_size,
                blocks,
                ..
            },
        )) => eprintln!("indexed {sp}: {blocks} blocks, {old_size} -> {new_size} bytes"),
        Ok((sp, Done::Already)) => eprintln!("already indexed {sp}"),
        Ok((sp, Done::WouldIndex { url, size })) => {
            eprintln!("would index {sp} ({url}, {size} bytes)")
        }
        Err(e) if hash.is_empty() => eprintln!("narfs: warning: {e}"),
        Err(e) => eprintln!("FAILED {e}"),
    };
    runtime().block_on(async {
        let storage = crate::storage::open(&url.url, None, keys.ssl_cert_file.as_deref()).await?;
        if hashes.is_empty() {
            hashes = crate::storage::narinfo_hashes(&*storage).await?;
        }
        Ok(crate::publish::index::index(storage, hashes, &opts, &report).await)
    })
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

fn inspect(cmd: Cmd) -> ExitCode {
    let rt = runtime();
    rt.block_on(async move {
        match cmd {
            Cmd::Ls {
                keys,
                long,
                recursive,
                cache_url,
                path,
            } => {
                let (s, info, sub) = match crate::cli::inspect::open_path(
                    &cache_url,
                    &keys.all(),
                    keys.netrc_file.as_deref(),
                    keys.ssl_cert_file.as_deref(),
                    &path,
                )
                .await
                {
                    Ok(v) => v,
                    Err(e) => return fail(e),
                };
                let tree = match s.tree(&info, long).await {
                    Ok(t) => t,
                    Err(e) => return fail(e),
                };
                let Some(e) = crate::cli::inspect::find(&tree, &sub) else {
                    return fail(format!("{path}: no such file or directory"));
                };
                let shown = if sub.is_empty() {
                    ".".to_owned()
                } else {
                    format!("./{}", sub.join("/"))
                };
                let mut out = std::io::stdout().lock();
                match crate::cli::inspect::print_ls(&mut out, e, &shown, long, recursive, true) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(e),
                }
            }
            Cmd::Cat {
                keys,
                cache_url,
                path,
            } => {
                let (s, info, sub) = match crate::cli::inspect::open_path(
                    &cache_url,
                    &keys.all(),
                    keys.netrc_file.as_deref(),
                    keys.ssl_cert_file.as_deref(),
                    &path,
                )
                .await
                {
                    Ok(v) => v,
                    Err(e) => return fail(e),
                };
                let tree = match s.file(&info, &sub).await {
                    Ok(t) => t,
                    Err(e) => return fail(e),
                };
                // names inside the path only; a symlink in it points at the host's
                // /nix/store, not at the cache, and is not followed
                for i in 0..sub.len() {
                    if let Some(crate::formats::listing::Entry::Symlink { .. }) =
                        crate::cli::inspect::find(&tree, &sub[..i])
                    {
                        return fail(format!("{path}: {} is a symbolic link", sub[i - 1]));
                    }
                }
                match crate::cli::inspect::find(&tree, &sub) {
                    Some(e @ crate::formats::listing::Entry::Regular { .. }) => {
                        let mut out = std::io::stdout().lock();
                        match s.write_file(e, &mut out) {
                            Ok(()) => ExitCode::SUCCESS,
                            Err(e) => fail(format!("{path}: {e}")),
                        }
                    }
                    Some(crate::formats::listing::Entry::Symlink { .. }) => {
                        fail(format!("{path}: a symbolic link"))
                    }
                    Some(_) => fail(format!("{path}: not a regular file")),
                    None => fail(format!("{path}: no such file")),
                }
            }
            Cmd::Verify {
                keys,
                cache_url,
                paths,
            } => {
                let s = match crate::cli::inspect::session(
                    &cache_url,
                    &keys.all(),
                    keys.netrc_file.as_deref(),
                    keys.ssl_cert_file.as_deref(),
                )
                .await
                {
                    Ok(s) => s,
                    Err(e) => return fail(e),
                };
                use crate::cli::inspect::Target;
                let mut targets: Vec<Target> = paths
                    .iter()
                    .map(|p| match crate::cli::inspect::split_path(p) {
                        Ok((sp, _)) => Target::Path(sp),
                        Err(e) => Target::Bad(e),
                    })
                    .collect();
                if paths.is_empty() {
                    match crate::cli::inspect::all_hashes(s.fetcher()).await {
                        Ok(h) => targets.extend(h.into_iter().map(Target::Hash)),
                        Err(e) => return fail(e),
                    }
                }
                let mut failed = 0usize;
                let mut ok = 0usize;
                for t in targets {
                    let r = match t {
                        Target::Path(sp) => crate::cli::inspect::verify_one(&s, &sp).await,
                        Target::Hash(h) => crate::cli::inspect::verify_hash(&s, &h).await,
                        Target::Bad(e) => Err(e),
                    };
                    match r {
                        Ok(sp) => {
                            ok += 1;
                            println!("ok {sp}");
                        }
                        Err(e) => {
                            failed += 1;
                            println!("FAILED {e}");
                        }
                    }
                }
                eprintln!("{ok} verified, {failed} failed");
                if failed > 0 {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            _ => unreachable!(),
        }
    })
}

pub fn main() -> ExitCode {
    use clap::CommandFactory;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let subcommands: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .chain(["help".to_owned()])
        .collect();
    let subcommands: Vec<&str> = subcommands.iter().map(String::as_str).collect();
    let cli = if crate::cli::fstab::is_helper_form(&args, &subcommands) {
        let Some(args) = args
            .iter()
            .map(|a| a.to_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
        else {
            eprintln!("narfs: arguments must be UTF-8");
            return ExitCode::from(2);
        };
        match crate::cli::fstab::translate(&args) {
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
        Cmd::Keygen {
            name,
            secret_file,
            public_file,
        } => match keygen(&name, &secret_file, &public_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Cmd::Push {
            key_file,
            compression,
            store,
            jobs,
            no_index,
            cache_url,
            paths,
        } => {
            init_logging(0, None);
            match push(
                key_file,
                compression,
                store,
                jobs,
                no_index,
                &cache_url,
                &paths,
            ) {
                Ok(s) => {
                    eprintln!(
                        "{} paths pushed ({} MiB of NAR, {} MiB uploaded), {} already in the cache",
                        s.pushed,
                        s.nar_bytes >> 20,
                        s.uploaded_bytes >> 20,
                        s.skipped
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Index {
            key_file,
            keys,
            compression,
            jobs,
            dry_run,
            cache_url,
            paths,
        } => {
            init_logging(keys.verbose, None);
            match index(
                &key_file,
                &keys,
                compression.as_deref(),
                jobs,
                dry_run,
                &cache_url,
                &paths,
            ) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(n) => fail(format!("{n} paths could not be indexed")),
                Err(e) => fail(e),
            }
        }
        Cmd::Prefetch { mountpoint, paths } => match prefetch(&mountpoint, &paths) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(n) => fail(format!("{n} paths could not be fetched")),
            Err(e) => fail(e),
        },
        Cmd::Stats { mountpoint } => match stats(&mountpoint) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        cmd @ (Cmd::Ls { .. } | Cmd::Cat { .. } | Cmd::Verify { .. }) => {
            // like nix store cat: only what was asked for, unless -v
            let verbose = match &cmd {
                Cmd::Ls { keys, .. } | Cmd::Cat { keys, .. } | Cmd::Verify { keys, .. } => {
                    keys.verbose
                }
                _ => 0,
            };
            init_logging_at(verbose, None);
            inspect(cmd)
        }
        Cmd::Mount(a) => {
            let child = std::env::var_os(crate::mount::session::READY_ENV).is_some();
            if a.daemon && !child {
                let Some(cache_dir) = a.cache_dir.clone().or_else(default_cache_dir) else {
                    eprintln!(
                        "narfs: no --cache-dir given and neither XDG_CACHE_HOME nor HOME is set"
                    );
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
