//! `narfs profile push`: a recorded start-up profile becomes a pack (the chunks it
//! read, in that order, as independent zstd frames) and a signed manifest next to the
//! profile's store path (docs/profiles.md). The chunks' bytes come from the cache
//! itself, through the read side's fetcher (narinfos, indexes and blocks verified as a
//! mount verifies them).

use crate::fetch::blocks::{Blocks, ChunkAt};
use crate::fetch::pace::Priority;
use crate::fetch::{Fetcher, Lookup};
use crate::formats::hash::Sha256;
use crate::formats::keys::{SecretKey, TrustedKeys};
use crate::formats::narinfo::NarInfo;
use crate::formats::profile::{Frame, Manifest, PackChunk, Recorded, MAX_FRAME};
use crate::formats::store_path::StorePath;
use crate::storage::Upload;
use std::collections::HashMap;
use std::sync::Arc;

/// A frame is cut after the chunk that brings it to this many bytes: small enough
/// that a replay skips what is already on disk, large enough to compress well.
const FRAME_TARGET: usize = 256 << 10;
/// zstd's level for packs: written once, read by every cold start.
const LEVEL: i32 = 19;

pub struct Pushed {
    pub manifest_key: String,
    pub pack_key: String,
    pub chunks: usize,
    pub raw_bytes: u64,
    pub pack_bytes: u64,
    pub manifest_bytes: u64,
    /// What was left out, and why (one line each).
    pub warnings: Vec<String>,
}

/// The verified block tables of the record's paths, by path; paths that are not in the
/// cache, not trusted or not indexed are left out with a warning (the root must be in
/// the cache).
async fn indexed_paths(
    fetcher: &Arc<Fetcher>,
    paths: &[StorePath],
    root: &StorePath,
    warnings: &mut Vec<String>,
) -> Result<HashMap<StorePath, Arc<Blocks>>, String> {
    let mut out = HashMap::new();
    for sp in paths {
        let info = match fetcher.narinfo(sp.hash_part()).await {
            Ok(Lookup::Found(i)) if i.store_path == *sp => i,
            Ok(_) if sp == root => return Err(format!("{sp}: not in the cache or not trusted")),
            Err(e) if sp == root => return Err(format!("{sp}: {e}")),
            _ => {
                warnings.push(format!(
                    "{sp}: not in the cache or not trusted: its chunks are left out"
                ));
                continue;
            }
        };
        match fetcher.file_index(info).await {
            Ok(Some(index)) => {
                out.insert(sp.clone(), Arc::new(Blocks::new(&index)));
            }
            _ if sp == root => {}
            _ => warnings.push(format!("{sp}: no file index: its chunks are left out")),
        }
    }
    Ok(out)
}

/// Chunk `c`'s bytes, fetched through its blocks into the fetcher's disk cache (checked
/// against its hash there) and read back.
async fn chunk_bytes(
    fetcher: &Arc<Fetcher>,
    b: &Arc<Blocks>,
    c: ChunkAt,
) -> Result<Vec<u8>, String> {
    fetcher.blocks().chunk(b, c, Priority::Demand).await?;
    let mut bytes = Vec::with_capacity(c.len as usize);
    fetcher
        .disk()
        .open_blob(&c.hash)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut bytes))
        .map_err(|e| format!("{}: {e}", b.store_path))?;
    Ok(bytes)
}

/// The pack of `chunks` (in order) and its frames.
fn pack(chunks: &[(PackChunk, &[u8])]) -> Result<(Vec<u8>, Vec<Frame>), String> {
    let mut out = Vec::new();
    let mut frames = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut flush = |cur: &mut Vec<u8>, out: &mut Vec<u8>| -> Result<(), String> {
        if cur.is_empty() {
            return Ok(());
        }
        let z = zstd::bulk::compress(cur, LEVEL).map_err(|e| format!("zstd: {e}"))?;
        frames.push(Frame {
            comp_len: z.len() as u64,
            raw_len: cur.len() as u64,
        });
        out.extend_from_slice(&z);
        cur.clear();
        Ok(())
    };
    for (_, bytes) in chunks {
        if cur.len() + bytes.len() > MAX_FRAME as usize {
            flush(&mut cur, &mut out)?;
        }
        cur.extend_from_slice(bytes);
        if cur.len() >= FRAME_TARGET {
            flush(&mut cur, &mut out)?;
        }
    }
    flush(&mut cur, &mut out)?;
    Ok((out, frames))
}

/// Pushes the profile `record` for `root` (by default the first path recorded).
/// `fetcher` verifies with `trusted` and stores what it fetches in a scratch disk cache.
pub async fn push(
    fetcher: &Arc<Fetcher>,
    record: &[Recorded],
    root: Option<StorePath>,
    key: &SecretKey,
    trusted: &TrustedKeys,
) -> Result<Pushed, String> {
    let storage = &**fetcher.storage();
    let root = root
        .or_else(|| record.first().map(|r| r.path.clone()))
        .ok_or("the record holds no chunk: nothing to push")?;
    let mut warnings = Vec::new();
    // every path of the record, verified, in the order they were first read
    let mut paths: Vec<StorePath> = Vec::new();
    for r in record {
        if !paths.contains(&r.path) {
            paths.push(r.path.clone());
        }
    }
    if !paths.contains(&root) {
        paths.insert(0, root.clone());
    }
    let indexed = indexed_paths(fetcher, &paths, &root, &mut warnings).await?;
    // the chunks each index holds at the length recorded, each once, in record order
    let mut kept: Vec<PackChunk> = Vec::new();
    let mut bytes: HashMap<Sha256, Vec<u8>> = HashMap::new();
    let mut missing: HashMap<&StorePath, usize> = HashMap::new();
    let by_hash: HashMap<(Sha256, u64), (&StorePath, ChunkAt)> = indexed
        .iter()
        .flat_map(|(sp, b)| b.chunks().iter().map(move |c| ((c.hash, c.len), (sp, *c))))
        .collect();
    for r in record {
        if !indexed.contains_key(&r.path) || bytes.contains_key(&r.hash) {
            continue;
        }
        match by_hash.get(&(r.hash, r.len)) {
            Some((sp, c)) if r.len <= MAX_FRAME => {
                bytes.insert(r.hash, chunk_bytes(fetcher, &indexed[*sp], *c).await?);
                kept.push(PackChunk {
                    path: r.path.clone(),
                    hash: r.hash,
                    len: r.len,
                });
            }
            _ => *missing.entry(&r.path).or_default() += 1,
        }
    }
    for (sp, n) in missing {
        warnings.push(format!(
            "{sp}: {n} recorded chunks are not in its signed index (pushed anew since?): left out"
        ));
    }
    if kept.is_empty() {
        return Err(format!(
            "no recorded chunk lies in an indexed path of the cache: nothing to push for {root}"
        ));
    }
    let ordered: Vec<(PackChunk, &[u8])> = kept
        .iter()
        .map(|c| (c.clone(), bytes[&c.hash].as_slice()))
        .collect();
    let (pack_bytes, frames) = tokio::task::block_in_place(|| pack(&ordered))?;
    let pack_key = format!(
        "profile/{}.pack.zst",
        crate::formats::nixbase32::encode(&Sha256::digest(&pack_bytes).0)
    );
    let manifest = Manifest {
        store_path: root.clone(),
        pack: pack_key.clone(),
        pack_size: pack_bytes.len() as u64,
        frames,
        chunks: kept,
    };
    let manifest_bytes = manifest.to_bytes(&[key]);
    let manifest_key = Manifest::object_key(&root);
    let raw_bytes = manifest.chunks.iter().map(|c| c.len).sum();
    let (pack_len, manifest_len) = (pack_bytes.len() as u64, manifest_bytes.len() as u64);
    for (k, b) in [(&pack_key, pack_bytes), (&manifest_key, manifest_bytes)] {
        storage
            .put(k, Upload::Bytes(b), "application/octet-stream")
            .await
            .map_err(|e| e.to_string())?;
    }
    // the narinfo names the manifest: every other line as it was
    let (text, _) =
        crate::publish::index::verified_narinfo(storage, root.hash_part(), trusted).await?;
    let rewritten =
        crate::publish::index::rewrite_unsigned(&text, &[("NarfsProfile", manifest_key.clone())]);
    let check = NarInfo::parse(&rewritten).map_err(|e| format!("{root}: {e}"))?;
    check
        .verify(root.hash_part(), trusted)
        .map_err(|e| format!("{root}: the rewritten narinfo does not verify: {e}"))?;
    storage
        .put(
            &format!("{}.narinfo", root.hash_part()),
            Upload::Bytes(rewritten.into_bytes()),
            "text/x-nix-narinfo",
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(Pushed {
        manifest_key,
        pack_key,
        chunks: manifest.chunks.len(),
        raw_bytes,
        pack_bytes: pack_len,
        manifest_bytes: manifest_len,
        warnings,
    })
}
