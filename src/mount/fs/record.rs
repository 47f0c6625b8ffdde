//! Recording what a program reads first (`narfs profile record`, docs/profiles.md).
//! A recording belongs to a process group: a request counts if the process that made
//! it is in that group now, so other programs reading the mount at the same time are
//! not mixed in. Only chunks of indexed paths are recorded (only they can be replayed).

use super::Fs;
use crate::formats::hash::Sha256;
use crate::formats::profile::Recorded;
use crate::mount::inodes::TreeSource;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub(super) struct Recorder {
    /// Whether any recording runs: reads pay for nothing else when none does.
    active: AtomicBool,
    sessions: Mutex<HashMap<i32, Session>>,
}

#[derive(Default)]
struct Session {
    seen: HashSet<Sha256>,
    order: Vec<Recorded>,
}

/// Chunks one recording keeps at most (as many as a profile may hold).
const MAX_RECORDED: usize = crate::formats::profile::MAX_CHUNKS;

impl Fs {
    /// Starts recording the reads of process group `pgid`. The kernel's cached pages
    /// of indexed files are dropped first, so what an earlier run read reaches the
    /// mount again. Blocking (the kernel is told of every such file): call it off the
    /// request loop.
    pub fn record_start(&self, pgid: i32) -> Result<(), String> {
        if pgid <= 1 {
            return Err(format!("{pgid} is not a process group to record"));
        }
        {
            let mut s = self.recorder.sessions.lock().unwrap();
            if s.contains_key(&pgid) {
                return Err(format!("process group {pgid} is already recorded"));
            }
            s.insert(pgid, Session::default());
            self.recorder.active.store(true, Ordering::Relaxed);
        }
        if let Some(inv) = self.invalidator.get() {
            for ino in self.index.indexed_files() {
                inv.data(ino);
            }
        }
        Ok(())
    }

    /// Ends the recording of `pgid`: the chunks in the order they were first read.
    pub fn record_end(&self, pgid: i32) -> Vec<Recorded> {
        let mut s = self.recorder.sessions.lock().unwrap();
        let out = s.remove(&pgid).map(|s| s.order).unwrap_or_default();
        self.recorder.active.store(!s.is_empty(), Ordering::Relaxed);
        out
    }

    /// A read of `size` bytes at `offset` of `ino` by process `pid`.
    pub fn record_read(&self, pid: u32, ino: u64, offset: u64, size: u64) {
        if !self.recorder.active.load(Ordering::Relaxed) {
            return;
        }
        let pgid = unsafe { libc::getpgid(pid as libc::pid_t) };
        if pgid <= 0 || !self.recorder.sessions.lock().unwrap().contains_key(&pgid) {
            return;
        }
        let Some(plan) = self.index.read_plan(ino, offset, size) else {
            return;
        };
        if self.index.tree_source(plan.path) != Some(TreeSource::Index) {
            return;
        }
        let Some(chunks) = plan.chunks.filter(|c| !c.is_empty()) else {
            return;
        };
        let file = self
            .index
            .relative_path(ino)
            .map(|(_, rel)| rel)
            .unwrap_or_default();
        let path = self.index.store_path(plan.path);
        let mut sessions = self.recorder.sessions.lock().unwrap();
        let Some(s) = sessions.get_mut(&pgid) else {
            return;
        };
        for c in chunks {
            if s.order.len() < MAX_RECORDED && s.seen.insert(c.hash) {
                s.order.push(Recorded {
                    path: path.clone(),
                    hash: c.hash,
                    len: c.len,
                    file: file.clone(),
                });
            }
        }
    }

    /// An open that hands the kernel the file's only chunk (passthrough): its reads
    /// never reach the mount, so the open counts as reading it.
    pub fn record_open(&self, pid: u32, ino: u64) {
        if self.recorder.active.load(Ordering::Relaxed)
            && self.index.file_chunks(ino).is_some_and(|c| c.len() == 1)
        {
            self.record_read(pid, ino, 0, 1);
        }
    }
}
