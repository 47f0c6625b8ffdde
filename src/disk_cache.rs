//! The cache directory: verified narinfos and unpacked store paths, kept across mounts.
//!
//! Layout: `store/<hash>-<name>` holds unpacked trees, `narinfo/<key id>/<hash>.narinfo`
//! narinfo records, `verified/<hash>-<name>` the NarHash each tree was verified against,
//! `tmp/` work in progress, `pending/` trees not yet flushed, `trash/` what is being
//! deleted. A path appears in `store/` by one rename, after its NAR matched NarHash and
//! NarSize, so anything in `store/` is complete and verified; `tmp/` is emptied at
//! start, which removes whatever a crash left. A lock file keeps two narfs processes
//! from sharing one directory.
//!
//! The directory is trusted only because no one else can write to it: it must belong
//! to the user running narfs and be writable by no one else (narfs creates it 0700 and
//! everything in it without group or other write, whatever the umask), its
//! subdirectories must be real directories (a symlink there is refused, never
//! followed), and clean-up works through directory descriptors. Even so, narinfo
//! records are verified again when read, and a tree is served only under a record
//! that verifies with the keys trusted now.

use crate::formats::listing::Entry;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct DiskCache {
    /// As the user named it: for messages.
    root: PathBuf,
    /// How narfs reaches it: through the descriptor it checked at start
    /// (`/proc/self/fd/N`), so renaming the directory away and putting another in its
    /// place (by someone who may write its parent) changes nothing narfs reads.
    dir: PathBuf,
    _root_fd: std::os::fd::OwnedFd,
    _lock: File,
    counter: AtomicU64,
    usage: Mutex<Usage>,
    hooks: std::sync::OnceLock<std::sync::Weak<dyn EvictionHooks>>,
    /// Woken when reserved room is returned: a demand waiting for room retries.
    room: tokio::sync::Notify,
}

/// Bytes on disk of each unpacked path, least recently used first, and bytes
/// reserved by unpacks under way: `total + reserved` is what the quota bounds, so
/// it holds at every moment, not only between unpacks.
struct Usage {
    lru: lru::LruCache<String, Held>,
    total: u64,
    reserved: u64,
    quota: u64,
    grace: std::time::Duration,
}

/// An unpacked path's size, and when it came: a path fetched for a reader is not
/// evicted before that reader opened it, or had `GRACE` to (else parallel readers
/// with a small quota would evict each other's paths as soon as they land, and fetch
/// them again, forever).
struct Held {
    size: u64,
    /// Set when committed; cleared by the first use.
    unused_since: Option<std::time::Instant>,
}

const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Usage {
    /// Takes least recently used paths (not `keep`, not pinned) out of the account
    /// until `need` bytes are freed or none is left; returns them for deletion.
    /// Also says whether a path was spared only for its grace (room will come).
    fn choose_victims(
        &mut self,
        need: u64,
        keep: &str,
        pinned: impl Fn(&str) -> bool,
    ) -> (Vec<String>, bool) {
        let mut victims = Vec::new();
        let mut graced = false;
        if need == 0 {
            return (victims, graced);
        }
        let mut freed = 0;
        let candidates: Vec<(String, u64, bool)> = self
            .lru
            .iter()
            .rev()
            .map(|(k, v)| {
                let young = v.unused_since.is_some_and(|t| t.elapsed() < self.grace);
                (k.clone(), v.size, young)
            })
            .collect();
        for (name, size, young) in candidates {
            if freed >= need {
                break;
            }
            if name == keep || pinned(&name) {
                continue;
            }
            if young {
                graced = true;
                continue;
            }
            self.lru.pop(&name);
            self.total -= size;
            freed += size;
            victims.push(name);
        }
        (victims, graced)
    }
}

/// What the layer above knows about the paths the disk cache may evict.
pub trait EvictionHooks: Send + Sync {
    /// Whether `basename` is in use (an open file): it is never evicted.
    fn pinned(&self, basename: &str) -> bool;
    /// `basename` was evicted: nothing of it may be read from disk any more.
    fn evicted(&self, basename: &str);
}

/// Room in the quota held for an unpack under way, returned when dropped.
pub struct Reservation {
    disk: std::sync::Arc<DiskCache>,
    bytes: u64,
    /// Whether growing it may evict other paths (a demand) or must not (a prefetch).
    may_evict: bool,
    keep: String,
}

/// Why room could not be had: other unpacks hold it, or none could free it.
enum Busy {
    Others,
    Alone,
}

/// The quota has no room for what a prefetch wants without evicting.
#[derive(Debug, thiserror::Error)]
#[error("no room in the cache quota without evicting other paths")]
pub struct NoRoom;

impl Reservation {
    /// Holds `bytes` more, evicting least recently used paths for them when allowed.
    /// A demand that finds nothing left to evict goes over the quota (a path larger
    /// than the quota is still served); a prefetch fails instead.
    pub fn grow(&mut self, bytes: u64) -> Result<(), NoRoom> {
        self.disk.make_room(bytes, &self.keep, self.may_evict)?;
        self.bytes += bytes;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut u = self.disk.usage.lock().unwrap();
        u.reserved = u.reserved.saturating_sub(self.bytes);
        drop(u);
        self.disk.room.notify_waiters();
    }
}

/// Bytes what the unpacker is about to create will take on disk, estimated before it
/// is written (ext4-like: whole 4 KiB blocks, short link targets inline, a block per
/// directory and its entries' names).
pub fn footprint(c: crate::formats::nar::Creating) -> u64 {
    use crate::formats::nar::Creating;
    const BLOCK: u64 = 4096;
    match c {
        Creating::File { size } => size.div_ceil(BLOCK) * BLOCK,
        Creating::Symlink { target_len } if target_len < 60 => 0,
        Creating::Symlink { .. } | Creating::Dir => BLOCK,
        Creating::Entry { name_len } => 8 + (name_len as u64).div_ceil(4) * 4,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error("cache directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache directory {0} is in use by another narfs process")]
    Locked(PathBuf),
    /// Others could change what narfs trusts: refused until the user fixes it.
    #[error("refusing cache directory {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
}

/// The subdirectories, each a real directory of ours.
const SUBDIRS: [&str; 6] = ["store", "narinfo", "tmp", "pending", "verified", "trash"];

/// Creates directory `p` and its missing parents 0700, whatever the umask.
pub fn create_private_dir(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// Opens a log or lock file for appending: created 0600, never through a symlink.
pub fn open_private_file(p: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
}

/// Creates `root` (0700, parents too) if missing and checks that only this user can
/// change it: owned by the effective user, not writable by group or others.
fn secure_root(root: &Path) -> Result<std::os::fd::OwnedFd, DiskCacheError> {
    if !root.exists() {
        create_private_dir(root).map_err(io_err(root))?;
    }
    let fd = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io_err(root)(e.into()))?;
    check_ours(&fd, root, "")?;
    Ok(fd)
}

/// Refuses a directory another user owns or that group or others may write to.
fn check_ours(fd: &impl std::os::fd::AsFd, path: &Path, fix: &str) -> Result<(), DiskCacheError> {
    let st = rustix::fs::fstat(fd).map_err(|e| io_err(path)(e.into()))?;
    let me = unsafe { libc::geteuid() };
    let unsafe_dir = |why: String| DiskCacheError::Unsafe {
        path: path.to_owned(),
        why,
    };
    if st.st_uid != me {
        return Err(unsafe_dir(format!(
            "it belongs to uid {}, not to you (uid {me}); use a directory of your own (--cache-dir){fix}",
            st.st_uid
        )));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "group or others may write to it (mode {mode:04o}); run `chmod go-w {}` (narfs creates it 0700){fix}",
            path.display()
        )));
    }
    Ok(())
}

/// Opens (creating it 0700 if missing) subdirectory `name` of the cache directory
/// without following a symlink; a subdirectory of ours with loose modes is tightened.
fn open_subdir(
    root_fd: &std::os::fd::OwnedFd,
    root: &Path,
    name: &str,
) -> Result<std::os::fd::OwnedFd, DiskCacheError> {
    use rustix::fs::{Mode, OFlags};
    let path = root.join(name);
    match rustix::fs::mkdirat(root_fd, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io_err(&path)(e.into())),
    }
    let fd = rustix::fs::openat(
        root_fd,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => DiskCacheError::Unsafe {
            path: path.clone(),
            why: "it is a symlink or not a directory; narfs never follows links in its cache directory: remove it".into(),
        },
        e => io_err(&path)(e.into()),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err(&path)(e.into()))?;
    if st.st_uid == unsafe { libc::geteuid() } && st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(|e| io_err(&path)(e.into()))?;
    }
    check_ours(&fd, &path, "")?;
    Ok(fd)
}

/// Removes everything inside the directory `dir` without following any symlink:
/// a link is removed, never what it points to. Calls `each` with every top name.
fn empty_dir_at(dir: &impl std::os::fd::AsFd, mut each: impl FnMut(&str)) -> io::Result<()> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    for name in names {
        each(&name.to_string_lossy());
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// Removes `name` in `dir`: a file or link by unlink, a directory by emptying it
/// through its own descriptor first.
fn remove_at(dir: &impl std::os::fd::AsFd, name: &std::ffi::CStr) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // unpacked trees are read-only (0555 directories): make each writable to empty it
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    empty_dir_at(&sub, |_| {})?;
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskCacheError + '_ {
    move |source| DiskCacheError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DiskCache {
    pub fn open(root: &Path) -> Result<Self, DiskCacheError> {
        // Nothing narfs creates in here may be writable by group or others, whatever
        // the umask it was started with (the mount is the whole process).
        unsafe { libc::umask(libc::umask(0o077) | 0o077) };
        let root_fd = secure_root(root)?;
        let mut dirs = Vec::new();
        for d in SUBDIRS {
            dirs.push(open_subdir(&root_fd, root, d)?);
        }
        let lock_path = root.join("lock");
        let lock = open_private_file(&lock_path).map_err(io_err(&lock_path))?;
        use std::os::fd::AsRawFd;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DiskCacheError::Locked(root.to_owned()));
        }
        let [_, _, tmp_fd, pending_fd, _, trash_fd] = &dirs[..] else {
            unreachable!("six subdirectories")
        };
        let trash = root.join("trash");
        empty_dir_at(trash_fd, |_| {}).map_err(io_err(&trash))?;
        let tmp = root.join("tmp");
        empty_dir_at(tmp_fd, |name| {
            tracing::info!(path = %tmp.join(name).display(), "removed leftover of an interrupted unpack");
        })
        .map_err(io_err(&tmp))?;
        // A path whose contents may not have reached the disk before a crash (its
        // flush had not finished) is not trusted: it is removed and fetched again.
        let pending = root.join("pending");
        let mut unflushed = Vec::new();
        empty_dir_at(pending_fd, |name| unflushed.push(name.to_owned()))
            .map_err(io_err(&pending))?;
        let [store_fd, _, _, _, verified_fd, _] = &dirs[..] else {
            unreachable!("six subdirectories")
        };
        for name in unflushed {
            // `<store path basename>.<n>`; anything else is not ours and names nothing
            let basename = name.rsplit_once('.').map_or(name.as_str(), |(b, _)| b);
            if crate::formats::store_path::StorePath::from_basename(basename).is_err() {
                continue;
            }
            let Ok(c) = std::ffi::CString::new(basename) else {
                continue;
            };
            remove_at(store_fd, &c).map_err(io_err(&root.join("store").join(basename)))?;
            let _ = remove_at(verified_fd, &c);
            tracing::info!(path = %root.join("store").join(basename).display(), "removed a path whose flush to disk was interrupted");
        }
        // What earlier mounts unpacked, oldest first by modification time (set when
        // the path was unpacked or last used).
        let mut known = Vec::new();
        let store = PathBuf::from(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            dirs[0].as_raw_fd()
        }));
        let store = if store.is_dir() {
            store
        } else {
            root.join("store")
        };
        for e in fs::read_dir(&store).map_err(io_err(&root.join("store")))? {
            let e = e.map_err(io_err(&root.join("store")))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let mtime = e.metadata().and_then(|m| m.modified()).ok();
            known.push((mtime, name, disk_usage(&e.path())));
        }
        known.sort();
        let mut usage = Usage {
            lru: lru::LruCache::unbounded(),
            total: 0,
            reserved: 0,
            quota: u64::MAX,
            grace: GRACE,
        };
        for (_, name, size) in known {
            usage.total += size;
            usage.lru.put(
                name,
                Held {
                    size,
                    unused_since: None,
                },
            );
        }
        let anchored = PathBuf::from(format!("/proc/self/fd/{}", root_fd.as_raw_fd()));
        let dir = if anchored.is_dir() {
            anchored
        } else {
            tracing::warn!("no /proc: the cache directory is used by its path");
            root.to_owned()
        };
        Ok(DiskCache {
            root: root.to_owned(),
            dir,
            _root_fd: root_fd,
            _lock: lock,
            counter: AtomicU64::new(0),
            usage: Mutex::new(usage),
            hooks: std::sync::OnceLock::new(),
            room: tokio::sync::Notify::new(),
        })
    }

    /// Tells the cache which paths are in use and whom to tell of an eviction.
    pub fn set_hooks(&self, hooks: std::sync::Weak<dyn EvictionHooks>) {
        let _ = self.hooks.set(hooks);
    }

    fn hooks(&self) -> Option<std::sync::Arc<dyn EvictionHooks>> {
        self.hooks.get().and_then(std::sync::Weak::upgrade)
    }

    /// Holds `bytes` of the quota for an unpack of `keep`, evicting least recently
    /// used paths for them if `may_evict`; without, `NoRoom` unless they fit as is.
    pub fn reserve(
        self: &std::sync::Arc<Self>,
        bytes: u64,
        keep: &str,
        may_evict: bool,
    ) -> Result<Reservation, NoRoom> {
        let mut r = Reservation {
            disk: self.clone(),
            bytes: 0,
            may_evict,
            keep: keep.to_owned(),
        };
        r.grow(bytes)?;
        Ok(r)
    }

    /// Holds `bytes` of the quota for a demand unpack of `keep`. While evicting
    /// cannot make room because other unpacks hold it, waits for them to end (their
    /// paths then become evictable): parallel downloads never take the cache past the
    /// quota together. Only a demand with nothing else under way may go over it.
    pub async fn reserve_demand(
        self: &std::sync::Arc<Self>,
        bytes: u64,
        keep: &str,
    ) -> Reservation {
        loop {
            let notified = self.room.notified();
            match self.try_room(bytes, keep, true) {
                Ok(()) | Err(Busy::Alone) => {
                    return Reservation {
                        disk: self.clone(),
                        bytes,
                        may_evict: true,
                        keep: keep.to_owned(),
                    }
                }
                Err(Busy::Others) => {
                    // woken when room is returned; the timeout re-checks pins let go
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_millis(200), notified).await;
                }
            }
        }
    }

    /// Counts `bytes` as reserved, first evicting (if allowed) until they fit. A
    /// demand that still does not fit goes over the quota (its reservation grows as
    /// it unpacks: it cannot wait for others that may be growing too).
    fn make_room(&self, bytes: u64, keep: &str, may_evict: bool) -> Result<(), NoRoom> {
        match self.try_room(bytes, keep, may_evict) {
            Ok(()) => Ok(()),
            Err(_) if !may_evict => Err(NoRoom),
            Err(_) => {
                self.usage.lock().unwrap().reserved += bytes;
                Ok(())
            }
        }
    }

    /// Reserves `bytes` if they fit, after evicting least recently used paths for
    /// them if `may_evict`; else says whether other reservations hold the room.
    fn try_room(&self, bytes: u64, keep: &str, may_evict: bool) -> Result<(), Busy> {
        let hooks = self.hooks();
        let (victims, fits) = {
            let mut u = self.usage.lock().unwrap();
            let need = (u.total + u.reserved + bytes).saturating_sub(u.quota);
            let (victims, graced) = if need > 0 && may_evict {
                u.choose_victims(need, keep, |n| hooks.as_ref().is_some_and(|h| h.pinned(n)))
            } else {
                (Vec::new(), false)
            };
            let fits = u.total + u.reserved + bytes <= u.quota;
            if fits {
                u.reserved += bytes;
            }
            (
                victims,
                if fits {
                    None
                } else {
                    Some(u.reserved > 0 || graced)
                },
            )
        };
        self.remove_evicted(victims, hooks.as_deref());
        match fits {
            None => Ok(()),
            Some(true) => Err(Busy::Others),
            Some(false) => Err(Busy::Alone),
        }
    }

    /// Caps the bytes unpacked paths may take; `None` picks 10% of the file system
    /// holding the cache directory, at most 10 GiB.
    pub fn set_quota(&self, quota: Option<u64>) -> u64 {
        let q = quota.unwrap_or_else(|| default_quota(&self.dir));
        self.usage.lock().unwrap().quota = q;
        q
    }

    #[cfg(test)]
    fn set_grace(&self, grace: std::time::Duration) {
        self.usage.lock().unwrap().grace = grace;
    }

    pub fn quota(&self) -> u64 {
        self.usage.lock().unwrap().quota
    }

    /// Bytes taken by unpacked paths.
    pub fn used(&self) -> u64 {
        self.usage.lock().unwrap().total
    }

    /// Marks a path as just used (it becomes the last to be evicted).
    pub fn touch(&self, basename: &str) {
        if let Some(held) = self.usage.lock().unwrap().lru.get_mut(basename) {
            held.unused_since = None;
        }
    }

    /// Evicts least recently used paths (never a pinned one) until what is unpacked
    /// and reserved fits the quota, as after the quota was lowered. Returns what was
    /// evicted.
    pub fn evict_to_quota(&self) -> Vec<String> {
        self.evict_to_quota_keeping("")
    }

    fn evict_to_quota_keeping(&self, keep: &str) -> Vec<String> {
        let hooks = self.hooks();
        let victims = {
            let mut u = self.usage.lock().unwrap();
            let need = (u.total + u.reserved).saturating_sub(u.quota);
            u.choose_victims(need, keep, |n| hooks.as_ref().is_some_and(|h| h.pinned(n)))
                .0
        };
        self.remove_evicted(victims.clone(), hooks.as_deref());
        victims
    }

    /// Each victim disappears by one rename before it is deleted, so no reader ever
    /// sees half of one; it is gone from the disk before this returns.
    fn remove_evicted(&self, victims: Vec<String>, hooks: Option<&dyn EvictionHooks>) {
        for name in victims {
            let _ = fs::remove_file(self.dir.join("verified").join(&name));
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let doomed = self.dir.join("trash").join(format!("{name}.{n}"));
            match fs::rename(self.path_dir(&name), &doomed) {
                Ok(()) => {
                    if let Err(e) = remove_any(&doomed) {
                        tracing::warn!("removing evicted {}: {e}", doomed.display());
                    }
                }
                Err(e) => tracing::warn!("evicting {name}: {e}"),
            }
            tracing::info!(path = name, "evicted from the cache directory");
            if let Some(h) = hooks {
                h.evicted(&name);
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_dir(&self, basename: &str) -> PathBuf {
        self.dir.join("store").join(basename)
    }

    /// Is `basename` unpacked here from a NAR with exactly this NarHash? A copy from
    /// another NarHash (the path was pushed again, or verified under keys no longer
    /// trusted) is removed rather than served under the new narinfo.
    pub fn has_verified(&self, basename: &str, nar_hash: &str) -> bool {
        let record = read_nofollow(&self.dir.join("verified").join(basename)).ok();
        if record.as_deref() == Some(nar_hash) && self.has_path(basename) {
            return true;
        }
        if self.has_path(basename) {
            tracing::info!(
                path = basename,
                "dropping an unpacked copy that is not of the NarHash now signed"
            );
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let doomed = self.dir.join("trash").join(format!("{basename}.{n}"));
            if fs::rename(self.path_dir(basename), &doomed).is_ok() {
                let _ = remove_any(&doomed);
                let mut u = self.usage.lock().unwrap();
                if let Some(held) = u.lru.pop(basename) {
                    u.total -= held.size;
                }
            }
        }
        false
    }

    pub fn has_path(&self, basename: &str) -> bool {
        fs::symlink_metadata(self.path_dir(basename)).is_ok()
    }

    /// A fresh name under `tmp/` (not created).
    pub fn temp_path(&self, basename: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("{basename}.{n}"))
    }

    /// Moves a verified unpack into place; its reservation becomes its size on disk.
    /// If the path is already there, the new copy is dropped: both were verified
    /// against the same NarHash.
    pub fn commit(
        &self,
        tmp: &Path,
        basename: &str,
        nar_hash: &str,
        reservation: Reservation,
    ) -> io::Result<()> {
        let size = disk_usage(tmp);
        // The path becomes visible at once and is flushed in the background: a marker
        // in pending/, itself flushed before the rename, says its contents may not be
        // on disk yet; it goes only after the flush. A power cut therefore never
        // leaves a trusted path in store/ whose files are empty (see `open`).
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let marker = self.dir.join("pending").join(format!("{basename}.{n}"));
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&marker)?
            .sync_all()?;
        File::open(self.dir.join("pending"))?.sync_all()?;
        let record = self.dir.join("verified").join(basename);
        write_new(
            &record.with_file_name(format!(".{basename}.{n}.tmp")),
            nar_hash,
            &record,
        )?;
        let dest = self.path_dir(basename);
        if let Err(e) = fs::rename(tmp, &dest) {
            let _ = fs::remove_file(&marker);
            if self.has_path(basename) {
                remove_any(tmp)?;
                return Ok(());
            }
            return Err(e);
        }
        let store = self.dir.join("store");
        std::thread::spawn(move || {
            if sync_fs(&store).is_ok() && File::open(&store).and_then(|d| d.sync_all()).is_ok() {
                let _ = fs::remove_file(&marker);
            }
        });
        let mut u = self.usage.lock().unwrap();
        let held = Held {
            size,
            unused_since: Some(std::time::Instant::now()),
        };
        if let Some(old) = u.lru.put(basename.to_owned(), held) {
            u.total -= old.size;
        }
        u.total += size;
        drop(u);
        drop(reservation);
        // what the estimate missed (or a demand that had to go over) is evicted now
        self.evict_to_quota_keeping(basename);
        Ok(())
    }

    /// Re-reads the tree of an unpacked path (after a remount).
    pub fn load_tree(&self, basename: &str) -> io::Result<Entry> {
        walk(&self.path_dir(basename), 0)
    }

    /// Verified narinfos are filed under the id of the key that verified them, so a
    /// remount trusts exactly what its own keys verified, without checking again.
    fn narinfo_path(&self, key_id: &str, hash_part: &str) -> PathBuf {
        self.dir
            .join("narinfo")
            .join(key_id)
            .join(format!("{hash_part}.narinfo"))
    }

    /// Keeps a verified narinfo so a remount needs no GET for it. Written to a temp
    /// file and renamed. Not flushed (a listing writes thousands): a record torn by a
    /// power cut lacks its final `Sig:` line and is ignored on load, then fetched again.
    pub fn save_narinfo(&self, key_id: &str, hash_part: &str, text: &str) -> io::Result<()> {
        let dest = self.narinfo_path(key_id, hash_part);
        real_dir(dest.parent().expect("in narinfo/"))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        write_new(
            &dest.with_file_name(format!(".{hash_part}.{n}.tmp")),
            text,
            &dest,
        )
    }

    pub fn load_narinfo(&self, key_id: &str, hash_part: &str) -> Option<String> {
        read_nofollow(&self.narinfo_path(key_id, hash_part)).ok()
    }

    /// Calls `f(hash part, text)` for every narinfo verified by key `key_id`, one at a
    /// time (a remount of a huge cache must not hold them all at once).
    pub fn for_each_narinfo(&self, key_id: &str, mut f: impl FnMut(&str, &str)) {
        let dir = self.dir.join("narinfo").join(key_id);
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(hash) = name.strip_suffix(".narinfo") else {
                continue;
            };
            if let Ok(text) = read_nofollow(&e.path()) {
                f(hash, &text);
            }
        }
    }
}

impl DiskCache {
    /// Waits for every unpacked path to reach the disk, so a clean shutdown leaves
    /// nothing to drop at the next start.
    pub fn flush(&self) {
        if sync_fs(&self.dir).is_ok() {
            if let Ok(rd) = fs::read_dir(self.dir.join("pending")) {
                for e in rd.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Creates directory `p` if missing; refuses anything but a real directory there.
fn real_dir(p: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::symlink_metadata(p)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "{} is not a directory (a symlink is never followed)",
                    p.display()
                )))
            }
        }
        Err(e) => Err(e),
    }
}

/// Writes `text` to the fresh file `tmp` (never through a symlink) and renames it to
/// `dest` (which replaces whatever is there, a symlink included, without following).
fn write_new(tmp: &Path, text: &str, dest: &Path) -> io::Result<()> {
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    io::Write::write_all(&mut f, text.as_bytes())?;
    drop(f);
    fs::rename(tmp, dest)
}

/// Reads a record, refusing a symlink in its place (and anything over 1 MiB).
fn read_nofollow(p: &Path) -> io::Result<String> {
    use std::io::Read;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)?;
    let mut s = String::new();
    f.take(crate::formats::narinfo::MAX_NARINFO_BYTES as u64)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// Flushes the file system holding `p` (one call for a whole unpacked tree, instead of
/// an fsync per file).
fn sync_fs(p: &Path) -> io::Result<()> {
    let f = File::open(p)?;
    use std::os::fd::AsRawFd;
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes a tree takes on disk (allocated blocks, not apparent sizes).
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(p) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir() {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                total += disk_usage(&e.path());
            }
        }
    }
    total
}

fn default_quota(root: &Path) -> u64 {
    const CAP: u64 = 10 << 30;
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
        return CAP;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return CAP;
    }
    (st.f_blocks as u64 * st.f_frsize as u64 / 10).min(CAP)
}

/// Parses `10G`, `500M`, `64K` or plain bytes (powers of 1024, as du and nix do).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "invalid size '{s}': unknown unit '{c}' (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| {
            format!("invalid size '{s}': expected e.g. 10G, 500M or a number of bytes")
        })?;
    Ok((n * mult as f64) as u64)
}

/// Removes a file, symlink or directory tree.
pub fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn walk(p: &Path, depth: usize) -> io::Result<Entry> {
    if depth > crate::formats::listing::MAX_DEPTH {
        return Err(io::Error::other("tree too deep"));
    }
    let m = fs::symlink_metadata(p)?;
    if m.file_type().is_symlink() {
        Ok(Entry::Symlink {
            target: fs::read_link(p)?.as_os_str().as_bytes().into(),
        })
    } else if m.is_dir() {
        let mut entries = Vec::new();
        for e in fs::read_dir(p)? {
            let e = e?;
            let name: Box<[u8]> = e.file_name().as_bytes().into();
            entries.push((name, walk(&e.path(), depth + 1)?));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Entry::Directory { entries })
    } else if m.is_file() {
        Ok(Entry::Regular {
            size: m.len(),
            executable: m.permissions().mode() & 0o100 != 0,
            nar_offset: None,
            chunks: None,
        })
    } else {
        Err(io::Error::other(format!(
            "{} is not a file, directory or symlink",
            p.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "-1M", "10X", "ten"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    /// Pins "c" and counts evictions.
    struct Hooks(std::sync::Mutex<Vec<String>>);
    impl EvictionHooks for Hooks {
        fn pinned(&self, name: &str) -> bool {
            name == "c"
        }
        fn evicted(&self, name: &str) {
            self.0.lock().unwrap().push(name.to_owned());
        }
    }

    fn put(c: &std::sync::Arc<DiskCache>, name: &str, bytes: usize) {
        let t = c.temp_path(name);
        fs::create_dir(&t).unwrap();
        fs::write(t.join("f"), vec![1u8; bytes]).unwrap();
        let r = c.reserve(0, name, true).unwrap();
        c.commit(&t, name, "h", r).unwrap();
    }

    #[test]
    fn reservations_evict_least_recently_used_but_never_pinned_or_kept() {
        let d = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(DiskCache::open(d.path()).unwrap());
        c.set_grace(std::time::Duration::ZERO);
        let hooks = std::sync::Arc::new(Hooks(Default::default()));
        let weak: std::sync::Weak<dyn EvictionHooks> =
            std::sync::Arc::downgrade(&(hooks.clone() as std::sync::Arc<dyn EvictionHooks>));
        c.set_hooks(weak);
        for name in ["a", "b", "c", "d"] {
            put(&c, name, 100_000);
        }
        let each = c.used() / 4;
        c.set_quota(Some(each * 4));
        c.touch("a"); // now b is the oldest
                      // a prefetch finds no room and evicts nothing
        assert!(c.reserve(each, "e", false).is_err());
        assert!(hooks.0.lock().unwrap().is_empty());
        // a demand for two paths' worth evicts b, then a (c is pinned, d is kept)
        let r = c.reserve(each * 2, "d", true).unwrap();
        assert_eq!(
            *hooks.0.lock().unwrap(),
            vec!["b".to_owned(), "a".to_owned()]
        );
        assert!(!c.has_path("b") && !c.has_path("a") && c.has_path("c") && c.has_path("d"));
        assert_eq!(c.used(), each * 2);
        // reserved room counts until it is dropped or committed
        assert!(c.reserve(1, "e", false).is_err());
        drop(r);
        assert!(c.reserve(each, "e", false).is_ok());
        // with nothing left to evict a demand still gets its room (over the quota)
        let mut r = c.reserve(each * 3, "e", true).unwrap();
        r.grow(each).unwrap();
        assert_eq!(r.bytes(), each * 4);
        assert!(c.has_path("c"));
        drop(r);
        // a reopened cache knows what is there
        drop(c);
        let c = DiskCache::open(d.path()).unwrap();
        assert!(c.used() <= each * 2);
    }

    const FLUSHED: &str = "00000000000000000000000000000000-flushed";
    const UNFLUSHED: &str = "11111111111111111111111111111111-unflushed";

    #[test]
    fn a_path_whose_flush_was_interrupted_is_dropped_at_start() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = std::sync::Arc::new(DiskCache::open(d.path()).unwrap());
            for name in [FLUSHED, UNFLUSHED] {
                put(&c, name, 10);
            }
            // the background flush removes the markers
            let t = std::time::Instant::now();
            while fs::read_dir(d.path().join("pending")).unwrap().count() > 0 {
                assert!(t.elapsed() < std::time::Duration::from_secs(10));
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // as if the machine had died before the flush of one of them
        File::create(d.path().join(format!("pending/{UNFLUSHED}.7"))).unwrap();
        let c = DiskCache::open(d.path()).unwrap();
        assert!(c.has_path(FLUSHED));
        assert!(!c.has_path(UNFLUSHED));
        assert_eq!(fs::read_dir(d.path().join("pending")).unwrap().count(), 0);
    }

    #[test]
    fn cleans_tmp_and_locks() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = DiskCache::open(d.path()).unwrap();
            let t = c.temp_path("x");
            fs::create_dir_all(t.join("a/b")).unwrap();
            assert!(matches!(
                DiskCache::open(d.path()),
                Err(DiskCacheError::Locked(_))
            ));
        }
        let _c = DiskCache::open(d.path()).unwrap();
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn commit_and_reload_tree() {
        let d = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(DiskCache::open(d.path()).unwrap());
        let t = c.temp_path("p");
        fs::create_dir(&t).unwrap();
        fs::write(t.join("f"), b"abc").unwrap();
        std::os::unix::fs::symlink("f", t.join("l")).unwrap();
        c.commit(&t, "p", "h", c.reserve(0, "p", true).unwrap())
            .unwrap();
        assert!(c.has_path("p"));
        let tree = c.load_tree("p").unwrap();
        assert_eq!(tree.count(), 3);
        // a second commit of the same path keeps the first
        let t2 = c.temp_path("p");
        fs::create_dir(&t2).unwrap();
        c.commit(&t2, "p", "h", c.reserve(0, "p", true).unwrap())
            .unwrap();
        assert!(!t2.exists());
        assert!(c.path_dir("p").join("f").exists());
    }
}
