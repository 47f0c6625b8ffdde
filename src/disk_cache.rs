//! The cache directory: verified narinfos and unpacked store paths, kept across mounts.
//!
//! Layout: `store/<hash>-<name>` holds unpacked trees, `narinfo/<hash>.narinfo` verified
//! narinfos, `tmp/` work in progress. A path appears in `store/` by one rename, after its
//! NAR matched NarHash and NarSize, so anything in `store/` is complete and verified;
//! `tmp/` is emptied at start, which removes whatever a crash left. A lock file keeps
//! two narfs processes from sharing one directory.

use crate::formats::listing::Entry;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct DiskCache {
    root: PathBuf,
    _lock: File,
    counter: AtomicU64,
    usage: Mutex<Usage>,
}

/// Bytes on disk of each unpacked path, least recently used first.
struct Usage {
    lru: lru::LruCache<String, u64>,
    total: u64,
    quota: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error("cache directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache directory {0} is in use by another narfs process")]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskCacheError + '_ {
    move |source| DiskCacheError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DiskCache {
    pub fn open(root: &Path) -> Result<Self, DiskCacheError> {
        for d in ["store", "narinfo", "tmp", "pending", "verified", "trash"] {
            fs::create_dir_all(root.join(d)).map_err(io_err(root))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        use std::os::fd::AsRawFd;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DiskCacheError::Locked(root.to_owned()));
        }
        let trash = root.join("trash");
        for e in fs::read_dir(&trash).map_err(io_err(&trash))? {
            let p = e.map_err(io_err(&trash))?.path();
            remove_any(&p).map_err(io_err(&p))?;
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let p = e.map_err(io_err(&tmp))?.path();
            remove_any(&p).map_err(io_err(&p))?;
            tracing::info!(path = %p.display(), "removed leftover of an interrupted unpack");
        }
        // A path whose contents may not have reached the disk before a crash (its
        // flush had not finished) is not trusted: it is removed and fetched again.
        let pending = root.join("pending");
        for e in fs::read_dir(&pending).map_err(io_err(&pending))? {
            let e = e.map_err(io_err(&pending))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let basename = name.rsplit_once('.').map_or(name.as_str(), |(b, _)| b);
            let dir = root.join("store").join(basename);
            remove_any(&dir).map_err(io_err(&dir))?;
            let _ = fs::remove_file(root.join("verified").join(basename));
            let _ = fs::remove_file(e.path());
            tracing::info!(path = %dir.display(), "removed a path whose flush to disk was interrupted");
        }
        // What earlier mounts unpacked, oldest first by modification time (set when
        // the path was unpacked or last used).
        let mut known = Vec::new();
        let store = root.join("store");
        for e in fs::read_dir(&store).map_err(io_err(&store))? {
            let e = e.map_err(io_err(&store))?;
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
            quota: u64::MAX,
        };
        for (_, name, size) in known {
            usage.total += size;
            usage.lru.put(name, size);
        }
        Ok(DiskCache {
            root: root.to_owned(),
            _lock: lock,
            counter: AtomicU64::new(0),
            usage: Mutex::new(usage),
        })
    }

    /// Caps the bytes unpacked paths may take; `None` picks 10% of the file system
    /// holding the cache directory, at most 10 GiB.
    pub fn set_quota(&self, quota: Option<u64>) -> u64 {
        let q = quota.unwrap_or_else(|| default_quota(&self.root));
        self.usage.lock().unwrap().quota = q;
        q
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
        self.usage.lock().unwrap().lru.promote(basename);
    }

    /// Evicts least recently used paths until the total fits the quota, skipping
    /// `keep` and any path `pinned` says is in use. Returns what was evicted. Each
    /// path disappears by one rename before it is deleted, so no reader ever sees half
    /// of one.
    pub fn evict(&self, keep: &str, pinned: impl Fn(&str) -> bool) -> Vec<String> {
        let mut victims = Vec::new();
        {
            let mut u = self.usage.lock().unwrap();
            if u.total <= u.quota {
                return victims;
            }
            let mut over = u.total - u.quota;
            let candidates: Vec<(String, u64)> =
                u.lru.iter().rev().map(|(k, v)| (k.clone(), *v)).collect();
            for (name, size) in candidates {
                if over == 0 {
                    break;
                }
                if name == keep || pinned(&name) {
                    continue;
                }
                u.lru.pop(&name);
                u.total -= size;
                over = over.saturating_sub(size);
                victims.push(name);
            }
        }
        for name in &victims {
            let _ = fs::remove_file(self.root.join("verified").join(name));
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let doomed = self.root.join("trash").join(format!("{name}.{n}"));
            match fs::rename(self.path_dir(name), &doomed) {
                Ok(()) => {
                    if let Err(e) = remove_any(&doomed) {
                        tracing::warn!("removing evicted {}: {e}", doomed.display());
                    }
                }
                Err(e) => tracing::warn!("evicting {name}: {e}"),
            }
        }
        victims
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_dir(&self, basename: &str) -> PathBuf {
        self.root.join("store").join(basename)
    }

    /// Is `basename` unpacked here from a NAR with exactly this NarHash? A copy from
    /// another NarHash (the path was pushed again, or verified under keys no longer
    /// trusted) is removed rather than served under the new narinfo.
    pub fn has_verified(&self, basename: &str, nar_hash: &str) -> bool {
        let record = fs::read_to_string(self.root.join("verified").join(basename)).ok();
        if record.as_deref() == Some(nar_hash) && self.has_path(basename) {
            return true;
        }
        if self.has_path(basename) {
            tracing::info!(
                path = basename,
                "dropping an unpacked copy that is not of the NarHash now signed"
            );
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let doomed = self.root.join("trash").join(format!("{basename}.{n}"));
            if fs::rename(self.path_dir(basename), &doomed).is_ok() {
                let _ = remove_any(&doomed);
                let mut u = self.usage.lock().unwrap();
                if let Some(size) = u.lru.pop(basename) {
                    u.total -= size;
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
        self.root.join("tmp").join(format!("{basename}.{n}"))
    }

    /// Moves a verified unpack into place. If the path is already there, the new copy
    /// is dropped: both were verified against the same NarHash.
    pub fn commit(&self, tmp: &Path, basename: &str, nar_hash: &str) -> io::Result<()> {
        let size = disk_usage(tmp);
        // The path becomes visible at once and is flushed in the background: a marker
        // in pending/, itself flushed before the rename, says its contents may not be
        // on disk yet; it goes only after the flush. A power cut therefore never
        // leaves a trusted path in store/ whose files are empty (see `open`).
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let marker = self.root.join("pending").join(format!("{basename}.{n}"));
        File::create(&marker)?.sync_all()?;
        File::open(self.root.join("pending"))?.sync_all()?;
        fs::write(self.root.join("verified").join(basename), nar_hash)?;
        let dest = self.path_dir(basename);
        if let Err(e) = fs::rename(tmp, &dest) {
            let _ = fs::remove_file(&marker);
            if self.has_path(basename) {
                remove_any(tmp)?;
                return Ok(());
            }
            return Err(e);
        }
        let store = self.root.join("store");
        std::thread::spawn(move || {
            if sync_fs(&store).is_ok() && File::open(&store).and_then(|d| d.sync_all()).is_ok() {
                let _ = fs::remove_file(&marker);
            }
        });
        let mut u = self.usage.lock().unwrap();
        if let Some(old) = u.lru.put(basename.to_owned(), size) {
            u.total -= old;
        }
        u.total += size;
        Ok(())
    }

    /// Re-reads the tree of an unpacked path (after a remount).
    pub fn load_tree(&self, basename: &str) -> io::Result<Entry> {
        walk(&self.path_dir(basename), 0)
    }

    /// Verified narinfos are filed under the id of the key that verified them, so a
    /// remount trusts exactly what its own keys verified, without checking again.
    fn narinfo_path(&self, key_id: &str, hash_part: &str) -> PathBuf {
        self.root
            .join("narinfo")
            .join(key_id)
            .join(format!("{hash_part}.narinfo"))
    }

    /// Keeps a verified narinfo so a remount needs no GET for it. Written to a temp
    /// file and renamed. Not flushed (a listing writes thousands): a record torn by a
    /// power cut lacks its final `Sig:` line and is ignored on load, then fetched again.
    pub fn save_narinfo(&self, key_id: &str, hash_part: &str, text: &str) -> io::Result<()> {
        let dest = self.narinfo_path(key_id, hash_part);
        fs::create_dir_all(dest.parent().unwrap())?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dest.with_file_name(format!(".{hash_part}.{n}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, dest)
    }

    pub fn load_narinfo(&self, key_id: &str, hash_part: &str) -> Option<String> {
        fs::read_to_string(self.narinfo_path(key_id, hash_part)).ok()
    }

    /// Calls `f(hash part, text)` for every narinfo verified by key `key_id`, one at a
    /// time (a remount of a huge cache must not hold them all at once).
    pub fn for_each_narinfo(&self, key_id: &str, mut f: impl FnMut(&str, &str)) {
        let dir = self.root.join("narinfo").join(key_id);
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(hash) = name.strip_suffix(".narinfo") else {
                continue;
            };
            if let Ok(text) = fs::read_to_string(e.path()) {
                f(hash, &text);
            }
        }
    }
}

impl DiskCache {
    /// Waits for every unpacked path to reach the disk, so a clean shutdown leaves
    /// nothing to drop at the next start.
    pub fn flush(&self) {
        if sync_fs(&self.root).is_ok() {
            if let Ok(rd) = fs::read_dir(self.root.join("pending")) {
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

    #[test]
    fn evicts_least_recently_used_but_never_pinned_or_kept() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(d.path()).unwrap();
        for name in ["a", "b", "c", "d"] {
            let t = c.temp_path(name);
            fs::create_dir(&t).unwrap();
            fs::write(t.join("f"), vec![1u8; 100_000]).unwrap();
            c.commit(&t, name, "h").unwrap();
        }
        let each = c.used() / 4;
        c.set_quota(Some(each * 2));
        c.touch("a"); // now b is the oldest
        let evicted = c.evict("d", |n| n == "c");
        assert_eq!(evicted, vec!["b".to_owned(), "a".to_owned()]);
        assert!(!c.has_path("b") && !c.has_path("a") && c.has_path("c") && c.has_path("d"));
        assert_eq!(c.used(), each * 2);
        // a reopened cache knows what is there
        drop(c);
        let c = DiskCache::open(d.path()).unwrap();
        assert_eq!(c.used(), each * 2);
    }

    #[test]
    fn a_path_whose_flush_was_interrupted_is_dropped_at_start() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = DiskCache::open(d.path()).unwrap();
            for name in ["flushed", "unflushed"] {
                let t = c.temp_path(name);
                fs::create_dir(&t).unwrap();
                c.commit(&t, name, "h").unwrap();
            }
            // the background flush removes the markers
            let t = std::time::Instant::now();
            while fs::read_dir(d.path().join("pending")).unwrap().count() > 0 {
                assert!(t.elapsed() < std::time::Duration::from_secs(10));
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // as if the machine had died before the flush of one of them
        File::create(d.path().join("pending/unflushed.7")).unwrap();
        let c = DiskCache::open(d.path()).unwrap();
        assert!(c.has_path("flushed"));
        assert!(!c.has_path("unflushed"));
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
        let c = DiskCache::open(d.path()).unwrap();
        let t = c.temp_path("p");
        fs::create_dir(&t).unwrap();
        fs::write(t.join("f"), b"abc").unwrap();
        std::os::unix::fs::symlink("f", t.join("l")).unwrap();
        c.commit(&t, "p", "h").unwrap();
        assert!(c.has_path("p"));
        let tree = c.load_tree("p").unwrap();
        assert_eq!(tree.count(), 3);
        // a second commit of the same path keeps the first
        let t2 = c.temp_path("p");
        fs::create_dir(&t2).unwrap();
        c.commit(&t2, "p", "h").unwrap();
        assert!(!t2.exists());
        assert!(c.path_dir("p").join("f").exists());
    }
}
