//! Satisfying what operations wait for: narinfos, trees (from the disk cache, a
//! listing or the NAR) and contents, and the prefetch that guesses what is next.

use super::{Errno, Fs, Need};
use crate::fetch::pace::Priority;
use crate::fetch::Lookup;
use crate::formats::store_path::StorePath;
use crate::mount::inodes::{PathId, TreeSource};
use futures::StreamExt;
use std::sync::Arc;

/// Paths remembered as looked into by a traversal, at most.
const WALK_LISTED: usize = 4096;
/// Readers waiting for two paths' contents this close together are walking many.
const WALK_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

impl Fs {
    /// Fetches the closure of `id` in the background: a closure is almost always read
    /// together. Each prefetched path prefetches its own references in turn.
    fn prefetch_references(&self, info: &crate::formats::narinfo::NarInfo) {
        let (Some(sem), Some(me)) = (self.prefetch.clone(), self.me.upgrade()) else {
            return;
        };
        for r in info.references.iter().filter(|r| **r != info.store_path) {
            let id = match self.index.path_by_basename(r.basename()) {
                Some(id) if self.index.is_unpacked(id) => continue,
                Some(id) => Some(id),
                None => None,
            };
            let (me, sem, r) = (me.clone(), sem.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(_permit) = sem.acquire().await else {
                    return;
                };
                let id = match id {
                    Some(id) => id,
                    None => {
                        if me
                            .satisfy(Need::NarInfo(r.basename().to_owned()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        match me.index.path_by_basename(r.basename()) {
                            Some(id) => id,
                            None => return,
                        }
                    }
                };
                if me.index.is_unpacked(id) || me.index.tree_source(id) == Some(TreeSource::Index) {
                    return;
                }
                // an indexed path: its index (a few KiB), not its NAR
                let Ok(info) = me.info(id).await else {
                    return;
                };
                if info.index.is_some() {
                    tracing::debug!(path = %r, "prefetching a reference's file index");
                    let _ = me.satisfy(Need::Tree(id)).await;
                    if me.index.tree_source(id) == Some(TreeSource::Index) {
                        return;
                    }
                }
                tracing::debug!(path = %r, "prefetching a reference");
                let _ = me.fetch_content(id, Priority::Prefetch).await;
            });
        }
    }

    /// A reader waits for the contents of `id`. If a reader waited for another path's
    /// a moment ago, this is a traversal of many paths: the paths it looked into (by
    /// their listings) and has not read yet are fetched in parallel, as `nix copy`
    /// fetches a closure, within the prefetch slots. Paths nobody looked into are not.
    fn walked(&self, id: PathId) {
        let now = std::time::Instant::now();
        let ahead: Vec<PathId> = {
            let mut walk = self.walk.lock().unwrap();
            let before = walk.last_demand.replace((id, now));
            let walking = before.is_some_and(|(p, t)| p != id && now - t < WALK_WINDOW);
            walk.listed.retain(|p| *p != id);
            if !walking {
                return;
            }
            walk.listed.drain(..).collect()
        };
        self.fetch_ahead(ahead);
    }

    /// Path `id` was looked into (its tree came from its listing). While another path
    /// is being read, that is a traversal moving on (`find | xargs cat` looks ahead
    /// of its reader): it is fetched at once. Otherwise it is remembered for `walked`.
    fn looked_into(&self, id: PathId) {
        let now = std::time::Instant::now();
        let reading_another = {
            let mut walk = self.walk.lock().unwrap();
            let reading = walk
                .last_demand
                .is_some_and(|(p, t)| p != id && now - t < WALK_WINDOW);
            if !reading {
                if walk.listed.len() >= WALK_LISTED {
                    walk.listed.pop_front();
                }
                walk.listed.push_back(id);
            }
            reading
        };
        if reading_another {
            self.fetch_ahead(vec![id]);
        }
    }

    /// Fetches `paths` (looked into by a traversal, not read yet) within the prefetch
    /// slots, as priority `Ahead`.
    fn fetch_ahead(&self, paths: Vec<PathId>) {
        let (Some(sem), Some(me)) = (self.prefetch.clone(), self.me.upgrade()) else {
            return;
        };
        for p in paths {
            let (me, sem) = (me.clone(), sem.clone());
            tokio::spawn(async move {
                let Ok(_permit) = sem.acquire().await else {
                    return;
                };
                if me.index.is_unpacked(p) || me.index.tree_source(p) != Some(TreeSource::Listing) {
                    return;
                }
                tracing::debug!(path = %me.index.store_path(p), "prefetching a path the traversal listed");
                let _ = me.fetch_content(p, Priority::Ahead).await;
            });
        }
    }

    /// A closure member's verified narinfo, or the path and why it cannot be had.
    async fn closure_member(
        &self,
        name: String,
    ) -> Result<Option<(PathId, Arc<crate::formats::narinfo::NarInfo>)>, (StorePath, String)> {
        let Ok(sp) = StorePath::from_basename(&name) else {
            return Err((
                StorePath::from_basename("00000000000000000000000000000000-invalid")
                    .expect("valid placeholder"),
                format!("'{name}' is not a store path"),
            ));
        };
        if self.satisfy(Need::NarInfo(name.clone())).await.is_err() {
            return Err((sp, "the cache has no valid, trusted narinfo for it".into()));
        }
        let Some(id) = self.index.path_by_basename(&name) else {
            return Ok(None);
        };
        match self.info(id).await {
            Ok(info) => Ok(Some((id, info))),
            Err(_) => Err((sp, "its narinfo went away".into())),
        }
    }

    /// Fetches the closures of `roots` (store path basenames) into the disk cache, for
    /// `narfs prefetch`: first every narinfo of the closure (`on_closure` gets the
    /// path count and NAR bytes), then the NARs, `jobs` at a time, each reported to
    /// `on_path` with its outcome. Returns how many failed.
    pub async fn prefetch_closure(
        &self,
        roots: Vec<String>,
        jobs: usize,
        on_closure: impl FnOnce(usize, u64),
        on_path: impl Fn(&StorePath, Result<(), String>),
    ) -> usize {
        // The closure is walked one level at a time, each level's narinfos fetched
        // concurrently.
        let mut seen = std::collections::HashSet::new();
        let mut level: Vec<String> = roots;
        let mut closure = Vec::new();
        let mut failed = 0;
        while !level.is_empty() {
            let names: Vec<String> = level.drain(..).filter(|n| seen.insert(n.clone())).collect();
            let found: Vec<_> = futures::stream::iter(names)
                .map(|name| self.closure_member(name))
                .buffer_unordered(16)
                .collect()
                .await;
            for r in found {
                match r {
                    Ok(Some((id, info))) => {
                        level.extend(info.references.iter().map(|r| r.basename().to_owned()));
                        closure.push((id, info));
                    }
                    Ok(None) => {}
                    Err((sp, why)) => {
                        failed += 1;
                        on_path(&sp, Err(why));
                    }
                }
            }
        }
        on_closure(closure.len(), closure.iter().map(|(_, i)| i.nar_size).sum());
        let results: Vec<(StorePath, Result<(), Errno>)> = futures::stream::iter(closure)
            .map(|(id, info)| async move {
                let r = self.satisfy(Need::Content(id)).await;
                (info.store_path.clone(), r)
            })
            .buffer_unordered(jobs.max(1))
            .inspect(|(sp, r)| {
                on_path(
                    sp,
                    r.map_err(|_| {
                        "fetching or verifying its NAR failed (see the mount's log)".into()
                    }),
                )
            })
            .collect()
            .await;
        failed + results.iter().filter(|(_, r)| r.is_err()).count()
    }

    /// The verified narinfo of a known path: kept on disk, read back when needed.
    async fn info(&self, id: PathId) -> Result<Arc<crate::formats::narinfo::NarInfo>, Errno> {
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
    async fn fetch_content(&self, id: PathId, priority: Priority) -> Result<(), Errno> {
        if self.index.has_failed(id) {
            // The cache may have been repaired since: verify its narinfo afresh (a
            // good one replaces the copy kept on disk).
            let sp = self.index.store_path(id);
            let _ = self.fetcher.narinfo_from_cache(sp.hash_part()).await;
        }
        let info = self.info(id).await?;
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
