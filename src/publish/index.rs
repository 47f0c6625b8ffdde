//! `narfs index`: gives the paths of a cache nix wrote a seekable NAR and a signed file
//! index, without touching what Nix signed.
//!
//! Each NAR is fetched once and checked against its narinfo, which must be signed by a
//! trusted key; it is packed again as independently decodable blocks (the tree and
//! every chunk hash come from the same pass), and uploaded under its new FileHash.
//! Then the index, then the narinfo with only its unsigned fields rewritten (URL,
//! Compression, FileHash, FileSize, and the NarfsIndex line): every `Sig:` stays
//! valid, third parties' included, since Nix's fingerprint covers none of them. The
//! old NAR goes last, once no narinfo names it. A crash at any point leaves a cache
//! that Nix and narfs read: at worst an object nothing names.

use crate::formats::file_index::{BlockCompression, FileIndex};
use crate::formats::hash::Hasher;
use crate::formats::keys::{SecretKey, TrustedKeys};
use crate::formats::narinfo::{Compression, NarInfo, MAX_NARINFO_BYTES};
use crate::formats::nixbase32;
use crate::storage::{get_small, Storage, Upload};
use futures::StreamExt;
use std::io::Read;
use std::sync::Arc;

pub struct IndexOptions {
    /// Signs the indexes.
    pub key: SecretKey,
    /// Verify the narinfos (the key's own public key is trusted too).
    pub trusted: TrustedKeys,
    /// Blocks compressed with this (default: xz, or zstd for a zstd NAR).
    pub compression: Option<BlockCompression>,
    pub jobs: usize,
    pub dry_run: bool,
}

/// One path's store path and what became of it, or why it failed.
pub type Outcome = Result<(String, Done), String>;

/// Told each outcome as it comes (the hash is empty for faults of no one path).
pub type Report<'a> = &'a (dyn Fn(&str, &Outcome) + Sync);

/// What became of one path.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Indexed {
        old_url: String,
        new_url: String,
        old_size: u64,
        new_size: u64,
        blocks: usize,
    },
    /// Its index is there and verifies.
    Already,
    /// `--dry-run`: what would be done.
    WouldIndex { url: String, size: u64 },
}

/// Indexes the paths with these hash parts, `jobs` at a time; `report` gets each
/// path's outcome (or why it failed). Old NARs no narinfo names any more are removed
/// at the end. Returns how many failed.
pub async fn index(
    storage: Arc<dyn Storage>,
    hashes: Vec<String>,
    opts: &IndexOptions,
    report: Report<'_>,
) -> usize {
    let mut trusted = opts.trusted.clone();
    trusted.add(opts.key.public());
    let tmp = match tempfile::tempdir() {
        Ok(t) => Arc::new(t),
        Err(e) => {
            report("", &Err(format!("temp dir: {e}")));
            return 1;
        }
    };
    let results: Vec<(String, Outcome)> = futures::stream::iter(hashes)
        .map(|h| {
            let (storage, trusted, tmp) = (storage.clone(), trusted.clone(), tmp.clone());
            async move {
                let r = index_one(&storage, &h, &trusted, opts, tmp.path()).await;
                report(&h, &r);
                (h, r)
            }
        })
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    let replaced: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| match r {
            Ok((
                _,
                Done::Indexed {
                    old_url, new_url, ..
                },
            )) if old_url != new_url => Some(old_url.clone()),
            _ => None,
        })
        .collect();
    let indexed = results
        .iter()
        .any(|(_, r)| matches!(r, Ok((_, Done::Indexed { .. } | Done::Already))));
    if indexed && !opts.dry_run {
        if let Err(e) = crate::publish::push::mark_indexed(&*storage).await {
            report("", &Err(format!("nix-cache-info not updated: {e}")));
        }
    }
    if !replaced.is_empty() && !opts.dry_run {
        remove_unnamed(&*storage, replaced, report).await;
    }
    failed
}

/// Removes the old NARs no narinfo of the cache names any more. Only once every
/// narinfo was read: a NAR a narinfo still names is lost for good once deleted.
async fn remove_unnamed(storage: &dyn Storage, old: Vec<String>, report: Report<'_>) {
    let named = match all_urls(storage).await {
        Ok(n) => n,
        Err(e) => {
            report(
                "",
                &Err(format!(
                    "old NARs kept: not every narinfo of the cache could be read to see \
                     which still name them ({e})"
                )),
            );
            return;
        }
    };
    for url in old {
        if named.contains(&url) {
            continue;
        }
        if let Err(e) = storage.delete(&url).await {
            report("", &Err(format!("old NAR kept: {e}")));
        }
    }
}

/// Every NAR URL the cache's narinfos name, or why not all of them could be read.
async fn all_urls(storage: &dyn Storage) -> Result<std::collections::HashSet<String>, String> {
    let mut urls = std::collections::HashSet::new();
    for h in crate::storage::narinfo_hashes(storage).await? {
        let key = format!("{h}.narinfo");
        // one gone since the listing names nothing
        if let Some(b) = get_small(storage, &key, MAX_NARINFO_BYTES)
            .await
            .map_err(|e| e.to_string())?
        {
            urls.extend(crate::formats::narinfo::named_urls(&b));
        }
    }
    Ok(urls)
}

/// Indexes one path; `Ok` has its store path.
async fn index_one(
    storage: &Arc<dyn Storage>,
    hash: &str,
    trusted: &TrustedKeys,
    opts: &IndexOptions,
    tmp: &std::path::Path,
) -> Outcome {
    let narinfo_key = format!("{hash}.narinfo");
    let (text, info) = verified_narinfo(&**storage, hash, trusted).await?;
    let sp = info.store_path.to_string();
    // already indexed, and the index verifies: nothing to do
    if let Some(key) = &info.index {
        if let Ok(Some(b)) = get_small(
            &**storage,
            key,
            crate::formats::file_index::MAX_BODY as usize + (16 << 10),
        )
        .await
        {
            if let Ok((index, _)) = FileIndex::parse_verified(
                &b,
                &info.store_path,
                &info.nar_hash,
                info.nar_size,
                trusted,
            ) {
                if storage.exists(&index.url).await.unwrap_or(false) {
                    return Ok((sp, Done::Already));
                }
            }
        }
    }
    if opts.dry_run {
        return Ok((
            sp,
            Done::WouldIndex {
                url: info.url.clone(),
                size: info.file_size.unwrap_or(info.nar_size),
            },
        ));
    }
    let blocks = opts.compression.unwrap_or(match info.compression {
        Compression::Zstd => BlockCompression::Zstd,
        _ => BlockCompression::Xz,
    });
    // the NAR, once: decompressed, checked against the narinfo, packed again
    let body = storage
        .get(&info.url)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "{sp}: its NAR {} does not exist",
                storage.location(&info.url)
            )
        })?;
    let reader = crate::fetch::stream::read_ahead(body);
    let out = tempfile::NamedTempFile::new_in(tmp).map_err(|e| e.to_string())?;
    let (file, path) = out.into_parts();
    let info2 = info.clone();
    let packed = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let mut file_hash = HashingReader {
            inner: reader,
            hasher: Hasher::default(),
        };
        let (packed, w) = {
            let nar = crate::fetch::decompress::nar_reader(&info2.compression, &mut file_hash)?;
            crate::publish::seekable::pack(
                nar,
                std::io::BufWriter::with_capacity(1 << 20, file),
                blocks,
                crate::publish::seekable::DEFAULT_BLOCK_TARGET,
                None,
            )
            .map_err(|e| format!("{}: bad NAR: {e}", info2.store_path))?
        };
        std::io::copy(&mut file_hash, &mut std::io::sink()).map_err(|e| e.to_string())?;
        w.into_inner()
            .map_err(|e| e.into_error().to_string())?
            .sync_all()
            .map_err(|e| e.to_string())?;
        Ok((packed, file_hash.hasher))
    })
    .await
    .map_err(|e| e.to_string())??;
    let (packed, old_file) = packed;
    if packed.nar_hash != info.nar_hash || packed.nar_size != info.nar_size {
        return Err(format!(
            "{sp}: its NAR ({}) does not match its narinfo: NarHash {} size {}, signed {} size {}",
            storage.location(&info.url),
            packed.nar_hash,
            packed.nar_size,
            info.nar_hash,
            info.nar_size
        ));
    }
    if let (Some(size), Some(hash)) = (info.file_size, info.file_hash) {
        if old_file.len() != size || old_file.finish() != hash {
            return Err(format!(
                "{sp}: its NAR {} does not match its FileHash/FileSize",
                storage.location(&info.url)
            ));
        }
    }
    let ext = match blocks {
        BlockCompression::Xz => ".xz",
        BlockCompression::Zstd => ".zst",
        BlockCompression::None => "",
    };
    let new_url = format!("nar/{}.nar{ext}", nixbase32::encode(&packed.file_hash.0));
    let index = FileIndex {
        store_path: info.store_path.clone(),
        nar_hash: packed.nar_hash,
        nar_size: packed.nar_size,
        url: new_url.clone(),
        compression: blocks,
        file_size: packed.file_size,
        file_hash: packed.file_hash,
        chunk_shift: crate::formats::nar::DEFAULT_CHUNK_SHIFT,
        blocks: packed.blocks.clone(),
        root: packed.tree,
    };
    let index_key = crate::formats::file_index::object_key(info.store_path.hash_part());
    let e = |e: crate::storage::StorageError| e.to_string();
    // new NAR, index, narinfo; the old NAR last (by the caller). An object already
    // at the new key (from a run cut short, or planted by anyone who may write to
    // the cache) is used only if it is the packed file, byte for byte.
    let held = holds(&**storage, &new_url, packed.file_size, &packed.file_hash)
        .await
        .map_err(e)?;
    if held != Some(true) {
        if held == Some(false) {
            tracing::warn!(
                "{} is not the NAR packed for {sp} (other size or SHA-256): replacing it",
                storage.location(&new_url)
            );
        }
        storage
            .put(
                &new_url,
                Upload::File(path.to_path_buf()),
                "application/x-nix-nar",
            )
            .await
            .map_err(e)?;
        if held == Some(false)
            && holds(&**storage, &new_url, packed.file_size, &packed.file_hash)
                .await
                .map_err(e)?
                != Some(true)
        {
            return Err(format!(
                "{sp}: {} still is not the NAR packed for it after writing it again; \
                 its narinfo is left as it was",
                storage.location(&new_url)
            ));
        }
    }
    storage
        .put(
            &index_key,
            Upload::Bytes(index.to_bytes(&[&opts.key])),
            "application/octet-stream",
        )
        .await
        .map_err(e)?;
    let compression = match blocks {
        BlockCompression::Xz => "xz",
        BlockCompression::Zstd => "zstd",
        BlockCompression::None => "none",
    };
    let rewritten = rewrite_unsigned(
        &text,
        &[
            ("URL", new_url.clone()),
            ("Compression", compression.to_owned()),
            ("FileHash", packed.file_hash.to_nix_string()),
            ("FileSize", packed.file_size.to_string()),
            ("NarfsIndex", index_key),
        ],
    );
    // the rewritten narinfo must verify exactly as the old one did
    let check = NarInfo::parse(&rewritten).map_err(|e| format!("{sp}: {e}"))?;
    check
        .verify(hash, trusted)
        .map_err(|e| format!("{sp}: the rewritten narinfo does not verify: {e}"))?;
    storage
        .put(
            &narinfo_key,
            Upload::Bytes(rewritten.into_bytes()),
            "text/x-nix-narinfo",
        )
        .await
        .map_err(e)?;
    Ok((
        sp,
        Done::Indexed {
            old_url: info.url,
            new_url,
            old_size: info.file_size.unwrap_or(0),
            new_size: packed.file_size,
            blocks: packed.blocks.len(),
        },
    ))
}

/// The narinfo `<hash>.narinfo` as stored (its text, for a rewrite of its unsigned
/// lines) and parsed, verified with `trusted`. `Err` names the object and the fault.
pub async fn verified_narinfo(
    storage: &dyn Storage,
    hash: &str,
    trusted: &TrustedKeys,
) -> Result<(String, NarInfo), String> {
    let key = format!("{hash}.narinfo");
    let at = || storage.location(&key);
    let text = get_small(storage, &key, MAX_NARINFO_BYTES)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{}: no such narinfo", at()))?;
    let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8 text", at()))?;
    let info = NarInfo::parse(&text).map_err(|e| format!("{}: {e}", at()))?;
    info.verify(hash, trusted)
        .map_err(|e| format!("{}: {e}", at()))?;
    Ok((text, info))
}

/// Whether the object at `key` is `size` bytes with SHA-256 `hash` (`None`: there is
/// no such object). Streamed, and never more than `size + 1` bytes read.
async fn holds(
    storage: &dyn Storage,
    key: &str,
    size: u64,
    hash: &crate::formats::hash::Sha256,
) -> Result<Option<bool>, crate::storage::StorageError> {
    use tokio::io::AsyncReadExt;
    let Some(body) = storage.get(key).await? else {
        return Ok(None);
    };
    let mut body = body.take(size + 1);
    let mut hasher = Hasher::default();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = body
            .read(&mut buf)
            .await
            .map_err(|err| crate::storage::StorageError {
                op: "GET",
                location: storage.location(key),
                detail: err.to_string(),
            })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hasher.len() == size && hasher.finish() == *hash))
}

/// `text` with the lines of these fields set to these values (added if missing),
/// every other line as it was, `Sig:` lines included.
pub fn rewrite_unsigned(text: &str, fields: &[(&str, String)]) -> String {
    let mut out = String::new();
    let mut seen = vec![false; fields.len()];
    for line in text.lines() {
        let key = line.split_once(':').map(|(k, _)| k);
        match fields.iter().position(|(f, _)| Some(*f) == key) {
            Some(i) if !seen[i] => {
                seen[i] = true;
                out += &format!("{}: {}\n", fields[i].0, fields[i].1);
            }
            Some(_) => {} // a duplicate of a field set here: dropped
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    for (i, (f, v)) in fields.iter().enumerate() {
        if !seen[i] {
            out += &format!("{f}: {v}\n");
        }
    }
    out
}

/// Hashes what passes through (the compressed NAR, for its FileHash).
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_fields_change() {
        let text = "StorePath: /nix/store/x\nURL: nar/a.nar.bz2\nCompression: bzip2\nFileHash: sha256:a\nFileSize: 1\nNarHash: sha256:b\nNarSize: 2\nReferences: \nSystem: x86_64-linux\nSig: k:AAA\nSig: other:BBB\n";
        let out = rewrite_unsigned(
            text,
            &[
                ("URL", "nar/b.nar.xz".into()),
                ("Compression", "xz".into()),
                ("FileHash", "sha256:c".into()),
                ("FileSize", "3".into()),
                ("NarfsIndex", "x.narfs-index".into()),
            ],
        );
        assert_eq!(
            out,
            "StorePath: /nix/store/x\nURL: nar/b.nar.xz\nCompression: xz\nFileHash: sha256:c\nFileSize: 3\nNarHash: sha256:b\nNarSize: 2\nReferences: \nSystem: x86_64-linux\nSig: k:AAA\nSig: other:BBB\nNarfsIndex: x.narfs-index\n"
        );
    }
}
