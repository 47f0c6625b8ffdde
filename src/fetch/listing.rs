//! `.ls` listings: unsigned, so a hint for names, types and sizes, never for contents.

use super::{FetchError, Fetcher};
use crate::formats::listing::{parse_ls_reader, Entry, MAX_LISTING_BYTES};
use crate::formats::narinfo::NarInfo;
use std::sync::Arc;

impl Fetcher {
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
}
