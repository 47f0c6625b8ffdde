//! Whole NARs: streamed through the verifying pipeline (`unpack`) into blobs as they
//! come; the tree is kept only once every check of the NAR passed. Readers go first:
//! reference prefetches are paced around them (see `pace`).

use super::pace::Priority;
use super::stream::{read_ahead, read_ahead_fed};
use super::unpack::{unpack_verified_into, UnpackError};
use super::{Content, FetchError, Fetcher};
use crate::fetch::metrics::Metrics;
use crate::fetch::retry::{Attempt, Guarded};
use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use crate::formats::nar;
use crate::formats::narinfo::NarInfo;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

impl Fetcher {
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
