//! The records kept beside the blobs: trees of verified NARs, file indexes and narinfo
//! records, each written to a temp file and renamed, each checked again when read.

use super::secure::{read_bytes_nofollow, read_nofollow, real_dir, write_new};
use super::DiskCache;
use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

impl DiskCache {
    // ---- trees

    fn tree_path(&self, nar_hash: &Sha256) -> PathBuf {
        let h = nar_hash.to_nix_string();
        self.dir.join("trees").join(&h[7..])
    }

    /// Keeps the tree of a verified NAR (or index), with its chunk hashes.
    pub fn save_tree(&self, nar_hash: &Sha256, tree: &Entry, nar_size: u64) -> io::Result<()> {
        let bytes = crate::formats::file_index::encode_tree(
            tree,
            nar_size,
            crate::formats::nar::DEFAULT_CHUNK_SHIFT,
        );
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!("tree.{n}"));
        write_new(&tmp, &bytes, &self.tree_path(nar_hash))
    }

    /// The tree kept for NarHash `nar_hash`, if any (and sound).
    pub fn load_tree(&self, nar_hash: &Sha256, nar_size: u64) -> Option<Entry> {
        let bytes = read_bytes_nofollow(
            &self.tree_path(nar_hash),
            crate::formats::file_index::MAX_BODY * 4,
        )
        .ok()?;
        match crate::formats::file_index::decode_tree(&bytes) {
            Ok((tree, size, shift))
                if size == nar_size && shift == crate::formats::nar::DEFAULT_CHUNK_SHIFT =>
            {
                Some(tree)
            }
            _ => {
                tracing::warn!(
                    "ignoring the tree record of NAR {} in the cache directory",
                    nar_hash.to_nix_string()
                );
                None
            }
        }
    }

    // ---- file indexes

    fn index_path(&self, hash_part: &str) -> PathBuf {
        self.dir
            .join("indexes")
            .join(format!("{hash_part}.narfs-index"))
    }

    /// Keeps a verified file index (it is verified again whenever read back).
    pub fn save_index(&self, hash_part: &str, bytes: &[u8]) -> io::Result<()> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!("index.{n}"));
        write_new(&tmp, bytes, &self.index_path(hash_part))
    }

    pub fn load_index(&self, hash_part: &str) -> Option<Vec<u8>> {
        read_bytes_nofollow(
            &self.index_path(hash_part),
            crate::formats::file_index::MAX_BODY + (16 << 10) + 1,
        )
        .ok()
    }

    pub fn has_index(&self, hash_part: &str) -> bool {
        fs::symlink_metadata(self.index_path(hash_part)).is_ok()
    }

    pub fn drop_index(&self, hash_part: &str) {
        let _ = fs::remove_file(self.index_path(hash_part));
    }

    // ---- narinfo records

    /// Verified narinfos are filed under the id of the key that verified them, so a
    /// remount looks only at what its own keys verified (and verifies it again).
    fn narinfo_path(&self, key_id: &str, hash_part: &str) -> PathBuf {
        self.dir
            .join("narinfo")
            .join(key_id)
            .join(format!("{hash_part}.narinfo"))
    }

    /// Keeps a verified narinfo so a remount needs no GET for it. Written to a temp
    /// file and renamed. Not flushed (a listing writes thousands): a record torn by a
    /// power cut fails verification on load and is fetched again.
    pub fn save_narinfo(&self, key_id: &str, hash_part: &str, text: &str) -> io::Result<()> {
        let dest = self.narinfo_path(key_id, hash_part);
        real_dir(dest.parent().expect("in narinfo/"))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        write_new(
            &dest.with_file_name(format!(".{hash_part}.{n}.tmp")),
            text.as_bytes(),
            &dest,
        )
    }

    pub fn load_narinfo(&self, key_id: &str, hash_part: &str) -> Option<String> {
        read_nofollow(&self.narinfo_path(key_id, hash_part)).ok()
    }

    /// The hash parts of the narinfos verified by key `key_id` (names only: a remount
    /// of a huge cache reads and checks the records on every core, see
    /// `Fetcher::verified_on_disk`).
    pub fn narinfo_hashes(&self, key_id: &str) -> Vec<String> {
        let dir = self.dir.join("narinfo").join(key_id);
        let Ok(rd) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".narinfo").map(str::to_owned)
            })
            .collect()
    }
}
