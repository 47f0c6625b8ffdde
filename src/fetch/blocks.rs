//! Reading indexed paths a chunk at a time: the blocks of a seekable NAR that hold a
//! chunk are fetched with one Range GET (adjacent blocks merged), each block once
//! however many readers want it, decoded (bounded by the length its signed index
//! gives), and every chunk they hold whole is stored as a blob, but only once its
//! SHA-256 matched the index's. A block that cannot be had, or decodes to other bytes,
//! fails the chunks that need it (and nothing else); the next read tries again.

use crate::disk_cache::{footprint, DiskCache};
use crate::fetch::metrics::Metrics;
use crate::fetch::pace::Priority;
use crate::fetch::retry::{Attempt, Guarded, Policy};
use crate::formats::file_index::{Block, BlockCompression, FileIndex};
use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use crate::formats::store_path::StorePath;
use crate::storage::Storage;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::io::Read;
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

    /// Every chunk of every file, by NAR offset.
    pub fn chunks(&self) -> &[ChunkAt] {
        &self.chunks
    }

    /// The blocks holding NAR bytes `[start, end)`.
    pub fn covering(&self, start: u64, end: u64) -> std::ops::Range<usize> {
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

/// Decoded NAR bytes `[start, start + nar.len())`: blocks of one run, in order.
struct Decoded {
    start: u64,
    nar: Vec<u8>,
}

/// A run under way: its result once all its blocks are decoded, and before that the
/// NAR offset up to which every chunk it holds whole has been dealt with (stored once
/// its hash matched), so a reader whose chunk is early in the run need not wait for
/// the rest.
#[derive(Clone)]
struct Run {
    done: Shared<BoxFuture<'static, Result<Arc<Decoded>, Arc<String>>>>,
    progress: tokio::sync::watch::Receiver<u64>,
}

pub struct BlockReader {
    storage: Arc<dyn Storage>,
    disk: Arc<DiskCache>,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Runs under way, under each of their blocks: `(url, block)`.
    inflight: Arc<Mutex<HashMap<(String, usize), Run>>>,
    /// Bounds runs under way (each holds its decoded blocks in memory).
    slots: Arc<tokio::sync::Semaphore>,
    /// Readers waiting, for reference prefetches to make way.
    demands: crate::fetch::pace::Demands,
    /// Chunks start-up profile replays are bringing.
    replays: crate::fetch::pending::Replays,
}

/// Runs at once: each holds at most a few blocks of at most 8 MiB decoded.
const RUNS: usize = 8;

impl BlockReader {
    pub fn new(
        storage: Arc<dyn Storage>,
        disk: Arc<DiskCache>,
        policy: Policy,
        metrics: Arc<Metrics>,
        demands: crate::fetch::pace::Demands,
    ) -> Self {
        BlockReader {
            storage,
            disk,
            policy,
            metrics,
            demands,
            replays: Default::default(),
            inflight: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(RUNS)),
        }
    }

    pub fn replays(&self) -> &crate::fetch::pending::Replays {
        &self.replays
    }

    pub(super) fn disk(&self) -> &Arc<DiskCache> {
        &self.disk
    }

    pub(super) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(super) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(super) fn policy(&self) -> Policy {
        self.policy
    }

    pub(super) fn location(&self, key: &str) -> String {
        self.storage.location(key)
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
        // a replay that brings it soon brings it no later than its block would
        self.replays.wait(&c.hash).await;
        if self.disk.has_blob(&c.hash) {
            return Ok(());
        }
        let _waits = (priority == Priority::Demand).then(|| self.demands.wait_for(&b.url));
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
        let end = c.nar_offset + c.len;
        // one run holds the whole chunk: done as soon as the run got past it
        if let [run] = &runs[..] {
            let mut progress = run.progress.clone();
            tokio::select! {
                biased;
                _ = run.done.clone() => {}
                r = progress.wait_for(|&at| at >= end) => {
                    if r.is_ok() && self.disk.has_blob(&c.hash) {
                        return Ok(());
                    }
                }
            }
        }
        let mut decoded: Vec<Arc<Decoded>> = Vec::new();
        for r in runs {
            let d = r.done.await.map_err(|e| e.to_string())?;
            if !decoded.iter().any(|x| Arc::ptr_eq(x, &d)) {
                decoded.push(d);
            }
        }
        if self.disk.has_blob(&c.hash) {
            return Ok(()); // stored by the run
        }
        // a chunk across blocks of different runs: put together here
        decoded.sort_by_key(|d| d.start);
        let mut bytes = Vec::with_capacity(c.len as usize);
        for d in &decoded {
            let from = c.nar_offset.max(d.start);
            let to = end.min(d.start + d.nar.len() as u64);
            if from < to {
                bytes.extend_from_slice(&d.nar[(from - d.start) as usize..(to - d.start) as usize]);
            }
        }
        if Sha256::digest(&bytes) != c.hash {
            return Err(format!(
                "{}: NAR bytes {}..{} (blocks {}..{} of {}) do not match their hash in the signed index",
                b.store_path,
                c.nar_offset,
                end,
                want.start,
                want.end,
                b.url
            ));
        }
        let reservation = match priority {
            Priority::Demand => self
                .disk
                .reserve_demand(footprint(c.len), self.policy.budget)
                .await
                .map_err(|e| format!("{}: {e}", b.store_path))?,
            // a prefetch holds no room a reader may wait for: it stores what fits
            Priority::Ahead | Priority::Prefetch => self.disk.no_reservation(),
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
        let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
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
            me.run(&b, range, priority, progress_tx)
                .await
                .map(Arc::new)
                .map_err(Arc::new)
        };
        let handle = tokio::spawn(work);
        let done = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Arc::new(format!("a block fetch failed: {e}"))))
        }
        .boxed()
        .shared();
        Run { done, progress }
    }

    async fn run(
        &self,
        b: &Blocks,
        range: std::ops::Range<usize>,
        priority: Priority,
        progress: tokio::sync::watch::Sender<u64>,
    ) -> Result<Decoded, String> {
        let _slot =
            crate::fetch::retry::permit(&self.slots, self.policy.budget, "block fetch slot")
                .await
                .map_err(|e| format!("{}: {e}", b.store_path))?;
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
        let blocks: Arc<[Block]> = b.blocks[range.clone()].into();
        let chunks: Arc<[ChunkAt]> = b
            .chunks_within(first.nar_offset, last.nar_offset + last.nar_len as u64)
            .into();
        let disk = self.disk.clone();
        let missing: u64 = chunks
            .iter()
            .filter(|c| !disk.has_blob(&c.hash))
            .map(|c| footprint(c.len))
            .sum();
        let reservation = match priority {
            Priority::Demand => disk
                .reserve_demand(missing, self.policy.budget)
                .await
                .map_err(|e| format!("{}: {e}", b.store_path))?,
            // a prefetch holds no room a reader may wait for: it stores what fits
            // without evicting, as it lands
            Priority::Ahead | Priority::Prefetch => disk.no_reservation(),
        };
        let writer = Arc::new(Mutex::new(disk.writer(reservation)));
        let progress = Arc::new(progress);
        let policy = self.policy;
        let (compression, store_path) = (b.compression, b.store_path.clone());
        let first_index = range.start;
        let decoded = crate::fetch::retry::run(policy, &what, |deadline| {
            let (blocks, chunks, disk, writer, progress, store_path) = (
                blocks.clone(),
                chunks.clone(),
                disk.clone(),
                writer.clone(),
                progress.clone(),
                store_path.clone(),
            );
            async move {
                let body = match self.storage.get_range(&b.url, comp_start, comp_len).await {
                    Ok(Some(body)) => body,
                    Ok(None) => return Err(Attempt::Permanent("the NAR does not exist".into())),
                    Err(e) => return Err(Attempt::Transient(e.to_string())),
                };
                // counted as requested: readers may be served before the rest arrives
                self.metrics.block_fetched(comp_len);
                let guarded = Guarded::new(body, policy.stall, deadline);
                let transport = guarded.failed.clone();
                let reader = crate::fetch::stream::read_ahead(guarded.take(comp_len));
                // decoded as the bytes come: each chunk is stored (and its readers
                // let go) as soon as it is whole and its hash matched
                tokio::task::spawn_blocking(move || {
                    let mut input = Counting {
                        inner: reader,
                        n: 0,
                    };
                    let run = Streamed {
                        compression,
                        blocks: &blocks,
                        chunks: &chunks,
                        first_index,
                        store_path: &store_path,
                        disk: &disk,
                        writer: &writer,
                        progress: &progress,
                    };
                    match run.decode(&mut input) {
                        Ok(d) => Ok(d),
                        Err(e) => {
                            // cut short by the network, or bytes that do not decode?
                            let _ = std::io::copy(&mut input, &mut std::io::sink());
                            if transport.load(std::sync::atomic::Ordering::Relaxed)
                                || input.n < comp_len
                            {
                                Err(Attempt::Transient(e))
                            } else {
                                Err(Attempt::Permanent(e))
                            }
                        }
                    }
                })
                .await
                .map_err(|e| Attempt::Permanent(e.to_string()))?
            }
        })
        .await;
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                if e.contains("the block") {
                    Metrics::inc(&self.metrics.block_refused);
                } else {
                    Metrics::inc(&self.metrics.block_failed);
                }
                tracing::error!("{e}");
                return Err(e);
            }
        };
        writer.lock().unwrap().keep();
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

/// Counts what was read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// One attempt at decoding a run's blocks from its compressed bytes as they arrive.
struct Streamed<'a> {
    compression: BlockCompression,
    blocks: &'a [Block],
    chunks: &'a [ChunkAt],
    first_index: usize,
    store_path: &'a StorePath,
    disk: &'a DiskCache,
    writer: &'a Mutex<crate::disk_cache::BlobWriter>,
    progress: &'a tokio::sync::watch::Sender<u64>,
}

impl Streamed<'_> {
    fn decode(&self, input: &mut (impl Read + Send)) -> Result<Decoded, String> {
        let start = self.blocks[0].nar_offset;
        let total: u64 = self.blocks.iter().map(|b| b.nar_len as u64).sum();
        let mut nar = Vec::with_capacity(total as usize);
        let mut next = 0; // the first chunk not dealt with yet
        let mut out_of_room = false;
        for (k, blk) in self.blocks.iter().enumerate() {
            let fault =
                |e: String| format!("{}: block {}: {e}", self.store_path, self.first_index + k);
            let block_start = nar.len();
            let mut plain = crate::fetch::decompress::block_reader(
                self.compression,
                (&mut *input).take(blk.comp_len as u64),
            )
            .map_err(fault)?
            .take(blk.nar_len as u64 + 1);
            loop {
                let at = nar.len();
                nar.resize(at + (256 << 10), 0);
                let n = match plain.read(&mut nar[at..]) {
                    Ok(n) => n,
                    Err(e) => {
                        nar.truncate(at);
                        return Err(fault(format!("the block does not decode: {e}")));
                    }
                };
                nar.truncate(at + n);
                if nar.len() - block_start > blk.nar_len as usize {
                    return Err(fault(format!(
                        "the block decodes to more than {} bytes",
                        blk.nar_len
                    )));
                }
                if n == 0 {
                    break;
                }
                // every chunk now whole: stored once its hash matched
                let decoded_to = start + nar.len() as u64;
                while let Some(c) = self.chunks.get(next) {
                    if c.nar_offset + c.len > decoded_to {
                        break;
                    }
                    next += 1;
                    if out_of_room || self.disk.has_blob(&c.hash) {
                        continue;
                    }
                    let from = (c.nar_offset - start) as usize;
                    let bytes = &nar[from..from + c.len as usize];
                    if Sha256::digest(bytes) != c.hash {
                        // the chunk's reader reports it; the others are still good
                        tracing::error!(
                            "{}: NAR bytes {}..{} decode to other bytes than the signed index says",
                            self.store_path,
                            c.nar_offset,
                            c.nar_offset + c.len
                        );
                        continue;
                    }
                    match self.writer.lock().unwrap().put(&c.hash, bytes) {
                        Ok(_) => {}
                        // a prefetch out of room: what is stored stays
                        Err(e)
                            if e.get_ref()
                                .is_some_and(|e| e.is::<crate::disk_cache::NoRoom>()) =>
                        {
                            out_of_room = true
                        }
                        Err(e) => return Err(format!("{}: {e}", self.store_path)),
                    }
                }
                self.progress.send_if_modified(|p| {
                    let newer = decoded_to > *p;
                    *p = (*p).max(decoded_to);
                    newer
                });
            }
            if nar.len() - block_start != blk.nar_len as usize {
                return Err(fault(format!(
                    "the block decodes to {} bytes, not {}",
                    nar.len() - block_start,
                    blk.nar_len
                )));
            }
        }
        Ok(Decoded { start, nar })
    }
}
