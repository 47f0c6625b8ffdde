//! Nix itself on the lazy store (docs/nix-store.md): a writable store directory whose
//! lower layer is the verified mount, every path of it registered with nix.
//! May use `formats`, `storage`, `disk_cache`, `fetch` and `mount`.

pub mod overlay;
pub mod register;

use crate::formats::store_path::StorePath;
use crate::mount::session::{self, End, MountError, MountOptions};
use std::path::{Path, PathBuf};

/// Where the upper layer (nix's writes) lives.
#[derive(Clone, Debug)]
pub enum Upper {
    /// `DIR/upper` and `DIR/work`, kept across mounts.
    Dir(PathBuf),
    /// A tmpfs of its own, gone with the mount.
    Tmpfs,
}

pub struct Options {
    /// The narfs mount; its mount point is the hidden lower directory.
    pub mount: MountOptions,
    /// Where nix sees the store.
    pub store_dir: PathBuf,
    pub upper: Upper,
    /// Register the closures of these; none: every path of the cache.
    pub closures: Vec<StorePath>,
    pub nix: register::Nix,
}

/// The hidden directory next to `store_dir` where narfs is mounted.
pub fn lower_dir(store_dir: &Path) -> PathBuf {
    store_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .join(".narfs-lower")
}

/// A tmpfs mounted for the upper layer, unmounted however `run` ends.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = overlay::unmount(&self.0) {
            tracing::warn!("unmounting {}: {e}", self.0.display());
        }
    }
}

/// The checks that need nothing mounted: each names the cause and the fix.
fn preflight(opts: &Options) -> Result<(), MountError> {
    if unsafe { libc::geteuid() } != 0 {
        return Err(MountError::Usage(format!(
            "narfs nix-store mounts overlayfs at {}: run it as root",
            opts.store_dir.display()
        )));
    }
    fuse_device().map_err(MountError::Failed)?;
    overlay::check_available().map_err(MountError::Failed)?;
    opts.nix.check_schema().map_err(MountError::Failed)?;
    match std::fs::metadata(&opts.store_dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(MountError::Usage(format!(
            "{} is not a directory",
            opts.store_dir.display()
        ))),
        Err(e) => Err(MountError::Usage(format!(
            "store directory {}: {e}",
            opts.store_dir.display()
        ))),
    }
}

/// `/dev/fuse` must be the FUSE device.
fn fuse_device() -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let fix = "load the fuse module (modprobe fuse) and install fuse3, or in a container \
               pass the device in (--device /dev/fuse)";
    match std::fs::metadata("/dev/fuse") {
        Ok(m)
            if m.file_type().is_char_device()
                && libc::major(m.rdev()) == 10
                && libc::minor(m.rdev()) == 229 =>
        {
            Ok(())
        }
        Ok(_) => Err(format!("no FUSE: /dev/fuse is not the FUSE device: {fix}")),
        Err(e) => Err(format!("no FUSE: /dev/fuse: {e}: {fix}")),
    }
}

/// The upper and work directories (on a tmpfs of their own, mounted at a hidden
/// directory next to the store, for `Upper::Tmpfs`).
fn upper_dirs(opts: &Options) -> Result<(PathBuf, PathBuf, Option<Tmpfs>), MountError> {
    let mut tmpfs = None;
    let base = match &opts.upper {
        Upper::Dir(d) => d.clone(),
        Upper::Tmpfs => {
            let d = opts
                .store_dir
                .parent()
                .unwrap_or(Path::new("/"))
                .join(".narfs-upper");
            std::fs::create_dir_all(&d)
                .map_err(|e| MountError::Failed(format!("{}: {e}", d.display())))?;
            mount_tmpfs(&d).map_err(|e| {
                MountError::Failed(format!("mounting a tmpfs at {}: {e}", d.display()))
            })?;
            tmpfs = Some(Tmpfs(d.clone()));
            d
        }
    };
    // the file system it is (or will be) on: the nearest directory that exists
    let on = base
        .ancestors()
        .find(|a| a.is_dir())
        .unwrap_or(Path::new("/"));
    overlay::check_upper(on).map_err(MountError::Usage)?;
    let (upper, work) = (base.join("upper"), base.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d)
            .map_err(|e| MountError::Failed(format!("{}: {e}", d.display())))?;
    }
    overlay::check_upper(&upper).map_err(MountError::Usage)?;
    Ok((upper, work, tmpfs))
}

fn mount_tmpfs(at: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(at.as_os_str().as_bytes())?;
    let t = std::ffi::CString::new("tmpfs").expect("no NUL");
    let data = std::ffi::CString::new("mode=0755").expect("no NUL");
    if unsafe { libc::mount(t.as_ptr(), c.as_ptr(), t.as_ptr(), 0, data.as_ptr().cast()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts narfs below a writable overlay at the store directory, registers the paths
/// with nix, serves until SIGTERM/SIGINT (or until the overlay is unmounted from
/// outside), then undoes it all: the overlay first, narfs last.
pub fn run(mut opts: Options) -> Result<(), MountError> {
    preflight(&opts)?;
    let (upper, work, _tmpfs) = upper_dirs(&opts)?;
    let lower = lower_dir(&opts.store_dir);
    std::fs::create_dir_all(&lower)
        .map_err(|e| MountError::Failed(format!("{}: {e}", lower.display())))?;
    // what the store directory held so far stays visible (and is never written)
    let kept = std::fs::read_dir(&opts.store_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    opts.mount.mountpoint = lower.clone();
    let serving = session::start(&opts.mount)?;
    let fetcher = serving.fs.fetcher().clone();
    let infos = serving.rt.block_on(async {
        if opts.closures.is_empty() {
            register::everything(&fetcher).await
        } else {
            register::closure(&fetcher, &opts.closures).await
        }
    });
    let infos = match infos {
        Ok(i) if i.is_empty() => {
            Err("the cache has no path that verifies: nothing to register".into())
        }
        r => r,
    };
    let infos = match infos {
        Ok(i) => i,
        Err(e) => {
            serving.stop(End::Done);
            return Err(MountError::Failed(e));
        }
    };
    // nix will hold these as valid with these contents: the mount serves no others
    fetcher.pin(
        infos
            .iter()
            .map(|i| (i.store_path.hash_part().to_owned(), i.nar_hash)),
    );
    let layers = overlay::Layers {
        store_dir: opts.store_dir.clone(),
        lowers: if kept {
            vec![opts.store_dir.clone(), lower.clone()]
        } else {
            vec![lower.clone()]
        },
        upper: upper.clone(),
        work,
    };
    let cleared = overlay::clear_whiteouts(&upper, infos.iter().map(|i| i.store_path.basename()))
        .map_err(|e| MountError::Failed(format!("{}: {e}", upper.display())));
    let mounted = cleared.and_then(|n| {
        if n > 0 {
            tracing::info!(
                paths = n,
                "paths an earlier garbage collection hid are shown again"
            );
        }
        overlay::mount(&layers).map_err(MountError::Failed)
    });
    if let Err(e) = mounted {
        serving.stop(End::Done);
        return Err(e);
    }
    let store_dir = opts.store_dir.clone();
    let overlay_dev = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&store_dir).map(|m| m.dev()).ok()
    };
    let tmp = tempfile::tempdir().map_err(|e| MountError::Failed(format!("temp dir: {e}")));
    let registered = tmp.and_then(|tmp| {
        opts.nix
            .register(&infos, tmp.path())
            .map_err(MountError::Failed)
    });
    if let Err(e) = registered {
        let _ = overlay::unmount(&store_dir);
        serving.stop(End::Done);
        return Err(e);
    }
    tracing::info!(
        paths = infos.len(),
        store = %store_dir.display(),
        "nix can use the store: every path registered, files fetched when read"
    );
    session::announce_ready();
    let ended = serving.wait(|| !overlay_dev.is_some_and(|d| dev_mounted_at(d, &store_dir)));
    if !matches!(ended, End::Done) {
        if let Err(e) = overlay::unmount(&store_dir) {
            tracing::warn!("unmounting the overlay at {}: {e}", store_dir.display());
        }
    } else {
        tracing::info!(
            "the overlay at {} was unmounted from outside",
            store_dir.display()
        );
    }
    serving.stop(ended);
    Ok(())
}

/// Whether device `dev` is mounted at `at` in this mount namespace.
fn dev_mounted_at(dev: u64, at: &Path) -> bool {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let at = at.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(2) == Some(&want.as_str()) && f.get(4) == Some(&at.as_ref())
        })
    })
}
