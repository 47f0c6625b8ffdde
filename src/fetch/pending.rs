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
pub struct Replays {
    pending: Arc<Mutex<HashMap<Sha256, Pending>>>,
    /// Replays whose manifest is on its way: until it is in, nobody knows which chunks
    /// they bring, so readers wait for it (a round trip, as a block would cost).
    starting: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Replays {
    fn default() -> Self {
        Replays {
            pending: Default::default(),
            starting: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

/// A replay starting: held from before its manifest is fetched until its chunks are
/// registered (or it ends).
pub struct Starting(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
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
        if *self.starting.borrow() > 0 {
            let mut starting = self.starting.subscribe();
            let _ = tokio::time::timeout(WAIT_AT_MOST, starting.wait_for(|&n| n == 0)).await;
        }
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
    /// A replay starts: readers wait for its manifest until the guard goes.
    pub fn starting(&self) -> Starting {
        self.starting.send_modify(|n| *n += 1);
        Starting(self.starting.clone())
    }

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
