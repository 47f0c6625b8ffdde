//! The cache directory: verified file contents, trees and records, kept across mounts,
//! and the quota over them. May use `formats` only: what reaches it was verified by
//! `fetch`, and what it hands back is verified again where the layout below says.
//!
//! Layout (format 2):
//! - `blobs/<hh>/<sha256 hex>`: file contents by hash, chunk by chunk, stored once for
//!   every store path and every cache that holds them (see `blobs`);
//! - `trees/<NarHash nix32>`: the tree of a verified NAR (names, types, modes, sizes,
//!   link targets and each file's chunk hashes), written after its blobs;
//! - `narinfo/<key id>/<hash>.narinfo`: narinfo records, verified again when read;
//! - `indexes/<hash>.narfs-index`: file indexes, verified again when read;
//! - `tmp/` work in progress, `pending/` writes not yet flushed, `trash/` deletions.
//!
//! A store path is served from here when its NarHash has a tree and the tree's blobs
//! are present; a missing blob is fetched again (its block, or the NAR). The quota
//! counts blobs, each once, evicted least recently used first.
//!
//! The directory is trusted only because no one else can write to it: it must belong
//! to the user running narfs and be writable by no one else (narfs creates it 0700 and
//! everything in it without group or other access, whatever the umask), it is reached
//! through the descriptor checked at start, its subdirectories must be real
//! directories (a symlink there is refused, never followed), and clean-up works
//! through directory descriptors. Even so, narinfo records and indexes are verified
//! again when read, and a tree is used only under a narinfo that verifies with the
//! keys trusted now.

mod blobs;
mod quota;
mod records;
mod secure;

pub use blobs::BlobWriter;

/// Where blob `hash` lives, relative to the cache directory (for tests and tools).
pub fn blob_rel_path(hash: &Sha256) -> PathBuf {
    blobs::rel_path(hash)
}
pub use quota::{footprint, parse_size, EvictionHooks, NoRoom, Reservation, RoomTimeout};
pub use secure::{create_private_dir, open_private_file};

use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use quota::{Busy, Held, Usage};
use secure::{empty_dir_at, io_err, open_subdir, secure_root};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

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
const SUBDIRS: [&str; 7] = [
    "blobs", "trees", "narinfo", "indexes", "tmp", "pending", "trash",
];
/// What format 1 (unpacked trees) kept, removed when a format 2 cache opens it.
const OLD_SUBDIRS: [&str; 2] = ["store", "verified"];

impl DiskCache {
    /// A disk cache for one command (`narfs cat`, `narfs profile push`), in a new
    /// directory created 0700 whatever the umask (a cache directory others may write to
    /// is refused), removed with the returned guard.
    pub fn scratch() -> Result<(tempfile::TempDir, Self), String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("narfs-")
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(|e| format!("a scratch directory: {e}"))?;
        let disk = Self::open(dir.path()).map_err(|e| e.to_string())?;
        Ok((dir, disk))
    }

    pub fn open(root: &Path) -> Result<Self, DiskCacheError> {
        // Nothing narfs creates in here may be writable by group or others, whatever
        // the umask it was started with (the mount is the whole process).
        unsafe { libc::umask(libc::umask(0o077) | 0o077) };
        let root_fd = secure_root(root)?;
        let mut dirs = std::collections::HashMap::new();
        for d in SUBDIRS {
            dirs.insert(d, open_subdir(&root_fd, root, d)?);
        }
        let lock_path = root.join("lock");
        let lock = open_private_file(&lock_path).map_err(io_err(&lock_path))?;
        use std::os::fd::AsRawFd;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DiskCacheError::Locked(root.to_owned()));
        }
        let anchored = PathBuf::from(format!("/proc/self/fd/{}", root_fd.as_raw_fd()));
        let dir = if anchored.is_dir() {
            anchored
        } else {
            tracing::warn!("no /proc: the cache directory is used by its path");
            root.to_owned()
        };
        let trash = root.join("trash");
        empty_dir_at(&dirs["trash"], |_| {}).map_err(io_err(&trash))?;
        let tmp = root.join("tmp");
        empty_dir_at(&dirs["tmp"], |name| {
            tracing::debug!(path = %tmp.join(name).display(), "removed leftover of an interrupted write");
        })
        .map_err(io_err(&tmp))?;
        // format 1's unpacked trees: gone, in the background (they can be large), by
        // directory descriptors (a symlink in them is removed, never followed)
        for old in OLD_SUBDIRS {
            if fs::symlink_metadata(dir.join(old)).is_ok()
                && fs::rename(dir.join(old), dir.join("trash").join(old)).is_ok()
            {
                tracing::info!(
                    "removing {} (kept by an older narfs)",
                    root.join(old).display()
                );
                let trash = dir.join("trash");
                std::thread::spawn(move || {
                    if let Ok(fd) = File::open(&trash) {
                        let _ = secure::empty_dir_at(&fd, |_| {});
                    }
                });
            }
        }
        let cache = DiskCache {
            root: root.to_owned(),
            dir,
            _root_fd: root_fd,
            _lock: lock,
            counter: AtomicU64::new(0),
            usage: Mutex::new(Usage::new()),
            hooks: std::sync::OnceLock::new(),
            room: tokio::sync::Notify::new(),
        };
        let since = cache.recover_pending(&dirs["pending"])?;
        cache.scan_blobs(since)?;
        Ok(cache)
    }

    /// Writes a crash may have cut short: the earliest a pending marker was made, if
    /// any (blobs written since are checked by `scan_blobs`); the markers go.
    fn recover_pending(
        &self,
        pending_fd: &std::os::fd::OwnedFd,
    ) -> Result<Option<std::time::SystemTime>, DiskCacheError> {
        let pending = self.root.join("pending");
        let mut since: Option<std::time::SystemTime> = None;
        for e in fs::read_dir(self.dir.join("pending")).map_err(io_err(&pending))? {
            let e = e.map_err(io_err(&pending))?;
            if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                since = Some(since.map_or(t, |s| s.min(t)));
            }
        }
        empty_dir_at(pending_fd, |_| {}).map_err(io_err(&pending))?;
        // blobs are renamed in after the marker was made: a little slack for clocks
        Ok(since.map(|t| t - std::time::Duration::from_secs(2)))
    }

    /// Accounts every blob on disk, oldest first (by modification time: when it was
    /// written or last used); blobs written after `suspect` are hashed again first,
    /// and dropped unless their bytes are their name.
    fn scan_blobs(&self, suspect: Option<std::time::SystemTime>) -> Result<(), DiskCacheError> {
        let blobs = self.root.join("blobs");
        let mut known = Vec::new();
        let (mut dropped, mut checked) = (0, 0);
        for shard in fs::read_dir(self.dir.join("blobs")).map_err(io_err(&blobs))? {
            let shard = shard.map_err(io_err(&blobs))?;
            if !shard.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let Ok(rd) = fs::read_dir(shard.path()) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(hash) = name.to_str().and_then(blobs::parse_name) else {
                    let _ = remove_any(&e.path());
                    continue;
                };
                let Ok(m) = e.metadata() else { continue };
                let mtime = m.modified().ok();
                if suspect.is_some_and(|s| mtime.is_none_or(|t| t >= s)) {
                    checked += 1;
                    if !rehash_matches(&e.path(), &hash) {
                        let _ = fs::remove_file(e.path());
                        dropped += 1;
                        continue;
                    }
                }
                known.push((mtime, hash, footprint(m.len())));
            }
        }
        if suspect.is_some() {
            tracing::info!(
                checked,
                dropped,
                "hashed again the blobs written since an unfinished flush (a crash)"
            );
        }
        known.sort_by_key(|k| k.0);
        let mut u = self.usage.lock().unwrap();
        for (_, hash, size) in known {
            u.total += size;
            u.lru.put(
                hash,
                Held {
                    size,
                    unused_since: None,
                },
            );
        }
        Ok(())
    }

    /// Tells the cache which blobs are in use and whom to tell of an eviction.
    pub fn set_hooks(&self, hooks: std::sync::Weak<dyn EvictionHooks>) {
        let _ = self.hooks.set(hooks);
    }

    fn hooks(&self) -> Option<Arc<dyn EvictionHooks>> {
        self.hooks.get().and_then(std::sync::Weak::upgrade)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    // ---- the quota

    /// Holds `bytes` of the quota, evicting least recently used blobs for them if
    /// `may_evict`; without, `NoRoom` unless they fit as is.
    pub fn reserve(self: &Arc<Self>, bytes: u64, may_evict: bool) -> Result<Reservation, NoRoom> {
        let mut r = Reservation {
            disk: self.clone(),
            bytes: 0,
            may_evict,
        };
        r.grow(bytes)?;
        Ok(r)
    }

    /// A reservation of nothing that may not grow past the quota: its writes store
    /// what fits without evicting, then fail with `NoRoom`.
    pub fn no_reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            disk: self.clone(),
            bytes: 0,
            may_evict: false,
        }
    }

    /// Holds `bytes` of the quota for a demand. While evicting cannot make room
    /// because other writes hold it (or blobs just written wait for their first use),
    /// waits for them, at most `within`: parallel downloads never take the cache past
    /// the quota together, and a reader never waits without end. Only a demand with
    /// nothing else under way may go over it.
    pub async fn reserve_demand(
        self: &Arc<Self>,
        bytes: u64,
        within: std::time::Duration,
    ) -> Result<Reservation, RoomTimeout> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.room.notified();
            let held = || Reservation {
                disk: self.clone(),
                bytes,
                may_evict: true,
            };
            match self.try_room(bytes, true) {
                Ok(()) => return Ok(held()),
                Err(Busy::Alone) => {
                    // nothing else under way could free room: over the quota it goes
                    self.usage.lock().unwrap().reserved += bytes;
                    return Ok(held());
                }
                Err(Busy::Others) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(RoomTimeout { bytes, within });
                    }
                    // woken when room is returned; the timeout re-checks graces
                    let wake = (now + std::time::Duration::from_millis(200)).min(deadline);
                    let _ = tokio::time::timeout_at(wake, notified).await;
                }
            }
        }
    }

    /// Whether `bytes` fit the quota now without evicting anything. A prefetch checks
    /// this before it starts and holds nothing: its writes take room as they land,
    /// and fail once a reader took it (see `no_reservation`).
    pub fn fits(&self, bytes: u64) -> bool {
        let u = self.usage.lock().unwrap();
        u.total + u.reserved + bytes <= u.quota
    }

    /// Counts `bytes` as reserved, first evicting (if allowed) until they fit. A
    /// demand that still does not fit goes over the quota (it grows as it writes and
    /// cannot wait for others that may be growing too).
    pub(crate) fn make_room(&self, bytes: u64, may_evict: bool) -> Result<(), NoRoom> {
        match self.try_room(bytes, may_evict) {
            Ok(()) => Ok(()),
            Err(_) if !may_evict => Err(NoRoom),
            Err(_) => {
                self.usage.lock().unwrap().reserved += bytes;
                Ok(())
            }
        }
    }

    /// Reserves `bytes` if they fit, after evicting least recently used blobs for
    /// them if `may_evict`; else says whether other reservations hold the room.
    fn try_room(&self, bytes: u64, may_evict: bool) -> Result<(), Busy> {
        let hooks = self.hooks();
        let (victims, fits) = {
            let mut u = self.usage.lock().unwrap();
            let need = (u.total + u.reserved + bytes).saturating_sub(u.quota);
            let (victims, graced) = if need > 0 && may_evict {
                u.choose_victims(need, |h| hooks.as_ref().is_some_and(|k| k.pinned(h)))
            } else {
                (Vec::new(), false)
            };
            let fits = u.total + u.reserved + bytes <= u.quota;
            if fits {
                u.reserved += bytes;
            }
            (victims, (!fits).then_some(u.reserved > 0 || graced))
        };
        self.remove_evicted(victims, hooks.as_deref());
        match fits {
            None => Ok(()),
            Some(true) => Err(Busy::Others),
            Some(false) => Err(Busy::Alone),
        }
    }

    /// Caps the bytes blobs may take; `None` picks 10% of the file system holding the
    /// cache directory, at most 10 GiB.
    pub fn set_quota(&self, quota: Option<u64>) -> u64 {
        let q = quota.unwrap_or_else(|| quota::default_quota(&self.dir));
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

    /// Bytes taken by blobs.
    pub fn used(&self) -> u64 {
        self.usage.lock().unwrap().total
    }

    /// Evicts least recently used blobs (never a pinned one) until what is stored and
    /// reserved fits the quota, as after the quota was lowered or a write went over.
    pub fn evict_to_quota(&self) -> usize {
        let hooks = self.hooks();
        let victims = {
            let mut u = self.usage.lock().unwrap();
            let need = (u.total + u.reserved).saturating_sub(u.quota);
            u.choose_victims(need, |h| hooks.as_ref().is_some_and(|k| k.pinned(h)))
                .0
        };
        let n = victims.len();
        self.remove_evicted(victims, hooks.as_deref());
        n
    }

    /// Each victim is unlinked (a reader holding it open reads on), and the layer
    /// above told to forget it.
    fn remove_evicted(&self, victims: Vec<Sha256>, hooks: Option<&dyn EvictionHooks>) {
        if victims.is_empty() {
            return;
        }
        for hash in &victims {
            if let Err(e) = fs::remove_file(self.dir.join(blobs::rel_path(hash))) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("evicting blob {}: {e}", hash.to_nix_string());
                }
            }
            if let Some(h) = hooks {
                h.evicted(hash);
            }
        }
        tracing::debug!(blobs = victims.len(), "evicted from the cache directory");
    }

    // ---- blobs

    /// A writer of blobs for one fetch, holding `reservation`.
    pub fn writer(self: &Arc<Self>, reservation: Reservation) -> BlobWriter {
        BlobWriter::new(self.clone(), reservation)
    }

    pub fn has_blob(&self, hash: &Sha256) -> bool {
        self.usage.lock().unwrap().lru.contains(hash)
    }

    /// Opens a blob to read it; `NotFound` if it is not (or no longer) here.
    pub fn open_blob(&self, hash: &Sha256) -> io::Result<File> {
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.dir.join(blobs::rel_path(hash)))
    }

    /// Marks a blob as just used (it becomes the last to be evicted).
    pub fn touch(&self, hash: &Sha256) {
        if let Some(held) = self.usage.lock().unwrap().lru.get_mut(hash) {
            held.unused_since = None;
        }
    }

    /// A blob just (re)written for a reader waits for its first use before it can be
    /// evicted.
    fn freshen(&self, hash: &Sha256) {
        if let Some(held) = self.usage.lock().unwrap().lru.get_mut(hash) {
            held.unused_since = Some(std::time::Instant::now());
        }
    }

    fn account(&self, hash: &Sha256, size: u64) {
        let mut u = self.usage.lock().unwrap();
        let held = Held {
            size,
            unused_since: Some(std::time::Instant::now()),
        };
        if let Some(old) = u.lru.put(*hash, held) {
            u.total -= old.size;
        }
        u.total += size;
    }

    /// Takes a blob out of the account (it is about to be removed); false if it was
    /// not there, or is pinned.
    fn forget(&self, hash: &Sha256) -> bool {
        if self.hooks().is_some_and(|h| h.pinned(hash)) {
            return false;
        }
        let mut u = self.usage.lock().unwrap();
        match u.lru.pop(hash) {
            Some(held) => {
                u.total -= held.size;
                true
            }
            None => false,
        }
    }

    /// Whether every chunk of every file of `tree` is here.
    pub fn has_all_blobs(&self, tree: &Entry) -> bool {
        let u = self.usage.lock().unwrap();
        fn all(u: &Usage, e: &Entry) -> bool {
            match e {
                Entry::Regular { chunks, .. } => chunks
                    .as_deref()
                    .is_some_and(|c| c.iter().all(|h| u.lru.contains(h))),
                Entry::Directory { entries } => entries.iter().all(|(_, c)| all(u, c)),
                Entry::Symlink { .. } => true,
            }
        }
        all(&u, tree)
    }

    /// Waits for every blob to reach the disk, so a clean shutdown leaves nothing to
    /// check at the next start.
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

/// Whether the file at `p` hashes to `hash`.
fn rehash_matches(p: &Path, hash: &Sha256) -> bool {
    let Ok(mut f) = File::open(p) else {
        return false;
    };
    let mut h = crate::formats::hash::Hasher::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match io::Read::read(&mut f, &mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    h.finish() == *hash
}

/// Flushes the file system holding `p` (one call for many blobs, not an fsync each).
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

/// Removes a file, symlink or directory tree (never following a symlink in it).
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins blob "c" and counts evictions.
    struct Hooks(Mutex<Vec<Sha256>>, Sha256);
    impl EvictionHooks for Hooks {
        fn pinned(&self, h: &Sha256) -> bool {
            *h == self.1
        }
        fn evicted(&self, h: &Sha256) {
            self.0.lock().unwrap().push(*h);
        }
    }

    fn blob(c: &Arc<DiskCache>, data: &[u8]) -> Sha256 {
        let h = Sha256::digest(data);
        let r = c.reserve(0, true).unwrap();
        let mut w = c.writer(r);
        w.put(&h, data).unwrap();
        h
    }

    #[test]
    fn blobs_are_stored_once_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let c = Arc::new(DiskCache::open(d.path()).unwrap());
        let h = blob(&c, b"some contents");
        assert!(c.has_blob(&h));
        let used = c.used();
        assert_eq!(used, 4096);
        assert_eq!(blob(&c, b"some contents"), h);
        assert_eq!(c.used(), used, "stored once");
        let mut s = String::new();
        io::Read::read_to_string(&mut c.open_blob(&h).unwrap(), &mut s).unwrap();
        assert_eq!(s, "some contents");
        // a reopened cache knows what is there
        drop(c);
        let c = DiskCache::open(d.path()).unwrap();
        assert!(c.has_blob(&h));
        assert_eq!(c.used(), used);
    }

    #[test]
    fn reservations_evict_least_recently_used_but_never_pinned() {
        let d = tempfile::tempdir().unwrap();
        let c = Arc::new(DiskCache::open(d.path()).unwrap());
        c.set_grace(std::time::Duration::ZERO);
        let [a, b, cc, dd] = [b"a", b"b", b"c", b"d"].map(|x| blob(&c, &[x[0]; 100_000]));
        let hooks = Arc::new(Hooks(Mutex::default(), cc));
        let weak: std::sync::Weak<dyn EvictionHooks> =
            Arc::downgrade(&(hooks.clone() as Arc<dyn EvictionHooks>));
        c.set_hooks(weak);
        let each = c.used() / 4;
        c.set_quota(Some(each * 4));
        c.touch(&a); // now b is the oldest
                     // a prefetch finds no room and evicts nothing
        assert!(c.reserve(each, false).is_err());
        assert!(hooks.0.lock().unwrap().is_empty());
        // a demand for two blobs' worth evicts b, then d (c is pinned, a was used)
        let r = c.reserve(each * 2, true).unwrap();
        assert_eq!(*hooks.0.lock().unwrap(), vec![b, dd]);
        assert!(!c.has_blob(&b) && c.has_blob(&a) && c.has_blob(&cc) && !c.has_blob(&dd));
        assert!(c.open_blob(&b).is_err());
        assert_eq!(c.used(), each * 2);
        // reserved room counts until it is dropped or spent
        assert!(c.reserve(1, false).is_err());
        drop(r);
        assert!(c.reserve(each, false).is_ok());
        // with nothing left to evict a demand still gets its room (over the quota)
        let mut r = c.reserve(each * 3, true).unwrap();
        r.grow(each).unwrap();
        assert_eq!(r.bytes(), each * 4);
        assert!(c.has_blob(&cc));
    }

    #[test]
    fn a_blob_a_crash_left_unfinished_is_dropped_at_start() {
        let d = tempfile::tempdir().unwrap();
        let (good, torn) = {
            let c = Arc::new(DiskCache::open(d.path()).unwrap());
            (blob(&c, b"good"), blob(&c, b"torn"))
        };
        // as if the machine had died before a flush: a marker, and bytes not their name
        let torn_path = d.path().join(blobs::rel_path(&torn));
        let mut perm = fs::metadata(&torn_path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
        fs::set_permissions(&torn_path, perm).unwrap();
        fs::write(&torn_path, b"").unwrap();
        File::create(d.path().join("pending/blobs.7")).unwrap();
        let c = DiskCache::open(d.path()).unwrap();
        assert!(c.has_blob(&good));
        assert!(!c.has_blob(&torn) && !torn_path.exists());
        assert_eq!(fs::read_dir(d.path().join("pending")).unwrap().count(), 0);
    }

    #[test]
    fn trees_are_kept_by_nar_hash() {
        let d = tempfile::tempdir().unwrap();
        let c = Arc::new(DiskCache::open(d.path()).unwrap());
        let src = d.path().join("t");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"abc").unwrap();
        std::os::unix::fs::symlink("f", src.join("l")).unwrap();
        let nar = crate::formats::nar::Writer::new(Vec::new())
            .dump_path(&src)
            .unwrap();
        let tree = crate::formats::nar::parse(
            &mut &nar[..],
            &mut crate::formats::nar::TreeOnly,
            crate::formats::nar::DEFAULT_CHUNK_SHIFT,
        )
        .unwrap();
        let h = Sha256::digest(&nar);
        assert!(c.load_tree(&h, nar.len() as u64).is_none());
        c.save_tree(&h, &tree, nar.len() as u64).unwrap();
        assert_eq!(c.load_tree(&h, nar.len() as u64), Some(tree.clone()));
        assert!(c.load_tree(&h, nar.len() as u64 + 1).is_none());
        assert!(!c.has_all_blobs(&tree));
        blob(&c, b"abc");
        assert!(c.has_all_blobs(&tree));
    }

    #[test]
    fn cleans_tmp_and_locks_and_drops_the_old_layout() {
        let d = tempfile::tempdir().unwrap();
        {
            let _c = DiskCache::open(d.path()).unwrap();
            fs::create_dir_all(d.path().join("tmp/a/b")).unwrap();
            assert!(matches!(
                DiskCache::open(d.path()),
                Err(DiskCacheError::Locked(_))
            ));
        }
        fs::create_dir_all(d.path().join("store/x/y")).unwrap();
        let _c = DiskCache::open(d.path()).unwrap();
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert!(!d.path().join("store").exists());
    }
}
