//! `narfs mount`: check the cache answers, then serve it until unmounted or signalled.

use crate::disk_cache::DiskCache;
use crate::fetch::Fetcher;
use crate::formats::keys::TrustedKeys;
use crate::mount::fs::Fs;
use crate::mount::inodes::Index;
use crate::storage;
use crate::storage::cache_info::check_cache;
use crate::storage::cache_url;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set in a background mount's environment (by `narfs mount --daemon` and the mount(8)
/// form): where the mount says it is serving.
pub const READY_ENV: &str = "NARFS_READY_SOCKET";

pub struct MountOptions {
    pub cache_url: String,
    pub mountpoint: PathBuf,
    pub trusted_public_keys: Vec<String>,
    pub cache_dir: PathBuf,
    pub allow_other: bool,
    pub negative_ttl: Duration,
    pub refresh_interval: Duration,
    pub timeout: Duration,
    pub cache_size: Option<u64>,
    pub jobs: usize,
    pub prefetch_references: bool,
    pub passthrough: bool,
    /// No FUSE opens; metadata only from verified NARs.
    pub no_open: bool,
    /// Keep the open round trip (and listings) even for a cache with file indexes.
    pub page_cache: bool,
    pub noexec: bool,
    /// `HOST:PORT` to serve Prometheus metrics on.
    pub metrics_addr: Option<String>,
    /// Credentials for http(s) caches (default: Nix's `/etc/nix/netrc` if present).
    pub netrc_file: Option<PathBuf>,
    /// The CA certificates https trusts (default: found as Nix finds them).
    pub ssl_cert_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Malformed input: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// Everything else: exit status 1.
    #[error("{0}")]
    Failed(String),
}

impl MountError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Usage(_) => 2,
            MountError::Failed(_) => 1,
        }
    }
}

fn parse_keys(keys: &[String]) -> Result<TrustedKeys, MountError> {
    let mut t = TrustedKeys::default();
    for k in keys {
        let pk = crate::formats::keys::PublicKey::parse(k)
            .map_err(|e| MountError::Usage(format!("invalid trusted public key: {e}")))?;
        t.add(pk);
    }
    if t.is_empty() {
        return Err(MountError::Usage(
            "no trusted public key given: pass --trusted-public-key NAME:BASE64 (or set \
             NARFS_TRUSTED_PUBLIC_KEYS); narfs never serves unverified store paths"
                .into(),
        ));
    }
    Ok(t)
}

/// Mounts the cache and serves it until SIGTERM/SIGINT or until it is unmounted from
/// outside (in every mount namespace).
pub fn run(opts: MountOptions) -> Result<(), MountError> {
    let serving = start(&opts)?;
    announce_ready();
    let ended = serving.wait(|| false);
    serving.stop(ended);
    Ok(())
}

/// A mount that serves: what `start` set up, until `stop`.
pub struct Serving {
    pub fs: Arc<Fs>,
    pub rt: tokio::runtime::Runtime,
    bg: fuser::BackgroundSession,
    /// The mount's device number: how to find it in mount tables.
    dev: Option<u64>,
    mountpoint: PathBuf,
    _control: Option<crate::mount::control::Listening>,
}

/// Checks the options and the cache, then mounts it; it serves from then on.
pub fn start(opts: &MountOptions) -> Result<Serving, MountError> {
    let parsed = cache_url::parse(&opts.cache_url).map_err(|e| MountError::Usage(e.to_string()))?;
    for w in &parsed.warnings {
        tracing::warn!("{w}");
    }
    let keys = parse_keys(&opts.trusted_public_keys)?;
    let netrc = storage::load_netrc(opts.netrc_file.as_deref())
        .map_err(|e| MountError::Usage(e.to_string()))?;
    match std::fs::metadata(&opts.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(MountError::Failed(format!(
                "mount point {} is not a directory",
                opts.mountpoint.display()
            )))
        }
        Err(e) => {
            return Err(MountError::Failed(format!(
                "mount point {}: {e}",
                opts.mountpoint.display()
            )))
        }
    }
    raise_fd_limit();
    let disk = Arc::new(DiskCache::open(&opts.cache_dir).map_err(|e| match e {
        crate::disk_cache::DiskCacheError::Unsafe { .. } => MountError::Usage(e.to_string()),
        e => MountError::Failed(e.to_string()),
    })?);
    let quota = disk.set_quota(opts.cache_size);
    disk.evict_to_quota();
    tracing::info!(
        cache_dir = %opts.cache_dir.display(),
        used_mb = disk.used() >> 20,
        quota_mb = quota >> 20,
        "cache directory"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("narfs-rt")
        .build()
        .map_err(|e| MountError::Failed(format!("cannot start the runtime: {e}")))?;
    let t0 = Instant::now();
    let storage = rt
        .block_on(storage::open(
            &parsed.url,
            netrc.as_ref(),
            opts.ssl_cert_file.as_deref(),
        ))
        .map_err(MountError::Usage)?;
    let info = rt
        .block_on(check_cache(&*storage, &parsed.url))
        .map_err(MountError::Failed)?;
    tracing::info!(url = %parsed.url, ms = t0.elapsed().as_millis() as u64, "cache answered");
    // A cache whose paths have file indexes is read without a round trip per open;
    // listings are then not used (paths without an index show verified metadata
    // only, from their NARs).
    let no_open = opts.no_open || (info.indexed && !opts.page_cache && !opts.passthrough);
    if no_open && !opts.no_open {
        tracing::info!(
            "the cache has file indexes: opens need no round trip (--page-cache to use .ls listings of paths without one)"
        );
    }

    let policy = crate::fetch::retry::Policy {
        budget: opts.timeout,
        stall: opts.timeout.min(Duration::from_secs(10)),
    };
    let fetcher = Arc::new(
        Fetcher::new(storage, keys, disk, opts.negative_ttl)
            .with_policy(policy)
            .with_indexes_announced(info.indexed)
            .with_jobs(opts.jobs),
    );
    let index = Arc::new(Index::default());
    let fs = Fs::new(
        index,
        fetcher,
        crate::mount::fs::FsOptions {
            prefetch_references: opts.prefetch_references,
            jobs: opts.jobs,
            use_listings: !no_open,
        },
    );
    fs.listing_started();
    rt.spawn(keep_listing(fs.clone(), opts.refresh_interval));
    if let Some(addr) = &opts.metrics_addr {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| MountError::Failed(format!("--metrics-addr {addr}: {e}")))?;
        let f = fs.clone();
        rt.spawn(crate::mount::metrics::serve(
            listener,
            Arc::new(move || f.metrics_text()),
        ));
        tracing::info!(addr, "serving metrics at /metrics");
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        // /proc/mounts, findmnt and df show the cache (without secrets) as the source
        // and `fuse.narfs` as the type. fuser mounts with mount(2) as root and drops
        // `Subtype` there (type `fuse`); the kernel takes `subtype=` as an option, and
        // so does fusermount3 (the way without root).
        fuser::MountOption::FSName(cache_url::mount_source(&opts.cache_url)),
        fuser::MountOption::CUSTOM("subtype=narfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        if opts.noexec {
            fuser::MountOption::NoExec
        } else {
            fuser::MountOption::Exec
        },
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(4);
    config.clone_fd = true;
    let session = fuser::Session::new(
        crate::mount::fuse::NarFuse::new(
            fs.clone(),
            rt.handle().clone(),
            if opts.passthrough {
                crate::mount::fuse::OpenMode::Passthrough
            } else if no_open {
                crate::mount::fuse::OpenMode::NoOpen
            } else {
                crate::mount::fuse::OpenMode::PageCache
            },
        ),
        &opts.mountpoint,
        &config,
    )
    .map_err(|e| {
        MountError::Failed(format!(
            "cannot mount at {}: {e}",
            opts.mountpoint.display()
        ))
    })?;
    fs.set_invalidator(Arc::new(crate::mount::fuse::KernelInvalidator(
        session.notifier(),
    )));
    let bg = session
        .spawn()
        .map_err(|e| MountError::Failed(format!("cannot start the FUSE session: {e}")))?;
    tracing::info!(mountpoint = %opts.mountpoint.display(), ms = t0.elapsed().as_millis() as u64, "mounted");
    let dev = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&opts.mountpoint).map(|m| m.dev()).ok()
    };
    // after the mount: the socket's name has the mount's device number
    let control = {
        let _rt = rt.enter();
        match crate::mount::control::listen(fs.clone(), &opts.mountpoint, opts.jobs) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("no control socket (narfs prefetch and stats will not work): {e}");
                None
            }
        }
    };
    Ok(Serving {
        fs,
        rt,
        bg,
        dev,
        mountpoint: opts.mountpoint.clone(),
        _control: control,
    })
}

/// Tells whoever waits for the mount that it serves: systemd (`Type=notify`), and the
/// foreground half of `--daemon`.
pub fn announce_ready() {
    sd_notify("READY=1");
    if let Some(p) = std::env::var_os(READY_ENV) {
        let _ = std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.send_to(b"READY=1", p));
    }
}

impl Serving {
    /// Serves until SIGTERM or SIGINT, until the mount is gone from every mount
    /// namespace, or until `done()` says so (checked every 200 ms).
    pub fn wait(&self, done: impl Fn() -> bool) -> End {
        self.rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut copies_told = false;
            loop {
                tokio::select! {
                    _ = int.recv() => return End::Signal,
                    _ = term.recv() => return End::Signal,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if self.bg.guard.is_finished() {
                            return End::Gone;
                        }
                        if done() {
                            return End::Done;
                        }
                        let Some(dev) = self.dev else { continue };
                        if mounted::here(dev) {
                            continue;
                        }
                        // gone from this namespace: a copy in another (a container, an
                        // `unshare -m` made while mounted) is still served
                        if !mounted::anywhere(dev) {
                            return End::Gone;
                        }
                        if !copies_told {
                            copies_told = true;
                            tracing::info!(
                                "unmounted here, but another mount namespace holds a copy of the mount: serving it on (SIGTERM ends it)"
                            );
                        }
                    }
                }
            }
        })
    }

    /// Ends the mount: unmounted here (lazily: a busy mount is detached) unless it is
    /// gone already, then the session ends with the process.
    pub fn stop(self, ended: End) {
        sd_notify("STOPPING=1");
        match ended {
            End::Signal | End::Done => {
                if matches!(ended, End::Signal) {
                    tracing::info!("signal received: unmounting");
                }
                // copies in other namespaces end too: their users get ENOTCONN
                if self.dev.is_some_and(mounted::here) {
                    if let Err(e) = mounted::detach(&self.mountpoint) {
                        tracing::warn!("unmounting {}: {e}", self.mountpoint.display());
                    }
                }
            }
            End::Gone => tracing::info!("unmounted from outside"),
        }
        // The session's threads may wait on a connection a lazily detached mount
        // keeps open: not joined (the connection ends when the process does), and not
        // unmounted again by fuser (the mount point may hold another file system now).
        std::mem::forget(self.bg);
        drop(self._control);
        self.rt.shutdown_timeout(Duration::from_secs(1));
    }
}

/// Why a mount ends.
pub enum End {
    /// SIGTERM or SIGINT.
    Signal,
    /// What it served for is over (`Serving::wait`'s `done`).
    Done,
    /// Unmounted from outside (`fusermount3 -u`, `umount`, `umount -l`), in every
    /// mount namespace.
    Gone,
}

/// Where the mount is, by the device number of its root.
mod mounted {
    /// Whether this process's mount namespace has a mount of device `dev`.
    pub fn here(dev: u64) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| has(&t, dev))
    }

    /// Whether any process's mount namespace has it (each table read at most once
    /// per namespace).
    pub fn anywhere(dev: u64) -> bool {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return true;
        };
        let mut seen = std::collections::HashSet::new();
        procs.flatten().any(|p| {
            let pid = p.file_name();
            if !pid
                .to_str()
                .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
            {
                return false;
            }
            let dir = p.path();
            // a namespace read once is enough (unreadable ones are read each time)
            if let Ok(ns) = std::fs::read_link(dir.join("ns/mnt")) {
                if !seen.insert(ns) {
                    return false;
                }
            }
            std::fs::read_to_string(dir.join("mountinfo")).is_ok_and(|t| has(&t, dev))
        })
    }

    /// Whether a mountinfo table lists device `dev` (field 3, `major:minor`).
    fn has(table: &str, dev: u64) -> bool {
        let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
        table
            .lines()
            .any(|l| l.split(' ').nth(2) == Some(want.as_str()))
    }

    /// Unmounts `at` even if busy (MNT_DETACH): what is open stays readable until
    /// the session ends.
    pub fn detach(at: &std::path::Path) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(at.as_os_str().as_bytes())?;
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
        // not root: the setuid helper may
        let st = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(at)
            .status()?;
        if st.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("fusermount3 -uz: {st}")))
        }
    }
}

/// Fills the root: first what earlier mounts verified (from disk, no GET), then the
/// cache's own listing, again every `interval` so newly pushed paths appear.
async fn keep_listing(fs: Arc<Fs>, interval: Duration) {
    let t = Instant::now();
    let f = fs.fetcher().clone();
    let index = fs.index().clone();
    if let Ok(n) = tokio::task::spawn_blocking(move || {
        f.verified_on_disk(|sp| {
            index.add_path(sp);
        })
    })
    .await
    {
        tracing::info!(
            paths = n,
            ms = t.elapsed().as_millis() as u64,
            "loaded verified paths from the cache directory"
        );
        // a remount: the paths listed last time answer at once, the listing refreshes
        // them in the background
        if n > 0 {
            fs.listing_done();
        }
    }
    if !fs.fetcher().storage().can_list() {
        tracing::info!(
            "this cache cannot be listed: store paths appear as they are looked up by name"
        );
        fs.listing_done();
        return;
    }
    loop {
        let t = Instant::now();
        match fs.scan_bucket().await {
            Ok(n) => tracing::info!(
                new_paths = n,
                paths = fs.index().path_count(),
                ms = t.elapsed().as_millis() as u64,
                "listed the cache"
            ),
            Err(e) => tracing::warn!("cannot list the cache (lookups by name still work): {e}"),
        }
        fs.listing_done();
        if interval.is_zero() {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Tells systemd (Type=notify) how the mount is doing, when it is watching.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!("sd_notify: {e}"),
    };
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let r = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = r {
        tracing::warn!("sd_notify {msg}: {e}");
    }
}

/// Raises the soft limit on open files to the hard limit: narfs caches descriptors,
/// and the common default of 1024 is easy to reach.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
