//! The read side's network: narinfos, file indexes, listings and NARs fetched from a
//! `storage`, verified, and kept in the `disk_cache`; blocks, profile packs, pacing, retries and
//! single-flight around them. May use `formats`, `storage` and `disk_cache`.
//!
//! Nothing reaches the disk cache unless every check passed (narinfo: signature and
//! StorePath; NAR: stream → decompress → NarHash/NarSize check ∥ unpack); each object
//! is fetched once however many callers wait for it.

pub mod blocks;
pub mod decompress;
mod file_index;
mod listing;
pub mod metrics;
mod nar;
mod narinfo;
pub mod pace;
pub mod pending;
pub mod replay;
pub mod retry;
pub mod singleflight;
pub mod stream;
pub mod unpack;

use crate::disk_cache::DiskCache;
use crate::fetch::metrics::Metrics;
use crate::fetch::retry::{Attempt, Guarded, Policy};
use crate::fetch::singleflight::SingleFlight;
use crate::formats::file_index::FileIndex;
use crate::formats::hash::Sha256;
use crate::formats::keys::TrustedKeys;
use crate::formats::listing::Entry;
use crate::formats::narinfo::NarInfo;
use crate::storage::{Storage, StorageError};
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
    /// NarHashes store paths are pinned to, by hash part (see `pin`).
    pins: std::sync::RwLock<std::collections::HashMap<String, Sha256>>,
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
            pins: Default::default(),
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

    /// Object `key`, read by `read` from its body (guarded against stalls and the
    /// attempt's deadline), with retries; `Ok(None)` if it does not exist.
    async fn get_retrying<T, Fut>(
        &self,
        key: &str,
        read: impl Fn(Guarded<crate::storage::Body>) -> Fut,
    ) -> Result<Option<T>, FetchError>
    where
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let policy = self.policy;
        let read = &read;
        crate::fetch::retry::run(policy, &self.storage.location(key), |deadline| async move {
            let body = match self.storage.get(key).await {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(None),
                Err(e) => return Err(Attempt::Transient(e.to_string())),
            };
            read(Guarded::new(body, policy.stall, deadline))
                .await
                .map(Some)
        })
        .await
        .map_err(FetchError::Other)
    }

    /// A small object, whole (at most `max + 1` bytes), with retries; `Ok(None)` if it
    /// does not exist.
    async fn get_small_retrying(
        &self,
        key: &str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, FetchError> {
        self.get_retrying(key, |body| async move {
            let mut buf = Vec::new();
            body.take(max as u64 + 1)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| {
                    Attempt::Transient(format!("GET {}: {e}", self.storage.location(key)))
                })?;
            // More than `max` bytes come back as `max + 1`: the parser refuses them.
            Ok(buf)
        })
        .await
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
}
