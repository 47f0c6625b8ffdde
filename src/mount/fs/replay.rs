//! Starting replays of start-up profiles (docs/profiles.md): when a path whose
//! narinfo names a profile is first looked into, every path the profile names is
//! looked up and its index loaded, all at once, and the pack is fetched ahead of the
//! program. Off the request loop; a profile that cannot be used costs a warning.

use super::{Fs, Need};
use crate::formats::narinfo::NarInfo;
use crate::formats::store_path::StorePath;
use crate::mount::inodes::PathId;
use std::collections::HashMap;
use std::sync::Arc;

impl Fs {
    /// Starts the replay of the profile `info` names, once per path per mount.
    pub(super) fn maybe_replay(&self, id: PathId, info: &Arc<NarInfo>) {
        if info.profile.is_none() || !self.replayed.lock().unwrap().insert(id) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let info = info.clone();
        tokio::spawn(async move { me.replay(info).await });
    }

    async fn replay(self: Arc<Self>, info: Arc<NarInfo>) {
        let sp = &info.store_path;
        let m = match self.fetcher.profile_manifest(&info).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("{sp}: start-up profile ignored: {e}");
                return;
            }
        };
        let mut paths: Vec<&StorePath> = Vec::new();
        for c in &m.chunks {
            if !paths.contains(&&c.path) {
                paths.push(&c.path);
            }
        }
        let loads = paths.iter().map(|p| {
            let me = self.clone();
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
                Some(((*p).clone(), b))
            }
        });
        let indexed: HashMap<_, _> = futures::future::join_all(loads)
            .await
            .into_iter()
            .flatten()
            .collect();
        match self.fetcher.blocks().replay(&m, &indexed).await {
            Ok(r) => tracing::info!(
                path = %sp,
                stored = r.stored,
                already = r.already,
                dropped = r.dropped,
                bytes = r.bytes,
                "replayed its start-up profile"
            ),
            Err(e) => tracing::warn!("{e}; reads go on from the blocks"),
        }
        if indexed.len() < paths.len() {
            tracing::warn!(
                "{sp}: its start-up profile names {} paths that are not indexed or not trusted here: their chunks come from their blocks or NARs",
                paths.len() - indexed.len()
            );
        }
    }
}
