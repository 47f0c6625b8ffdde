//! Reading indexed paths a chunk at a time: the blocks of a seekable NAR that hold a
//! chunk are fetched with one Range GET (adjacent blocks merged), each block once
//! however many readers want it, decoded (bounded by the length its signed index
//! gives), and every chunk they hold whole is stored as a blob, but only once its
//! SHA-256 matched the index's. A block that cannot be had, or decodes to other bytes,
//! fails the chunks that need it (and nothing else); the next read tries again.

use crate::disk_cache::{footprint, DiskCache};
use crate::fetch::Priority;
use crate::formats::file_index::{Block, BlockCompression, FileIndex};
use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use crate::formats::store_path::StorePath;
use crate::metrics::Metrics;
use crate::retry::{Attempt, Guarded, Policy};
use crate::storage::Storage;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::AsyncReadExt;

/// One chunk of one file, where it lies in the NAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkAt {
    pub nar_offset: u64,
    pub len: u64,
    pub hash: Sha256,
}

/// What a mount keeps of an indexed path's index: where its compressed NAR is, its
/// blocks, and every chunk of every file by NAR offset. All of it signed.
pub struct Blocks {
    pub store_path: StorePath,
    pub url: String,
    pub compression: BlockCompression,
    pub blocks: Vec<Block>,
    chunks: Vec<ChunkAt>,
}

impl Blocks {
    pub fn new(index: &FileIndex) -> Self {
        let mut chunks = Vec::new();
        fn walk(e: &Entry, chunk: u64, out: &mut Vec<ChunkAt>) {
            match e {
                Entry::Regular {
                    size,
                    nar_offset: Some(off),
                    chunks: Some(hashes),
                    ..
                } => {
                    for (i, h) in hashes.iter().enumerate() {
                        let at = i as u64 * chunk;
                        out.push(ChunkAt {
                            nar_offset: off + at,
                            len: (size - at).min(chunk),
                            hash: *h,
                        });
                    }
                }
                Entry::Directory { entries } => {
                    entries.iter().for_each(|(_, c)| walk(c, chunk, out))
                }
                _ => {}
            }
        }
        walk(&index.root, index.chunk_size(), &mut chunks);
        // NAR order already; kept sorted for the binary searches
        chunks.sort_by_key(|c| c.nar_offset);
        Blocks {
            store_path: index.store_path.clone(),
            url: index.url.clone(),
            compression: index.compression,
            blocks: index.blocks.clone(),
            chunks,
        }
    }

    /// The blocks holding NAR bytes `[start, end)`.
    fn covering(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        let first = self
            .blocks
            .partition_point(|b| b.nar_offset + b.nar_len as u64 <= start);
        let last = self.blocks.partition_point(|b| b.nar_offset < end);
        first..last.max(first)
    }

    /// The chunks lying whole in NAR bytes `[start, end)`.
    fn chunks_within(&self, start: u64, end: u64) -> &[ChunkAt] {
        let first = self.chunks.partition_point(|c| c.nar_offset < start);
        let last = self
            .chunks
            .partition_point(|c| c.nar_offset + c.len <= end && c.nar_offset < end);
        &self.chunks[first..last.max(first)]
    }
}

/// Decoded NAR bytes of blocks `first..first + data.len()`.
struct Decoded {
    first: usize,
    data: Vec<Arc<Vec<u8>>>,
}

type Run = Shared<BoxFuture<'static, Result<Arc<Decoded>, Arc<String>>>>;

pub struct BlockReader {
    storage: Arc<dyn Storage>,
    disk: Arc<DiskCache>,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Runs under way, under each of their blocks: `(url, block)`.
    inflight: Arc<Mutex<HashMap<(String, usize), Run>>>,
    /// Bounds runs under way (each holds its decoded blocks in memory).
    slots: Arc<tokio::sync::Semaphore>,
}

/// Runs at once: each holds at most a few blocks of at most 8 MiB decoded.
const RUNS: usize = 8;

impl BlockReader {
    pub fn new(
        storage: Arc<dyn Storage>,
        disk: Arc<DiskCache>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Self {
        BlockReader {
            storage,
            disk,
            policy,
            metrics,
            inflight: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(RUNS)),
        }
    }

    /// Makes chunk `c` of `b` a blob in the disk cache (and every other chunk that
    /// lies whole in the blocks fetched for it). `Err` names the path and the fault.
    pub async fn chunk(
        self: &Arc<Self>,
        b: &Arc<Blocks>,
        c: ChunkAt,
        priority: Priority,
    ) -> Result<(), String> {
        if self.disk.has_blob(&c.hash) {
            return Ok(());
        }
        let want = b.covering(c.nar_offset, c.nar_offset + c.len);
        if want.is_empty() {
            return Err(format!(
                "{}: no block holds NAR bytes {}..{}",
                b.store_path,
                c.nar_offset,
                c.nar_offset + c.len
            ));
        }
        // join the runs under way, start runs for the blocks nobody fetches
        let runs: Vec<Run> = {
            let mut inflight = self.inflight.lock().unwrap();
            let mut runs: Vec<Run> = Vec::new();
            let mut i = want.start;
            while i < want.end {
                if let Some(r) = inflight.get(&(b.url.clone(), i)) {
                    runs.push(r.clone());
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < want.end && !inflight.contains_key(&(b.url.clone(), j)) {
                    j += 1;
                }
                let run = self.start_run(b.clone(), i..j, priority);
                for k in i..j {
                    inflight.insert((b.url.clone(), k), run.clone());
                }
                runs.push(run);
                i = j;
            }
            runs
        };
        let mut decoded: HashMap<usize, Arc<Vec<u8>>> = HashMap::new();
        for r in runs {
            let d = r.await.map_err(|e| e.to_string())?;
            for (k, data) in d.data.iter().enumerate() {
                decoded.insert(d.first + k, data.clone());
            }
        }
        if self.disk.has_blob(&c.hash) {
            return Ok(()); // stored by the run
        }
        // a chunk across blocks of different runs: put together here
        let mut bytes = Vec::with_capacity(c.len as usize);
        for k in want.clone() {
            let (blk, data) = (&b.blocks[k], &decoded[&k]);
            let from = c.nar_offset.max(blk.nar_offset) - blk.nar_offset;
            let to =
                (c.nar_offset + c.len).min(blk.nar_offset + blk.nar_len as u64) - blk.nar_offset;
            bytes.extend_from_slice(&data[from as usize..to as usize]);
        }
        if Sha256::digest(&bytes) != c.hash {
            return Err(format!(
                "{}: NAR bytes {}..{} (blocks {}..{} of {}) do not match their hash in the signed index",
                b.store_path,
                c.nar_offset,
                c.nar_offset + c.len,
                want.start,
                want.end,
                b.url
            ));
        }
        let reservation = match priority {
            Priority::Demand => self.disk.reserve_demand(footprint(c.len)).await,
            Priority::Prefetch => self
                .disk
                .reserve(footprint(c.len), false)
                .map_err(|e| e.to_string())?,
        };
        let mut w = self.disk.writer(reservation);
        w.put(&c.hash, &bytes)
            .map_err(|e| format!("{}: {e}", b.store_path))?;
        w.keep();
        Ok(())
    }

    /// Fetches blocks `range` of `b` with one Range GET, decodes them and stores the
    /// chunks lying whole in them; shared by every reader that wants one of them.
    fn start_run(
        self: &Arc<Self>,
        b: Arc<Blocks>,
        range: std::ops::Range<usize>,
        priority: Priority,
    ) -> Run {
        let me = self.clone();
        let keys: Vec<(String, usize)> = range.clone().map(|k| (b.url.clone(), k)).collect();
        let inflight = self.inflight.clone();
        let work = async move {
            // the entries go however the run ends
            struct Done(
                Arc<Mutex<HashMap<(String, usize), Run>>>,
                Vec<(String, usize)>,
            );
            impl Drop for Done {
                fn drop(&mut self) {
                    if let Ok(mut m) = self.0.lock() {
                        for k in &self.1 {
                            m.remove(k);
                        }
                    }
                }
            }
            let _done = Done(inflight, keys);
            me.run(&b, range, priority)
                .await
                .map(Arc::new)
                .map_err(Arc::new)
        };
        let handle = tokio::spawn(work);
        async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Arc::new(format!("a block fetch failed: {e}"))))
        }
        .boxed()
        .shared()
    }

    async fn run(
        &self,
        b: &Blocks,
        range: std::ops::Range<usize>,
        priority: Priority,
    ) -> Result<Decoded, String> {
        let _slot = self.slots.acquire().await;
        let (first, last) = (&b.blocks[range.start], &b.blocks[range.end - 1]);
        let comp_start = first.comp_offset;
        let comp_len = last.comp_offset + last.comp_len as u64 - comp_start;
        let what = format!(
            "{} (blocks {}..{} of {})",
            b.store_path,
            range.start,
            range.end,
            self.storage.location(&b.url)
        );
        let t0 = Instant::now();
        let policy = self.policy;
        let bytes = crate::retry::run(policy, &what, |deadline| async move {
            let body = match self.storage.get_range(&b.url, comp_start, comp_len).await {
                Ok(Some(body)) => body,
                Ok(None) => return Err(Attempt::Permanent("the NAR does not exist".into())),
                Err(e) => return Err(Attempt::Transient(e.to_string())),
            };
            let mut buf = Vec::with_capacity(comp_len as usize);
            Guarded::new(body, policy.stall, deadline)
                .take(comp_len)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| Attempt::Transient(e.to_string()))?;
            if buf.len() as u64 != comp_len {
                return Err(Attempt::Permanent(format!(
                    "{} bytes where the index has {comp_len}",
                    buf.len()
                )));
            }
            Ok(buf)
        })
        .await
        .inspect_err(|e| {
            Metrics::inc(&self.metrics.block_failed);
            tracing::error!("{e}");
        })?;
        self.metrics.block_fetched(comp_len);
        // decode each block and store the chunks lying whole in them, off the runtime
        let blocks: Vec<Block> = b.blocks[range.clone()].to_vec();
        let chunks: Vec<ChunkAt> = b
            .chunks_within(first.nar_offset, last.nar_offset + last.nar_len as u64)
            .to_vec();
        let (compression, disk, store_path) =
            (b.compression, self.disk.clone(), b.store_path.clone());
        let missing: u64 = chunks
            .iter()
            .filter(|c| !disk.has_blob(&c.hash))
            .map(|c| footprint(c.len))
            .sum();
        let reservation = match priority {
            Priority::Demand => disk.reserve_demand(missing).await,
            // a prefetch stores only what fits without evicting
            Priority::Prefetch => disk
                .reserve(missing, false)
                .unwrap_or_else(|_| disk.no_reservation()),
        };
        let first_index = range.start;
        let decoded = tokio::task::spawn_blocking(move || -> Result<Decoded, String> {
            let mut data = Vec::with_capacity(blocks.len());
            for (k, blk) in blocks.iter().enumerate() {
                let at = (blk.comp_offset - comp_start) as usize;
                let comp = &bytes[at..at + blk.comp_len as usize];
                let plain = crate::seekable::decode_block(compression, comp, blk.nar_len)
                    .map_err(|e| format!("{store_path}: block {}: {e}", first_index + k))?;
                data.push(Arc::new(plain));
            }
            let mut w = disk.writer(reservation);
            let base = blocks[0].nar_offset;
            let whole: Vec<u8>;
            // one block: no copy; several: the chunks may cross block boundaries
            let nar: &[u8] = if data.len() == 1 {
                &data[0]
            } else {
                whole = data.iter().flat_map(|d| d.iter().copied()).collect();
                &whole
            };
            for c in &chunks {
                if disk.has_blob(&c.hash) {
                    continue;
                }
                let from = (c.nar_offset - base) as usize;
                let bytes = &nar[from..from + c.len as usize];
                if Sha256::digest(bytes) != c.hash {
                    // the chunk's reader reports it; the others are still good
                    tracing::error!(
                        "{store_path}: NAR bytes {}..{} decode to other bytes than the signed index says",
                        c.nar_offset,
                        c.nar_offset + c.len
                    );
                    continue;
                }
                match w.put(&c.hash, bytes) {
                    Ok(_) => {}
                    // a prefetch out of room: what is stored stays
                    Err(e) if e.get_ref().is_some_and(|e| e.is::<crate::disk_cache::NoRoom>()) => break,
                    Err(e) => return Err(format!("{store_path}: {e}")),
                }
            }
            w.keep();
            Ok(Decoded {
                first: first_index,
                data,
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .inspect_err(|e| {
            Metrics::inc(&self.metrics.block_refused);
            tracing::error!("{e}");
        })?;
        tracing::debug!(
            path = %b.store_path,
            blocks = range.len(),
            bytes = comp_len,
            ms = t0.elapsed().as_millis() as u64,
            "fetched and decoded blocks"
        );
        Ok(decoded)
    }
}
