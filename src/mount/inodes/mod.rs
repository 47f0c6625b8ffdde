//! The superblock: owns every inode of the mount.
//!
//! Inode 1 is the root. Every store path owns one *tree*: a block of nodes, the path's
//! top at position 0. A tree is built from a `.ls` listing, a verified NAR or a file
//! index and replaced as a whole: when the verified NAR disagrees with the listing (or
//! the path was pushed again with other contents) the path gets a new tree with new
//! inode numbers, top included, and the old tree is freed. An inode of a freed tree
//! answers ESTALE, so nothing the kernel learnt from a listing can outlive the
//! verification that refuted it, and a forged listing costs memory only until its NAR
//! arrives.
//!
//! Inode numbers come from one counter and are never reused during a mount: a tree's
//! top gets one when the tree is created, the nodes a build appends one contiguous run.
//! So they stay below 2^32 (32-bit programs without large-file support get EOVERFLOW
//! from `stat` beyond) until the mount has seen about four billion nodes. A sorted list
//! of runs maps a number back to its tree; the tops of trees created one after another
//! (a listing of the cache) share one run.

use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use crate::formats::nixbase32;
use crate::formats::store_path::StorePath;
use std::sync::RwLock;
use tree::{build, Inner, NodeKind, Run, StorePathEntry, TOP};

mod tree;

pub const ROOT: u64 = 1;

pub type PathId = u32;

/// What a node is, as the file system layer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Root,
    /// A store path whose tree is not known yet.
    Unloaded,
    Dir,
    File {
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Box<[u8]>,
    },
    /// A node of a tree that was replaced: every operation on it fails (ESTALE), so
    /// nothing is ever resolved through the replaced tree's shape.
    Stale,
}

/// Where a store path's tree came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeSource {
    /// The unsigned `.ls` listing: names, types and sizes only, until the NAR is here.
    Listing,
    /// The verified NAR (or its tree kept in the disk cache): contents come whole.
    Nar,
    /// The verified file index: contents come chunk by chunk.
    Index,
}

impl TreeSource {
    /// Whether what it says may be cached by the kernel and acted on.
    pub fn verified(self) -> bool {
        matches!(self, TreeSource::Nar | TreeSource::Index)
    }
}

/// Kernel caches to drop after a tree was replaced: `(directory inode, entry name)`.
pub type Stale = Vec<(u64, Box<[u8]>)>;

/// The most nodes all trees built from listings may hold together (about 80 MB): a
/// hostile cache could offer many large listings, each within its own bounds; beyond
/// this, paths are read from their NARs.
pub const MAX_LISTING_NODES: usize = 500_000;

pub struct Index {
    inner: RwLock<Inner>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            inner: RwLock::new(Inner {
                next_ino: ROOT + 1,
                ..Inner::default()
            }),
        }
    }
}

/// See `Index::read_plan`.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadPlan {
    pub path: PathId,
    pub size: u64,
    pub chunks: Option<Vec<PlannedChunk>>,
}

/// A chunk of a file: where it is in the file and in the NAR, and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    pub at: u64,
    pub len: u64,
    pub hash: Sha256,
    pub nar_offset: Option<u64>,
}

/// A copy of what a FUSE reply needs about one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub ino: u64,
    pub parent: u64,
    pub path: PathId,
    pub kind: Kind,
    /// Where its path's tree came from and whether the verified contents are on disk,
    /// read under the same lock as `kind`: a check of either against a node read
    /// separately could pair a listing's node with the NAR's state.
    pub tree: Option<TreeSource>,
    pub unpacked: bool,
}

impl Index {
    /// Adds a store path whose narinfo verified (idempotent); returns its id.
    pub fn add_path(&self, sp: &StorePath) -> PathId {
        let key = hash_key(sp.hash_part()).expect("validated store path");
        let mut g = self.inner.write().unwrap();
        if let Some(&id) = g.by_hash.get(&key) {
            return id;
        }
        let id = g.paths.len() as PathId;
        let (tree, top) = g.new_tree(id, sp.basename().as_bytes().into());
        let root_pos = g.root_order.len() as u32;
        g.root_order.push(top);
        g.by_hash.insert(key, id);
        g.paths.push(StorePathEntry {
            tree,
            root_pos,
            source: None,
            tree_nar: 0,
            unpacked: false,
            failed: false,
        });
        id
    }

    pub fn path_count(&self) -> usize {
        self.inner.read().unwrap().paths.len()
    }

    pub fn has_hash(&self, hash: &str) -> bool {
        hash_key(hash).is_some_and(|k| self.inner.read().unwrap().by_hash.contains_key(&k))
    }

    /// The path named exactly `name` (`<hash>-<name>`), if known.
    pub fn path_by_basename(&self, name: &str) -> Option<PathId> {
        let key = hash_key(name.get(..32)?)?;
        let g = self.inner.read().unwrap();
        let &id = g.by_hash.get(&key)?;
        (*g.top(id).name == *name.as_bytes()).then_some(id)
    }

    pub fn store_path(&self, id: PathId) -> StorePath {
        let g = self.inner.read().unwrap();
        let name = &g.top(id).name;
        StorePath::from_basename(std::str::from_utf8(name).expect("validated"))
            .expect("validated store path")
    }

    pub fn path_ino(&self, id: PathId) -> u64 {
        let g = self.inner.read().unwrap();
        g.root_order[g.paths[id as usize].root_pos as usize]
    }

    /// The path owning inode `ino`, whether or not its tree is still current.
    pub fn path_of(&self, ino: u64) -> Option<PathId> {
        let g = self.inner.read().unwrap();
        let (t, _) = g.locate(ino)?;
        Some(g.trees.get(t as usize - 1)?.path)
    }

    pub fn tree_source(&self, id: PathId) -> Option<TreeSource> {
        self.inner.read().unwrap().paths[id as usize].source
    }

    /// Whether `ino` is a directory of a path whose tree came from its verified NAR
    /// (without copying anything, as `node` does).
    pub fn is_verified_dir(&self, ino: u64) -> bool {
        let g = self.inner.read().unwrap();
        let Some((tree, n)) = g.find(ino) else {
            return false;
        };
        matches!(n.kind, NodeKind::Dir { .. })
            && g.paths[tree.path as usize]
                .source
                .is_some_and(TreeSource::verified)
    }

    pub fn is_unpacked(&self, id: PathId) -> bool {
        self.inner.read().unwrap().paths[id as usize].unpacked
    }

    pub fn set_unpacked(&self, id: PathId, unpacked: bool) {
        self.inner.write().unwrap().paths[id as usize].unpacked = unpacked;
    }

    pub fn set_failed(&self, id: PathId, failed: bool) {
        self.inner.write().unwrap().paths[id as usize].failed = failed;
    }

    pub fn has_failed(&self, id: PathId) -> bool {
        self.inner.read().unwrap().paths[id as usize].failed
    }

    /// Gives a store path its tree, built for the NAR whose NarHash is `nar_hash`. A
    /// listing never replaces anything. The NAR's tree replaces a listing's when they
    /// differ (the NAR wins), and replaces an earlier NAR's tree when the cache now
    /// holds different contents for the path. A replaced tree is freed and its inodes
    /// answer ESTALE; the returned entries are stale in the kernel's caches, the
    /// path's top included (`(ROOT, name)`). For a listing's or a NAR's tree (a file
    /// index's chunks may have another size: `attach_index`).
    pub fn attach_tree(
        &self,
        id: PathId,
        tree: &Entry,
        source: TreeSource,
        nar_hash: &Sha256,
    ) -> Stale {
        debug_assert_ne!(source, TreeSource::Index);
        self.attach(
            id,
            tree,
            source,
            nar_hash,
            crate::formats::nar::DEFAULT_CHUNK_SHIFT,
        )
    }

    /// `attach_tree` for the tree of a verified file index, read with its own chunk
    /// size.
    pub fn attach_index(&self, id: PathId, index: &crate::formats::file_index::FileIndex) -> Stale {
        self.attach(
            id,
            &index.root,
            TreeSource::Index,
            &index.nar_hash,
            index.chunk_shift,
        )
    }

    fn attach(
        &self,
        id: PathId,
        tree: &Entry,
        source: TreeSource,
        nar_hash: &Sha256,
        chunk_shift: u8,
    ) -> Stale {
        let tag = u64::from_le_bytes(nar_hash.0[..8].try_into().expect("8 bytes"));
        let mut g = self.inner.write().unwrap();
        let p = &g.paths[id as usize];
        let (old, same_nar) = (p.tree, p.tree_nar == tag);
        let mut stale = Vec::new();
        let replace = match (p.source, source) {
            // The top was shown to the kernel (in the root's listing) as a directory
            // before anything was known: a path that is not one gets a new inode.
            (None, _) => !matches!(tree, Entry::Directory { .. }),
            (Some(TreeSource::Listing), new)
                if new.verified() && same_nar && g.matches(old, 0, tree) =>
            {
                g.paths[id as usize].source = Some(new);
                g.listing_nodes -= g.trees[old as usize - 1].nodes.len();
                g.trees[old as usize - 1].chunk_shift = chunk_shift;
                g.adopt_chunks(old, 0, tree);
                return stale;
            }
            (Some(was), new) if new.verified() && (was == TreeSource::Listing || !same_nar) => {
                let name = String::from_utf8_lossy(&g.top(id).name).into_owned();
                if was == TreeSource::Listing {
                    tracing::warn!(
                        "the .ls listing of /nix/store/{name} disagrees with its verified NAR; serving the NAR"
                    );
                } else {
                    tracing::warn!(
                        "/nix/store/{name} was pushed again with different contents; serving the new ones"
                    );
                }
                true
            }
            _ => return stale,
        };
        if replace && g.paths[id as usize].source == Some(TreeSource::Listing) {
            g.listing_nodes -= g.trees[old as usize - 1].nodes.len();
        }
        let t = if replace {
            let name = g.top(id).name.clone();
            g.collect_entries(old, 0, &mut stale);
            stale.push((ROOT, name.clone()));
            let (t, top) = g.new_tree(id, name);
            let freed = std::mem::take(&mut g.trees[old as usize - 1].nodes);
            g.live_nodes -= freed.len();
            let pos = g.paths[id as usize].root_pos as usize;
            g.root_order[pos] = top;
            g.paths[id as usize].tree = t;
            t
        } else {
            old
        };
        let first = g.next_ino;
        let tr = &mut g.trees[t as usize - 1];
        debug_assert_eq!(tr.nodes.len(), 1, "a tree is built once");
        let mut nodes = std::mem::take(&mut tr.nodes).into_vec();
        nodes[0].kind = build(&mut nodes, 0, tree);
        tr.nodes = nodes.into_boxed_slice();
        tr.chunk_shift = chunk_shift;
        tr.first = first;
        let below = tr.nodes.len() - 1;
        if below > 0 {
            g.runs.push(Run {
                first,
                tree: t,
                tops: false,
            });
            g.next_ino += below as u64;
            g.live_nodes += below;
        }
        if source == TreeSource::Listing {
            g.listing_nodes += g.trees[t as usize - 1].nodes.len();
        }
        let p = &mut g.paths[id as usize];
        p.source = Some(source);
        p.tree_nar = tag;
        stale
    }

    /// Whether a listing of `nodes` more nodes fits `MAX_LISTING_NODES`.
    pub fn listing_fits(&self, nodes: usize) -> bool {
        self.inner.read().unwrap().listing_nodes + nodes <= MAX_LISTING_NODES
    }

    pub fn node(&self, ino: u64) -> Option<NodeView> {
        if ino == ROOT {
            return Some(NodeView {
                ino,
                parent: ROOT,
                path: PathId::MAX,
                kind: Kind::Root,
                tree: None,
                unpacked: false,
            });
        }
        let g = self.inner.read().unwrap();
        let (t, pos) = g.locate(ino)?;
        let tree = g.trees.get(t as usize - 1)?;
        let p = &g.paths[tree.path as usize];
        if !tree.live() {
            return Some(NodeView {
                ino,
                parent: ROOT,
                path: tree.path,
                kind: Kind::Stale,
                tree: None,
                unpacked: false,
            });
        }
        let n = tree.nodes.get(pos as usize)?;
        Some(NodeView {
            ino,
            parent: match n.parent {
                TOP => ROOT,
                0 => g.root_order[p.root_pos as usize],
                pos => tree.ino_below(pos),
            },
            path: tree.path,
            kind: n.kind.view(),
            tree: p.source,
            unpacked: p.unpacked,
        })
    }

    /// Child `name` of directory `parent` (not the root).
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let g = self.inner.read().unwrap();
        let (tree, n) = g.find(parent)?;
        let NodeKind::Dir { children, .. } = &n.kind else {
            return None;
        };
        children
            .binary_search_by(|&c| (*tree.nodes[c as usize].name).cmp(name))
            .ok()
            .map(|i| tree.ino_below(children[i]))
    }

    /// `(ino, name, kind)` of the entries of `dir` from position `from` on, at most
    /// `max`. Kinds carry no link targets (readdir needs only the type).
    pub fn entries(&self, dir: u64, from: usize, max: usize) -> Vec<(u64, Box<[u8]>, Kind)> {
        let g = self.inner.read().unwrap();
        let shallow = |k: &NodeKind| match k {
            NodeKind::Symlink { .. } => Kind::Symlink {
                target: Box::new([]),
            },
            k => k.view(),
        };
        if dir == ROOT {
            return g
                .root_order
                .iter()
                .skip(from)
                .take(max)
                .filter_map(|&c| {
                    let (_, n) = g.find(c)?;
                    Some((c, n.name.clone(), shallow(&n.kind)))
                })
                .collect();
        }
        let Some((tree, n)) = g.find(dir) else {
            return Vec::new();
        };
        let NodeKind::Dir { children, .. } = &n.kind else {
            return Vec::new();
        };
        children
            .iter()
            .skip(from)
            .take(max)
            .map(|&c| {
                let n = &tree.nodes[c as usize];
                (tree.ino_below(c), n.name.clone(), shallow(&n.kind))
            })
            .collect()
    }

    /// Path of `ino` relative to its store path's directory (empty for the top).
    pub fn relative_path(&self, ino: u64) -> Option<(PathId, Vec<u8>)> {
        let g = self.inner.read().unwrap();
        let (tree, _) = g.find(ino)?;
        let mut parts = Vec::new();
        let mut cur = g.locate(ino)?.1;
        while cur != 0 {
            let n = &tree.nodes[cur as usize];
            parts.push(&n.name);
            cur = n.parent;
        }
        let mut rel = Vec::new();
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                rel.push(b'/');
            }
            rel.extend_from_slice(p);
        }
        Some((tree.path, rel))
    }

    pub fn subdir_count(&self, ino: u64) -> u32 {
        let g = self.inner.read().unwrap();
        match g.find(ino).map(|(_, n)| &n.kind) {
            Some(NodeKind::Dir { subdirs, .. }) => *subdirs,
            _ => 0,
        }
    }

    /// What reading bytes `[offset, offset + len)` of file `ino` takes: its path, size
    /// and the chunks covering the range. `None` for what
    /// is not a regular file of a live tree; `chunks` is `None` while its tree came
    /// from a listing (contents unknown until the NAR is verified).
    pub fn read_plan(&self, ino: u64, offset: u64, len: u64) -> Option<ReadPlan> {
        let g = self.inner.read().unwrap();
        let (tree, n) = g.find(ino)?;
        let NodeKind::File {
            size,
            chunks,
            nar_offset,
            ..
        } = &n.kind
        else {
            return None;
        };
        let chunks = chunks.as_ref().map(|c| {
            let shift = tree.chunk_shift;
            let end = offset.saturating_add(len).min(*size);
            if offset >= end {
                return Vec::new();
            }
            let (first, last) = (offset >> shift, (end - 1) >> shift);
            (first..=last)
                .filter_map(|i| {
                    let at = i << shift;
                    let len = (*size - at).min(1 << shift);
                    Some(PlannedChunk {
                        at,
                        len,
                        hash: *c.get(i as usize)?,
                        nar_offset: (*nar_offset > 0).then(|| nar_offset + at),
                    })
                })
                .collect()
        });
        Some(ReadPlan {
            path: tree.path,
            size: *size,
            chunks,
        })
    }

    /// Every chunk hash of file `ino` (what an open handle pins).
    pub fn file_chunks(&self, ino: u64) -> Option<Box<[Sha256]>> {
        let g = self.inner.read().unwrap();
        match &g.find(ino)?.1.kind {
            NodeKind::File { chunks, .. } => chunks.clone(),
            _ => None,
        }
    }

    /// Every file inode of the paths read through their file index: what a recording
    /// must see read again (the kernel may hold their pages from earlier reads).
    pub fn indexed_files(&self) -> Vec<u64> {
        let g = self.inner.read().unwrap();
        let mut out = Vec::new();
        for e in g
            .paths
            .iter()
            .filter(|e| e.source == Some(TreeSource::Index))
        {
            let tree = &g.trees[e.tree as usize - 1];
            for (pos, n) in tree.nodes.iter().enumerate() {
                if matches!(n.kind, NodeKind::File { .. }) {
                    out.push(match pos {
                        0 => g.root_order[e.root_pos as usize],
                        _ => tree.ino_below(pos as u32),
                    });
                }
            }
        }
        out
    }

    /// Nodes held in live trees (for memory checks and `statfs`).
    pub fn node_count(&self) -> usize {
        self.inner.read().unwrap().live_nodes
    }
}

fn hash_key(hash: &str) -> Option<[u8; 20]> {
    nixbase32::decode(hash)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds the store path `basename`: it, its id and its top's inode.
    fn added(index: &Index, basename: &str) -> (StorePath, PathId, u64) {
        let sp = StorePath::from_basename(basename).unwrap();
        let id = index.add_path(&sp);
        (sp, id, index.path_ino(id))
    }

    fn tree(size: u64) -> Entry {
        Entry::Directory {
            entries: vec![(
                b"f".to_vec().into(),
                Entry::Regular {
                    size,
                    executable: false,
                    nar_offset: None,
                    chunks: None,
                },
            )],
        }
    }

    #[test]
    fn trees_are_replaced_only_by_a_disagreeing_or_different_nar() {
        let index = Index::default();
        let (sp, id, top) = added(&index, "00000000000000000000000000000000-p");
        let (h1, h2) = (Sha256::digest(b"one"), Sha256::digest(b"two"));
        let child = |top| index.child(top, b"f").unwrap();

        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Listing, &h1)
            .is_empty());
        let listed = child(top);
        // a listing never replaces, an agreeing NAR keeps the inodes
        assert!(index
            .attach_tree(id, &tree(4), TreeSource::Listing, &h1)
            .is_empty());
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Nar, &h1)
            .is_empty());
        assert_eq!(child(top), listed);
        assert_eq!(index.path_ino(id), top);
        // the same NAR again (after an eviction) changes nothing
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Nar, &h1)
            .is_empty());
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Listing, &h2)
            .is_empty());
        // another NAR for the path, even of the same shape: new inodes, the top's
        // included; the old ones are stale and their memory freed
        let nodes = index.node_count();
        let stale = index.attach_tree(id, &tree(3), TreeSource::Nar, &h2);
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(stale.contains(&(top, b"f".to_vec().into())));
        assert!(stale.contains(&(ROOT, sp.basename().as_bytes().into())));
        let new_top = index.path_ino(id);
        assert_ne!(new_top, top);
        assert_ne!(child(new_top), listed);
        assert_eq!(index.node(listed).unwrap().kind, Kind::Stale);
        assert_eq!(index.node(top).unwrap().kind, Kind::Stale);
        assert_eq!(index.node(new_top).unwrap().tree, Some(TreeSource::Nar));
        assert_eq!(index.node_count(), nodes);
        assert_eq!(index.entries(ROOT, 0, 10)[0].0, new_top);
        assert_eq!(index.path_of(listed), Some(id));

        // a listing of the old narinfo, then the NAR of a newer one: rebuilt too
        let (_, id, top) = added(&index, "11111111111111111111111111111111-q");
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Listing, &h1)
            .is_empty());
        let listed = index.child(top, b"f").unwrap();
        assert_eq!(
            index.attach_tree(id, &tree(3), TreeSource::Nar, &h2).len(),
            2
        );
        assert_ne!(index.child(index.path_ino(id), b"f").unwrap(), listed);
    }

    #[test]
    fn a_top_that_is_not_a_directory_gets_its_own_inode() {
        let index = Index::default();
        let (sp, id, top) = added(&index, "00000000000000000000000000000000-f");
        let file = Entry::Regular {
            size: 3,
            executable: true,
            nar_offset: None,
            chunks: None,
        };
        let stale = index.attach_tree(id, &file, TreeSource::Listing, &Sha256::digest(b"x"));
        assert_eq!(stale, vec![(ROOT, sp.basename().as_bytes().into())]);
        assert_ne!(index.path_ino(id), top);
        assert_eq!(index.node(top).unwrap().kind, Kind::Stale);
        assert_eq!(
            index.node(index.path_ino(id)).unwrap().kind,
            Kind::File {
                size: 3,
                executable: true
            }
        );
        assert_eq!(index.path_by_basename(sp.basename()), Some(id));
    }

    #[test]
    fn inode_numbers_are_small_and_never_reused() {
        let index = Index::default();
        let path = |i: usize| {
            let sp = StorePath::from_basename(&format!("{i:032}-p")).unwrap();
            index.add_path(&sp)
        };
        let two = Entry::Directory {
            entries: vec![
                (b"a".to_vec().into(), tree(1)),
                (b"b".to_vec().into(), tree(2)),
            ],
        };
        let (h1, h2) = (Sha256::digest(b"one"), Sha256::digest(b"two"));
        let ids: Vec<PathId> = (0..3).map(path).collect();
        index.attach_tree(ids[1], &two, TreeSource::Nar, &h1);
        let ids: Vec<PathId> = ids.into_iter().chain((3..5).map(path)).collect();
        let names = |top| -> Vec<(u64, Vec<u8>)> {
            let mut out = vec![];
            for a in [&b"a"[..], b"b"] {
                let d = index.child(top, a).unwrap();
                out.push((d, index.relative_path(d).unwrap().1));
                let f = index.child(d, b"f").unwrap();
                out.push((f, index.relative_path(f).unwrap().1));
            }
            out
        };
        let old = names(index.path_ino(ids[1]));
        let old_top = index.path_ino(ids[1]);
        index.attach_tree(ids[1], &two, TreeSource::Nar, &h2);
        let new = names(index.path_ino(ids[1]));
        let mut all: Vec<u64> = ids.iter().map(|&i| index.path_ino(i)).collect();
        all.push(old_top);
        all.extend(old.iter().chain(&new).map(|(i, _)| *i));
        // every number handed out once, in a row after the root's
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (2..2 + all.len() as u64).collect::<Vec<_>>());
        let rel = |v: &[(u64, Vec<u8>)]| v.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>();
        assert_eq!(rel(&old), rel(&new));
        for (i, _) in &old {
            assert_eq!(index.node(*i).unwrap().kind, Kind::Stale);
            assert_eq!(index.path_of(*i), Some(ids[1]));
        }
        for (k, &id) in ids.iter().enumerate() {
            let top = index.path_ino(id);
            assert_eq!(index.path_of(top), Some(id));
            assert_eq!(index.store_path(id).basename(), format!("{k:032}-p"));
            assert_eq!(index.node(top).unwrap().parent, ROOT);
        }
        assert_eq!(index.node(new[1].0).unwrap().parent, new[0].0);
        assert_eq!(index.node(sorted.last().unwrap() + 1), None);
        assert_eq!(index.node_count(), 5 + 4);
    }

    #[test]
    fn relative_paths_and_entries() {
        let index = Index::default();
        let sp = StorePath::from_basename("00000000000000000000000000000000-p").unwrap();
        let id = index.add_path(&sp);
        let t = Entry::Directory {
            entries: vec![
                (b"a".to_vec().into(), tree(1)),
                (
                    b"l".to_vec().into(),
                    Entry::Symlink {
                        target: b"a/f".to_vec().into(),
                    },
                ),
            ],
        };
        index.attach_tree(id, &t, TreeSource::Nar, &Sha256::digest(b"x"));
        let top = index.path_ino(id);
        let a = index.child(top, b"a").unwrap();
        let f = index.child(a, b"f").unwrap();
        assert_eq!(index.relative_path(f), Some((id, b"a/f".to_vec())));
        assert_eq!(index.relative_path(top), Some((id, Vec::new())));
        assert_eq!(index.node(f).unwrap().parent, a);
        assert_eq!(index.node(a).unwrap().parent, top);
        assert_eq!(index.node(top).unwrap().parent, ROOT);
        assert_eq!(index.subdir_count(top), 1);
        assert!(index.is_verified_dir(a));
        let names: Vec<_> = index
            .entries(top, 0, 10)
            .into_iter()
            .map(|(_, n, _)| n)
            .collect();
        assert_eq!(names, vec![b"a".to_vec().into(), b"l".to_vec().into()]);
        assert_eq!(index.entries(top, 1, 10).len(), 1);
        assert_eq!(index.node(1 << 40), None);
    }
}
