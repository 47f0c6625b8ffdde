//! Fetching before anyone waits: a path's references once it is opened, the paths a
//! traversal looked into, and whole closures for `narfs prefetch`. Never ahead of a
//! reader: these run within the prefetch slots, at a lower priority (see `pace`).

use super::{Errno, Fs, Need};
use crate::fetch::pace::Priority;
use crate::formats::store_path::StorePath;
use crate::mount::inodes::{PathId, TreeSource};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Paths remembered as looked into by a traversal, at most.
const WALK_LISTED: usize = 4096;
/// Looked-into paths examined for a closure looked into whole, at most.
const CERTAIN_PATHS: usize = 1024;
/// A reader waiting this soon after a path was looked into is part of a traversal
/// still looking (`find | xargs cat`), not someone reading one file after a look
/// around.
const CERTAIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(3);
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
    /// If a traversal still looking (a path looked into within `CERTAIN_WINDOW`) has
    /// looked into every path of a closure that holds `id`, the rest of that closure
    /// is certain to be read: it is fetched at once (`fetch_certain`).
    pub(super) fn walked(&self, id: PathId) {
        let now = std::time::Instant::now();
        let (ahead, looking) = {
            let mut walk = self.walk.lock().unwrap();
            let before = walk.last_demand.replace((id, now));
            let walking = before.is_some_and(|(p, t)| p != id && now - t < WALK_WINDOW);
            if !walking {
                walk.demanded.clear();
                walk.sent.clear();
                walk.references.clear();
            }
            if !walk.demanded.contains(&id) {
                if walk.demanded.len() >= WALK_LISTED {
                    walk.demanded.pop_front();
                }
                walk.demanded.push_back(id);
            }
            walk.listed.retain(|p| *p != id);
            let looking = walk.last_looked.is_some_and(|t| now - t < CERTAIN_WINDOW);
            let ahead = if walking {
                walk.listed.drain(..).collect()
            } else {
                Vec::new()
            };
            (ahead, looking)
        };
        self.fetch_ahead(ahead);
        if looking {
            self.fetch_certain();
        }
    }

    /// Path `id` was looked into (its tree came from its listing). While another path
    /// is being read, that is a traversal moving on (`find | xargs cat` looks ahead
    /// of its reader): it is fetched at once, with the rest of any closure the
    /// traversal has now looked into whole. Otherwise it is remembered for `walked`.
    pub(super) fn looked_into(&self, id: PathId) {
        let now = std::time::Instant::now();
        let reading_another = {
            let mut walk = self.walk.lock().unwrap();
            let reading = walk
                .last_demand
                .is_some_and(|(p, t)| p != id && now - t < WALK_WINDOW);
            walk.last_looked = Some(now);
            if !reading {
                if walk.listed.len() >= WALK_LISTED {
                    walk.listed.pop_front();
                }
                walk.listed.push_back(id);
            }
            if reading {
                walk.sent.insert(id);
            }
            reading
        };
        if reading_another {
            self.fetch_ahead(vec![id]);
            self.fetch_certain();
        }
    }

    /// Fetches every path of each closure that the traversal looked into whole (each
    /// member looked into, read, or on disk) and that holds a path a reader waited
    /// for: `find | xargs cat` reads all of it, so waiting for the reader to reach each
    /// path only leaves the link idle. They go through the prefetch slots in the order
    /// they were looked into (the reader's next path first); a reader's own fetches still
    /// come first (priority `Ahead`), and a closure with any member nobody looked into
    /// is left alone (`ls` of one path says nothing about its references).
    /// One check runs at a time: a look-into during it asks for one more afterwards
    /// (a `find` of many paths asks once per path).
    fn fetch_certain(&self) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if self.prefetch.is_none() {
            return;
        }
        {
            let mut walk = self.walk.lock().unwrap();
            if walk.checking {
                walk.check_again = true;
                return;
            }
            walk.checking = true;
        }
        tokio::spawn(async move {
            loop {
                let looked = Looked::of(&me.walk.lock().unwrap());
                let certain = if looked.demanded.is_empty() || looked.all.len() < 2 {
                    Vec::new()
                } else {
                    me.certain_closures(&looked).await
                };
                let fresh: Vec<PathId> = {
                    let mut walk = me.walk.lock().unwrap();
                    walk.listed.retain(|p| !certain.contains(p));
                    certain
                        .into_iter()
                        .filter(|p| walk.sent.insert(*p))
                        .collect()
                };
                me.fetch_ahead(fresh);
                let mut walk = me.walk.lock().unwrap();
                if !std::mem::take(&mut walk.check_again) {
                    walk.checking = false;
                    return;
                }
            }
        });
    }

    /// The members of closures looked into whole that hold a path in
    /// `looked.demanded`, less those read or on disk, in the order they were looked
    /// into: the order the traversal will read them in.
    async fn certain_closures(&self, looked: &Looked) -> Vec<PathId> {
        // each looked-into path's references; None: one of them was not looked into
        let mut refs: HashMap<PathId, Option<Vec<PathId>>> = HashMap::new();
        // the paths read first, then the others in the order they were looked into
        let mut examine: Vec<PathId> = looked.all.iter().copied().collect();
        examine.sort_by_key(|p| {
            (
                !looked.demanded.contains(p),
                looked.order.get(p).copied().unwrap_or(usize::MAX),
            )
        });
        for &p in examine.iter().take(CERTAIN_PATHS) {
            let Some(references) = self.references_of(p).await else {
                refs.insert(p, None);
                continue;
            };
            let mut rs = Vec::new();
            let mut whole = true;
            for r in references.iter() {
                match self.index.path_by_basename(r.basename()) {
                    Some(id) if looked.all.contains(&id) => rs.push(id),
                    Some(id) if self.index.is_unpacked(id) => {}
                    _ => whole = false,
                }
            }
            refs.insert(p, whole.then_some(rs));
        }
        let mut out = HashSet::new();
        let mut whole_memo: HashMap<PathId, bool> = HashMap::new();
        for &root in refs.keys() {
            // a member's closure is within the closure that brought it in
            if out.contains(&root) || !closure_whole(root, &refs, &mut whole_memo) {
                continue;
            }
            let members = closure_of(root, &refs);
            if members.iter().any(|m| looked.demanded.contains(m)) {
                out.extend(members);
            }
        }
        out.retain(|p| !looked.demanded.contains(p) && !self.index.is_unpacked(*p));
        let mut out: Vec<PathId> = out.into_iter().collect();
        out.sort_by_key(|p| looked.order.get(p).copied().unwrap_or(usize::MAX));
        out
    }

    /// The references of `p` but itself, from its verified narinfo, kept for the
    /// traversal: each check examines every path looked into.
    async fn references_of(&self, p: PathId) -> Option<Arc<[StorePath]>> {
        if let Some(r) = self.walk.lock().unwrap().references.get(&p) {
            return Some(r.clone());
        }
        let info = self.info(p).await.ok()?;
        let r: Arc<[StorePath]> = info
            .references
            .iter()
            .filter(|r| **r != info.store_path)
            .cloned()
            .collect();
        let mut walk = self.walk.lock().unwrap();
        if walk.references.len() >= WALK_LISTED {
            walk.references.clear();
        }
        walk.references.insert(p, r.clone());
        Some(r)
    }

    /// Fetches `paths` (looked into by a traversal, not read yet) within the prefetch
    /// slots, in their order, as priority `Ahead`.
    fn fetch_ahead(&self, paths: Vec<PathId>) {
        let (Some(sem), Some(me)) = (self.prefetch.clone(), self.me.upgrade()) else {
            return;
        };
        if paths.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for p in paths {
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    walk_fetch(&me, p).await;
                });
            }
        });
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

/// NAR fetches under way, readers' and prefetches': a prefetch starts no decoder
/// beyond the CPUs (each holds its dictionary, 8 MiB for nix's xz, and adds no speed
/// while the others keep the CPUs busy). Readers are never held back.
pub(super) struct Decoders {
    cpus: usize,
    /// (readers', prefetches') fetches under way
    running: std::sync::Mutex<(usize, usize)>,
    ended: tokio::sync::Notify,
}

/// One fetch counted in [`Decoders`] while it lives.
pub(super) struct Decoding<'a> {
    of: &'a Decoders,
    prefetch: bool,
}

impl Decoders {
    pub(super) fn new(cpus: usize) -> Self {
        Decoders {
            cpus: cpus.max(1),
            running: Default::default(),
            ended: Default::default(),
        }
    }

    pub(super) fn reader(&self) -> Decoding<'_> {
        self.running.lock().unwrap().0 += 1;
        Decoding {
            of: self,
            prefetch: false,
        }
    }

    /// Waits until fewer fetches than CPUs are under way, and counts this one.
    pub(super) async fn prefetch(&self) -> Decoding<'_> {
        loop {
            let ended = self.ended.notified();
            {
                let mut r = self.running.lock().unwrap();
                if r.0 + r.1 < self.cpus {
                    r.1 += 1;
                    return Decoding {
                        of: self,
                        prefetch: true,
                    };
                }
            }
            ended.await;
        }
    }
}

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        {
            let mut r = self.of.running.lock().unwrap();
            if self.prefetch {
                r.1 -= 1;
            } else {
                r.0 -= 1;
            }
        }
        self.of.ended.notify_waiters();
    }
}

/// What a traversal has looked into: every path it listed or read, those read, and
/// the order it looked into those not read yet.
struct Looked {
    all: HashSet<PathId>,
    demanded: HashSet<PathId>,
    order: HashMap<PathId, usize>,
}

impl Looked {
    fn of(walk: &super::Walk) -> Looked {
        let demanded: HashSet<PathId> = walk.demanded.iter().copied().collect();
        let mut all = demanded.clone();
        all.extend(walk.listed.iter().copied());
        all.extend(walk.sent.iter().copied());
        let order = walk
            .listed
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i))
            .collect();
        Looked {
            all,
            demanded,
            order,
        }
    }
}

/// Fetches path `p` for a traversal, unless it is on disk or has a verified tree.
async fn walk_fetch(me: &Arc<Fs>, p: PathId) {
    if me.index.is_unpacked(p) || me.index.tree_source(p) != Some(TreeSource::Listing) {
        return;
    }
    tracing::debug!(path = %me.index.store_path(p), "prefetching a path the traversal listed");
    let _ = me.fetch_content(p, Priority::Ahead).await;
}

/// Whether every path in the closure of `root` was looked into (`refs` has `None`
/// for a path with a reference that was not, and no entry for one not examined).
fn closure_whole(
    root: PathId,
    refs: &HashMap<PathId, Option<Vec<PathId>>>,
    memo: &mut HashMap<PathId, bool>,
) -> bool {
    // iterative, children before parents: store paths reference no cycle but their own
    let mut stack = vec![(root, false)];
    while let Some((p, expanded)) = stack.pop() {
        if memo.contains_key(&p) {
            continue;
        }
        let Some(Some(rs)) = refs.get(&p) else {
            memo.insert(p, false);
            continue;
        };
        if expanded {
            let whole = rs.iter().all(|r| memo.get(r).copied().unwrap_or(false));
            memo.insert(p, whole);
        } else {
            stack.push((p, true));
            stack.extend(
                rs.iter()
                    .filter(|r| !memo.contains_key(r))
                    .map(|r| (*r, false)),
            );
        }
    }
    memo[&root]
}

/// The closure of `root` within `refs`.
fn closure_of(root: PathId, refs: &HashMap<PathId, Option<Vec<PathId>>>) -> HashSet<PathId> {
    let mut seen = HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for r in refs.get(&p).and_then(Option::as_ref).into_iter().flatten() {
            if seen.insert(*r) {
                todo.push(*r);
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(edges: &[(PathId, Option<&[PathId]>)]) -> HashMap<PathId, Option<Vec<PathId>>> {
        edges
            .iter()
            .map(|(p, r)| (*p, r.map(<[PathId]>::to_vec)))
            .collect()
    }

    #[test]
    fn a_closure_is_whole_only_when_every_member_was_looked_into() {
        // 0 -> {1, 2}, 2 -> {3}; 4 -> {5} where 5 has a reference nobody looked into
        let r = refs(&[
            (0, Some(&[1, 2])),
            (1, Some(&[])),
            (2, Some(&[3])),
            (3, Some(&[])),
            (4, Some(&[5])),
            (5, None),
        ]);
        let mut memo = HashMap::new();
        for (p, whole) in [
            (0, true),
            (2, true),
            (3, true),
            (4, false),
            (5, false),
            (9, false),
        ] {
            assert_eq!(closure_whole(p, &r, &mut memo), whole, "path {p}");
        }
        assert_eq!(closure_of(0, &r), HashSet::from([0, 1, 2, 3]));
        assert_eq!(closure_of(2, &r), HashSet::from([2, 3]));
        // a reference not examined (beyond CERTAIN_PATHS) leaves its closure not whole
        let r = refs(&[(0, Some(&[1]))]);
        assert!(!closure_whole(0, &r, &mut HashMap::new()));
    }

    #[tokio::test]
    async fn prefetches_wait_for_a_decoder_below_the_cpus_and_readers_never_wait() {
        let d = Arc::new(Decoders::new(2));
        let reader = d.reader();
        let first = d.prefetch().await;
        // two under way on two CPUs: another prefetch waits, a reader does not
        let d2 = d.clone();
        let waiting = tokio::spawn(async move {
            let _decoding = d2.prefetch().await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a third decoder started");
        let another_reader = d.reader();
        assert_eq!(*d.running.lock().unwrap(), (2, 1));
        drop(another_reader);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "started with two readers' fetches under way"
        );
        // the reader's fetch ended: the waiting prefetch goes on
        drop(reader);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiting prefetch went on")
            .unwrap();
        drop(first);
        assert_eq!(*d.running.lock().unwrap(), (0, 0));
    }
}
