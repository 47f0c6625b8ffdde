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

pub struct DiskCache {
    root: PathBuf,
    _lock: File,
    counter: AtomicU64,
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
        for d in ["store", "narinfo", "tmp"] {
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
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let p = e.map_err(io_err(&tmp))?.path();
            remove_any(&p).map_err(io_err(&p))?;
            tracing::info!(path = %p.display(), "removed leftover of an interrupted unpack");
        }
        Ok(DiskCache {
            root: root.to_owned(),
            _lock: lock,
            counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_dir(&self, basename: &str) -> PathBuf {
        self.root.join("store").join(basename)
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
    pub fn commit(&self, tmp: &Path, basename: &str) -> io::Result<()> {
        let dest = self.path_dir(basename);
        if let Err(e) = fs::rename(tmp, &dest) {
            if self.has_path(basename) {
                remove_any(tmp)?;
            } else {
                return Err(e);
            }
        }
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
    /// file and renamed, so a crash never leaves half a record.
    pub fn save_narinfo(&self, key_id: &str, hash_part: &str, text: &str) -> io::Result<()> {
        let dest = self.narinfo_path(key_id, hash_part);
        fs::create_dir_all(dest.parent().unwrap())?;
        let tmp = self.temp_path(&format!("{hash_part}.narinfo"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, dest)
    }

    pub fn load_narinfo(&self, key_id: &str, hash_part: &str) -> Option<String> {
        fs::read_to_string(self.narinfo_path(key_id, hash_part)).ok()
    }

    /// Every narinfo verified by key `key_id`, as (hash part, text).
    pub fn all_narinfos(&self, key_id: &str) -> Vec<(String, String)> {
        let dir = self.root.join("narinfo").join(key_id);
        let Ok(rd) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let hash = name.strip_suffix(".narinfo")?.to_owned();
            Some((hash, fs::read_to_string(e.path()).ok()?))
        })
        .collect()
    }
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
        c.commit(&t, "p").unwrap();
        assert!(c.has_path("p"));
        let tree = c.load_tree("p").unwrap();
        assert_eq!(tree.count(), 3);
        // a second commit of the same path keeps the first
        let t2 = c.temp_path("p");
        fs::create_dir(&t2).unwrap();
        c.commit(&t2, "p").unwrap();
        assert!(!t2.exists());
        assert!(c.path_dir("p").join("f").exists());
    }
}
