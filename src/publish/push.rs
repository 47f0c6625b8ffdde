//! `narfs push`: writes closures from a local Nix store to a binary cache as
//! `nix copy --to` does (NARs, `.ls` listings, signed narinfos, `nix-cache-info`).
//! Many machines' nix (Debian's 2.8 among them) cannot write to S3 at all.
//!
//! What a path is (its NarHash, references, deriver, signatures) comes from the local
//! store's own database through `nix path-info --json`; its NAR is written from the
//! files and must hash to the registered NarHash before anything is uploaded.

use crate::formats::file_index::{BlockCompression, FileIndex};
use crate::formats::hash::Sha256;
use crate::formats::keys::SecretKey;
use crate::formats::listing;
use crate::formats::narinfo::{Compression, NarInfo};
use crate::formats::nixbase32;
use crate::formats::store_path::StorePath;
use crate::storage::{Storage, Upload};
use futures::{StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One store path as the local store registered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

/// Reads `nix path-info --json` output: the list form of nix ≤ 2.18 and the object
/// form (keyed by path, `null` for invalid paths) of later versions.
pub fn parse_path_info_json(bytes: &[u8]) -> Result<Vec<PathInfo>, String> {
    use serde_json::Value;
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("nix path-info --json: {e}"))?;
    let items: Vec<(Option<String>, Value)> = match v {
        Value::Array(a) => a.into_iter().map(|x| (None, x)).collect(),
        Value::Object(o) => o.into_iter().map(|(k, x)| (Some(k), x)).collect(),
        _ => return Err("nix path-info --json: neither a list nor an object".into()),
    };
    let mut out = Vec::new();
    for (key, item) in items {
        let path = key
            .or_else(|| item.get("path").and_then(Value::as_str).map(str::to_owned))
            .ok_or("nix path-info --json: an entry without a path")?;
        if item.is_null() || item.get("valid").and_then(Value::as_bool) == Some(false) {
            return Err(format!("{path} is not valid in the local store"));
        }
        let bad = |what: &str| format!("nix path-info --json: {path}: {what}");
        let sp = |s: &str| {
            StorePath::from_absolute(s)
                .or_else(|_| StorePath::from_basename(s))
                .map_err(|e| bad(&e.to_string()))
        };
        let strings = |field: &str| -> Vec<String> {
            item.get(field)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let nar_hash = item
            .get("narHash")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no narHash"))?;
        out.push(PathInfo {
            path: sp(&path)?,
            nar_hash: Sha256::parse(nar_hash).map_err(|e| bad(&e.to_string()))?,
            nar_size: item
                .get("narSize")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("no narSize"))?,
            references: strings("references")
                .iter()
                .map(|r| sp(r))
                .collect::<Result<_, _>>()?,
            deriver: item
                .get("deriver")
                .and_then(Value::as_str)
                .map(|d| d.rsplit('/').next().unwrap_or(d).to_owned()),
            sigs: strings("signatures"),
            ca: item.get("ca").and_then(Value::as_str).map(str::to_owned),
        });
    }
    Ok(out)
}

/// The closures of `paths` in the local store `store` (a nix store URL; `None`: nix's
/// default), asked of nix itself.
pub fn query_closure(store: Option<&str>, paths: &[String]) -> Result<Vec<PathInfo>, String> {
    let mut cmd = std::process::Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
        "--recursive",
    ]);
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    cmd.arg("--").args(paths);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run nix (needed to read the local store): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nix path-info failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_path_info_json(&out.stdout)
}

/// Where the files of `/nix/store/...` are for a nix store URL: under `root` for
/// `local?root=DIR` or a plain directory (a chroot store), else in place.
pub fn store_root(store: Option<&str>) -> PathBuf {
    let Some(s) = store else {
        return PathBuf::from("/");
    };
    if s.starts_with('/') {
        return PathBuf::from(s.split('?').next().unwrap_or(s));
    }
    if let Some((_, q)) = s.split_once('?') {
        for kv in q.split('&') {
            if let Some(r) = kv.strip_prefix("root=") {
                return PathBuf::from(r);
            }
        }
    }
    PathBuf::from("/")
}

/// Paths ordered so each comes after everything it references (a cache never holds a
/// narinfo whose references it lacks), grouped in levels that can go up in parallel.
pub fn levels(infos: &[PathInfo]) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.hash_part(), i))
        .collect();
    let mut level = vec![usize::MAX; infos.len()];
    fn depth(
        i: usize,
        infos: &[PathInfo],
        index: &HashMap<&str, usize>,
        level: &mut Vec<usize>,
        seen: &mut HashSet<usize>,
    ) -> usize {
        if level[i] != usize::MAX {
            return level[i];
        }
        if !seen.insert(i) {
            return 0; // a cycle (only self-references exist in a store): ignore the edge
        }
        let mut d = 0;
        for r in &infos[i].references {
            if let Some(&j) = index.get(r.hash_part()) {
                if j != i {
                    d = d.max(depth(j, infos, index, level, seen) + 1);
                }
            }
        }
        level[i] = d;
        d
    }
    let mut seen = HashSet::new();
    for i in 0..infos.len() {
        depth(i, infos, &index, &mut level, &mut seen);
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, &l) in level.iter().enumerate() {
        if out.len() <= l {
            out.resize_with(l + 1, Vec::new);
        }
        out[l].push(i);
    }
    out
}

fn extension(c: &Compression) -> &'static str {
    match c {
        Compression::Xz => ".xz",
        Compression::Zstd => ".zst",
        Compression::Bzip2 => ".bz2",
        Compression::Br => ".br",
        Compression::Gzip => ".gz",
        _ => "",
    }
}

/// A path made ready to upload: its compressed NAR in a temp file, its listing, its
/// file index and its narinfo (index and narinfo not yet signed).
pub struct Packed {
    pub file: tempfile::TempPath,
    pub listing: Option<String>,
    pub index: Option<FileIndex>,
    pub info: NarInfo,
}

/// Writes the NAR of `info.path` (found under `root`) into a temp file in `tmp` as a
/// seekable NAR (independently decodable blocks, one ordinary compressed file), and
/// builds its file index, checking the NAR against the registered NarHash and NarSize
/// in the same pass.
pub fn pack(
    root: &Path,
    info: &PathInfo,
    c: &Compression,
    tmp: &Path,
    with_index: bool,
) -> Result<Packed, String> {
    let real = root.join(info.path.absolute().trim_start_matches('/'));
    let err = |e: io::Error| format!("{}: {e}", real.display());
    let blocks = match c {
        Compression::Xz => BlockCompression::Xz,
        Compression::Zstd => BlockCompression::Zstd,
        Compression::None => BlockCompression::None,
        other => return Err(format!("cannot compress with {}", other.as_str())),
    };
    let file =
        tempfile::NamedTempFile::new_in(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let (file, path) = file.into_parts();
    let (packed, out) = crate::publish::seekable::pack_path(
        &real,
        io::BufWriter::with_capacity(1 << 20, file),
        blocks,
        crate::publish::seekable::DEFAULT_BLOCK_TARGET,
        None,
    )?;
    out.into_inner()
        .map_err(|e| err(e.into_error()))?
        .sync_all()
        .map_err(err)?;
    if packed.nar_hash != info.nar_hash || packed.nar_size != info.nar_size {
        return Err(format!(
            "{}: the files do not match what the store registered (NarHash {} size {}, \
             registered {} size {}); run `nix store verify` on it",
            info.path, packed.nar_hash, packed.nar_size, info.nar_hash, info.nar_size
        ));
    }
    let url = format!(
        "nar/{}.nar{}",
        nixbase32::encode(&packed.file_hash.0),
        extension(c)
    );
    let index = with_index.then(|| FileIndex {
        store_path: info.path.clone(),
        nar_hash: packed.nar_hash,
        nar_size: packed.nar_size,
        url: url.clone(),
        compression: blocks,
        file_size: packed.file_size,
        file_hash: packed.file_hash,
        chunk_shift: crate::formats::nar::DEFAULT_CHUNK_SHIFT,
        blocks: packed.blocks,
        root: packed.tree.clone(),
    });
    Ok(Packed {
        file: path,
        listing: listing::to_ls_json(&packed.tree),
        info: NarInfo {
            store_path: info.path.clone(),
            url,
            compression: c.clone(),
            file_hash: Some(packed.file_hash),
            file_size: Some(packed.file_size),
            nar_hash: packed.nar_hash,
            nar_size: packed.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
            index: with_index
                .then(|| crate::formats::file_index::object_key(info.path.hash_part())),
            profile: None,
        },
        index,
    })
}

/// Adds (or renews) `key`'s signature, keeping the others.
pub fn sign(info: &mut NarInfo, key: &SecretKey) {
    let prefix = format!("{}:", key.name);
    info.sigs.retain(|s| !s.starts_with(&prefix));
    info.sigs.push(key.sign(info.fingerprint().as_bytes()));
}

pub struct PushOptions {
    pub store: Option<String>,
    pub key: Option<SecretKey>,
    pub compression: Compression,
    pub jobs: usize,
    /// Write a signed file index per path (needs `key`).
    pub index: bool,
}

/// What a push did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub pushed: usize,
    pub skipped: usize,
    pub nar_bytes: u64,
    pub uploaded_bytes: u64,
}

/// Reports progress: a bar on a terminal, a line per path otherwise.
pub trait Progress: Send + Sync {
    fn start(&self, paths: usize, bytes: u64);
    fn done(&self, path: &StorePath, nar_size: u64, file_size: u64);
    fn finish(&self);
}

pub const NIX_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

/// Packs one path and uploads its NAR (unless the cache has that NAR already) and
/// its listing; the narinfo comes later, once its references are in.
async fn upload_nar(
    storage: &dyn Storage,
    root: &Arc<PathBuf>,
    tmp: &Path,
    info: PathInfo,
    c: Compression,
    key: Option<&SecretKey>,
) -> Result<NarInfo, String> {
    let e = |e: crate::storage::StorageError| e.to_string();
    let (root, tmp_dir) = (root.clone(), tmp.to_owned());
    let with_index = key.is_some();
    let p = tokio::task::spawn_blocking(move || pack(&root, &info, &c, &tmp_dir, with_index))
        .await
        .map_err(|e| format!("packing: {e}"))??;
    if !storage.exists(&p.info.url).await.map_err(e)? {
        storage
            .put(
                &p.info.url,
                Upload::File(p.file.to_path_buf()),
                "application/x-nix-nar",
            )
            .await
            .map_err(e)?;
    }
    if let Some(ls) = &p.listing {
        let key = format!("{}.ls", p.info.store_path.hash_part());
        storage
            .put(
                &key,
                Upload::Bytes(ls.clone().into_bytes()),
                "application/json",
            )
            .await
            .map_err(e)?;
    }
    // the index before the narinfo that points at it
    if let (Some(index), Some(key)) = (&p.index, key) {
        storage
            .put(
                &crate::formats::file_index::object_key(p.info.store_path.hash_part()),
                Upload::Bytes(index.to_bytes(&[key])),
                "application/octet-stream",
            )
            .await
            .map_err(e)?;
    }
    Ok(p.info)
}

/// Writes `nix-cache-info` (if missing) with the line telling mounts the cache has
/// file indexes, or adds that line to the one there, keeping every other line.
pub async fn mark_indexed(storage: &dyn Storage) -> Result<(), String> {
    let e = |e: crate::storage::StorageError| e.to_string();
    let text = match crate::storage::get_small(storage, "nix-cache-info", 64 * 1024)
        .await
        .map_err(e)?
    {
        Some(b) => String::from_utf8(b)
            .map_err(|_| format!("{}: not UTF-8 text", storage.location("nix-cache-info")))?,
        None => NIX_CACHE_INFO.to_owned(),
    };
    if let Some(text) = crate::storage::cache_info::with_indexed_line(&text) {
        storage
            .put(
                "nix-cache-info",
                Upload::Bytes(text.into_bytes()),
                "text/x-nix-cache-info",
            )
            .await
            .map_err(e)?;
    }
    Ok(())
}

/// Pushes the closures `infos` (from `query_closure`) to `storage`.
pub async fn push(
    storage: Arc<dyn Storage>,
    infos: Vec<PathInfo>,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<Summary, String> {
    let e = |e: crate::storage::StorageError| e.to_string();
    if opts.index && opts.key.is_some() {
        mark_indexed(&*storage).await?;
    } else if !storage.exists("nix-cache-info").await.map_err(e)? {
        storage
            .put(
                "nix-cache-info",
                Upload::Bytes(NIX_CACHE_INFO.as_bytes().to_vec()),
                "text/x-nix-cache-info",
            )
            .await
            .map_err(e)?;
    }
    // what the cache already has is skipped, as nix copy does
    let present: Vec<bool> = futures::stream::iter(infos.iter())
        .map(|i| {
            let s = storage.clone();
            async move { s.exists(&format!("{}.narinfo", i.path.hash_part())).await }
        })
        .buffered(32)
        .try_collect()
        .await
        .map_err(e)?;
    let infos: Vec<PathInfo> = infos
        .into_iter()
        .zip(&present)
        .filter(|(_, &p)| !p)
        .map(|(i, _)| i)
        .collect();
    let mut summary = Summary {
        skipped: present.iter().filter(|&&p| p).count(),
        ..Summary::default()
    };
    if opts.key.is_none() && infos.iter().any(|i| i.sigs.is_empty()) {
        tracing::warn!(
            "pushing paths without any signature (no --key-file): neither narfs nor nix \
             will trust them"
        );
    }
    progress.start(infos.len(), infos.iter().map(|i| i.nar_size).sum());
    let root = Arc::new(store_root(opts.store.as_deref()));
    let tmp = Arc::new(tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?);
    // NARs and listings first, in parallel; a narinfo only once its NAR is there.
    // After a failure no new upload starts, but those under way finish (or abort)
    // rather than being dropped halfway.
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results: Vec<Result<NarInfo, String>> = futures::stream::iter(infos.iter().cloned())
        .map(|info| {
            let (root, tmp, storage) = (root.clone(), tmp.clone(), storage.clone());
            let c = opts.compression.clone();
            let failed = failed.clone();
            async move {
                if failed.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(String::new());
                }
                let key = opts.key.as_ref().filter(|_| opts.index);
                let r = upload_nar(&*storage, &root, tmp.path(), info, c, key).await;
                match &r {
                    Ok(info) => {
                        progress.done(&info.store_path, info.nar_size, info.file_size.unwrap_or(0))
                    }
                    Err(_) => failed.store(true, std::sync::atomic::Ordering::SeqCst),
                }
                r
            }
        })
        .buffered(opts.jobs.max(1))
        .collect()
        .await;
    let mut packed = Vec::new();
    let mut first_error = None;
    for r in results {
        match r {
            Ok(info) => packed.push(info),
            Err(why) if !why.is_empty() && first_error.is_none() => first_error = Some(why),
            Err(_) => {}
        }
    }
    if let Some(why) = first_error {
        return Err(why);
    }
    for info in &packed {
        summary.nar_bytes += info.nar_size;
        summary.uploaded_bytes += info.file_size.unwrap_or(0);
    }
    // narinfos after everything they reference
    let mut packed: Vec<Option<NarInfo>> = packed.into_iter().map(Some).collect();
    for level in levels(&infos) {
        let batch: Vec<NarInfo> = level.iter().filter_map(|&i| packed[i].take()).collect();
        futures::stream::iter(batch)
            .map(|mut info| {
                let storage = storage.clone();
                async move {
                    if let Some(k) = &opts.key {
                        sign(&mut info, k);
                    }
                    let key = format!("{}.narinfo", info.store_path.hash_part());
                    storage
                        .put(
                            &key,
                            Upload::Bytes(info.to_text().into_bytes()),
                            "text/x-nix-narinfo",
                        )
                        .await
                        .map_err(e)
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
    }
    summary.pushed = infos.len();
    progress.finish();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    fn sp(s: &str) -> StorePath {
        StorePath::from_basename(s).unwrap()
    }

    #[test]
    fn reads_both_path_info_forms() {
        let old = format!(
            r#"[{{"path":"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-b","narHash":"{H1}","narSize":120,"references":["/nix/store/01i3s2rvgbyv8zgcga77aa80qdgg4lx5-a"],"deriver":"/nix/store/xxh7qgvs4kgzsn8a6rb273saxyqh4jxl-b.drv","valid":true,"signatures":["k:abc"]}}]"#
        );
        let v = parse_path_info_json(old.as_bytes()).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].path, sp("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-b"));
        assert_eq!(
            v[0].references,
            vec![sp("01i3s2rvgbyv8zgcga77aa80qdgg4lx5-a")]
        );
        assert_eq!(
            v[0].deriver.as_deref(),
            Some("xxh7qgvs4kgzsn8a6rb273saxyqh4jxl-b.drv")
        );
        assert_eq!(v[0].sigs, vec!["k:abc".to_owned()]);
        let new = format!(
            r#"{{"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-b":{{"narHash":"{H1}","narSize":120,"references":[],"signatures":[]}}}}"#
        );
        let w = parse_path_info_json(new.as_bytes()).unwrap();
        assert_eq!(w[0].path, v[0].path);
        assert_eq!(w[0].nar_hash, v[0].nar_hash);
        for bad in [
            r#"{"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-b":null}"#,
            r#"[{"path":"/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-b","narSize":1}]"#,
            r#"[{"path":"/tmp/x","narHash":"sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s","narSize":1}]"#,
            "3",
            "",
        ] {
            assert!(parse_path_info_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn levels_put_references_first() {
        let info = |name: &str, refs: &[&str]| PathInfo {
            path: sp(name),
            nar_hash: Sha256::parse(H1).unwrap(),
            nar_size: 1,
            references: refs.iter().map(|r| sp(r)).collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let a = "01i3s2rvgbyv8zgcga77aa80qdgg4lx5-a";
        let b = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-b";
        let c = "8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-c";
        // c -> b -> a, c -> a, a -> a (self-reference)
        let infos = vec![info(c, &[b, a]), info(b, &[a]), info(a, &[a])];
        assert_eq!(levels(&infos), vec![vec![2], vec![1], vec![0]]);
    }

    #[test]
    fn store_roots() {
        assert_eq!(store_root(None), PathBuf::from("/"));
        assert_eq!(store_root(Some("daemon")), PathBuf::from("/"));
        assert_eq!(store_root(Some("/tmp/s")), PathBuf::from("/tmp/s"));
        assert_eq!(
            store_root(Some("local?root=/tmp/s&x=1")),
            PathBuf::from("/tmp/s")
        );
    }
}
