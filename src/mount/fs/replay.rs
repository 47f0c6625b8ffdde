//! Starting replays of start-up profiles (docs/profiles.md): when a path whose
//! narinfo names a profile is first looked into, every path the profile names is
//! looked up and its index loaded, all at once, and the pack is fetched ahead of the
//! program. Off the request loop; a profile that cannot be used costs a warning.

use super::{Fs, Need};
use crate::formats::hash::Sha256;
use crate::formats::narinfo::NarInfo;
use crate::formats::store_path::StorePath;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

impl Fs {
    /// Store path inode `ino` was looked up by name (a program uses it): the first
    /// time in this mount, the replay of its profile, if it has one, to be run on the
    /// runtime. Reference prefetches and replays load paths without a lookup, so they
    /// start none.
    pub fn first_use(&self, ino: u64) -> Option<impl std::future::Future<Output = ()> + Send> {
        let id = self.index.path_of(ino)?;
        if !self.replayed.lock().unwrap().insert(id) {
            return None;
        }
        let me = self.me.upgrade()?;
        // taken before the kernel has the lookup's answer, so no read of the program
        // can slip past the replay before it says which chunks it brings
        let starting = self.fetcher.blocks().replays().starting();
        Some(async move {
            if let Ok(info) = me.info(id).await {
                if info.profile.is_some() {
                    me.replay(info, starting).await;
                }
            }
        })
    }

    async fn replay(
        self: Arc<Self>,
        info: Arc<NarInfo>,
        starting: crate::fetch::pending::Starting,
    ) {
        let sp = &info.store_path;
        let m = match self.fetcher.profile_manifest(&info).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("{sp}: start-up profile ignored: {e}");
                return;
            }
        };
        let mut seen = HashSet::new();
        let paths: Vec<&StorePath> = m
            .chunks
            .iter()
            .map(|c| &c.path)
            .filter(|p| seen.insert(*p))
            .collect();
        // the paths it names are looked up and their indexes loaded (the program will
        // want them) while the pack streams: every chunk in it is checked against its
        // own hash, and only ever served by a hash a signed index or NAR gave
        let loads = paths.iter().map(|p| {
            let me = self.clone();
            let p = (*p).clone();
            async move {
                let name = p.basename();
                if me.index.path_by_basename(name).is_none() {
                    me.satisfy(Need::NarInfo(name.to_owned())).await.ok()?;
                }
                let id = me.index.path_by_basename(name)?;
                // a path a profile names does not start a profile of its own
                me.replayed.lock().unwrap().insert(id);
                me.satisfy(Need::Tree(id)).await.ok()?;
                let b = me.indexed.lock().unwrap().get(&id).cloned()?;
                Some((p, b))
            }
        });
        let loads = tokio::spawn(futures::future::join_all(loads));
        // the frames of the first PRIME bytes at once, the rest once the indexes say
        // which of its chunks anything here could ever read
        let mut raw = 0;
        let split = m
            .frames
            .iter()
            .position(|f| {
                raw += f.raw_len;
                raw - f.raw_len >= PRIME
            })
            .unwrap_or(m.frames.len());
        let blocks = self.fetcher.blocks();
        let first = blocks.replay(&m, 0..split, None, Some(starting)).await;
        let indexed: HashMap<StorePath, Arc<crate::fetch::blocks::Blocks>> = loads
            .await
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        let known: HashSet<(Sha256, u64)> = indexed
            .values()
            .flat_map(|b| b.chunks().iter().map(|c| (c.hash, c.len)))
            .collect();
        let unindexed = m
            .chunks
            .iter()
            .filter(|c| !known.contains(&(c.hash, c.len)))
            .count();
        if unindexed > 0 {
            tracing::warn!(
                "{sp}: its start-up profile names {unindexed} chunks that no signed index here holds (paths not indexed or not trusted, or pushed anew since): they are not used"
            );
        }
        let rest = match first {
            Ok(_) if split < m.frames.len() => Some(
                blocks
                    .replay(&m, split..m.frames.len(), Some(&known), None)
                    .await,
            ),
            _ => None,
        };
        for r in std::iter::once(first).chain(rest) {
            match r {
                Ok(r) => {
                    tracing::info!(
                        path = %sp,
                        stored = r.stored,
                        already = r.already,
                        bytes = r.bytes,
                        "replayed its start-up profile"
                    );
                    if let Some(e) = r.mismatch {
                        tracing::warn!("{e}: not stored; their reads go to the blocks");
                    }
                }
                Err(e) => tracing::warn!("{e}; reads go on from the blocks"),
            }
        }
    }
}

/// Decoded pack bytes replayed before the paths' indexes are in: a start-up's worth
/// (Python importing ten packages reads ~7 MB), fetched at once; beyond it, only chunks
/// a signed index holds.
const PRIME: u64 = 8 << 20;
