//! Blobs: verified file contents, stored once by their SHA-256 and shared by every
//! store path (and every cache) that holds them. A file is a sequence of chunks
//! (1 MiB, the last shorter); each chunk is a blob, `blobs/<hh>/<sha256 hex>`.
//!
//! A blob's name is the hash of its contents: it is written to `tmp/`, under the hash
//! its writer computed over exactly those bytes, and renamed into place; nothing
//! checks it again when it is read. After a crash, blobs written since the last
//! flush began (a marker in `pending/`) are hashed again at start and dropped if they
//! do not match, so a power cut never leaves a blob whose bytes are not its name.

use super::quota::{footprint, Reservation};
use super::DiskCache;
use crate::formats::hash::Sha256;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn hex(hash: &Sha256) -> String {
    hash.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// `blobs/<hh>/<hex>`, relative to the cache directory.
pub(super) fn rel_path(hash: &Sha256) -> PathBuf {
    let h = hex(hash);
    PathBuf::from("blobs").join(&h[..2]).join(h)
}

/// Parses a blob's file name back into its hash.
pub(super) fn parse_name(name: &str) -> Option<Sha256> {
    if name.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in name.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    // only the canonical (lower-case) spelling names a blob
    (hex(&Sha256(out)) == name).then_some(Sha256(out))
}

/// Writes blobs for one fetch, charging each new one to its reservation.
pub struct BlobWriter {
    disk: Arc<DiskCache>,
    reservation: Reservation,
    /// `pending/<n>`, made (and flushed) before the first blob of this writer is
    /// renamed into place, removed once they are all on disk.
    marker: Option<PathBuf>,
    /// Blobs this writer made since the last `keep`, and their footprints.
    created: Vec<(Sha256, u64)>,
}

impl BlobWriter {
    pub(super) fn new(disk: Arc<DiskCache>, reservation: Reservation) -> Self {
        BlobWriter {
            disk,
            reservation,
            marker: None,
            created: Vec::new(),
        }
    }

    /// What was written is to stay (the source it came from passed every check).
    pub fn keep(&mut self) {
        self.created.clear();
    }

    /// Removes the blobs made since the last `keep`: each is its hash, but they came
    /// from something that failed a check, and nothing of that stays on disk.
    pub fn discard(&mut self) {
        for (hash, size) in self.created.drain(..) {
            if self.disk.forget(&hash) {
                let _ = fs::remove_file(self.disk.dir.join(rel_path(&hash)));
                self.reservation.refund_spent(size);
            }
        }
    }

    /// Stores `data` as blob `hash`, which the caller computed over exactly `data`,
    /// unless the blob is there already (then it only waits for its first use, as a
    /// new one would). Returns whether it was new. A reservation that may not grow
    /// (a prefetch's) past the quota fails with `NoRoom` inside the error.
    pub fn put(&mut self, hash: &Sha256, data: &[u8]) -> io::Result<bool> {
        if self.disk.has_blob(hash) {
            self.disk.freshen(hash);
            return Ok(false);
        }
        let size = footprint(data.len() as u64);
        self.reservation.spend(size).map_err(io::Error::other)?;
        if self.marker.is_none() {
            let n = self.disk.counter.fetch_add(1, Ordering::Relaxed);
            let marker = self.disk.dir.join("pending").join(format!("blobs.{n}"));
            File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&marker)?
                .sync_all()?;
            File::open(self.disk.dir.join("pending"))?.sync_all()?;
            self.marker = Some(marker);
        }
        let n = self.disk.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.disk.dir.join("tmp").join(format!("blob.{n}"));
        let written = (|| {
            let mut f = File::options()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(data)?;
            drop(f);
            let dest = self.disk.dir.join(rel_path(hash));
            super::secure::real_dir(dest.parent().expect("in blobs/"))?;
            fs::rename(&tmp, &dest)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            // the room was spent on nothing: it is held again
            self.reservation.refund(size);
            return Err(e);
        }
        self.disk.account(hash, size);
        self.created.push((*hash, size));
        Ok(true)
    }

    /// Room still held.
    pub fn reservation(&mut self) -> &mut Reservation {
        &mut self.reservation
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // once everything written is on disk, the marker goes: in the background
        if let Some(marker) = self.marker.take() {
            let dir = self.disk.dir.clone();
            std::thread::spawn(move || {
                if super::sync_fs(&dir).is_ok() {
                    let _ = fs::remove_file(&marker);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_canonical_ones_parse() {
        let h = Sha256::digest(b"x");
        let p = rel_path(&h);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_name(name), Some(h));
        assert_eq!(p.parent().unwrap().file_name().unwrap().len(), 2);
        assert_eq!(parse_name(&name.to_uppercase()), None);
        assert_eq!(parse_name("00"), None);
        assert_eq!(parse_name(&format!("{}.tmp", &name[..60])), None);
    }
}
