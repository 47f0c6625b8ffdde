//! The file system as plain methods, testable without FUSE.
//!
//! Every operation first tries to answer from what is already known. When it needs the
//! network (a narinfo not yet seen, a store path whose tree is not loaded) it returns
//! `Outcome::Need`; the caller satisfies that need off the request loop and asks again.
//! That is how the FUSE loop never waits on the network.

use crate::fetch::{Fetcher, Lookup, Priority};
use crate::formats::store_path::StorePath;
use crate::index::{Index, Kind, NodeView, PathId, TreeSource, ROOT};
use futures::StreamExt;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

/// An errno value; the FUSE adapter is the one place that turns it into a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const ESTALE: Errno = Errno(libc::ESTALE);
}

/// What an operation must wait for before it can answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// The narinfo of a root entry name that is not known yet.
    NarInfo(String),
    /// The tree of a store path (from its `.ls` listing if it has one, else its NAR).
    Tree(PathId),
    /// The verified contents of a store path in the disk cache.
    Content(PathId),
}

/// Tells the kernel to forget cached entries; the FUSE adapter provides it.
pub trait Invalidator: Send + Sync + 'static {
    fn entry(&self, parent: u64, name: &[u8]);
}

#[derive(Debug)]
pub enum Outcome<T> {
    Ready(Result<T, Errno>),
    Need(Need),
}

use Outcome::{Need as Wait, Ready};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    /// Comes from the verified NAR (or is the root's): the kernel may keep it. Anything
    /// else came from an unsigned listing and must be asked for again at every use, so
    /// the kernel never acts on a stale copy once the NAR is verified.
    pub verified: bool,
}

impl Attr {
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    /// Offset to resume after this entry.
    pub next: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
}

pub struct Fs {
    index: Arc<Index>,
    fetcher: Arc<Fetcher>,
    list_jobs: usize,
    use_listings: bool,
    invalidator: std::sync::OnceLock<Arc<dyn Invalidator>>,
    /// Open file handles and the path each belongs to: open paths are never evicted.
    pins: std::sync::Mutex<HashMap<i32, PathId>>,
    me: std::sync::Weak<Fs>,
    /// Open handles of the page-cache mode and the path each pins.
    handles: std::sync::Mutex<HashMap<u64, PathId>>,
    next_handle: std::sync::atomic::AtomicU64,
    fd_cache: std::sync::Mutex<lru::LruCache<u64, Arc<std::fs::File>>>,
    /// Bounds background prefetches so demand reads keep download slots.
    prefetch: Option<Arc<tokio::sync::Semaphore>>,
}

/// A quarter of the open-file limit, at most 1024: the rest is for sockets, unpacking
/// and passthrough handles.
fn fd_cache_size() -> std::num::NonZeroUsize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    std::num::NonZeroUsize::new((soft / 4).clamp(16, 1024)).unwrap()
}

/// How `Fs` fetches beyond what is asked for.
#[derive(Clone, Copy, Debug)]
pub struct FsOptions {
    /// Prefetch the references of a path when it is first opened.
    pub prefetch_references: bool,
    /// Parallel NAR downloads.
    pub jobs: usize,
    /// Take names, types and sizes from `.ls` listings before the NAR is fetched.
    /// Off for the no-open mode, where the kernel could use a listing's size to serve
    /// a file without asking narfs.
    pub use_listings: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            prefetch_references: true,
            jobs: 4,
            use_listings: true,
        }
    }
}

const DIR_SIZE: u64 = 4096;

impl crate::disk_cache::EvictionHooks for Fs {
    fn pinned(&self, basename: &str) -> bool {
        self.index
            .path_by_basename(basename)
            .is_some_and(|p| self.is_pinned(p))
    }

    fn evicted(&self, basename: &str) {
        crate::metrics::Metrics::inc(&self.fetcher.metrics().evictions);
        let Some(p) = self.index.path_by_basename(basename) else {
            return;
        };
        self.index.set_unpacked(p, false);
        // close its cached descriptors so the space is really freed
        let mut cache = self.fd_cache.lock().unwrap();
        let stale: Vec<u64> = cache
            .iter()
            .map(|(&ino, _)| ino)
            .filter(|&ino| self.index.path_of(ino) == Some(p))
            .collect();
        for ino in stale {
            cache.pop(&ino);
        }
    }
}

impl Fs {
    pub fn new(index: Arc<Index>, fetcher: Arc<Fetcher>, opts: FsOptions) -> Arc<Self> {
        let fs = Self::build(index, fetcher, opts);
        let hooks: std::sync::Weak<dyn crate::disk_cache::EvictionHooks> =
            Arc::downgrade(&(fs.clone() as Arc<dyn crate::disk_cache::EvictionHooks>));
        fs.fetcher.disk().set_hooks(hooks);
        fs
    }

    fn build(index: Arc<Index>, fetcher: Arc<Fetcher>, opts: FsOptions) -> Arc<Self> {
        Arc::new_cyclic(|me| Fs {
            index,
            fetcher,
            list_jobs: 64,
            use_listings: opts.use_listings,
            invalidator: std::sync::OnceLock::new(),
            pins: Default::default(),
            me: me.clone(),
            handles: Default::default(),
            next_handle: std::sync::atomic::AtomicU64::new(1),
            fd_cache: std::sync::Mutex::new(lru::LruCache::new(fd_cache_size())),
            prefetch: opts
                .prefetch_references
                .then(|| Arc::new(tokio::sync::Semaphore::new((opts.jobs / 2).max(1)))),
        })
    }

    /// Fetches the closure of `id` in the background: a closure is almost always read
    /// together. Each prefetched path prefetches its own references in turn.
    fn prefetch_references(&self, info: &crate::formats::narinfo::NarInfo) {
        let (Some(sem), Some(me)) = (self.prefetch.clone(), self.me.upgrade()) else {
            return;
        };
        for r in info.references.iter().filter(|r| **r != info.store_path) {
            let id = match self.index.path_by_basename(r.basename()) {
                Some(id) if self.index.is_unpacked(id) => continue,
                Some(id) => Some(id),
                None => None,
            };
            let (me, sem, r) = (me.clone(), sem.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(_permit) = sem.acquire().await else {
                    return;
                };
                let id = match id {
                    Some(id) => id,
                    None => {
                        if me
                            .satisfy(Need::NarInfo(r.basename().to_owned()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        match me.index.path_by_basename(r.basename()) {
                            Some(id) => id,
                            None => return,
                        }
                    }
                };
                if !me.index.is_unpacked(id) {
                    tracing::debug!(path = %r, "prefetching a reference");
                    let _ = me.fetch_content(id, Priority::Prefetch).await;
                }
            });
        }
    }

    /// Whether a file of `id` is open: its path is never evicted.
    fn is_pinned(&self, id: PathId) -> bool {
        self.pins.lock().unwrap().values().any(|&p| p == id)
            || self.handles.lock().unwrap().values().any(|&p| p == id)
    }

    pub fn set_invalidator(&self, inv: Arc<dyn Invalidator>) {
        let _ = self.invalidator.set(inv);
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    fn attr_of(&self, n: &NodeView) -> Outcome<Attr> {
        let ino = n.ino;
        let (kind, size, perm, nlink) = match &n.kind {
            Kind::Root => (FileKind::Dir, DIR_SIZE, 0o555, 2),
            Kind::Unloaded => return Wait(Need::Tree(n.path)),
            Kind::Dir => (
                FileKind::Dir,
                DIR_SIZE,
                0o555,
                2 + self.index.subdir_count(ino),
            ),
            Kind::File { size, executable } => (
                FileKind::File,
                *size,
                if *executable { 0o555 } else { 0o444 },
                1,
            ),
            Kind::Symlink { target } => (FileKind::Symlink, target.len() as u64, 0o777, 1),
            Kind::Stale => return Ready(Err(Errno::ESTALE)),
        };
        Ready(Ok(Attr {
            ino,
            kind,
            size,
            perm,
            nlink,
            verified: n.kind == Kind::Root || n.tree == Some(TreeSource::Nar),
        }))
    }

    pub fn getattr(&self, ino: u64) -> Outcome<Attr> {
        match self.index.node(ino) {
            Some(n) => self.attr_of(&n),
            None => Ready(Err(Errno::ENOENT)),
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Outcome<Attr> {
        if parent == ROOT {
            let Ok(name) = std::str::from_utf8(name) else {
                return Ready(Err(Errno::ENOENT));
            };
            return match self.index.path_by_basename(name) {
                Some(id) => self.getattr(self.index.path_ino(id)),
                None if StorePath::from_basename(name).is_ok() => {
                    Wait(Need::NarInfo(name.to_owned()))
                }
                None => Ready(Err(Errno::ENOENT)),
            };
        }
        let Some(n) = self.index.node(parent) else {
            return Ready(Err(Errno::ENOENT));
        };
        match n.kind {
            Kind::Unloaded => Wait(Need::Tree(n.path)),
            Kind::Dir => match self.index.child(parent, name) {
                Some(c) => self.getattr(c),
                None => Ready(Err(Errno::ENOENT)),
            },
            Kind::Stale => Ready(Err(Errno::ESTALE)),
            _ => Ready(Err(Errno::ENOTDIR)),
        }
    }

    /// A link target is content: it comes from the verified NAR, never from the
    /// unsigned listing (a forged target would redirect what a path runs).
    pub fn readlink(&self, ino: u64) -> Outcome<Vec<u8>> {
        let Some(n) = self.index.node(ino) else {
            return Ready(Err(Errno::ENOENT));
        };
        match n.kind {
            Kind::Symlink { target } => {
                if n.tree != Some(TreeSource::Nar) {
                    return Wait(Need::Content(n.path));
                }
                Ready(Ok(target.into_vec()))
            }
            Kind::Unloaded => Wait(Need::Tree(n.path)),
            Kind::Stale => Ready(Err(Errno::ESTALE)),
            _ => Ready(Err(Errno::EINVAL)),
        }
    }

    /// Whether directory `ino` can never change again: it lies in a path whose tree
    /// came from the verified NAR. Such a directory's entries may stay in the kernel's
    /// cache; the root (refreshed) and listing-built directories (the NAR may yet
    /// replace them) may not.
    pub fn dir_is_final(&self, ino: u64) -> bool {
        self.index.is_verified_dir(ino)
    }

    /// Entries from `offset` on (0 = start; "." and ".." first), at most `max`.
    pub fn readdir(&self, ino: u64, offset: u64, max: usize) -> Outcome<Vec<DirEntry>> {
        let Some(n) = self.index.node(ino) else {
            return Ready(Err(Errno::ENOENT));
        };
        match n.kind {
            Kind::Unloaded => return Wait(Need::Tree(n.path)),
            Kind::Root | Kind::Dir => {}
            Kind::Stale => return Ready(Err(Errno::ESTALE)),
            _ => return Ready(Err(Errno::ENOTDIR)),
        }
        let mut out = Vec::new();
        for (i, name) in [&b"."[..], b".."].iter().enumerate() {
            if offset <= i as u64 {
                out.push(DirEntry {
                    ino: if i == 0 { ino } else { n.parent },
                    next: i as u64 + 1,
                    kind: FileKind::Dir,
                    name: name.to_vec(),
                });
            }
        }
        let from = offset.saturating_sub(2) as usize;
        for (i, (cino, name, kind)) in self.index.entries(ino, from, max).into_iter().enumerate() {
            out.push(DirEntry {
                ino: cino,
                next: (from + i) as u64 + 3,
                kind: match kind {
                    Kind::File { .. } => FileKind::File,
                    Kind::Symlink { .. } => FileKind::Symlink,
                    // not loaded yet: almost every store path is a directory
                    _ => FileKind::Dir,
                },
                name: name.into_vec(),
            });
        }
        Ready(Ok(out))
    }

    /// The path of regular file `ino`, once its verified contents are on disk.
    fn unpacked_file(&self, ino: u64) -> Outcome<PathId> {
        let Some(n) = self.index.node(ino) else {
            return Ready(Err(Errno::ENOENT));
        };
        match n.kind {
            Kind::File { .. } => {}
            Kind::Unloaded => return Wait(Need::Tree(n.path)),
            Kind::Dir | Kind::Root => return Ready(Err(Errno::EISDIR)),
            Kind::Symlink { .. } => return Ready(Err(Errno::EINVAL)),
            Kind::Stale => return Ready(Err(Errno::ESTALE)),
        }
        if !n.unpacked {
            return Wait(Need::Content(n.path));
        }
        Ready(Ok(n.path))
    }

    /// Opens a file for the page-cache mode: no syscall, just a handle that pins the
    /// path. The verified contents must be on disk first: this wait is what keeps a
    /// file whose size came from the unsigned listing from being read before its NAR
    /// is verified (a disagreeing listing's inode then goes stale, and the kernel looks
    /// the name up again).
    pub fn open_handle(&self, ino: u64) -> Outcome<u64> {
        let path = match self.unpacked_file(ino) {
            Ready(Ok(p)) => p,
            Ready(Err(e)) => return Ready(Err(e)),
            Wait(n) => return Wait(n),
        };
        let fh = self
            .next_handle
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, path);
        // in use: the last to be evicted
        self.fetcher
            .disk()
            .touch(self.index.store_path(path).basename());
        Ready(Ok(fh))
    }

    pub fn release_handle(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    /// Reads by inode through a per-inode descriptor cache (one open per file, not
    /// one per `open(2)`).
    pub fn read_ino(&self, ino: u64, offset: u64, size: u32) -> Outcome<Vec<u8>> {
        let cached = self.fd_cache.lock().unwrap().get(&ino).cloned();
        let file = match cached {
            Some(f) => f,
            None => match self.open(ino) {
                Ready(Ok(fd)) => {
                    // `open` pinned the descriptor for passthrough; here the cache owns it
                    self.pins.lock().unwrap().remove(&fd);
                    use std::os::fd::FromRawFd;
                    let f = Arc::new(unsafe { std::fs::File::from_raw_fd(fd) });
                    self.fd_cache.lock().unwrap().put(ino, f.clone());
                    f
                }
                Ready(Err(e)) => return Ready(Err(e)),
                Wait(n) => return Wait(n),
            },
        };
        use std::os::fd::AsRawFd;
        Ready(self.read(file.as_raw_fd(), offset, size))
    }

    /// Opens a file's verified contents in the disk cache; returns the descriptor.
    pub fn open(&self, ino: u64) -> Outcome<i32> {
        match self.unpacked_file(ino) {
            Ready(Ok(_)) => {}
            Ready(Err(e)) => return Ready(Err(e)),
            Wait(n) => return Wait(n),
        }
        let Some((path, rel)) = self.index.relative_path(ino) else {
            return Ready(Err(Errno::ENOENT));
        };
        let sp = self.index.store_path(path);
        let dir = self
            .fetcher
            .disk()
            .path_dir(sp.basename())
            .into_os_string()
            .into_vec();
        let (Ok(c), Ok(rel_c)) = (CString::new(dir), CString::new(rel)) else {
            return Ready(Err(Errno::EIO));
        };
        let fd = crate::beneath::open_beneath(&c, &rel_c, false);
        if fd >= 0 {
            self.pins.lock().unwrap().insert(fd, path);
            self.fetcher.disk().touch(sp.basename());
            return Ready(Ok(fd));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::NotFound
            && !self.fetcher.disk().has_path(sp.basename())
        {
            // The unpacked copy went away (evicted or removed by hand): fetch again.
            return Wait(Need::Content(path));
        }
        if err.raw_os_error() == Some(libc::ELOOP) {
            // the name passes through a symlink of the verified tree: it came from a
            // listing the NAR replaced, and is never followed out of the path
            return Ready(Err(Errno::ESTALE));
        }
        tracing::error!(
            "cannot open {}/{} in the cache directory: {err}",
            String::from_utf8_lossy(c.as_bytes()),
            String::from_utf8_lossy(rel_c.as_bytes())
        );
        Ready(Err(Errno::EIO))
    }

    pub fn read(&self, fd: i32, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = unsafe {
                libc::pread(
                    fd,
                    buf[done..].as_mut_ptr().cast(),
                    buf.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Errno(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn release(&self, fd: i32) {
        if self.pins.lock().unwrap().remove(&fd).is_some() {
            unsafe { libc::close(fd) };
        }
    }

    /// The mount's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let disk = self.fetcher.disk();
        self.fetcher.metrics().render(&crate::metrics::Gauges {
            cache_bytes_used: disk.used(),
            cache_bytes_quota: disk.quota(),
            paths_known: self.index.path_count() as u64,
        })
    }

    /// A closure member's verified narinfo, or the path and why it cannot be had.
    async fn closure_member(
        &self,
        name: String,
    ) -> Result<Option<(PathId, Arc<crate::formats::narinfo::NarInfo>)>, (StorePath, String)> {
        let Ok(sp) = StorePath::from_basename(&name) else {
            return Err((
                StorePath::from_basename("00000000000000000000000000000000-invalid")
                    .expect("valid placeholder"),
                format!("'{name}' is not a store path"),
            ));
        };
        if self.satisfy(Need::NarInfo(name.clone())).await.is_err() {
            return Err((sp, "the cache has no valid, trusted narinfo for it".into()));
        }
        let Some(id) = self.index.path_by_basename(&name) else {
            return Ok(None);
        };
        match self.info(id).await {
            Ok(info) => Ok(Some((id, info))),
            Err(_) => Err((sp, "its narinfo went away".into())),
        }
    }

    /// Fetches the closures of `roots` (store path basenames) into the disk cache, for
    /// `narfs prefetch`: first every narinfo of the closure (`on_closure` gets the
    /// path count and NAR bytes), then the NARs, `jobs` at a time, each reported to
    /// `on_path` with its outcome. Returns how many failed.
    pub async fn prefetch_closure(
        &self,
        roots: Vec<String>,
        jobs: usize,
        on_closure: impl FnOnce(usize, u64),
        on_path: impl Fn(&StorePath, Result<(), String>),
    ) -> usize {
        // The closure is walked one level at a time, each level's narinfos fetched
        // concurrently.
        let mut seen = std::collections::HashSet::new();
        let mut level: Vec<String> = roots;
        let mut closure = Vec::new();
        let mut failed = 0;
        while !level.is_empty() {
            let names: Vec<String> = level.drain(..).filter(|n| seen.insert(n.clone())).collect();
            let found: Vec<_> = futures::stream::iter(names)
                .map(|name| self.closure_member(name))
                .buffer_unordered(16)
                .collect()
                .await;
            for r in found {
                match r {
                    Ok(Some((id, info))) => {
                        level.extend(info.references.iter().map(|r| r.basename().to_owned()));
                        closure.push((id, info));
                    }
                    Ok(None) => {}
                    Err((sp, why)) => {
                        failed += 1;
                        on_path(&sp, Err(why));
                    }
                }
            }
        }
        on_closure(closure.len(), closure.iter().map(|(_, i)| i.nar_size).sum());
        let results: Vec<(StorePath, Result<(), Errno>)> = futures::stream::iter(closure)
            .map(|(id, info)| async move {
                let r = self.satisfy(Need::Content(id)).await;
                (info.store_path.clone(), r)
            })
            .buffer_unordered(jobs.max(1))
            .inspect(|(sp, r)| {
                on_path(
                    sp,
                    r.map_err(|_| {
                        "fetching or verifying its NAR failed (see the mount's log)".into()
                    }),
                )
            })
            .collect()
            .await;
        failed + results.iter().filter(|(_, r)| r.is_err()).count()
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 0,
            files: self.index.path_count() as u64,
        }
    }

    /// The verified narinfo of a known path: kept on disk, read back when needed.
    async fn info(&self, id: PathId) -> Result<Arc<crate::formats::narinfo::NarInfo>, Errno> {
        let sp = self.index.store_path(id);
        match self.fetcher.narinfo(sp.hash_part()).await {
            Ok(Lookup::Found(info)) if info.store_path == sp => Ok(info),
            Ok(_) => {
                tracing::error!("{sp}: its narinfo is no longer in the cache");
                Err(Errno::EIO)
            }
            Err(e) => {
                tracing::error!("{sp}: {e}");
                Err(Errno::EIO)
            }
        }
    }

    /// Does the network part of an operation; afterwards the operation is asked again.
    pub async fn satisfy(&self, need: Need) -> Result<(), Errno> {
        match need {
            Need::NarInfo(name) => {
                let sp = StorePath::from_basename(&name).map_err(|_| Errno::ENOENT)?;
                match self.fetcher.narinfo(sp.hash_part()).await {
                    Ok(Lookup::Found(info)) => {
                        if info.store_path != sp {
                            tracing::warn!(
                                "{name}: the cache has {} under that hash, not this name",
                                info.store_path
                            );
                            return Err(Errno::ENOENT);
                        }
                        self.index.add_path(&info.store_path);
                        Ok(())
                    }
                    Ok(Lookup::Missing | Lookup::Rejected) => Err(Errno::ENOENT),
                    Err(e) => {
                        tracing::error!("looking up {name}: {e}");
                        Err(Errno::EIO)
                    }
                }
            }
            Need::Tree(id) => {
                if self.index.tree_source(id).is_some() {
                    return Ok(());
                }
                let info = self.info(id).await?;
                if self.use_listings && !self.fetcher.disk().has_path(info.store_path.basename()) {
                    match self.fetcher.listing(info.clone()).await {
                        Ok(Some(tree)) if !self.index.listing_fits(tree.count()) => {
                            tracing::warn!(
                                "{}: listings already hold {} nodes; its NAR will be used instead",
                                info.store_path,
                                crate::index::MAX_LISTING_NODES
                            );
                        }
                        Ok(Some(tree)) => {
                            let stale = self.index.attach_tree(
                                id,
                                &tree,
                                TreeSource::Listing,
                                &info.nar_hash,
                            );
                            self.invalidate(stale);
                            return Ok(());
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // the cache did not answer: the NAR would not come either
                            tracing::error!("{e}");
                            return Err(Errno::EIO);
                        }
                    }
                }
                Box::pin(self.satisfy(Need::Content(id))).await
            }
            Need::Content(id) => self.fetch_content(id, Priority::Demand).await,
        }
    }

    /// Makes the contents of `id` available on disk and attaches their tree.
    async fn fetch_content(&self, id: PathId, priority: Priority) -> Result<(), Errno> {
        if self.index.has_failed(id) {
            // The cache may have been repaired since: verify its narinfo afresh (a
            // good one replaces the copy kept on disk).
            let sp = self.index.store_path(id);
            let _ = self.fetcher.narinfo_from_cache(sp.hash_part()).await;
        }
        let info = self.info(id).await?;
        match self.fetcher.content(info.clone(), priority).await {
            Ok(c) => {
                self.index.set_failed(id, false);
                let stale = self
                    .index
                    .attach_tree(id, &c.tree, TreeSource::Nar, &c.nar_hash);
                self.index.set_unpacked(id, true);
                self.invalidate(stale);
                self.prefetch_references(&info);
                Ok(())
            }
            // a prefetch skipped for want of room: nothing failed
            Err(e) if matches!(*e, crate::fetch::FetchError::NoRoom(_)) => Err(Errno(libc::EAGAIN)),
            Err(_) => {
                self.index.set_failed(id, true);
                Err(Errno::EIO)
            }
        }
    }

    /// Drops a replaced tree from the kernel's caches: its entries, so names resolve
    /// to the new inodes. Not needed for correctness (the old inodes answer ESTALE and
    /// nothing of a listing is ever cached), but it spares the kernel a round trip.
    /// Off the request path: the kernel may hold a directory lock while it waits for
    /// one of our replies. Descriptors cached for the old inodes are closed.
    fn invalidate(&self, stale: crate::index::Stale) {
        if stale.is_empty() {
            return;
        }
        let mut fds = self.fd_cache.lock().unwrap();
        let gone: Vec<u64> = fds
            .iter()
            .map(|(&ino, _)| ino)
            .filter(|&ino| self.index.node(ino).is_none_or(|n| n.kind == Kind::Stale))
            .collect();
        for ino in gone {
            fds.pop(&ino);
        }
        drop(fds);
        if let Some(inv) = self.invalidator.get().cloned() {
            std::thread::spawn(move || {
                for (parent, name) in stale.iter().rev() {
                    inv.entry(*parent, name);
                }
            });
        }
    }

    /// Lists `*.narinfo` keys at the cache root and adds every path whose narinfo
    /// verifies. Runs in the background: readdir serves what is known meanwhile. The
    /// next page is listed while the narinfos of this one are fetched.
    pub async fn scan_bucket(&self) -> Result<usize, crate::storage::StorageError> {
        let storage = self.fetcher.storage().clone();
        let list = |token: Option<String>| {
            let storage = storage.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                storage.list_page(token).await.map(|p| (p, t.elapsed()))
            })
        };
        let mut next = Some(list(None));
        let mut added = 0usize;
        while let Some(pending) = next.take() {
            let (page, list_time) = pending.await.map_err(|e| crate::storage::StorageError {
                op: "LIST",
                location: storage.location(""),
                detail: e.to_string(),
            })??;
            next = page.next.clone().map(|t| list(Some(t)));
            let t_get = std::time::Instant::now();
            let hashes: Vec<String> = page
                .keys
                .iter()
                .filter_map(|k| k.strip_suffix(".narinfo"))
                .filter(|h| crate::formats::store_path::is_hash_part(h) && !self.index.has_hash(h))
                .map(str::to_owned)
                .collect();
            let index = &self.index;
            futures::stream::iter(hashes)
                .map(|h| {
                    let f = self.fetcher.clone();
                    async move { f.narinfo(&h).await }
                })
                .buffer_unordered(self.list_jobs)
                .for_each(|r| {
                    match r {
                        Ok(Lookup::Found(info)) => {
                            index.add_path(&info.store_path);
                            added += 1;
                        }
                        Ok(Lookup::Missing | Lookup::Rejected) => {}
                        Err(e) => tracing::warn!("listing: {e}"),
                    }
                    async {}
                })
                .await;
            tracing::debug!(
                keys = page.keys.len(),
                list_ms = list_time.as_millis() as u64,
                get_ms = t_get.elapsed().as_millis() as u64,
                "listing page"
            );
        }
        Ok(added)
    }
}
