//! File indexes: read header first, so an index not signed for the path costs little;
//! verified against the path's signed narinfo; kept in the cache directory and
//! verified again when read back. A faulty one is ignored and the NAR read instead.

use super::{FetchError, Fetcher};
use crate::fetch::metrics::Metrics;
use crate::fetch::retry::Attempt;
use crate::formats::file_index::FileIndex;
use crate::formats::narinfo::NarInfo;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncReadExt;

impl Fetcher {
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
        self.get_retrying(key, |mut body| async move {
            let failed = |e: std::io::Error| {
                Attempt::Transient(format!("GET {}: {e}", self.storage.location(key)))
            };
            let mut buf = Vec::with_capacity(4096);
            let len = loop {
                if let Some(len) = header_len(&buf) {
                    break len;
                }
                if buf.len() >= MAX_HEADER_BYTES {
                    return Ok((buf, None));
                }
                let mut chunk = [0u8; 4096];
                let want = chunk.len().min(MAX_HEADER_BYTES - buf.len());
                match body.read(&mut chunk[..want]).await.map_err(failed)? {
                    0 => return Ok((buf, None)),
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
                return Ok((buf, None));
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
            Ok((buf, Some(permit)))
        })
        .await
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
}
