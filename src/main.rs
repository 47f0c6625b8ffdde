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
    /// Create a signing key pair in the formats of `nix-store --generate-binary-cache-key`.
    Keygen {
        /// The key's name, e.g. cache.example.org-1
        name: String,
        /// Where the secret key goes (created with mode 0600)
        secret_file: PathBuf,
        /// Where the public key goes
        public_file: PathBuf,
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
    #[arg(long, value_name = "SIZE", value_parser = narfs::disk_cache::parse_size)]
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
    #[arg(long)]
    passthrough: bool,
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
    let sk = narfs::formats::keys::SecretKey::from_seed(name, seed);
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
                let (s, info, sub) =
                    match narfs::inspect::open_path(&cache_url, &keys.all(), &path).await {
                        Ok(v) => v,
                        Err(e) => return fail(e),
                    };
                let tree = match s.tree(&info).await {
                    Ok(t) => t,
                    Err(e) => return fail(e),
                };
                let Some(e) = narfs::inspect::find(&tree, &sub) else {
                    return fail(format!("{path}: no such file or directory"));
                };
                let shown = if sub.is_empty() {
                    ".".to_owned()
                } else {
                    format!("./{}", sub.join("/"))
                };
                let mut out = std::io::stdout().lock();
                match narfs::inspect::print_ls(&mut out, e, &shown, long, recursive, true) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(e),
                }
            }
            Cmd::Cat {
                keys,
                cache_url,
                path,
            } => {
                let (s, info, sub) =
                    match narfs::inspect::open_path(&cache_url, &keys.all(), &path).await {
                        Ok(v) => v,
                        Err(e) => return fail(e),
                    };
                let dir = match s.content(&info).await {
                    Ok(d) => d,
                    Err(e) => return fail(e),
                };
                // Walk without following links: a symlink in the store path points at
                // the host's /nix/store, not at the cache.
                let mut file = dir;
                for (i, part) in sub.iter().enumerate() {
                    file.push(part);
                    match std::fs::symlink_metadata(&file) {
                        Ok(m) if m.is_file() && i + 1 == sub.len() => {}
                        Ok(m) if m.is_dir() && i + 1 < sub.len() => {}
                        Ok(m) if m.file_type().is_symlink() => {
                            return fail(format!("{path}: {part} is a symbolic link"))
                        }
                        Ok(_) => return fail(format!("{path}: not a regular file")),
                        Err(_) => return fail(format!("{path}: no such file")),
                    }
                }
                if sub.is_empty() && !file.is_file() {
                    return fail(format!("{path}: not a regular file"));
                }
                let mut out = std::io::stdout().lock();
                match std::fs::File::open(&file).and_then(|mut f| std::io::copy(&mut f, &mut out)) {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => fail(e),
                }
            }
            Cmd::Verify {
                keys,
                cache_url,
                paths,
            } => {
                let s = match narfs::inspect::session(&cache_url, &keys.all()).await {
                    Ok(s) => s,
                    Err(e) => return fail(e),
                };
                use narfs::inspect::Target;
                let mut targets: Vec<Target> = paths
                    .iter()
                    .map(|p| match narfs::inspect::split_path(p) {
                        Ok((sp, _)) => Target::Path(sp),
                        Err(e) => Target::Bad(e),
                    })
                    .collect();
                if paths.is_empty() {
                    match narfs::inspect::all_hashes(s.fetcher()).await {
                        Ok(h) => targets.extend(h.into_iter().map(Target::Hash)),
                        Err(e) => return fail(e),
                    }
                }
                let mut failed = 0usize;
                let mut ok = 0usize;
                for t in targets {
                    let r = match t {
                        Target::Path(sp) => narfs::inspect::verify_one(&s, &sp).await,
                        Target::Hash(h) => narfs::inspect::verify_hash(&s, &h).await,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Keygen {
            name,
            secret_file,
            public_file,
        } => match keygen(&name, &secret_file, &public_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        cmd @ (Cmd::Ls { .. } | Cmd::Cat { .. } | Cmd::Verify { .. }) => {
            init_logging(0);
            inspect(cmd)
        }
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
                passthrough: a.passthrough,
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
