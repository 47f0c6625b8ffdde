//! Replaying start-up profiles (docs/profiles.md): a pack of the chunks a program read
//! first, fetched with one Range GET and decoded as it arrives; each chunk is stored
//! only if its bytes hash to it. Readers whose chunk the pack brings soon wait for it;
//! any other reader fetches its block at once.

use super::blocks::BlockReader;
use super::metrics::Metrics;
use crate::formats::hash::Sha256;
use crate::formats::profile::Manifest;
use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    pub stored: usize,
    pub already: usize,
    /// Chunks whose bytes did not hash to the hash named (not stored): the first, and
    /// how many.
    pub mismatch: Option<String>,
    pub bytes: u64,
}

impl BlockReader {
    /// Replays frames `within` of `m`: streams those holding chunks not on disk (and,
    /// with `known`, named by a signed index) and stores each chunk whose bytes hash to
    /// the hash named (content-addressed: a blob is only ever served under a hash a
    /// signed index or NAR gave). `Err` names the store path, the pack and the fault;
    /// what was stored before it stays.
    pub async fn replay(
        self: &Arc<Self>,
        m: &Manifest,
        within: std::ops::Range<usize>,
        known: Option<&HashSet<(Sha256, u64)>>,
        starting: Option<crate::fetch::pending::Starting>,
    ) -> Result<Replayed, String> {
        let mut done = Replayed::default();
        let mut frames = Vec::with_capacity(m.frames.len());
        let (mut raw, mut comp) = (0u64, 0u64);
        for f in &m.frames {
            frames.push((raw, comp, *f));
            raw += f.raw_len;
            comp += f.comp_len;
        }
        let Some((lo, hi)) = frames.get(within.start).map(|(r, _, _)| *r).zip(
            frames
                .get(within.end.wrapping_sub(1))
                .map(|(r, _, f)| r + f.raw_len),
        ) else {
            return Ok(done);
        };
        // each chunk: where it starts in the decoded pack, and whether it is wanted:
        // whole within the frames, not on disk, and known
        let mut wanted = Vec::with_capacity(m.chunks.len());
        let mut at = 0u64;
        for c in &m.chunks {
            let inside = at >= lo && at + c.len <= hi;
            let mut want = inside && known.is_none_or(|k| k.contains(&(c.hash, c.len)));
            if want && self.disk().has_blob(&c.hash) {
                done.already += 1;
                want = false;
            }
            wanted.push((at, want));
            at += c.len;
        }
        // the frames holding a wanted chunk: chunks and frames both run in pack order,
        // so each chunk's frames are found by bisection (no chunks × frames walk)
        let starts: Vec<u64> = frames.iter().map(|(r, _, _)| *r).collect();
        let mut holds = vec![false; frames.len()];
        for (c, (start, want)) in m.chunks.iter().zip(&wanted) {
            if *want {
                let a = starts.partition_point(|&r| r <= *start).saturating_sub(1);
                let b = starts.partition_point(|&r| r < start + c.len);
                holds[a..b.max(a)].iter_mut().for_each(|h| *h = true);
            }
        }
        let (Some(first), Some(last)) = (
            within.clone().find(|&i| holds[i]),
            within.clone().rev().find(|&i| holds[i]),
        ) else {
            return Ok(done);
        };
        let (raw_start, comp_start, _) = frames[first];
        let (raw_last, comp_last, f) = frames[last];
        let (raw_end, comp_end) = (raw_last + f.raw_len, comp_last + f.comp_len);
        let (progress_tx, progress) = tokio::sync::watch::channel(raw_start);
        let _registered = self.replays().register(
            m.chunks
                .iter()
                .zip(&wanted)
                .filter(|(c, (start, want))| {
                    *want && *start >= raw_start && start + c.len <= raw_end
                })
                .map(|(c, (start, _))| (c.hash, start + c.len)),
            progress,
        );
        // its chunks are known now: readers wait for them, not for the manifest
        drop(starting);
        let what = format!("{}: profile pack {}", m.store_path, self.location(&m.pack));
        let body = match self
            .storage()
            .get_range(&m.pack, comp_start, comp_end - comp_start)
            .await
        {
            Ok(Some(b)) => b,
            Ok(None) => return Err(format!("{what}: no such object")),
            Err(e) => return Err(format!("{}: {e}", m.store_path)),
        };
        Metrics::inc(&self.metrics().profile_requests);
        self.metrics()
            .profile_bytes
            .fetch_add(comp_end - comp_start, std::sync::atomic::Ordering::Relaxed);
        let policy = self.policy();
        let guarded = crate::fetch::retry::Guarded::new(
            body,
            policy.stall,
            std::time::Instant::now() + policy.budget,
        );
        let reader = crate::fetch::stream::read_ahead(tokio::io::AsyncReadExt::take(
            guarded,
            comp_end - comp_start,
        ));
        let me = self.clone();
        let m2 = m.clone();
        let frames: Vec<_> = frames[first..=last].to_vec();
        let stored = tokio::task::spawn_blocking(move || {
            let mut input = reader;
            let mut chunk = 0usize; // the chunk being filled
            let mut buf: Vec<u8> = Vec::new();
            // stored, their bytes, the first mismatch, mismatches
            let mut out = (0usize, 0u64, None::<String>, 0usize);
            let mut out_of_room = false;
            // skip the chunks that start before the first frame fetched
            while chunk < m2.chunks.len() && wanted[chunk].0 < raw_start {
                chunk += 1;
            }
            let mut pos = raw_start;
            let mut tmp = vec![0u8; 256 << 10];
            for (k, (_, _, f)) in frames.iter().enumerate() {
                let fault = |e: String| format!("{what}: frame {}: {e}", first + k);
                let mut framed = (&mut input).take(f.comp_len);
                let mut plain = zstd::stream::read::Decoder::new(&mut framed)
                    .map_err(|e| fault(e.to_string()))?
                    .single_frame()
                    .take(f.raw_len + 1);
                let frame_end = pos + f.raw_len;
                loop {
                    let n = plain
                        .read(&mut tmp)
                        .map_err(|e| fault(format!("does not decode: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    if pos + n as u64 > frame_end {
                        return Err(fault(format!("decodes to more than {} bytes", f.raw_len)));
                    }
                    let mut bytes = &tmp[..n];
                    while !bytes.is_empty() && chunk < m2.chunks.len() {
                        let c = &m2.chunks[chunk];
                        let (start, want) = wanted[chunk];
                        if pos < start {
                            // the tail of a chunk begun before these frames
                            let skip = ((start - pos) as usize).min(bytes.len());
                            bytes = &bytes[skip..];
                            pos += skip as u64;
                            continue;
                        }
                        let need = (start + c.len - pos) as usize;
                        let take = need.min(bytes.len());
                        if want {
                            buf.extend_from_slice(&bytes[..take]);
                        }
                        bytes = &bytes[take..];
                        pos += take as u64;
                        if take < need {
                            break;
                        }
                        if want {
                            if Sha256::digest(&buf) != c.hash {
                                // not stored; the others may still be good
                                out.2.get_or_insert(format!(
                                    "{what}: the bytes named {} of {} do not hash to it",
                                    c.hash.to_nix_string(),
                                    c.path
                                ));
                                out.3 += 1;
                            } else if !out_of_room && !me.disk().has_blob(&c.hash) {
                                let mut w = me.disk().writer(me.disk().no_reservation());
                                match w.put(&c.hash, &buf) {
                                    Ok(_) => {
                                        w.keep();
                                        out.0 += 1;
                                        out.1 += c.len;
                                    }
                                    Err(e)
                                        if e.get_ref().is_some_and(|e| {
                                            e.is::<crate::disk_cache::NoRoom>()
                                        }) =>
                                    {
                                        out_of_room = true
                                    }
                                    Err(e) => return Err(format!("{}: {e}", m2.store_path)),
                                }
                            }
                            buf.clear();
                        }
                        chunk += 1;
                        progress_tx.send_replace(pos);
                    }
                }
                drop(plain);
                // whatever follows the frame inside its length: read past, so the next
                // frame starts where the manifest says
                std::io::copy(&mut framed, &mut std::io::sink())
                    .map_err(|e| fault(e.to_string()))?;
                if pos != frame_end {
                    return Err(fault(format!(
                        "decodes to {} bytes, not {}",
                        f.raw_len - (frame_end - pos),
                        f.raw_len
                    )));
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| format!("{}: the replay failed: {e}", m.store_path))?;
        match stored {
            Ok((n, bytes, mismatch, mismatched)) => {
                done.stored = n;
                done.bytes = bytes;
                done.mismatch = mismatch.map(|e| format!("{e} ({mismatched} chunks so)"));
                self.metrics()
                    .profile_chunks
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(done)
            }
            Err(e) => {
                Metrics::inc(&self.metrics().profile_refused);
                Err(e)
            }
        }
    }
}

impl super::Fetcher {
    /// The verified manifest of the start-up profile `info` names, if it names one.
    /// `Err` says why it is refused (the program then starts from blocks).
    pub async fn profile_manifest(
        &self,
        info: &crate::formats::narinfo::NarInfo,
    ) -> Result<Option<Manifest>, String> {
        let Some(key) = &info.profile else {
            return Ok(None);
        };
        let max = crate::formats::profile::MAX_MANIFEST_BYTES;
        let bytes = self
            .get_small_retrying(key, max)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{}: no such object", self.storage.location(key)))?;
        Manifest::parse_verified(&bytes, &info.store_path, &self.keys)
            .map(Some)
            .map_err(|e| {
                Metrics::inc(&self.metrics.profile_refused);
                format!("{}: {e}", self.storage.location(key))
            })
    }
}
