//! Narinfos: looked up once however many callers ask, verified (a trusted
//! signature, the StorePath of the hash asked for) before any use, kept in the cache
//! directory and verified again when read back; misses remembered for the negative TTL.

use super::{FetchError, Fetcher, Lookup, SPECULATED_BYTES};
use crate::fetch::metrics::Metrics;
use crate::formats::hash::Sha256;
use crate::formats::narinfo::{NarInfo, MAX_NARINFO_BYTES};
use crate::formats::store_path::StorePath;
use std::sync::Arc;
use std::time::Instant;

impl Fetcher {
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
            Ok(info) if self.pin_refuses(&info) => None,
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
            Ok(_) if self.pin_refuses(&info) => Ok(Lookup::Rejected),
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

    /// Pins store paths to the NarHash nix registered them with (`narfs nix-store`):
    /// nix believes a registered path has those contents, so a narinfo that says
    /// otherwise (the path pushed again with other contents) is refused like an
    /// untrusted one, and the path's reads fail rather than show other bytes.
    pub fn pin(&self, pins: impl IntoIterator<Item = (String, Sha256)>) {
        self.pins.write().unwrap().extend(pins);
    }

    /// Whether `info` contradicts a pin (and says so in the log).
    fn pin_refuses(&self, info: &NarInfo) -> bool {
        let pins = self.pins.read().unwrap();
        match pins.get(info.store_path.hash_part()) {
            Some(pinned) if *pinned != info.nar_hash => {
                tracing::error!(
                    "{}: the cache now has it with NarHash {}, but nix registered it with {}: refused (register it again to take the new contents)",
                    info.store_path,
                    info.nar_hash,
                    pinned
                );
                true
            }
            _ => false,
        }
    }

    /// The verified narinfo of `hash` with all it says (signatures, deriver, CA), as
    /// nix needs it to register the path; `None` if the cache has none that verifies.
    pub async fn narinfo_whole(self: &Arc<Self>, hash: &str) -> Result<Option<NarInfo>, String> {
        match self.narinfo(hash).await {
            Ok(Lookup::Found(_)) => {}
            Ok(_) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        for id in &self.key_ids {
            let whole = self.disk.load_narinfo(id, hash).and_then(|t| {
                let i = NarInfo::parse(&t).ok()?;
                i.verify(hash, &self.keys).ok()?;
                Some(i)
            });
            if whole.is_some() {
                return Ok(whole);
            }
        }
        Err(format!(
            "{hash}.narinfo verified, but its record in the cache directory {} cannot be read back",
            self.disk.root().display()
        ))
    }
}
