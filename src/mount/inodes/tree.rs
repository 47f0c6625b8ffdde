//! How the inodes are held (see the module doc of `inodes`): trees of nodes, one per
//! store path, and the runs of inode numbers that map a number back to its node.
//! Nothing here locks or decides: `Index` does both.

use super::{Kind, PathId, Stale, TreeSource, ROOT};
use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use std::collections::HashMap;

/// Marks the top of a tree: its parent is the root.
pub(super) const TOP: u32 = u32::MAX;

pub(super) struct Node {
    /// Position of the parent in the same tree, or `TOP`.
    pub(super) parent: u32,
    pub(super) name: Box<[u8]>,
    pub(super) kind: NodeKind,
}

pub(super) enum NodeKind {
    Unloaded,
    Dir {
        /// Positions in the same tree, sorted by name.
        children: Box<[u32]>,
        subdirs: u32,
    },
    File {
        size: u64,
        executable: bool,
        /// The SHA-256 of each chunk, from a verified NAR or index (not a listing).
        chunks: Option<Box<[Sha256]>>,
        /// Where its contents start in the NAR (0: not known).
        nar_offset: u64,
    },
    Symlink {
        target: Box<[u8]>,
    },
}

pub(super) struct Tree {
    pub(super) path: PathId,
    /// Its files' chunks are `2^chunk_shift` bytes: a file index may choose its own.
    pub(super) chunk_shift: u8,
    /// The inode number of position 1 (positions 1.. are numbered in a row).
    pub(super) first: u64,
    /// Empty once the tree was replaced. Not a `Vec`: a tree is built once, and a
    /// known path's tree of one node is most of what the path costs.
    pub(super) nodes: Box<[Node]>,
}

impl Tree {
    pub(super) fn live(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// The inode number of position `pos` (not the top).
    pub(super) fn ino_below(&self, pos: u32) -> u64 {
        self.first + pos as u64 - 1
    }
}

/// A run of inode numbers, up to the next run's first: the tops of trees `tree`,
/// `tree + 1`, ... or positions 1.. of tree `tree`.
pub(super) struct Run {
    pub(super) first: u64,
    pub(super) tree: u32,
    pub(super) tops: bool,
}

/// Deliberately small: a known-but-unopened path costs this, its tree of one node and
/// a map slot. The narinfo itself stays in the disk cache until the path is opened.
#[derive(Debug)]
pub(super) struct StorePathEntry {
    /// Its current tree (1-based).
    pub(super) tree: u32,
    /// Its position in the root listing.
    pub(super) root_pos: u32,
    pub(super) source: Option<TreeSource>,
    /// The first 8 bytes of the NarHash the tree was built for: a path pushed again
    /// with different contents (a non-reproducible build) gets a new tree.
    pub(super) tree_nar: u64,
    /// Its verified contents are in the disk cache.
    pub(super) unpacked: bool,
    /// The last fetch of its contents failed: check the narinfo again before retrying.
    pub(super) failed: bool,
}

#[derive(Default)]
pub(super) struct Inner {
    /// `trees[t - 1]` is tree `t`.
    pub(super) trees: Vec<Tree>,
    /// Nodes of trees that came from listings and are not verified yet.
    pub(super) listing_nodes: usize,
    pub(super) paths: Vec<StorePathEntry>,
    pub(super) by_hash: HashMap<[u8; 20], PathId>,
    /// Top inodes in the order paths appeared, so readdir offsets stay valid while
    /// the listing grows.
    pub(super) root_order: Vec<u64>,
    /// Every inode number handed out, in order (see the module doc).
    pub(super) runs: Vec<Run>,
    /// The next inode number.
    pub(super) next_ino: u64,
    /// Nodes held in live trees.
    pub(super) live_nodes: usize,
}

impl NodeKind {
    pub(super) fn view(&self) -> Kind {
        match self {
            NodeKind::Unloaded => Kind::Unloaded,
            NodeKind::Dir { .. } => Kind::Dir,
            NodeKind::File {
                size, executable, ..
            } => Kind::File {
                size: *size,
                executable: *executable,
            },
            NodeKind::Symlink { target } => Kind::Symlink {
                target: target.clone(),
            },
        }
    }
}

impl Inner {
    /// A new tree holding only the (unloaded) top of path `id`: the tree and the
    /// top's inode number.
    pub(super) fn new_tree(&mut self, id: PathId, name: Box<[u8]>) -> (u32, u64) {
        self.trees.push(Tree {
            path: id,
            chunk_shift: crate::formats::nar::DEFAULT_CHUNK_SHIFT,
            first: 0,
            nodes: Box::new([Node {
                parent: TOP,
                name,
                kind: NodeKind::Unloaded,
            }]),
        });
        let t = self.trees.len() as u32;
        let top = self.next_ino;
        self.next_ino += 1;
        self.live_nodes += 1;
        let extends = self
            .runs
            .last()
            .is_some_and(|r| r.tops && r.tree as u64 + (top - r.first) == t as u64);
        if !extends {
            self.runs.push(Run {
                first: top,
                tree: t,
                tops: true,
            });
        }
        (t, top)
    }

    /// `(tree, position)` of an inode number other than the root's.
    pub(super) fn locate(&self, ino: u64) -> Option<(u32, u32)> {
        if ino <= ROOT || ino >= self.next_ino {
            return None;
        }
        let r = &self.runs[self
            .runs
            .partition_point(|r| r.first <= ino)
            .checked_sub(1)?];
        let off = ino - r.first;
        if r.tops {
            Some((r.tree + off as u32, 0))
        } else {
            Some((r.tree, u32::try_from(off + 1).ok()?))
        }
    }

    pub(super) fn top(&self, id: PathId) -> &Node {
        &self.trees[self.paths[id as usize].tree as usize - 1].nodes[0]
    }

    /// The live node of `ino` and its tree.
    pub(super) fn find(&self, ino: u64) -> Option<(&Tree, &Node)> {
        let (t, pos) = self.locate(ino)?;
        let tree = self.trees.get(t as usize - 1)?;
        Some((tree, tree.nodes.get(pos as usize)?))
    }

    /// Does the subtree at position `pos` of tree `t` have exactly the names, types,
    /// sizes, modes and targets of `e`?
    pub(super) fn matches(&self, t: u32, pos: u32, e: &Entry) -> bool {
        let tree = &self.trees[t as usize - 1];
        match (&tree.nodes[pos as usize].kind, e) {
            (
                NodeKind::File {
                    size, executable, ..
                },
                Entry::Regular {
                    size: s,
                    executable: x,
                    ..
                },
            ) => size == s && executable == x,
            (NodeKind::Symlink { target }, Entry::Symlink { target: t }) => target == t,
            (NodeKind::Dir { children, .. }, Entry::Directory { entries }) => {
                children.len() == entries.len()
                    && children.iter().zip(entries).all(|(&c, (name, e))| {
                        tree.nodes[c as usize].name == *name && self.matches(t, c, e)
                    })
            }
            _ => false,
        }
    }

    /// Gives the files of a listing's tree (which the NAR confirmed) their chunks.
    pub(super) fn adopt_chunks(&mut self, t: u32, pos: u32, e: &Entry) {
        match e {
            Entry::Regular {
                chunks, nar_offset, ..
            } => {
                if let NodeKind::File {
                    chunks: c,
                    nar_offset: o,
                    ..
                } = &mut self.trees[t as usize - 1].nodes[pos as usize].kind
                {
                    *c = chunks.clone();
                    *o = nar_offset.unwrap_or(0);
                }
            }
            Entry::Directory { entries } => {
                let NodeKind::Dir { children, .. } =
                    &self.trees[t as usize - 1].nodes[pos as usize].kind
                else {
                    return;
                };
                let children = children.clone();
                for (&c, (_, child)) in children.iter().zip(entries) {
                    self.adopt_chunks(t, c, child);
                }
            }
            Entry::Symlink { .. } => {}
        }
    }

    /// The entries below position `pos` of the current tree `t`.
    pub(super) fn collect_entries(&self, t: u32, pos: u32, out: &mut Stale) {
        let tree = &self.trees[t as usize - 1];
        if let NodeKind::Dir { children, .. } = &tree.nodes[pos as usize].kind {
            let dir = match pos {
                0 => self.root_order[self.paths[tree.path as usize].root_pos as usize],
                pos => tree.ino_below(pos),
            };
            for &c in children.iter() {
                out.push((dir, tree.nodes[c as usize].name.clone()));
                self.collect_entries(t, c, out);
            }
        }
    }
}

/// Appends the nodes below `e` to `nodes` (its node at position `pos` exists) and
/// returns the kind of the node at `pos`. Each directory's children are contiguous.
pub(super) fn build(nodes: &mut Vec<Node>, pos: u32, e: &Entry) -> NodeKind {
    match e {
        Entry::Regular {
            size,
            executable,
            chunks,
            nar_offset,
        } => NodeKind::File {
            size: *size,
            executable: *executable,
            chunks: chunks.clone(),
            nar_offset: nar_offset.unwrap_or(0),
        },
        Entry::Symlink { target } => NodeKind::Symlink {
            target: target.clone(),
        },
        Entry::Directory { entries } => {
            let first = nodes.len() as u32;
            for (name, _) in entries {
                nodes.push(Node {
                    parent: pos,
                    name: name.clone(),
                    kind: NodeKind::Unloaded,
                });
            }
            let mut subdirs = 0;
            for (i, (_, child)) in entries.iter().enumerate() {
                let c = first + i as u32;
                subdirs += matches!(child, Entry::Directory { .. }) as u32;
                let k = build(nodes, c, child);
                nodes[c as usize].kind = k;
            }
            NodeKind::Dir {
                children: (first..first + entries.len() as u32).collect(),
                subdirs,
            }
        }
    }
}
