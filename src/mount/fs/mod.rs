//! The file system as plain methods, testable without FUSE.
//!
//! Every operation first tries to answer from what is already known. When it needs the
//! network (a narinfo not yet seen, a store path whose tree is not loaded, a file's
//! contents not on disk) it returns `Outcome::Need`; the caller satisfies that need off
//! the request loop and asks again. That is how the FUSE loop never waits on the
//! network.
//!
//! Here: the types and the metadata operations. `handles`: opens, reads and what they
//! pin. `needs`: satisfying needs (narinfos, trees, contents). `prefetch`: fetching
//! what is likely wanted next. `scan`: listing the cache's root.

mod handles;
mod needs;
mod prefetch;
mod record;
mod replay;
mod scan;

pub use handles::Opened;

use crate::fetch::Fetcher;
use crate::formats::hash::Sha256;
use crate::formats::store_path::StorePath;
use crate::mount::inodes::{Index, Kind, NodeView, PathId, TreeSource, ROOT};
use std::collections::HashMap;
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
    /// The tree of a store path (from its file index, a tree kept on disk, its `.ls`
    /// listing, else its NAR).
    Tree(PathId),
    /// The verified contents of a store path in the disk cache.
    Content(PathId),
    /// One chunk of a file of an indexed path.
    Chunk(PathId, crate::fetch::blocks::ChunkAt),
    /// The end of the mount's first listing of the cache.
    Listing,
}

/// Tells the kernel to forget cached entries; the FUSE adapter provides it.
pub trait Invalidator: Send + Sync + 'static {
    fn entry(&self, parent: u64, name: &[u8]);
    /// Drops the cached pages (and attributes) of file `ino`.
    fn data(&self, ino: u64);
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
    /// 512-byte blocks, as the store on a disk (ext4) would have them allocated, so `du`
    /// agrees with it: a file takes whole 4 KiB blocks; a symlink's target fits in its
    /// inode up to 59 bytes and takes a block beyond; a directory one block.
    pub fn blocks(&self) -> u64 {
        match self.kind {
            FileKind::File => self.size.div_ceil(BLOCK) * (BLOCK / 512),
            FileKind::Symlink if self.size < 60 => 0,
            FileKind::Symlink | FileKind::Dir => BLOCK / 512,
        }
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

/// Sizes in `BLOCK`s.
pub struct StatFs {
    pub blocks: u64,
    pub free: u64,
    pub files: u64,
}

pub struct Fs {
    index: Arc<Index>,
    fetcher: Arc<Fetcher>,
    list_jobs: usize,
    use_listings: bool,
    invalidator: std::sync::OnceLock<Arc<dyn Invalidator>>,
    me: std::sync::Weak<Fs>,
    /// Open handles and the blobs each pins.
    handles: std::sync::Mutex<HashMap<u64, Box<[Sha256]>>>,
    /// Blobs of open files, with how many handles pin each: never evicted.
    pinned: std::sync::Mutex<HashMap<Sha256, u32>>,
    next_handle: std::sync::atomic::AtomicU64,
    /// Open descriptors of blobs, by hash.
    fd_cache: std::sync::Mutex<lru::LruCache<Sha256, Arc<std::fs::File>>>,
    /// Bounds background prefetches so demand reads keep download slots.
    prefetch: Option<Arc<tokio::sync::Semaphore>>,
    /// The block tables of paths read through their file index.
    indexed: std::sync::Mutex<HashMap<PathId, Arc<crate::fetch::blocks::Blocks>>>,
    /// False while a mount's first listing of the cache runs: the root's readdir waits
    /// for it, so the first `ls` shows the whole cache (lookups by name never wait).
    listed: tokio::sync::watch::Sender<bool>,
    /// What a traversal of many paths looks like so far (see `Fs::walked`).
    walk: std::sync::Mutex<Walk>,
    /// NAR fetches under way, so that prefetches start no decoder beyond the CPUs.
    decoders: prefetch::Decoders,
    /// Programs whose first reads are being recorded (`narfs profile record`).
    recorder: record::Recorder,
    /// Paths whose start-up profile was replayed (or tried): once per mount.
    replayed: std::sync::Mutex<std::collections::HashSet<PathId>>,
}

/// Paths looked into from their listings, in that order, and the last paths whose
/// contents were asked for: a traversal (`find`, then reading what it found) reads
/// paths it listed a moment ago, one after another.
#[derive(Default)]
struct Walk {
    /// Paths whose tree came from a listing, not fetched yet, oldest first.
    listed: std::collections::VecDeque<PathId>,
    /// The last path whose contents a reader waited for, and when.
    last_demand: Option<(PathId, std::time::Instant)>,
    /// Paths readers waited for while they walked, newest last.
    demanded: std::collections::VecDeque<PathId>,
    /// Paths sent ahead because a traversal looked into their whole closure.
    sent: std::collections::HashSet<PathId>,
    /// When the last path was looked into.
    last_looked: Option<std::time::Instant>,
    /// The references of paths a closure check examined, kept while the walk lasts.
    references: HashMap<PathId, Arc<[StorePath]>>,
    /// A closure check runs; one more is wanted after it.
    checking: bool,
    check_again: bool,
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

/// The block size the mount reports (`statfs`, `st_blksize`, `st_blocks`).
pub const BLOCK: u64 = 4096;
const DIR_SIZE: u64 = BLOCK;

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
            me: me.clone(),
            handles: Default::default(),
            pinned: Default::default(),
            next_handle: std::sync::atomic::AtomicU64::new(1),
            fd_cache: std::sync::Mutex::new(lru::LruCache::new(handles::fd_cache_size())),
            prefetch: opts
                .prefetch_references
                .then(|| Arc::new(tokio::sync::Semaphore::new((opts.jobs / 2).max(1)))),
            indexed: Default::default(),
            listed: tokio::sync::watch::Sender::new(true),
            walk: Default::default(),
            decoders: prefetch::Decoders::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            ),
            recorder: Default::default(),
            replayed: Default::default(),
        })
    }

    /// The first listing of the cache starts: until [`Self::listing_done`], the root's
    /// readdir waits.
    pub fn listing_started(&self) {
        self.listed.send_replace(false);
    }

    /// The root now shows the whole cache (or all that could be listed).
    pub fn listing_done(&self) {
        self.listed.send_replace(true);
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
            verified: n.kind == Kind::Root || n.tree.is_some_and(TreeSource::verified),
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
                if !n.tree.is_some_and(TreeSource::verified) {
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
            Kind::Root if !*self.listed.borrow() => return Wait(Need::Listing),
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

    /// The mount's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let disk = self.fetcher.disk();
        self.fetcher
            .metrics()
            .render(&crate::fetch::metrics::Gauges {
                cache_bytes_used: disk.used(),
                cache_bytes_quota: disk.quota(),
                paths_known: self.index.path_count() as u64,
                tcp_connections: crate::fetch::metrics::tcp_connections(),
            })
    }

    /// The mount is as big as its cache: `df` shows the quota, what the cache holds
    /// and what it can still take without evicting (no more than the cache
    /// directory's file system has), so tools that check for room see figures a user
    /// can act on (`--cache-size`). Inodes: every node known, none free (read-only).
    pub fn statfs(&self) -> StatFs {
        use std::os::unix::ffi::OsStrExt;
        let disk = self.fetcher.disk();
        let (mut quota, used) = (disk.quota(), disk.used());
        let mut free = quota.saturating_sub(used);
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if let Ok(dir) = std::ffi::CString::new(disk.root().as_os_str().as_bytes()) {
            if unsafe { libc::statvfs(dir.as_ptr(), &mut st) } == 0 {
                let frsize = st.f_frsize as u64;
                quota = quota.min(st.f_blocks as u64 * frsize);
                free = free.min(st.f_bavail as u64 * frsize);
            }
        }
        StatFs {
            blocks: quota / BLOCK,
            free: free / BLOCK,
            files: self.index.node_count() as u64 + 1,
        }
    }

    /// Whether `ino` may be asked for extended attributes. NARs carry none, so no
    /// file has any: there is nothing else to look up. Counted: each is a round trip
    /// the kernel could not answer from its caches.
    pub fn xattr_target(&self, ino: u64) -> Result<(), Errno> {
        crate::fetch::metrics::Metrics::inc(&self.fetcher.metrics().xattr_requests);
        match self.index.node(ino) {
            Some(n) if n.kind == Kind::Stale => Err(Errno::ESTALE),
            Some(_) => Ok(()),
            None => Err(Errno::ENOENT),
        }
    }

    /// Drops a replaced tree from the kernel's caches: its entries, so names resolve
    /// to the new inodes. Not needed for correctness (the old inodes answer ESTALE and
    /// nothing of a listing is ever cached), but it spares the kernel a round trip.
    /// Off the request path: the kernel may hold a directory lock while it waits for
    /// one of our replies.
    fn invalidate(&self, stale: crate::mount::inodes::Stale) {
        if stale.is_empty() {
            return;
        }
        if let Some(inv) = self.invalidator.get().cloned() {
            std::thread::spawn(move || {
                for (parent, name) in stale.iter().rev() {
                    inv.entry(*parent, name);
                }
            });
        }
    }
}
