//! The superblock: owns every inode of the mount.
//!
//! Inode 1 is the root. Each verified store path gets one inode when its narinfo is
//! accepted; the nodes inside it get inodes when its tree is attached. Inode numbers are
//! never reused during a mount, so they are stable for its life.

use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use crate::formats::nixbase32;
use crate::formats::store_path::StorePath;
use std::collections::HashMap;
use std::sync::RwLock;

pub const ROOT: u64 = 1;

pub type PathId = u32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Root,
    /// A store path whose tree is not known yet.
    Unloaded,
    Dir {
        children: Vec<u64>,
    },
    File {
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Box<[u8]>,
    },
    /// A node of a listing's tree that the verified NAR replaced: every operation on
    /// it fails (ESTALE), so nothing is ever resolved through the listing's shape.
    Stale,
}

#[derive(Debug)]
pub struct Node {
    pub parent: u64,
    pub path: PathId,
    pub name: Box<[u8]>,
    pub kind: Kind,
}

/// Where a store path's tree came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeSource {
    /// The unsigned `.ls` listing: names, types and sizes only, until the NAR is here.
    Listing,
    /// The verified NAR (or its unpacked copy in the disk cache).
    Nar,
}

/// Deliberately small: a known-but-unopened path costs this, its node and a map slot.
/// The narinfo itself stays in the disk cache until the path is opened.
#[derive(Debug)]
pub struct StorePathEntry {
    pub ino: u64,
    pub tree: Option<TreeSource>,
    /// The first 8 bytes of the NarHash the tree was built for: a path pushed again
    /// with different contents (a non-reproducible build) gets a new tree.
    pub tree_nar: u64,
    /// Its verified contents are in the disk cache.
    pub unpacked: bool,
    /// The last fetch of its contents failed: check the narinfo again before retrying.
    pub failed: bool,
}

/// Kernel caches to drop after a tree was replaced: `(directory inode, entry name)`.
pub type Stale = Vec<(u64, Box<[u8]>)>;

#[derive(Default)]
struct Inner {
    /// `nodes[ino - 2]`; the root has no slot.
    nodes: Vec<Node>,
    paths: Vec<StorePathEntry>,
    by_hash: HashMap<[u8; 20], PathId>,
    /// Root entries in the order they appeared, so readdir offsets stay valid while
    /// the listing grows.
    root_order: Vec<u64>,
}

#[derive(Default)]
pub struct Index {
    inner: RwLock<Inner>,
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
        let ino = g.nodes.len() as u64 + 2;
        g.nodes.push(Node {
            parent: ROOT,
            path: id,
            name: sp.basename().as_bytes().into(),
            kind: Kind::Unloaded,
        });
        g.by_hash.insert(key, id);
        g.paths.push(StorePathEntry {
            ino,
            tree: None,
            tree_nar: 0,
            unpacked: false,
            failed: false,
        });
        g.root_order.push(ino);
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
        let ino = g.paths[id as usize].ino;
        (*g.node(ino).name == *name.as_bytes()).then_some(id)
    }

    pub fn store_path(&self, id: PathId) -> StorePath {
        let g = self.inner.read().unwrap();
        let name = &g.node(g.paths[id as usize].ino).name;
        StorePath::from_basename(std::str::from_utf8(name).expect("validated"))
            .expect("validated store path")
    }

    pub fn path_ino(&self, id: PathId) -> u64 {
        self.inner.read().unwrap().paths[id as usize].ino
    }

    pub fn tree_source(&self, id: PathId) -> Option<TreeSource> {
        self.inner.read().unwrap().paths[id as usize].tree
    }

    /// Whether `ino` is a directory of a path whose tree came from its verified NAR
    /// (without copying the directory's children, as `node` does).
    pub fn is_verified_dir(&self, ino: u64) -> bool {
        let g = self.inner.read().unwrap();
        let Some(n) = ino.checked_sub(2).and_then(|i| g.nodes.get(i as usize)) else {
            return false;
        };
        matches!(n.kind, Kind::Dir { .. }) && g.paths[n.path as usize].tree == Some(TreeSource::Nar)
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
    /// holds different contents for the path; then the returned entries are stale in
    /// the kernel's caches, the path's top directory included (`(ROOT, name)`).
    pub fn attach_tree(
        &self,
        id: PathId,
        tree: &Entry,
        source: TreeSource,
        nar_hash: &Sha256,
    ) -> Stale {
        let tag = u64::from_le_bytes(nar_hash.0[..8].try_into().expect("8 bytes"));
        let mut g = self.inner.write().unwrap();
        let ino = g.paths[id as usize].ino;
        let mut stale = Vec::new();
        let same_nar = g.paths[id as usize].tree_nar == tag;
        match (g.paths[id as usize].tree, source) {
            (None, _) => {}
            (Some(TreeSource::Listing), TreeSource::Nar) if same_nar && g.matches(ino, tree) => {
                g.paths[id as usize].tree = Some(TreeSource::Nar);
                return stale;
            }
            (Some(was), TreeSource::Nar) if was == TreeSource::Listing || !same_nar => {
                let name = String::from_utf8_lossy(&g.node(ino).name).into_owned();
                if was == TreeSource::Listing {
                    tracing::warn!(
                        "the .ls listing of /nix/store/{name} disagrees with its verified NAR; serving the NAR"
                    );
                } else {
                    tracing::warn!(
                        "/nix/store/{name} was pushed again with different contents; serving the new ones"
                    );
                }
                g.collect_entries(ino, &mut stale);
                g.mark_stale(ino);
                let name = g.nodes[(ino - 2) as usize].name.clone();
                stale.push((ROOT, name));
            }
            _ => return stale,
        }
        let kind = g.build(id, ino, tree);
        g.nodes[(ino - 2) as usize].kind = kind;
        g.paths[id as usize].tree = Some(source);
        g.paths[id as usize].tree_nar = tag;
        stale
    }

    pub fn node(&self, ino: u64) -> Option<NodeView> {
        let g = self.inner.read().unwrap();
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
        let n = g.nodes.get(ino.checked_sub(2)? as usize)?;
        let p = &g.paths[n.path as usize];
        Some(NodeView {
            ino,
            parent: n.parent,
            path: n.path,
            kind: n.kind.clone(),
            tree: p.tree,
            unpacked: p.unpacked,
        })
    }

    /// Child `name` of directory `parent` (not the root).
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let g = self.inner.read().unwrap();
        let Kind::Dir { children } = &g.nodes.get(parent.checked_sub(2)? as usize)?.kind else {
            return None;
        };
        children
            .binary_search_by(|&c| (*g.nodes[(c - 2) as usize].name).cmp(name))
            .ok()
            .map(|i| children[i])
    }

    /// `(ino, name, kind)` of the entries of `dir` from position `from` on, at most `max`.
    pub fn entries(&self, dir: u64, from: usize, max: usize) -> Vec<(u64, Box<[u8]>, Kind)> {
        let g = self.inner.read().unwrap();
        let list: &[u64] = if dir == ROOT {
            &g.root_order
        } else {
            match g.nodes.get((dir - 2) as usize).map(|n| &n.kind) {
                Some(Kind::Dir { children }) => children,
                _ => &[],
            }
        };
        list.iter()
            .skip(from)
            .take(max)
            .map(|&c| {
                let n = &g.nodes[(c - 2) as usize];
                let kind = match &n.kind {
                    Kind::Dir { .. } => Kind::Dir {
                        children: Vec::new(),
                    },
                    Kind::Symlink { .. } => Kind::Symlink {
                        target: Box::new([]),
                    },
                    k => k.clone(),
                };
                (c, n.name.clone(), kind)
            })
            .collect()
    }

    /// Path of `ino` relative to its store path's directory (empty for the top).
    pub fn relative_path(&self, ino: u64) -> Option<(PathId, Vec<u8>)> {
        let g = self.inner.read().unwrap();
        let mut parts = Vec::new();
        let mut cur = ino;
        let path = g.nodes.get(ino.checked_sub(2)? as usize)?.path;
        loop {
            let n = &g.nodes[(cur - 2) as usize];
            if n.parent == ROOT {
                break;
            }
            parts.push(n.name.clone());
            cur = n.parent;
        }
        let mut rel = Vec::new();
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                rel.push(b'/');
            }
            rel.extend_from_slice(p);
        }
        Some((path, rel))
    }

    pub fn subdir_count(&self, ino: u64) -> u32 {
        let g = self.inner.read().unwrap();
        match g.nodes.get((ino.wrapping_sub(2)) as usize).map(|n| &n.kind) {
            Some(Kind::Dir { children }) => children
                .iter()
                .filter(|&&c| matches!(g.nodes[(c - 2) as usize].kind, Kind::Dir { .. }))
                .count() as u32,
            _ => 0,
        }
    }
}

fn hash_key(hash: &str) -> Option<[u8; 20]> {
    nixbase32::decode(hash)?.try_into().ok()
}

impl Inner {
    fn node(&self, ino: u64) -> &Node {
        &self.nodes[(ino - 2) as usize]
    }

    /// Does the subtree at `ino` have exactly the names, types, sizes, modes and
    /// targets of `e`?
    fn matches(&self, ino: u64, e: &Entry) -> bool {
        match (&self.node(ino).kind, e) {
            (
                Kind::File { size, executable },
                Entry::Regular {
                    size: s,
                    executable: x,
                    ..
                },
            ) => size == s && executable == x,
            (Kind::Symlink { target }, Entry::Symlink { target: t }) => target == t,
            (Kind::Dir { children }, Entry::Directory { entries }) => {
                children.len() == entries.len()
                    && children
                        .iter()
                        .zip(entries)
                        .all(|(&c, (name, e))| self.node(c).name == *name && self.matches(c, e))
            }
            _ => false,
        }
    }

    fn mark_stale(&mut self, ino: u64) {
        if let Kind::Dir { children } = self.node(ino).kind.clone() {
            for c in children {
                self.mark_stale(c);
                self.nodes[(c - 2) as usize].kind = Kind::Stale;
            }
        }
    }

    fn collect_entries(&self, ino: u64, out: &mut Stale) {
        if let Kind::Dir { children } = &self.node(ino).kind {
            for &c in children {
                out.push((ino, self.node(c).name.clone()));
                self.collect_entries(c, out);
            }
        }
    }

    fn build(&mut self, path: PathId, ino: u64, e: &Entry) -> Kind {
        match e {
            Entry::Regular {
                size, executable, ..
            } => Kind::File {
                size: *size,
                executable: *executable,
            },
            Entry::Symlink { target } => Kind::Symlink {
                target: target.clone(),
            },
            Entry::Directory { entries } => {
                let first = self.nodes.len() as u64 + 2;
                for (name, _) in entries {
                    self.nodes.push(Node {
                        parent: ino,
                        path,
                        name: name.clone(),
                        kind: Kind::Unloaded,
                    });
                }
                for (i, (_, child)) in entries.iter().enumerate() {
                    let cino = first + i as u64;
                    let k = self.build(path, cino, child);
                    self.nodes[(cino - 2) as usize].kind = k;
                }
                Kind::Dir {
                    children: (first..first + entries.len() as u64).collect(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(size: u64) -> Entry {
        Entry::Directory {
            entries: vec![(
                b"f".to_vec().into(),
                Entry::Regular {
                    size,
                    executable: false,
                    nar_offset: None,
                },
            )],
        }
    }

    #[test]
    fn trees_are_replaced_only_by_a_disagreeing_or_different_nar() {
        let index = Index::default();
        let sp = StorePath::from_basename("00000000000000000000000000000000-p").unwrap();
        let id = index.add_path(&sp);
        let top = index.path_ino(id);
        let (h1, h2) = (Sha256::digest(b"one"), Sha256::digest(b"two"));
        let child = || index.child(top, b"f").unwrap();

        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Listing, &h1)
            .is_empty());
        let listed = child();
        // a listing never replaces, an agreeing NAR keeps the inodes
        assert!(index
            .attach_tree(id, &tree(4), TreeSource::Listing, &h1)
            .is_empty());
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Nar, &h1)
            .is_empty());
        assert_eq!(child(), listed);
        // the same NAR again (after an eviction) changes nothing
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Nar, &h1)
            .is_empty());
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Listing, &h2)
            .is_empty());
        // another NAR for the path, even of the same shape: new inodes, old ones stale
        let stale = index.attach_tree(id, &tree(3), TreeSource::Nar, &h2);
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(stale.contains(&(top, b"f".to_vec().into())));
        assert!(stale.contains(&(ROOT, sp.basename().as_bytes().into())));
        assert_ne!(child(), listed);
        assert_eq!(index.node(listed).unwrap().kind, Kind::Stale);
        assert_eq!(index.node(top).unwrap().tree, Some(TreeSource::Nar));

        // a listing of the old narinfo, then the NAR of a newer one: rebuilt too
        let sp = StorePath::from_basename("11111111111111111111111111111111-q").unwrap();
        let id = index.add_path(&sp);
        let top = index.path_ino(id);
        assert!(index
            .attach_tree(id, &tree(3), TreeSource::Listing, &h1)
            .is_empty());
        let listed = index.child(top, b"f").unwrap();
        assert_eq!(
            index.attach_tree(id, &tree(3), TreeSource::Nar, &h2).len(),
            2
        );
        assert_ne!(index.child(top, b"f").unwrap(), listed);
    }
}
