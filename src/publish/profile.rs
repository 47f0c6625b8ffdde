//! `narfs profile push`: a recorded start-up profile becomes a pack (the chunks it
//! read, in that order, as independent zstd frames) and a signed manifest next to the
//! profile's store path (docs/profiles.md). The chunks' bytes come from the cache
//! itself, each checked against its path's signed file index before it is packed.

use crate::fetch::blocks::{Blocks, ChunkAt};
use crate::formats::file_index::FileIndex;
use crate::formats::hash::Sha256;
use crate::formats::keys::{SecretKey, TrustedKeys};
use crate::formats::narinfo::{NarInfo, MAX_NARINFO_BYTES};
use crate::formats::profile::{Frame, Manifest, PackChunk, Recorded, MAX_FRAME};
use crate::formats::store_path::StorePath;
use crate::storage::{get_small, Storage, Upload};
use std::collections::HashMap;

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

/// A path's verified narinfo (and its text, to rewrite) and index.
struct Source {
    text: String,
    index: Option<(FileIndex, Blocks)>,
}

async fn source(
    storage: &dyn Storage,
    sp: &StorePath,
    trusted: &TrustedKeys,
) -> Result<Source, String> {
    let key = format!("{}.narinfo", sp.hash_part());
    let text = get_small(storage, &key, MAX_NARINFO_BYTES)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{sp}: not in the cache ({})", storage.location(&key)))?;
    let text = String::from_utf8(text).map_err(|_| format!("{key}: not UTF-8 text"))?;
    let info = NarInfo::parse(&text).map_err(|e| format!("{}: {e}", storage.location(&key)))?;
    info.verify(sp.hash_part(), trusted)
        .map_err(|e| format!("{}: {e}", storage.location(&key)))?;
    if info.store_path != *sp {
        return Err(format!("{key} describes {}, not {sp}", info.store_path));
    }
    let Some(ikey) = &info.index else {
        return Ok(Source { text, index: None });
    };
    let bytes = get_small(
        storage,
        ikey,
        crate::formats::file_index::MAX_BODY as usize + (16 << 10),
    )
    .await
    .map_err(|e| e.to_string())?;
    let index = match bytes {
        Some(b) => {
            let (index, _) =
                FileIndex::parse_verified(&b, sp, &info.nar_hash, info.nar_size, trusted)
                    .map_err(|e| format!("{}: {e}", storage.location(ikey)))?;
            let blocks = Blocks::new(&index);
            Some((index, blocks))
        }
        None => None,
    };
    Ok(Source { text, index })
}

/// The bytes of `wanted` chunks of one indexed path, fetched block by block (each
/// block once), each checked against its hash.
async fn chunk_bytes(
    storage: &dyn Storage,
    sp: &StorePath,
    index: &FileIndex,
    blocks: &Blocks,
    mut wanted: Vec<ChunkAt>,
    out: &mut HashMap<Sha256, Vec<u8>>,
) -> Result<(), String> {
    wanted.sort_by_key(|c| c.nar_offset);
    let mut decoded: HashMap<usize, Vec<u8>> = HashMap::new();
    for c in wanted {
        let range = blocks.covering(c.nar_offset, c.nar_offset + c.len);
        // blocks before this chunk are done with: the chunks come in NAR order
        decoded.retain(|&i, _| i >= range.start);
        let mut bytes = Vec::with_capacity(c.len as usize);
        for i in range {
            let b = index.blocks[i];
            if let std::collections::hash_map::Entry::Vacant(slot) = decoded.entry(i) {
                let loc = storage.location(&index.url);
                let body = storage
                    .get_range(&index.url, b.comp_offset, b.comp_len as u64)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{sp}: its NAR {loc} is missing"))?;
                let mut comp = Vec::with_capacity(b.comp_len as usize);
                tokio::io::AsyncReadExt::read_to_end(
                    &mut tokio::io::AsyncReadExt::take(body, b.comp_len as u64 + 1),
                    &mut comp,
                )
                .await
                .map_err(|e| format!("GET {loc}: {e}"))?;
                let nar =
                    crate::fetch::decompress::decode_block(index.compression, &comp, b.nar_len)
                        .map_err(|e| format!("{sp}: block {i} of {loc}: {e}"))?;
                slot.insert(nar);
            }
            let nar = &decoded[&i];
            let from = c.nar_offset.max(b.nar_offset);
            let to = (c.nar_offset + c.len).min(b.nar_offset + b.nar_len as u64);
            bytes.extend_from_slice(
                &nar[(from - b.nar_offset) as usize..(to - b.nar_offset) as usize],
            );
        }
        if Sha256::digest(&bytes) != c.hash {
            return Err(format!(
                "{sp}: NAR bytes {}..{} do not match their hash in the signed index",
                c.nar_offset,
                c.nar_offset + c.len
            ));
        }
        out.insert(c.hash, bytes);
    }
    Ok(())
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
pub async fn push(
    storage: &dyn Storage,
    record: &[Recorded],
    root: Option<StorePath>,
    key: &SecretKey,
    trusted: &TrustedKeys,
) -> Result<Pushed, String> {
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
    let mut sources = HashMap::new();
    for sp in &paths {
        match source(storage, sp, trusted).await {
            Ok(s) => {
                if s.index.is_none() && *sp != root {
                    warnings.push(format!("{sp}: no file index: its chunks are left out"));
                }
                sources.insert(sp.clone(), s);
            }
            Err(e) if *sp == root => return Err(e),
            Err(e) => warnings.push(format!("{e}: its chunks are left out")),
        }
    }
    // the chunks each index holds at the length recorded, each once
    let mut wanted: HashMap<StorePath, Vec<ChunkAt>> = HashMap::new();
    let mut kept: Vec<PackChunk> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for sp in &paths {
        let Some(Source {
            index: Some((_, blocks)),
            ..
        }) = sources.get(sp)
        else {
            continue;
        };
        let by_hash: HashMap<(Sha256, u64), ChunkAt> = blocks
            .chunks()
            .iter()
            .map(|c| ((c.hash, c.len), *c))
            .collect();
        let mut missing = 0;
        for r in record.iter().filter(|r| r.path == *sp) {
            match by_hash.get(&(r.hash, r.len)) {
                Some(c) if r.len <= MAX_FRAME => {
                    if seen.insert(r.hash) {
                        wanted.entry(sp.clone()).or_default().push(*c);
                    }
                }
                _ => missing += 1,
            }
        }
        if missing > 0 {
            warnings.push(format!(
                "{sp}: {missing} recorded chunks are not in its signed index (pushed anew since?): left out"
            ));
        }
    }
    let mut bytes: HashMap<Sha256, Vec<u8>> = HashMap::new();
    for (sp, chunks) in wanted {
        let Some(Source {
            index: Some((index, blocks)),
            ..
        }) = sources.get(&sp)
        else {
            continue;
        };
        chunk_bytes(storage, &sp, index, blocks, chunks, &mut bytes).await?;
    }
    let mut packed = std::collections::HashSet::new();
    for r in record {
        if bytes.contains_key(&r.hash) && packed.insert(r.hash) {
            kept.push(PackChunk {
                path: r.path.clone(),
                hash: r.hash,
                len: r.len,
            });
        }
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
    let text = &sources[&root].text;
    let rewritten =
        crate::publish::index::rewrite_unsigned(text, &[("NarfsProfile", manifest_key.clone())]);
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
