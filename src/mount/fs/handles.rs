//! Opens and reads: a file's contents are its chunks' blobs in the disk cache, read
//! through a cache of open blob descriptors. An open file pins its blobs (they are
//! never evicted while it is open); a read of a chunk that is not on disk waits for
//! it to be fetched (and verified) again.

use super::{Errno, Fs, Need, Outcome};
use crate::formats::hash::Sha256;
use crate::mount::inodes::{Kind, TreeSource};
use std::sync::Arc;
use Outcome::{Need as Wait, Ready};

/// What an open hands the FUSE adapter.
pub struct Opened {
    pub fh: u64,
    /// The file itself, for FUSE passthrough: only a file of one chunk, on disk.
    pub backing: Option<Arc<std::fs::File>>,
}

/// A quarter of the open-file limit, at most 1024: the rest is for sockets and
/// passthrough handles.
pub(super) fn fd_cache_size() -> std::num::NonZeroUsize {
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

impl crate::disk_cache::EvictionHooks for Fs {
    fn pinned(&self, hash: &Sha256) -> bool {
        self.pinned.lock().unwrap().contains_key(hash)
    }

    fn evicted(&self, hash: &Sha256) {
        crate::fetch::metrics::Metrics::inc(&self.fetcher.metrics().evictions);
        // its descriptor goes, so the space is really freed
        self.fd_cache.lock().unwrap().pop(hash);
    }
}

impl Fs {
    /// The errno (or need) for an operation on a regular file that `ino` is not.
    fn not_a_file(&self, ino: u64) -> Outcome<()> {
        let Some(n) = self.index.node(ino) else {
            return Ready(Err(Errno::ENOENT));
        };
        match n.kind {
            Kind::File { .. } => Ready(Ok(())),
            Kind::Unloaded => Wait(Need::Tree(n.path)),
            Kind::Dir | Kind::Root => Ready(Err(Errno::EISDIR)),
            Kind::Symlink { .. } => Ready(Err(Errno::EINVAL)),
            Kind::Stale => Ready(Err(Errno::ESTALE)),
        }
    }

    /// Opens file `ino`: a handle that pins its blobs. Its tree must be verified
    /// (from a NAR or a file index) first: this wait is what keeps a file whose size
    /// came from an unsigned listing from being read before its NAR is verified (a
    /// disagreeing listing's inode then goes stale, and the kernel looks the name up
    /// again). With `backing`, a file of one chunk also gets its blob, fetched if
    /// need be, for FUSE passthrough.
    pub fn open_handle(&self, ino: u64, backing: bool) -> Outcome<Opened> {
        match self.not_a_file(ino) {
            Ready(Ok(())) => {}
            Ready(Err(e)) => return Ready(Err(e)),
            Wait(n) => return Wait(n),
        }
        let Some(plan) = self.index.read_plan(ino, 0, u64::MAX) else {
            return Ready(Err(Errno::ESTALE));
        };
        let Some(chunks) = plan.chunks else {
            return Wait(Need::Content(plan.path));
        };
        // A path read from its NAR is opened with its contents on disk, as before its
        // NAR was split into blobs: if some were evicted, the NAR is fetched again
        // (and its narinfo checked again if that fails: it may have been pushed anew).
        // An indexed path's chunks come when read.
        let disk = self.fetcher.disk();
        let indexed = self.index.tree_source(plan.path) == Some(TreeSource::Index);
        if !indexed && !chunks.iter().all(|c| disk.has_blob(&c.hash)) {
            return Wait(Need::Content(plan.path));
        }
        let backing = match (backing, &chunks[..]) {
            (true, [c]) => match self.blob(&c.hash) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Wait(self.missing(plan.path, c))
                }
                Err(e) => {
                    tracing::error!("cannot open blob {}: {e}", c.hash.to_nix_string());
                    return Ready(Err(Errno::EIO));
                }
            },
            _ => None,
        };
        let hashes: Box<[Sha256]> = chunks.iter().map(|c| c.hash).collect();
        {
            let mut pinned = self.pinned.lock().unwrap();
            for h in hashes.iter() {
                *pinned.entry(*h).or_default() += 1;
            }
        }
        let fh = self
            .next_handle
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, hashes);
        Ready(Ok(Opened { fh, backing }))
    }

    pub fn release_handle(&self, fh: u64) {
        let Some(hashes) = self.handles.lock().unwrap().remove(&fh) else {
            return;
        };
        let mut pinned = self.pinned.lock().unwrap();
        for h in hashes.iter() {
            if let Some(n) = pinned.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    pinned.remove(h);
                }
            }
        }
    }

    /// What a chunk not on disk waits for: itself, for an indexed path; else the NAR.
    fn missing(
        &self,
        path: crate::mount::inodes::PathId,
        c: &crate::mount::inodes::PlannedChunk,
    ) -> Need {
        match (
            c.nar_offset,
            self.indexed.lock().unwrap().contains_key(&path),
        ) {
            (Some(nar_offset), true) => Need::Chunk(
                path,
                crate::fetch::blocks::ChunkAt {
                    nar_offset,
                    len: c.len,
                    hash: c.hash,
                },
            ),
            _ => Need::Content(path),
        }
    }

    /// A blob's descriptor, from the cache or opened (and cached).
    fn blob(&self, hash: &Sha256) -> std::io::Result<Arc<std::fs::File>> {
        if let Some(f) = self.fd_cache.lock().unwrap().get(hash).cloned() {
            return Ok(f);
        }
        let f = Arc::new(self.fetcher.disk().open_blob(hash)?);
        self.fd_cache.lock().unwrap().put(*hash, f.clone());
        Ok(f)
    }

    /// Reads `size` bytes at `offset` of file `ino` from its blobs; a chunk that is
    /// not on disk (evicted, or never fetched) is waited for.
    pub fn read_ino(&self, ino: u64, offset: u64, size: u32) -> Outcome<Vec<u8>> {
        let Some(plan) = self.index.read_plan(ino, offset, size as u64) else {
            return match self.not_a_file(ino) {
                Ready(Ok(())) => Ready(Err(Errno::ESTALE)),
                Ready(Err(e)) => Ready(Err(e)),
                Wait(n) => Wait(n),
            };
        };
        let Some(chunks) = plan.chunks else {
            return Wait(Need::Content(plan.path));
        };
        let end = offset.saturating_add(size as u64).min(plan.size);
        // one buffer, read into in place: a read is one allocation, not one per chunk
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        let mut filled = 0;
        for c in chunks {
            let crate::mount::inodes::PlannedChunk { at, len, hash, .. } = c;
            let f = match self.blob(&hash) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Wait(self.missing(plan.path, &c))
                }
                Err(e) => {
                    tracing::error!("cannot open blob {}: {e}", hash.to_nix_string());
                    return Ready(Err(Errno::EIO));
                }
            };
            self.fetcher.disk().touch(&hash);
            let from = offset.max(at) - at;
            let to = end.min(at + len) - at;
            let want = (to - from) as usize;
            match pread_exact(&f, from, &mut out[filled..filled + want]) {
                Ok(n) => filled += n,
                Err(e) => {
                    tracing::error!("reading blob {}: {e}", hash.to_nix_string());
                    return Ready(Err(Errno::EIO));
                }
            }
        }
        out.truncate(filled);
        Ready(Ok(out))
    }
}

/// Fills `buf` from `offset` (less only at the end of the file); how much it read.
fn pread_exact(f: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let len = buf.len();
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
