//! Chunks that start-up profile replays are bringing, for readers to wait on: kept
//! apart from both the block reader (which waits) and the replay (which registers) so
//! neither names the other's internals.

use crate::formats::hash::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How far (decoded bytes) beyond what a replay has decoded a reader still waits for
/// it rather than fetching its block: about what that block would carry (blocks are
/// about 1 MiB compressed), so the pack brings it no later than the block would.
const WAIT_AHEAD: u64 = 2 << 20;
/// The longest a reader waits for a replay before it fetches its block after all.
const WAIT_AT_MOST: Duration = Duration::from_secs(2);

/// Chunks replays are bringing: where each ends in its pack's decoded bytes, and how
/// far that replay has got.
#[derive(Default)]
pub struct Replays {
    pending: Arc<Mutex<HashMap<Sha256, Pending>>>,
}

#[derive(Clone)]
struct Pending {
    end: u64,
    progress: tokio::sync::watch::Receiver<u64>,
}

impl Replays {
    /// Waits (bounded) for chunk `hash` if a replay brings it soon; returns at once
    /// otherwise. The caller then finds it on disk or fetches its block.
    pub async fn wait(&self, hash: &Sha256) {
        let Some(p) = self.pending.lock().unwrap().get(hash).cloned() else {
            return;
        };
        let mut progress = p.progress;
        if p.end.saturating_sub(*progress.borrow()) > WAIT_AHEAD {
            return;
        }
        // an ended replay drops its sender: the wait ends with it
        let _ = tokio::time::timeout(WAIT_AT_MOST, progress.wait_for(|&at| at >= p.end)).await;
    }
}

/// A replay's chunks, registered until it is dropped (however the replay ends).
pub struct Registered {
    pending: Arc<Mutex<HashMap<Sha256, Pending>>>,
    mine: Vec<Sha256>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap();
        for h in &self.mine {
            p.remove(h);
        }
    }
}

impl Replays {
    /// Registers chunks (hash, where it ends in the decoded pack) that a replay whose
    /// decoded position is `progress` brings. A chunk another replay already brings
    /// stays its.
    pub fn register(
        &self,
        chunks: impl Iterator<Item = (Sha256, u64)>,
        progress: tokio::sync::watch::Receiver<u64>,
    ) -> Registered {
        let mut mine = Vec::new();
        let mut p = self.pending.lock().unwrap();
        for (hash, end) in chunks {
            p.entry(hash).or_insert_with(|| {
                mine.push(hash);
                Pending {
                    end,
                    progress: progress.clone(),
                }
            });
        }
        Registered {
            pending: self.pending.clone(),
            mine,
        }
    }
}
