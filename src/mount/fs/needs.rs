//! Satisfying what operations wait for: narinfos, trees (from the disk cache, a
//! listing, a file index or the NAR) and contents.

use super::{Errno, Fs, Need};
use crate::fetch::pace::Priority;
use crate::fetch::Lookup;
use crate::formats::store_path::StorePath;
use crate::mount::inodes::{PathId, TreeSource};
use std::sync::Arc;

impl Fs {
    /// The verified narinfo of a known path: kept on disk, read back when needed.
    pub(super) async fn info(
        &self,
        id: PathId,
    ) -> Result<Arc<crate::formats::narinfo::NarInfo>, Errno> {
        let sp = self.index.store_path(id);
        match self.fetcher.narinfo(sp.hash_part()).await {
            Ok(Lookup::Found(info)) if info.store_path == sp => Ok(info),
            Ok(_) => {
                tracing::error!("{sp}: its narinfo is no longer in the cache");
                Err(Errno::EIO)
            }
            Err(e) => {
                tracing::error!("{sp}: {e}");
                Err(Errno::EIO)
            }
        }
    }

    /// Does the network part of an operation; afterwards the operation is asked again.
    pub async fn satisfy(&self, need: Need) -> Result<(), Errno> {
        match need {
            Need::NarInfo(name) => {
                let sp = StorePath::from_basename(&name).map_err(|_| Errno::ENOENT)?;
                // a name not in a complete listing is likely missing: no index
                // asked for with its narinfo (a miss costs one request)
                let likely = !*self.listed.borrow() || !self.fetcher.storage().can_list();
                match self.fetcher.narinfo_and_index(sp.hash_part(), likely).await {
                    Ok(Lookup::Found(info)) => {
                        if info.store_path != sp {
                            tracing::warn!(
                                "{name}: the cache has {} under that hash, not this name",
                                info.store_path
                            );
                            return Err(Errno::ENOENT);
                        }
                        self.index.add_path(&info.store_path);
                        Ok(())
                    }
                    Ok(Lookup::Missing | Lookup::Rejected) => Err(Errno::ENOENT),
                    Err(e) => {
                        tracing::error!("looking up {name}: {e}");
                        Err(Errno::EIO)
                    }
                }
            }
            Need::Listing => {
                // the first `ls` waits for the whole cache, but at most the time
                // budget: then it shows what was listed so far
                let budget = self.fetcher.policy().budget;
                let mut done = self.listed.subscribe();
                if tokio::time::timeout(budget, done.wait_for(|&d| d))
                    .await
                    .is_err()
                    && !self.listed.send_replace(true)
                {
                    tracing::info!(
                        paths = self.index.path_count(),
                        "the first listing of the cache takes longer than --timeout ({budget:?}): the root shows the paths listed so far, and the listing goes on"
                    );
                }
                Ok(())
            }
            Need::Tree(id) => {
                if self.index.tree_source(id).is_some() {
                    return Ok(());
                }
                let info = self.info(id).await?;
                // a signed file index: the verified tree, and chunks on demand
                if let Ok(Some(index)) = self.fetcher.file_index(info.clone()).await {
                    let blocks = Arc::new(crate::fetch::blocks::Blocks::new(&index));
                    self.indexed.lock().unwrap().insert(id, blocks);
                    let stale = self.index.attach_index(id, &index);
                    self.invalidate(stale);
                    self.prefetch_references(&info);
                    return Ok(());
                }
                // a tree verified before (kept by NarHash): no network at all
                let disk = self.fetcher.disk().clone();
                let (hash, size) = (info.nar_hash, info.nar_size);
                let kept = tokio::task::spawn_blocking(move || disk.load_tree(&hash, size))
                    .await
                    .map_err(|_| Errno::EIO)?;
                if let Some(tree) = kept {
                    let stale = self
                        .index
                        .attach_tree(id, &tree, TreeSource::Nar, &info.nar_hash);
                    self.invalidate(stale);
                    return Ok(());
                }
                if self.use_listings {
                    match self.fetcher.listing(info.clone()).await {
                        Ok(Some(tree)) if !self.index.listing_fits(tree.count()) => {
                            tracing::warn!(
                                "{}: listings already hold {} nodes; its NAR will be used instead",
                                info.store_path,
                                crate::mount::inodes::MAX_LISTING_NODES
                            );
                        }
                        Ok(Some(tree)) => {
                            let stale = self.index.attach_tree(
                                id,
                                &tree,
                                TreeSource::Listing,
                                &info.nar_hash,
                            );
                            self.invalidate(stale);
                            self.looked_into(id);
                            return Ok(());
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // the cache did not answer: the NAR would not come either
                            tracing::error!("{e}");
                            return Err(Errno::EIO);
                        }
                    }
                }
                Box::pin(self.satisfy(Need::Content(id))).await
            }
            Need::Content(id) => {
                self.walked(id);
                self.fetch_content(id, Priority::Demand).await
            }
            Need::Chunk(id, chunk) => {
                let blocks = self.indexed.lock().unwrap().get(&id).cloned();
                let Some(blocks) = blocks else {
                    return Box::pin(self.satisfy(Need::Content(id))).await;
                };
                self.fetcher
                    .blocks()
                    .chunk(&blocks, chunk, Priority::Demand)
                    .await
                    .map_err(|e| {
                        tracing::error!("{e}");
                        Errno::EIO
                    })
            }
        }
    }

    /// Makes the contents of `id` available on disk and attaches their tree.
    pub(super) async fn fetch_content(&self, id: PathId, priority: Priority) -> Result<(), Errno> {
        if self.index.has_failed(id) {
            // The cache may have been repaired since: verify its narinfo afresh (a
            // good one replaces the copy kept on disk).
            let sp = self.index.store_path(id);
            let _ = self.fetcher.narinfo_from_cache(sp.hash_part()).await;
        }
        let info = self.info(id).await?;
        let _decoding = match priority {
            Priority::Demand => self.decoders.reader(),
            Priority::Ahead | Priority::Prefetch => {
                let d = self.decoders.prefetch().await;
                if self.index.is_unpacked(id) {
                    return Ok(());
                }
                d
            }
        };
        match self.fetcher.content(info.clone(), priority).await {
            Ok(c) => {
                self.index.set_failed(id, false);
                let stale = self
                    .index
                    .attach_tree(id, &c.tree, TreeSource::Nar, &c.nar_hash);
                self.index.set_unpacked(id, true);
                self.invalidate(stale);
                self.prefetch_references(&info);
                Ok(())
            }
            // a prefetch skipped for want of room: nothing failed
            Err(e) if matches!(*e, crate::fetch::FetchError::NoRoom(_)) => Err(Errno(libc::EAGAIN)),
            // a reader that waited its time budget behind other fetches: nothing is
            // wrong with the path
            Err(e) if matches!(*e, crate::fetch::FetchError::Busy(_)) => {
                tracing::error!("{e}");
                Err(Errno::EIO)
            }
            Err(_) => {
                self.index.set_failed(id, true);
                Err(Errno::EIO)
            }
        }
    }
}
