//! The fuser adapter: a thin wrapper that turns kernel requests into `fs` calls and
//! their results into replies. Operations that need the network run as tasks on the
//! tokio runtime and reply from there, so the request loop keeps serving others.

use crate::mount::fs::{Attr, Errno, FileKind, Fs, Outcome};
use fuser::{
    BackingId, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// Store paths are immutable: entries and attributes inside them never change.
const TTL: Duration = Duration::from_secs(3600);
/// The root grows as paths are pushed.
const ROOT_TTL: Duration = Duration::from_secs(1);

pub struct NarFuse {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    passthrough: Arc<Passthrough>,
    mode: OpenMode,
    /// Bounds the requests waiting on the network at once: each is a task, and mount
    /// users (many processes, many threads) must not be able to pile up without end.
    waiting: Arc<tokio::sync::Semaphore>,
}

/// Requests that may wait on the network at once; more get EAGAIN. A process waits on
/// at most one request per thread, so only thousands of blocked threads reach this.
const MAX_WAITING: usize = 4096;

/// How files are opened and read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Each open waits for the verified contents (a round trip); reads then come to
    /// narfs once and stay in the kernel's page cache (`FOPEN_KEEP_CACHE`).
    PageCache,
    /// The kernel is told opens need no answer: no round trip per file, for mounts
    /// that do not use listings (`--no-open`).
    NoOpen,
    /// At open narfs hands the kernel the file's blob; reads bypass narfs (files of
    /// one chunk; larger ones are read as in `PageCache`).
    Passthrough,
}

/// FUSE passthrough: reads of a file of one chunk go from the kernel straight to its
/// blob in the disk cache, never through narfs. One backing id per inode while any
/// handle of it is open, as the kernel requires.
#[derive(Default)]
struct Passthrough {
    enabled: std::sync::atomic::AtomicBool,
    state: std::sync::Mutex<BackingState>,
}

#[derive(Default)]
struct BackingState {
    by_handle: std::collections::HashMap<u64, Arc<BackingId>>,
    by_inode: std::collections::HashMap<u64, std::sync::Weak<BackingId>>,
}

impl Passthrough {
    fn reply(&self, reply: ReplyOpen, ino: u64, opened: crate::mount::fs::Opened) {
        use std::sync::atomic::Ordering;
        if let (true, Some(file)) = (self.enabled.load(Ordering::Relaxed), &opened.backing) {
            let mut st = self.state.lock().unwrap();
            let existing = st.by_inode.get(&ino).and_then(std::sync::Weak::upgrade);
            let id = match existing {
                Some(id) => Ok(id),
                None => {
                    use std::os::fd::AsFd;
                    reply.open_backing(file.as_fd()).map(Arc::new)
                }
            };
            match id {
                Ok(id) => {
                    st.by_inode.insert(ino, Arc::downgrade(&id));
                    st.by_handle.insert(opened.fh, id.clone());
                    reply.opened_passthrough(FileHandle(opened.fh), FopenFlags::empty(), &id);
                    return;
                }
                Err(e) => {
                    self.enabled.store(false, Ordering::Relaxed);
                    tracing::info!("FUSE passthrough refused ({e}); reads go through narfs");
                }
            }
        }
        reply.opened(FileHandle(opened.fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(&self, fh: u64) {
        let mut st = self.state.lock().unwrap();
        st.by_handle.remove(&fh);
        st.by_inode.retain(|_, w| w.strong_count() > 0);
    }
}

impl NarFuse {
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle, mode: OpenMode) -> Self {
        NarFuse {
            fs,
            rt,
            passthrough: Arc::default(),
            mode,
            waiting: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING)),
        }
    }

    /// Answers at once when possible; otherwise satisfies the need on the runtime and
    /// retries (a path may need its narinfo, then its tree).
    fn run<T: Send + 'static>(
        &self,
        op: impl Fn(&Fs) -> Outcome<T> + Send + 'static,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) {
        match op(&self.fs) {
            Outcome::Ready(r) => done(r),
            Outcome::Need(need) => {
                let Ok(permit) = self.waiting.clone().try_acquire_owned() else {
                    tracing::warn!(
                        "{MAX_WAITING} requests already wait on the cache: answering EAGAIN"
                    );
                    return done(Err(Errno(libc::EAGAIN)));
                };
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let _permit = permit;
                    let mut need = need;
                    for _ in 0..4 {
                        if let Err(e) = fs.satisfy(need).await {
                            return done(Err(e));
                        }
                        match op(&fs) {
                            Outcome::Ready(r) => return done(r),
                            Outcome::Need(n) => need = n,
                        }
                    }
                    done(Err(Errno::EIO))
                });
            }
        }
    }
}

/// Kernel cache invalidation through the session's notifier.
pub struct KernelInvalidator(pub fuser::Notifier);

impl crate::mount::fs::Invalidator for KernelInvalidator {
    fn entry(&self, parent: u64, name: &[u8]) {
        if let Err(e) = self.0.inval_entry(INodeNo(parent), OsStr::from_bytes(name)) {
            tracing::debug!("invalidating {}: {e}", String::from_utf8_lossy(name));
        }
    }

    fn data(&self, ino: u64) {
        // an inode the kernel does not hold answers ENOENT: nothing to drop
        let _ = self.0.inval_inode(INodeNo(ino), 0, 0);
    }
}

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn to_attr(a: &Attr) -> FileAttr {
    // mtime 1, as in /nix/store
    let t = UNIX_EPOCH + Duration::from_secs(1);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks(),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: crate::mount::fs::BLOCK as u32,
        flags: 0,
    }
}

/// How long the kernel may keep an entry or attributes: long for what came from a
/// verified NAR (store paths never change), not at all for what came from an unsigned
/// listing (the kernel asks again at every use, so once the NAR is verified it sees
/// the NAR's answer, and a refuted inode answers ESTALE), briefly for the root.
fn ttl_for(a: &Attr) -> Duration {
    if a.ino == crate::mount::inodes::ROOT {
        ROOT_TTL
    } else if a.verified {
        TTL
    } else {
        Duration::ZERO
    }
}

impl fuser::Filesystem for NarFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Lookups in one directory must not queue behind a lookup that waits for a
        // download; symlinks never change, so the kernel may cache them.
        // READDIRPLUS: `ls -l` and `find` get attributes with the names, not one
        // lookup per entry.
        // Not POSIX_ACL: the kernel would cache that a file has no ACL, but forget it
        // whenever it refreshes attributes to check a permission, and ask for it on
        // every such check by another user than the owner: a round trip more per
        // path component of a path not yet verified (whose attributes it keeps not
        // at all). `getxattr` tells ACL readers once instead.
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!("kernel does not offer {cap:?}");
            }
        }
        if self.mode == OpenMode::Passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough
                .enabled
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("FUSE passthrough offered by the kernel");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        tracing::trace!(parent = parent.0, name = %String::from_utf8_lossy(&name), "lookup");
        let (fs, rt) = (self.fs.clone(), self.rt.clone());
        self.run(
            move |fs| fs.lookup(parent.0, &name),
            move |r| match r {
                Ok(a) => {
                    if parent.0 == crate::mount::inodes::ROOT {
                        if let Some(replay) = fs.first_use(a.ino) {
                            rt.spawn(replay);
                        }
                    }
                    reply.entry(&ttl_for(&a), &to_attr(&a), Generation(0));
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        tracing::trace!(ino = ino.0, "getattr");
        self.run(
            move |fs| fs.getattr(ino.0),
            move |r| match r {
                Ok(a) => reply.attr(&ttl_for(&a), &to_attr(&a)),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        tracing::trace!(ino = ino.0, "readlink");
        self.run(
            move |fs| fs.readlink(ino.0),
            move |r| match r {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        tracing::trace!(ino = ino.0, "open");
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(fuser::Errno::EROFS);
        }
        match self.mode {
            OpenMode::NoOpen => {
                // ENOSYS tells the kernel that opens always succeed: it stops sending
                // opens and releases and keeps the page cache across opens, a round
                // trip less per file. Sound only because this mode never uses
                // listings: every file the kernel knows of is already verified.
                return reply.error(fuser::Errno::ENOSYS);
            }
            OpenMode::PageCache => {
                return self.run(
                    move |fs| fs.open_handle(ino.0, false),
                    move |r| match r {
                        Ok(o) => reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_KEEP_CACHE),
                        Err(e) => reply.error(errno(e)),
                    },
                );
            }
            OpenMode::Passthrough => self.fs.record_open(req.pid(), ino.0),
        }
        let pt = self.passthrough.clone();
        self.run(
            move |fs| fs.open_handle(ino.0, true),
            move |r| match r {
                Ok(o) => pt.reply(reply, ino.0, o),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        tracing::trace!(ino = ino.0, offset, size, "read");
        let _ = fh;
        self.fs.record_read(req.pid(), ino.0, offset, size as u64);
        self.run(
            move |fs| fs.read_ino(ino.0, offset, size),
            move |r| match r {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        match self.mode {
            OpenMode::Passthrough => {
                self.passthrough.release(fh.0);
                self.fs.release_handle(fh.0);
            }
            OpenMode::PageCache => self.fs.release_handle(fh.0),
            OpenMode::NoOpen => {}
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // a directory that can no longer change is listed once, then from the
        // kernel's cache: a warm traversal sends no READDIR for it
        let flags = if self.fs.dir_is_final(ino.0) {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        tracing::trace!(ino = ino.0, offset, "readdir");
        self.run(
            move |fs| fs.readdir(ino.0, offset, 512),
            move |r| match r {
                Ok(entries) => {
                    for e in entries {
                        if reply.add(
                            INodeNo(e.ino),
                            e.next,
                            file_type(e.kind),
                            OsStr::from_bytes(&e.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        tracing::trace!(ino = ino.0, offset, "readdirplus");
        self.run(
            move |fs| match fs.readdir(ino.0, offset, 512) {
                crate::mount::fs::Outcome::Ready(Ok(entries)) => {
                    crate::mount::fs::Outcome::Ready(Ok(entries
                        .into_iter()
                        .map(|e| {
                            // a store path whose tree is not loaded yet gets no cached
                            // attributes: the kernel looks it up when it is used
                            let attr = match fs.getattr(e.ino) {
                                crate::mount::fs::Outcome::Ready(Ok(a)) => Some(a),
                                _ => None,
                            };
                            (e, attr)
                        })
                        .collect::<Vec<_>>()))
                }
                crate::mount::fs::Outcome::Ready(Err(e)) => {
                    crate::mount::fs::Outcome::Ready(Err(e))
                }
                crate::mount::fs::Outcome::Need(n) => crate::mount::fs::Outcome::Need(n),
            },
            move |r| match r {
                Ok(entries) => {
                    for (e, attr) in entries {
                        let (ttl, attr) = match attr {
                            Some(a) => (ttl_for(&a), to_attr(&a)),
                            None => (
                                Duration::ZERO,
                                to_attr(&Attr {
                                    ino: e.ino,
                                    kind: e.kind,
                                    size: 0,
                                    perm: 0o555,
                                    nlink: 1,
                                    verified: false,
                                }),
                            ),
                        };
                        if reply.add(
                            INodeNo(e.ino),
                            e.next,
                            OsStr::from_bytes(&e.name),
                            &ttl,
                            &attr,
                            Generation(0),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        let block = crate::mount::fs::BLOCK as u32;
        reply.statfs(s.blocks, s.free, s.free, s.files, 0, block, 255, block);
    }

    // No extended attributes: ENODATA and an empty list, as a disk answers for a file
    // without any (the default ENOSYS makes the kernel answer EOPNOTSUPP, and
    // `getfattr`, `cp -a` and `rsync -X` report errors).
    // SELinux labels and POSIX ACLs are not supported, as a file system without
    // them answers: `ls -l` asks every entry for both on each run (round trips the
    // kernel cannot cache) until a file system says so, and then asks it no more.
    // A label request reaches the mount only when no security module answers it.
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, _size: u32, reply: ReplyXattr) {
        const UNSUPPORTED: [&[u8]; 3] = [
            b"security.selinux",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
        ];
        match self.fs.xattr_target(ino.0) {
            Ok(()) if UNSUPPORTED.contains(&name.as_bytes()) => {
                reply.error(fuser::Errno::EOPNOTSUPP)
            }
            Ok(()) => reply.error(fuser::Errno::NO_XATTR),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.xattr_target(ino.0) {
            Ok(()) if size == 0 => reply.size(0),
            Ok(()) => reply.data(&[]),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(
        &self,
        _req: &Request,
        _ino: INodeNo,
        mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        if mask.bits() & libc::W_OK != 0 {
            reply.error(fuser::Errno::EROFS)
        } else {
            reply.ok()
        }
    }
}
