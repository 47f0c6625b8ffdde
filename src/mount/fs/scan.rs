//! Listing the cache's root: every `*.narinfo` the bucket holds, verified.

use super::Fs;
use crate::fetch::Lookup;
use futures::StreamExt;

impl Fs {
    /// Lists `*.narinfo` keys at the cache root and adds every path whose narinfo
    /// verifies. Runs in the background: readdir serves what is known meanwhile. The
    /// next page is listed while the narinfos of this one are fetched.
    pub async fn scan_bucket(&self) -> Result<usize, crate::storage::StorageError> {
        let storage = self.fetcher.storage().clone();
        let list = |token: Option<String>| {
            let storage = storage.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                storage.list_page(token).await.map(|p| (p, t.elapsed()))
            })
        };
        let mut next = Some(list(None));
        let mut pass = crate::storage::ListPass::default();
        let mut added = 0usize;
        let (t0, mut told) = (std::time::Instant::now(), std::time::Instant::now());
        while let Some(pending) = next.take() {
            let (page, list_time) = pending.await.map_err(|e| crate::storage::StorageError {
                op: "LIST",
                location: storage.location(""),
                detail: e.to_string(),
            })??;
            match pass.next(&page) {
                Ok(token) => next = token.map(|t| list(Some(t))),
                Err(why) => tracing::warn!(
                    "listing {}: {why}; this pass ends here (lookups by name still work)",
                    storage.location("")
                ),
            }
            let t_get = std::time::Instant::now();
            let hashes: Vec<String> = page
                .keys
                .iter()
                .filter_map(|k| k.strip_suffix(".narinfo"))
                .filter(|h| crate::formats::store_path::is_hash_part(h) && !self.index.has_hash(h))
                .map(str::to_owned)
                .collect();
            let index = &self.index;
            futures::stream::iter(hashes)
                .map(|h| {
                    let f = self.fetcher.clone();
                    async move { f.narinfo(&h).await }
                })
                .buffer_unordered(self.list_jobs)
                .for_each(|r| {
                    match r {
                        Ok(Lookup::Found(info)) => {
                            index.add_path(&info.store_path);
                            added += 1;
                        }
                        Ok(Lookup::Missing | Lookup::Rejected) => {}
                        Err(e) => tracing::warn!("listing: {e}"),
                    }
                    async {}
                })
                .await;
            // a big bucket takes a while: say how far it got
            if told.elapsed() >= std::time::Duration::from_secs(5) {
                told = std::time::Instant::now();
                tracing::info!(
                    paths = self.index.path_count(),
                    secs = t0.elapsed().as_secs(),
                    "listing the cache"
                );
            }
            tracing::debug!(
                keys = page.keys.len(),
                list_ms = list_time.as_millis() as u64,
                get_ms = t_get.elapsed().as_millis() as u64,
                "listing page"
            );
        }
        Ok(added)
    }
}
