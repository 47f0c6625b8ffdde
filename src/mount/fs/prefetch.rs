//! Fetching before anyone waits: a path's references once it is opened, the paths a
//! traversal looked into, and whole closures for `narfs prefetch`. Never ahead of a
//! reader: these run within the prefetch slots, at a lower priority (see `pace`).

use super::{Errno, Fs, Need};
use crate::fetch::pace::Priority;
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
    pub(super) fn prefetch_references(&self, info: &crate::formats::narinfo::NarInfo) {
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
    pub(super) fn walked(&self, id: PathId) {
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
    pub(super) fn looked_into(&self, id: PathId) {
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
}
