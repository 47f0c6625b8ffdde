//! Fetch and verify: narinfos (signature and StorePath) and NARs (stream → decompress →
//! NarHash/NarSize check ∥ unpack into a temp dir → rename). Nothing reaches the disk
//! cache's `store/` unless every check passed; each object is fetched once however many
//! callers wait for it.

pub mod blocks;
pub mod decompress;
pub mod metrics;
pub mod pace;
pub mod retry;
pub mod singleflight;

use crate::disk_cache::DiskCache;
use crate::fetch::metrics::Metrics;
use crate::fetch::retry::{Attempt, Guarded, Policy};
use crate::fetch::singleflight::SingleFlight;
use crate::formats::file_index::FileIndex;
use crate::formats::hash::{Hasher, Sha256};
use crate::formats::keys::TrustedKeys;
use crate::formats::listing::{parse_ls_reader, Entry, MAX_LISTING_BYTES};
use crate::formats::nar;
use crate::formats::narinfo::{Compression, NarInfo, MAX_NARINFO_BYTES};
use crate::formats::store_path::StorePath;
use crate::storage::{Storage, StorageError};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A prefetch that would have had to evict other paths: skipped.
    #[error(transparent)]
    NoRoom(#[from] crate::disk_cache::NoRoom),
    /// A reader waited its whole time budget for a slot or for room that other fetches
    /// held: nothing is wrong with the path, the next access tries afresh.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Other(String),
}

/// Who wants a NAR: a reader waiting for it; a traversal about to read it (it looked
/// into the path); or reference prefetch guessing it will be wanted, which makes way
/// for readers (see `pace`). Only a reader may evict anything from the disk cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Ahead,
    Prefetch,
}

impl From<String> for FetchError {
    fn from(s: String) -> Self {
        FetchError::Other(s)
    }
}

/// A path's verified contents, unpacked in the disk cache.
#[derive(Debug)]
pub struct Content {
    pub tree: Arc<Entry>,
    pub nar_hash: Sha256,
}

/// The answer to "does the cache hold this store path?".
#[derive(Clone, Debug)]
pub enum Lookup {
    Found(Arc<NarInfo>),
    /// No narinfo: remembered for the negative TTL.
    Missing,
    /// A narinfo that must not be served (the reason was logged). Not remembered, so
    /// a repaired one is picked up by the next access.
    Rejected,
}

/// Listings fetched and parsed at once.
const LISTING_SLOTS: usize = 4;
/// Narinfos fetched at once (64 MiB of buffers at most).
const NARINFO_SLOTS: usize = 64;
/// Missing store paths remembered (about 100 bytes each).
const NEGATIVE_ENTRIES: usize = 65_536;

pub struct Fetcher {
    storage: Arc<dyn Storage>,
    keys: TrustedKeys,
    key_ids: Vec<String>,
    disk: Arc<DiskCache>,
    narinfos: SingleFlight<String, Lookup, FetchError>,
    listings: SingleFlight<String, Option<Arc<Entry>>, FetchError>,
    indexes: SingleFlight<String, Option<Arc<FileIndex>>, FetchError>,
    blocks: std::sync::OnceLock<Arc<crate::fetch::blocks::BlockReader>>,
    nars: SingleFlight<String, Arc<Content>, FetchError>,
    /// Missing narinfos by hash, least recently asked first out: bounded however
    /// many names mount users look up.
    negative: Mutex<lru::LruCache<String, Instant>>,
    negative_ttl: Duration,
    policy: Policy,
    /// Bounds parallel NAR downloads (`--jobs`).
    downloads: Arc<tokio::sync::Semaphore>,
    /// Bounds listings fetched and parsed at once: each may hold up to
    /// `MAX_LISTING_BYTES` and its tree in memory.
    listing_slots: tokio::sync::Semaphore,
    /// Bounds narinfos fetched at once: each may buffer up to `MAX_NARINFO_BYTES`.
    narinfo_slots: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
    /// File index bytes asked for together with the narinfo that will name them (a
    /// store path looked up is about to be looked into), by hash: one round trip
    /// instead of two. Unverified until that narinfo arrives; bounded.
    speculated: Mutex<lru::LruCache<String, SpeculatedIndex>>,
    /// Bounds speculative index fetches (each may buffer `SPECULATED_BYTES`): a flood
    /// of lookups skips speculating rather than wait or buffer without limit.
    speculation_slots: Arc<tokio::sync::Semaphore>,
    /// Readers waiting for the network, for reference prefetches to make way.
    demands: crate::fetch::pace::Demands,
    /// KiB of file index bodies being read and parsed at once (see `get_index`).
    index_bytes: Arc<tokio::sync::Semaphore>,
    /// The cache's `nix-cache-info` says `NarfsIndexes: 1`: only then is a path's
    /// index asked for before its narinfo named one.
    indexes_announced: bool,
}

type SpeculatedIndex =
    futures::future::Shared<futures::future::BoxFuture<'static, Option<Vec<u8>>>>;

/// File index bodies read and parsed at once, at most (KiB; one body may take up to
/// `MAX_BODY`, 64 MiB).
const INDEX_KIB: usize = 96 << 10;

/// Indexes fetched ahead of their narinfo, at most.
const SPECULATED: usize = 64;
/// Speculative index fetches at once, at most.
const SPECULATION_SLOTS: usize = 16;
/// A speculated index larger than this is dropped and fetched again once its narinfo
/// verified (big indexes are rare; unverified bytes stay small).
const SPECULATED_BYTES: usize = 1 << 20;

impl Fetcher {
    pub fn new(
        storage: Arc<dyn Storage>,
        keys: TrustedKeys,
        disk: Arc<DiskCache>,
        negative_ttl: Duration,
    ) -> Self {
        Fetcher {
            key_ids: keys.iter().map(|k| k.id()).collect(),
            storage,
            keys,
            disk,
            narinfos: SingleFlight::default(),
            listings: SingleFlight::default(),
            indexes: SingleFlight::default(),
            blocks: std::sync::OnceLock::new(),
            nars: SingleFlight::default(),
            negative: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(NEGATIVE_ENTRIES).expect("non-zero"),
            )),
            negative_ttl,
            policy: Policy::default(),
            downloads: Arc::new(tokio::sync::Semaphore::new(4)),
            listing_slots: tokio::sync::Semaphore::new(LISTING_SLOTS),
            narinfo_slots: tokio::sync::Semaphore::new(NARINFO_SLOTS),
            metrics: Arc::default(),
            speculated: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(SPECULATED).expect("non-zero"),
            )),
            speculation_slots: Arc::new(tokio::sync::Semaphore::new(SPECULATION_SLOTS)),
            demands: Default::default(),
            index_bytes: Arc::new(tokio::sync::Semaphore::new(INDEX_KIB)),
            indexes_announced: false,
        }
    }

    pub fn with_jobs(mut self, jobs: usize) -> Self {
        self.downloads = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
        self
    }

    /// Whether the cache announces file indexes (see `indexes_announced`).
    pub fn with_indexes_announced(mut self, announced: bool) -> Self {
        self.indexes_announced = announced;
        self
    }

    /// The time budget of one fetch (all retries included) and the longest stall.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// A small object, whole (at most `max + 1` bytes), with retries; `Ok(None)` if it
    /// does not exist.
    async fn get_small_retrying(
        &self,
        key: &str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, FetchError> {
        let policy = self.policy;
        crate::fetch::retry::run(policy, &self.storage.location(key), |deadline| async move {
            let body = match self.storage.get(key).await {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(None),
                Err(e) => return Err(Attempt::Transient(e.to_string())),
            };
            let mut buf = Vec::new();
            Guarded::new(body, policy.stall, deadline)
                .take(max as u64 + 1)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| {
                    Attempt::Transient(format!("GET {}: {e}", self.storage.location(key)))
                })?;
            // More than `max` bytes come back as `max + 1`: the parser refuses them.
            Ok(Some(buf))
        })
        .await
        .map_err(FetchError::Other)
    }

    /// A file index object, read header first: a header that is not signed for this
    /// path by a trusted key ends the download after at most `MAX_HEADER_BYTES` (the
    /// bytes so far are returned, and refused by `verify_index` with the reason); a
    /// signed one says how large the body is, and the body is read only once that much
    /// of the bytes budget of all index fetches together is held. The permit goes
    /// with the bytes: it is held until they are parsed.
    async fn get_index(
        &self,
        key: &str,
        info: &NarInfo,
    ) -> Result<Option<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>)>, FetchError> {
        use crate::formats::file_index::{header_len, verify_header, MAX_HEADER_BYTES};
        let policy = self.policy;
        crate::fetch::retry::run(policy, &self.storage.location(key), |deadline| async move {
            let body = match self.storage.get(key).await {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(None),
                Err(e) => return Err(Attempt::Transient(e.to_string())),
            };
            let failed = |e: std::io::Error| {
                Attempt::Transient(format!("GET {}: {e}", self.storage.location(key)))
            };
            let mut body = Guarded::new(body, policy.stall, deadline);
            let mut buf = Vec::with_capacity(4096);
            let len = loop {
                if let Some(len) = header_len(&buf) {
                    break len;
                }
                if buf.len() >= MAX_HEADER_BYTES {
                    return Ok(Some((buf, None)));
                }
                let mut chunk = [0u8; 4096];
                let want = chunk.len().min(MAX_HEADER_BYTES - buf.len());
                match body.read(&mut chunk[..want]).await.map_err(failed)? {
                    0 => return Ok(Some((buf, None))),
                    n => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let Ok(h) = verify_header(
                &buf[..len],
                &info.store_path,
                &info.nar_hash,
                info.nar_size,
                &self.keys,
            ) else {
                return Ok(Some((buf, None)));
            };
            let kib = (h.body_size.div_ceil(1024) as u32).max(1);
            let permit = tokio::time::timeout(
                policy.budget,
                self.index_bytes.clone().acquire_many_owned(kib),
            )
            .await
            .map_err(|_| {
                Attempt::Permanent(format!(
                    "file indexes of other paths held the memory for {:?} (--timeout)",
                    policy.budget
                ))
            })?
            .map_err(|e| Attempt::Permanent(e.to_string()))?;
            let want = len as u64 + h.body_size;
            buf.reserve_exact((want as usize).saturating_sub(buf.len()));
            (&mut body)
                .take((want + 1).saturating_sub(buf.len() as u64))
                .read_to_end(&mut buf)
                .await
                .map_err(failed)?;
            Ok(Some((buf, Some(permit))))
        })
        .await
        .map_err(FetchError::Other)
    }

    /// Reads chunks of indexed paths (with this fetcher's storage, disk cache, time
    /// budget and metrics).
    pub fn blocks(&self) -> &Arc<crate::fetch::blocks::BlockReader> {
        self.blocks.get_or_init(|| {
            Arc::new(crate::fetch::blocks::BlockReader::new(
                self.storage.clone(),
                self.disk.clone(),
                self.policy,
                self.metrics.clone(),
                self.demands.clone(),
            ))
        })
    }

    /// The path's file index, if its narinfo names one and it verifies (trusted key,
    /// this store path, the narinfo's NarHash and NarSize, a sound body); anything
    /// else is ignored with a warning naming the path and the fault, and the path is
    /// read as it would be without. A verified index is kept in the disk cache and
    /// verified again when read back.
    pub async fn file_index(
        self: &Arc<Self>,
        info: Arc<NarInfo>,
    ) -> Result<Option<Arc<FileIndex>>, Arc<FetchError>> {
        let Some(key) = info.index.clone() else {
            return Ok(None);
        };
        let me = self.clone();
        self.indexes
            .run(info.store_path.hash_part().to_owned(), move || async move {
                let hash = info.store_path.hash_part().to_owned();
                let t0 = Instant::now();
                // one kept by an earlier mount, verified again with the keys trusted now
                let disk = me.disk.clone();
                let h = hash.clone();
                let kept = tokio::task::spawn_blocking(move || disk.load_index(&h))
                    .await
                    .map_err(|e| FetchError::Other(e.to_string()))?;
                if let Some(bytes) = kept {
                    match me.verify_index(&info, bytes).await? {
                        Ok((index, _)) => return Ok(Some(Arc::new(index))),
                        Err(e) => {
                            tracing::warn!("dropping the kept file index of {}: {e}", info.store_path);
                            me.disk.drop_index(&hash);
                        }
                    }
                }
                // asked for with the narinfo, if it is where that narinfo says
                let speculated = me.speculated.lock().unwrap().pop(&hash);
                let early = match speculated {
                    Some(f) if key == crate::formats::file_index::object_key(&hash) => f.await,
                    _ => None,
                };
                let got = match early {
                    Some(b) => Ok(Some((b, None))),
                    None => me.get_index(&key, &info).await,
                };
                let (bytes, _permit) = match got {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        tracing::warn!(
                            "{}: its narinfo names file index {}, which the cache does not have; reading its NAR instead",
                            info.store_path,
                            me.storage.location(&key)
                        );
                        return Ok(None);
                    }
                    Err(e) => {
                        tracing::warn!("{}: file index: {e}; reading its NAR instead", info.store_path);
                        return Ok(None);
                    }
                };
                let size = bytes.len();
                match me.verify_index(&info, bytes).await? {
                    Ok((index, bytes)) => {
                        Metrics::inc(&me.metrics.index_fetched);
                        tracing::debug!(path = %info.store_path, bytes = size, ms = t0.elapsed().as_millis() as u64, "file index verified");
                        if let Err(e) = me.disk.save_index(&hash, &bytes) {
                            tracing::warn!("cannot keep the file index of {}: {e}", info.store_path);
                        }
                        Ok(Some(Arc::new(index)))
                    }
                    Err(e) => {
                        Metrics::inc(&me.metrics.index_refused);
                        tracing::warn!(
                            "ignoring the file index {} of {}: {e}; reading its NAR instead",
                            me.storage.location(&key),
                            info.store_path
                        );
                        Ok(None)
                    }
                }
            })
            .await
    }

    /// The path's file index fetched from the cache (not the disk cache) and verified,
    /// for `narfs verify`: unlike [`Self::file_index`], a fault is an error.
    pub async fn check_file_index(&self, info: &Arc<NarInfo>) -> Result<Option<FileIndex>, String> {
        let Some(key) = &info.index else {
            return Ok(None);
        };
        let where_ = self.storage.location(key);
        let (bytes, _permit) = self
            .get_index(key, info)
            .await
            .map_err(|e| format!("file index {where_}: {e}"))?
            .ok_or_else(|| {
                format!("file index {where_}: the narinfo names it, the cache does not have it")
            })?;
        match self.verify_index(info, bytes).await {
            Ok(Ok((index, _))) => Ok(Some(index)),
            Ok(Err(e)) => Err(format!("file index {where_}: {e}")),
            Err(e) => Err(format!("file index {where_}: {e}")),
        }
    }

    /// Parses and verifies an index (off the runtime: a big one takes a while).
    async fn verify_index(
        &self,
        info: &Arc<NarInfo>,
        bytes: Vec<u8>,
    ) -> Result<Result<(FileIndex, Vec<u8>), crate::formats::file_index::IndexError>, FetchError>
    {
        let keys = self.keys.clone();
        let info = info.clone();
        tokio::task::spawn_blocking(move || {
            FileIndex::parse_verified(
                &bytes,
                &info.store_path,
                &info.nar_hash,
                info.nar_size,
                &keys,
            )
            .map(|(index, _)| (index, bytes))
        })
        .await
        .map_err(|e| FetchError::Other(e.to_string()))
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The time budget of one fetch (`--timeout`), which also bounds every wait of a
    /// reader.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn disk(&self) -> &Arc<DiskCache> {
        &self.disk
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A narinfo record from the cache directory, verified again exactly as a fetched
    /// one (signature by a key trusted now, StorePath of `hash`, every field): a
    /// record planted there, torn by a crash or left by a mount that trusted other
    /// keys is dropped with a warning.
    fn parse_kept(&self, hash: &str, text: &str) -> Option<Arc<NarInfo>> {
        let checked = NarInfo::parse(text)
            .map_err(|e| e.to_string())
            .and_then(|i| {
                i.verify(hash, &self.keys)
                    .map(|_| i)
                    .map_err(|e| e.to_string())
            });
        match checked {
            Ok(info) => Some(Arc::new(info.compact())),
            Err(e) => {
                tracing::warn!(
                    "ignoring the narinfo record of {hash} in the cache directory {}: {e}",
                    self.disk.root().display()
                );
                None
            }
        }
    }

    /// Calls `f` with each store path earlier mounts verified, verified again with the
    /// keys trusted now: the root listing is ready from disk before the cache is
    /// listed again. Records are read and checked in batches (a remount of a huge cache
    /// does not hold them all), each batch on every core (a signature costs tens of
    /// microseconds, and so does reading a small file).
    pub fn verified_on_disk(&self, mut f: impl FnMut(&StorePath)) -> usize {
        const BATCH: usize = 8192;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut n = 0;
        for id in &self.key_ids {
            for batch in self.disk.narinfo_hashes(id).chunks(BATCH) {
                let chunk = batch.len().div_ceil(threads).max(1);
                let found: Vec<Vec<StorePath>> = std::thread::scope(|s| {
                    let workers: Vec<_> = batch
                        .chunks(chunk)
                        .map(|c| {
                            s.spawn(move || {
                                c.iter()
                                    .filter_map(|h| {
                                        let text = self.disk.load_narinfo(id, h)?;
                                        self.parse_kept(h, &text)
                                    })
                                    .map(|i| i.store_path.clone())
                                    .collect()
                            })
                        })
                        .collect();
                    workers
                        .into_iter()
                        .map(|w| w.join().unwrap_or_default())
                        .collect()
                });
                for sp in found.iter().flatten() {
                    f(sp);
                    n += 1;
                }
            }
        }
        n
    }

    /// Looks up `<hash>.narinfo`: from the disk cache if verified before, else from the
    /// cache (once, however many callers). `Missing` answers are remembered for the
    /// negative TTL; errors are not remembered.
    pub async fn narinfo(self: &Arc<Self>, hash: &str) -> Result<Lookup, Arc<FetchError>> {
        match self.known(hash) {
            Some(l) => Ok(l),
            None => self.narinfo_from_cache(hash).await,
        }
    }

    /// What needs no request: a narinfo verified before, or one missing within the
    /// negative TTL.
    fn known(&self, hash: &str) -> Option<Lookup> {
        for id in &self.key_ids {
            if let Some(info) = self
                .disk
                .load_narinfo(id, hash)
                .and_then(|t| self.parse_kept(hash, &t))
            {
                Metrics::inc(&self.metrics.narinfo_disk_hits);
                return Some(Lookup::Found(info));
            }
        }
        match self.negative.lock().unwrap().get(hash) {
            Some(t) if t.elapsed() < self.negative_ttl => Some(Lookup::Missing),
            _ => None,
        }
    }

    /// [`Self::narinfo`] for a path about to be looked into (a lookup by name). When the
    /// cache announces file indexes (`NarfsIndexes: 1`) and the name is `likely` to
    /// exist (the caller has not seen a complete listing without it), the path's file
    /// index, if it is where `narfs push` puts it, is asked for at the same time: one
    /// round trip instead of two. Otherwise a lookup costs one request at most, and a
    /// miss none more within the negative TTL.
    pub async fn narinfo_and_index(
        self: &Arc<Self>,
        hash: &str,
        likely: bool,
    ) -> Result<Lookup, Arc<FetchError>> {
        if let Some(l) = self.known(hash) {
            return Ok(l);
        }
        let slot = if self.indexes_announced && likely && !self.disk.has_index(hash) {
            self.speculation_slots.clone().try_acquire_owned().ok()
        } else {
            None
        };
        if let Some(slot) = slot {
            let key = crate::formats::file_index::object_key(hash);
            let me = self.clone();
            let fut = async move {
                let got = me.get_small_retrying(&key, SPECULATED_BYTES).await;
                drop(slot);
                got.ok().flatten().filter(|b| b.len() <= SPECULATED_BYTES)
            };
            let handle = tokio::spawn(fut);
            use futures::FutureExt;
            let shared = async move { handle.await.ok().flatten() }.boxed().shared();
            self.speculated
                .lock()
                .unwrap()
                .get_or_insert(hash.to_owned(), || shared);
        }
        let r = self.narinfo_from_cache(hash).await;
        if !matches!(&r, Ok(Lookup::Found(i)) if i.index.is_some()) {
            self.speculated.lock().unwrap().pop(hash);
        }
        r
    }

    /// Asks the cache itself, ignoring what was verified before: after a NAR failed its
    /// checks, the narinfo may have been repaired (a new URL or FileHash).
    pub async fn narinfo_from_cache(
        self: &Arc<Self>,
        hash: &str,
    ) -> Result<Lookup, Arc<FetchError>> {
        let me = self.clone();
        let h = hash.to_owned();
        let r = self
            .narinfos
            .run(hash.to_owned(), move || async move {
                me.fetch_narinfo(&h).await
            })
            .await;
        let mut neg = self.negative.lock().unwrap();
        match r {
            Ok(Lookup::Missing) => {
                neg.put(hash.to_owned(), Instant::now());
            }
            Ok(_) | Err(_) => {
                neg.pop(hash);
            }
        }
        r
    }

    async fn fetch_narinfo(&self, hash: &str) -> Result<Lookup, FetchError> {
        let key = format!("{hash}.narinfo");
        let t0 = Instant::now();
        let slot =
            crate::fetch::retry::permit(&self.narinfo_slots, self.policy.budget, "narinfo slot")
                .await
                .map_err(|e| FetchError::Busy(format!("{key}: {e}")))?;
        let got = self.get_small_retrying(&key, MAX_NARINFO_BYTES).await;
        drop(slot);
        let Some(bytes) = got? else {
            tracing::debug!(key, "no such narinfo");
            Metrics::inc(&self.metrics.narinfo_missing);
            return Ok(Lookup::Missing);
        };
        let location = self.storage.location(&key);
        let info = match NarInfo::parse_bytes(&bytes) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("rejecting {location}: invalid narinfo: {e}");
                Metrics::inc(&self.metrics.narinfo_invalid);
                return Ok(Lookup::Rejected);
            }
        };
        match info.verify(hash, &self.keys) {
            Ok(signer) => {
                Metrics::inc(&self.metrics.narinfo_fetched);
                tracing::debug!(path = %info.store_path, signer = %signer.name, ms = t0.elapsed().as_millis() as u64, "narinfo verified");
                if let Err(e) = self.disk.save_narinfo(&signer.id(), hash, &info.to_text()) {
                    tracing::warn!(
                        "cannot keep verified narinfo of {} in the cache directory: {e}",
                        info.store_path
                    );
                }
                Ok(Lookup::Found(Arc::new(info.compact())))
            }
            Err(e) => {
                tracing::warn!("rejecting {location}: {e}");
                Metrics::inc(&self.metrics.narinfo_untrusted);
                Ok(Lookup::Rejected)
            }
        }
    }

    /// The path's `.ls` listing, if the cache has a usable one. It is unsigned: a hint
    /// for names, types and sizes only, never for contents.
    pub async fn listing(
        self: &Arc<Self>,
        info: Arc<NarInfo>,
    ) -> Result<Option<Arc<Entry>>, Arc<FetchError>> {
        let me = self.clone();
        self.listings
            .run(info.store_path.hash_part().to_owned(), move || async move {
                let key = format!("{}.ls", info.store_path.hash_part());
                let _slot = crate::fetch::retry::permit(
                    &me.listing_slots,
                    me.policy.budget,
                    "listing slot",
                )
                .await
                .map_err(|e| FetchError::Busy(format!("{key}: {e}")))?;
                let Some(bytes) = me.get_small_retrying(&key, MAX_LISTING_BYTES).await? else {
                    return Ok(None);
                };
                // parsed off the runtime: a large listing takes a while
                let nar_size = info.nar_size;
                let parsed = tokio::task::spawn_blocking(move || {
                    let json = crate::fetch::decompress::listing_reader(bytes, MAX_LISTING_BYTES);
                    parse_ls_reader(json, nar_size).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| FetchError::Other(e.to_string()))?;
                match parsed {
                    Ok(tree) => Ok(Some(Arc::new(tree))),
                    Err(e) => {
                        tracing::warn!(
                            "ignoring listing {} of {}: {e}; its NAR will be used instead",
                            me.storage.location(&key),
                            info.store_path
                        );
                        Ok(None)
                    }
                }
            })
            .await
    }

    /// Makes the path's contents available in the disk cache and returns its tree.
    /// The tree comes with the NarHash it was verified against: a caller holding a
    /// newer narinfo may have joined a fetch started with an older one.
    /// A demand that joined a prefetch which found no room runs again as a demand.
    pub async fn content(
        self: &Arc<Self>,
        info: Arc<NarInfo>,
        priority: Priority,
    ) -> Result<Arc<Content>, Arc<FetchError>> {
        // a reader waits: reference prefetches make way (or, fetching this very NAR,
        // go on at once, as they do when a traversal is about to read it)
        let _waits = match priority {
            Priority::Demand => Some(self.demands.wait_for(&info.url)),
            Priority::Ahead => Some(self.demands.ahead(&info.url)),
            Priority::Prefetch => None,
        };
        // a demand that joined a prefetch which found no room runs again as a demand
        // (a few times at most: each time another prefetch may have started first)
        for _ in 0..3 {
            let me = self.clone();
            let info = info.clone();
            let r = self
                .nars
                .run(info.store_path.hash_part().to_owned(), move || async move {
                    let nar_hash = info.nar_hash;
                    me.fetch_content(info, priority).await.map(|tree| {
                        Arc::new(Content {
                            tree: Arc::new(tree),
                            nar_hash,
                        })
                    })
                })
                .await;
            match r {
                Err(e) if priority == Priority::Demand && matches!(*e, FetchError::NoRoom(_)) => {}
                r => return r,
            }
        }
        Err(Arc::new(FetchError::Busy(format!(
            "{}: prefetches kept taking its fetch and giving up for want of room",
            info.store_path
        ))))
    }

    async fn fetch_content(
        &self,
        info: Arc<NarInfo>,
        priority: Priority,
    ) -> Result<Entry, FetchError> {
        // a tree kept for this NarHash, all of whose blobs are here: nothing to fetch
        let disk = self.disk.clone();
        let (hash, size) = (info.nar_hash, info.nar_size);
        let kept = tokio::task::spawn_blocking(move || {
            disk.load_tree(&hash, size)
                .filter(|t| disk.has_all_blobs(t))
        })
        .await
        .map_err(|e| FetchError::Other(e.to_string()))?;
        if let Some(tree) = kept {
            Metrics::inc(&self.metrics.nar_disk_hits);
            return Ok(tree);
        }
        // a reference prefetch starts while no reader waits and pauses while one does;
        // it does not take a download slot a reader could need. One that waited
        // `MAX_START_WAIT` goes on anyway and is owed progress.
        let paced = priority == Priority::Prefetch;
        let (owed, _slot) = if paced {
            let free = self
                .demands
                .pace(&info.url)
                .until_free(crate::fetch::pace::MAX_START_WAIT)
                .await;
            (!free, None)
        } else {
            let slot = crate::fetch::retry::permit(
                &self.downloads,
                self.policy.budget,
                "download slot (--jobs)",
            )
            .await
            .map_err(|e| FetchError::Busy(format!("{}: {e}", info.store_path)))?;
            (false, Some(slot))
        };
        // Room in the quota for the files: a reader holds it from before the first
        // byte is written (waiting for it at most the time budget). A prefetch holds
        // none: it starts only if the NAR fits without evicting, takes room as its
        // files land and fails once a reader took it, so it never holds room a
        // reader waits for, paused or not.
        let reservation = match priority {
            Priority::Demand => self
                .disk
                .reserve_demand(info.nar_size, self.policy.budget)
                .await
                .map_err(|e| FetchError::Busy(format!("{}: {e}", info.store_path)))?,
            Priority::Ahead | Priority::Prefetch => {
                if !self.disk.fits(info.nar_size) {
                    tracing::debug!(path = %info.store_path, "prefetch skipped: the cache quota has no room without evicting");
                    return Err(FetchError::NoRoom(crate::disk_cache::NoRoom));
                }
                self.disk.no_reservation()
            }
        };
        let writer = Arc::new(Mutex::new(self.disk.writer(reservation)));
        let no_room = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _in_flight = self.metrics.in_flight();
        let t0 = Instant::now();
        let location = self.storage.location(&info.url);
        let policy = self.policy;
        let res = crate::fetch::retry::run_with(
            policy,
            &format!("{} (NAR {location})", info.store_path),
            false,
            |deadline| {
                let info = info.clone();
                let (writer, no_room) = (writer.clone(), no_room.clone());
                let pace = paced.then(|| self.demands.pace(&info.url));
                async move {
                    self.attempt_content(info, deadline, writer, no_room, pace, owed)
                        .await
                }
            },
        )
        .await;
        match res {
            Ok(tree) => {
                self.metrics.fetched(
                    t0.elapsed(),
                    info.file_size.unwrap_or(info.nar_size),
                    info.nar_size,
                );
                tracing::info!(
                    path = %info.store_path,
                    key = %info.url,
                    nar_size = info.nar_size,
                    ms = t0.elapsed().as_millis() as u64,
                    "fetched, verified and unpacked"
                );
                Ok(tree)
            }
            Err(_) if no_room.load(std::sync::atomic::Ordering::SeqCst) => {
                // a prefetch whose files did not fit without evicting
                Err(FetchError::NoRoom(crate::disk_cache::NoRoom))
            }
            Err(e) => {
                Metrics::inc(&self.metrics.nar_failed);
                let msg = format!("{} (NAR {location}): {e}", info.store_path);
                tracing::error!("{msg}");
                Err(msg.into())
            }
        }
    }

    /// Opens the rest of object `key` from an offset (a Range GET to its end, whatever
    /// the unsigned FileSize says), guarded like the first stream; failures count as
    /// the stream's (`failed`), not the data's.
    fn reopen(
        &self,
        key: &str,
        failed: Arc<std::sync::atomic::AtomicBool>,
    ) -> crate::fetch::pace::Reopen {
        let (storage, key, stall) = (self.storage.clone(), key.to_owned(), self.policy.stall);
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        Box::new(move |offset| {
            let (storage, key, failed) = (storage.clone(), key.clone(), failed.clone());
            Box::pin(async move {
                let r = match storage.get_range(&key, offset, 1 << 50).await {
                    Ok(Some(b)) => Ok(Box::pin(
                        Guarded::new(b, stall, far).failing_to(failed.clone()),
                    ) as crate::storage::Body),
                    Ok(None) => Err(io::Error::other("the NAR went away")),
                    Err(e) => Err(io::Error::other(e.to_string())),
                };
                if r.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                r
            })
        })
    }

    /// One download + verify + store. The files go into blobs as they come (a blob is
    /// its hash, whatever NAR it came from); the tree is kept only once every check
    /// of the NAR passed.
    async fn attempt_content(
        &self,
        info: Arc<NarInfo>,
        deadline: Instant,
        writer: Arc<Mutex<crate::disk_cache::BlobWriter>>,
        no_room: Arc<std::sync::atomic::AtomicBool>,
        pace: Option<crate::fetch::pace::Pace>,
        owed: bool,
    ) -> Result<Entry, Attempt> {
        let left = deadline.saturating_duration_since(Instant::now());
        let body = match tokio::time::timeout(left, self.storage.get(&info.url)).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return Err(Attempt::Permanent("the NAR does not exist".into())),
            Ok(Err(e)) => return Err(Attempt::Transient(e.to_string())),
            Err(_) => {
                return Err(Attempt::Transient(
                    "no answer within the time budget".into(),
                ))
            }
        };
        // A NAR may take longer than the budget to stream: only stalls end it.
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let guarded = Guarded::new(body, self.policy.stall, far);
        let stream_failed = guarded.failed.clone();
        let reader = match pace {
            None => {
                let (demands, key) = (self.demands.clone(), info.url.clone());
                read_ahead_fed(guarded, move |fed| demands.fed(&key, fed))
            }
            Some(pace) => {
                // a reference prefetch: may let go of its connection and go on later
                let reopen = self.reopen(&info.url, stream_failed.clone());
                read_ahead(crate::fetch::pace::PacedBody::new(
                    Box::pin(guarded),
                    pace,
                    reopen,
                    owed,
                ))
            }
        };
        let disk = self.disk.clone();
        // Parse, verify and store off the runtime: big trees must not stall lookups.
        let res = tokio::task::spawn_blocking(move || {
            let mut writer = writer.lock().unwrap();
            let mut sink = BlobSink {
                writer: &mut writer,
                buf: Vec::new(),
                no_room: &no_room,
            };
            // (whether the NAR itself was refused, why)
            let r = unpack_verified_into(reader, &info, &mut sink)
                .map_err(|e| (matches!(e, UnpackError::Refused(_)), e.to_string()))
                .and_then(|tree| {
                    disk.save_tree(&info.nar_hash, &tree, info.nar_size)
                        .map(|()| tree)
                        .map_err(|e| {
                            (
                                false,
                                format!("cannot keep the tree in the cache directory: {e}"),
                            )
                        })
                });
            match &r {
                Ok(_) => writer.keep(),
                Err(_) => writer.discard(),
            }
            r
        })
        .await
        .map_err(|e| Attempt::Permanent(e.to_string()))?;
        res.map_err(|(refused, e)| {
            if stream_failed.load(std::sync::atomic::Ordering::SeqCst) {
                // a cut or stalled stream, not a verdict on the NAR
                Attempt::Transient(e)
            } else {
                if refused {
                    Metrics::inc(&self.metrics.nar_refused);
                }
                Attempt::Permanent(e)
            }
        })
    }
}

/// Stores each chunk of each file as a blob as soon as the parser hashed it.
struct BlobSink<'a> {
    writer: &'a mut crate::disk_cache::BlobWriter,
    buf: Vec<u8>,
    no_room: &'a std::sync::atomic::AtomicBool,
}

impl nar::Sink for BlobSink<'_> {
    fn dir(&mut self, _: &std::path::Path) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _: &std::path::Path, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn file_start(&mut self, _: &std::path::Path, _: u64, _: bool) -> io::Result<()> {
        self.buf.clear();
        Ok(())
    }
    fn file_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }
    fn chunk_end(&mut self, hash: &Sha256) -> io::Result<()> {
        let r = self.writer.put(hash, &self.buf);
        self.buf.clear();
        if let Err(e) = &r {
            if e.get_ref()
                .is_some_and(|e| e.is::<crate::disk_cache::NoRoom>())
            {
                self.no_room
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        r.map(|_| ())
    }
    fn file_end(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts and hashes what passes through, and refuses to pass more than `limit` bytes:
/// the NarSize bound that stops decompression bombs and over-long archives.
struct Checked<R> {
    inner: R,
    hasher: Hasher,
    limit: u64,
    what: &'static str,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.hasher.len() + n as u64 > self.limit {
            return Err(io::Error::other(format!(
                "{} is longer than the {} bytes its narinfo states",
                self.what, self.limit
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Chunks between pipeline stages; 8 in flight per stage bounds memory to a few MiB
/// however large the NAR (or however well a bomb compresses).
const CHUNK: usize = 256 * 1024;
const IN_FLIGHT: usize = 8;

type Chunk = io::Result<Vec<u8>>;

/// The receiving end of a pipeline stage, as a `Read`.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Chunk>) -> Self {
        ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Downloads ahead of the decompressor: reads `body` on the runtime into a bounded
/// channel, so the network, decompression and hashing+unpacking overlap.
pub fn read_ahead<R: tokio::io::AsyncRead + Unpin + Send + 'static>(body: R) -> ChannelReader {
    read_ahead_fed(body, |_| {})
}

/// `read_ahead`, telling `on_fed` whether the reading outpaces the consumer (the
/// buffer stays mostly full: the consumer, not the source, sets the pace) or not.
pub fn read_ahead_fed<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut body: R,
    on_fed: impl Fn(bool) + Send + 'static,
) -> ChannelReader {
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    tokio::spawn(async move {
        let mut fed = false;
        loop {
            let mut buf = vec![0u8; CHUNK];
            match body.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).await.is_err() {
                        return;
                    }
                    let queued = IN_FLIGHT - tx.capacity();
                    // (with hysteresis: three quarters full to turn, a quarter to
                    // turn back)
                    let now_fed = if fed {
                        queued > IN_FLIGHT / 4
                    } else {
                        queued >= IN_FLIGHT * 3 / 4
                    };
                    if now_fed != fed {
                        fed = now_fed;
                        on_fed(fed);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    ChannelReader::new(rx)
}

/// Why a NAR was not unpacked: the archive itself was refused (hash, size, format,
/// compression), or something local failed (disk, a panicked thread).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Local(String),
}

impl From<String> for UnpackError {
    fn from(s: String) -> Self {
        UnpackError::Refused(s)
    }
}

/// The streaming pipeline: compressed bytes → FileHash check → decompressor (its own
/// thread) → NarHash/NarSize check → NAR unpacker writing into `dest`. One pass, no
/// whole-NAR buffering. Returns the tree only if every check passed; the caller removes
/// `dest` otherwise.
pub fn unpack_verified<R: Read + Send>(
    reader: R,
    info: &NarInfo,
    dest: &std::path::Path,
) -> Result<Entry, UnpackError> {
    unpack_verified_into(reader, info, &mut nar::DiskSink::new(dest))
}

/// The same pipeline, with the NAR's nodes going to `sink` (an error from it is a
/// local fault that stops the parse).
pub fn unpack_verified_into<R: Read + Send>(
    reader: R,
    info: &NarInfo,
    sink: &mut dyn nar::Sink,
) -> Result<Entry, UnpackError> {
    let mut file = Checked {
        inner: reader,
        hasher: Hasher::default(),
        limit: info.file_size.unwrap_or(u64::MAX),
        what: "compressed NAR",
    };
    let compression = info.compression.clone();
    if let Compression::Unknown(c) = &compression {
        return Err(format!("unsupported compression '{c}'").into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(IN_FLIGHT);
    std::thread::scope(|scope| {
        let decoding = scope.spawn(move || -> Result<Hasher, String> {
            {
                let mut decoder = crate::fetch::decompress::nar_reader(&compression, &mut file)?;
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    match decoder.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.blocking_send(Ok(buf)).is_err() {
                                // the unpacker stopped: its error is the one to report
                                return Err(String::new());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
                            return Err(e.to_string());
                        }
                    }
                }
            }
            drop(tx);
            // The compressed stream may carry bytes after the end of the compressed
            // data; FileHash covers them too.
            io::copy(&mut file, &mut io::sink()).map_err(|e| e.to_string())?;
            Ok(file.hasher)
        });
        let mut nar_stream = Checked {
            inner: ChannelReader::new(rx),
            hasher: Hasher::default(),
            limit: info.nar_size,
            what: "NAR",
        };
        let unpacked = nar::parse(
            &mut nar_stream,
            sink,
            crate::formats::file_index::DEFAULT_CHUNK_SHIFT,
        )
        .map_err(|e| match e {
            nar::NarError::Write(_) => UnpackError::Local(e.to_string()),
            e => UnpackError::Refused(format!("bad NAR: {e}")),
        });
        drop(nar_stream.inner); // lets a decoder blocked on a full channel finish
                                // a panicked decompressor looks like a truncated NAR to the unpacker: say
                                // what happened first
        let Ok(file_hasher) = decoding.join() else {
            return Err(UnpackError::Local("decompressor panicked".to_owned()));
        };
        let tree = unpacked?;
        let file_hasher = file_hasher?;
        let nar_hasher = nar_stream.hasher;
        if nar_hasher.len() != info.nar_size {
            return Err(format!(
                "NarSize mismatch: expected {}, got {}",
                info.nar_size,
                nar_hasher.len()
            )
            .into());
        }
        let got = nar_hasher.finish();
        if got != info.nar_hash {
            return Err(format!("NarHash mismatch: expected {}, got {got}", info.nar_hash).into());
        }
        if let Some(size) = info.file_size {
            if file_hasher.len() != size {
                return Err(format!(
                    "FileSize mismatch: expected {size}, got {}",
                    file_hasher.len()
                )
                .into());
            }
        }
        if let Some(expected) = info.file_hash {
            let got: Sha256 = file_hasher.finish();
            if got != expected {
                return Err(format!("FileHash mismatch: expected {expected}, got {got}").into());
            }
        }
        Ok(tree)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::store_path::StorePath;
    use std::io::Write;

    fn sample_nar() -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("p")).unwrap();
        std::fs::write(d.path().join("p/f"), "hello ".repeat(1000)).unwrap();
        nar::Writer::new(Vec::new())
            .dump_path(&d.path().join("p"))
            .unwrap()
    }

    fn compress(c: &Compression, data: &[u8]) -> Vec<u8> {
        crate::fetch::decompress::compressed(c, data)
    }

    fn info_for(c: Compression, nar: &[u8], file: &[u8]) -> NarInfo {
        NarInfo {
            store_path: StorePath::from_basename("00000000000000000000000000000000-p").unwrap(),
            url: "nar/x".into(),
            compression: c,
            file_hash: Some(Sha256::digest(file)),
            file_size: Some(file.len() as u64),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            index: None,
        }
    }

    fn attempt(info: &NarInfo, file: &[u8]) -> Result<Entry, String> {
        let d = tempfile::tempdir().unwrap();
        unpack_verified(file, info, &d.path().join("out")).map_err(|e| e.to_string())
    }

    #[test]
    fn every_compression_round_trips() {
        let nar = sample_nar();
        for c in crate::fetch::decompress::ALL {
            let file = compress(&c, &nar);
            let info = info_for(c.clone(), &nar, &file);
            assert!(attempt(&info, &file).is_ok(), "{c:?}");
        }
    }

    #[test]
    fn each_check_catches_its_fault() {
        let nar = sample_nar();
        let file = compress(&Compression::Xz, &nar);
        let good = info_for(Compression::Xz, &nar, &file);

        let mut i = good.clone();
        i.nar_size -= 1;
        let e = attempt(&i, &file).unwrap_err();
        assert!(e.contains("longer than"), "short NarSize: {e}");
        let mut i = good.clone();
        i.nar_size += 1;
        assert!(attempt(&i, &file).unwrap_err().contains("NarSize mismatch"));
        let mut i = good.clone();
        i.nar_hash = Sha256::digest(b"x");
        assert!(attempt(&i, &file).unwrap_err().contains("NarHash mismatch"));
        let mut i = good.clone();
        i.file_hash = Some(Sha256::digest(b"x"));
        assert!(attempt(&i, &file)
            .unwrap_err()
            .contains("FileHash mismatch"));
        let mut i = good.clone();
        i.compression = Compression::Unknown("lz4".into());
        assert!(attempt(&i, &file)
            .unwrap_err()
            .contains("unsupported compression 'lz4'"));
        let mut i = good.clone();
        i.compression = Compression::Zstd;
        assert!(attempt(&i, &file).is_err(), "wrong decompressor");
        // truncated compressed stream
        assert!(attempt(&good, &file[..file.len() / 2]).is_err());
        // extra bytes after the compressed stream change FileSize
        let mut longer = file.clone();
        longer.extend_from_slice(b"junk");
        assert!(attempt(&good, &longer).is_err());
        // one content byte flipped, FileHash and FileSize fixed up
        let mut bad = nar.clone();
        let at = bad.windows(5).position(|w| w == b"hello").unwrap();
        bad[at] ^= 1;
        let bad_file = compress(&Compression::Xz, &bad);
        let mut i = good.clone();
        i.file_hash = Some(Sha256::digest(&bad_file));
        i.file_size = Some(bad_file.len() as u64);
        assert!(attempt(&i, &bad_file)
            .unwrap_err()
            .contains("NarHash mismatch"));
    }

    #[test]
    fn decompression_bomb_stops_at_nar_size() {
        // a NAR header claiming a 1 GiB file, then 1 GiB of zeros: ~150 KiB of xz;
        // the narinfo claims a 1 KiB NAR
        let mut w = liblzma::write::XzEncoder::new(Vec::new(), 1);
        let mut head = nar::Writer::new(Vec::new());
        for s in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
        ] {
            head.raw_string(s).unwrap();
        }
        let mut head = head.into_inner();
        head.extend_from_slice(&(1u64 << 30).to_le_bytes());
        w.write_all(&head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            w.write_all(&zeros).unwrap();
        }
        let file = w.finish().unwrap();
        let mut info = info_for(Compression::Xz, b"", &file);
        info.nar_size = 1024;
        let t = Instant::now();
        let e = attempt(&info, &file).unwrap_err();
        assert!(e.contains("longer than the 1024 bytes"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
