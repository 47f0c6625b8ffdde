//! The tree of one store path: what a NAR holds, minus file contents.
//!
//! The same shape comes from three places: unpacking a verified NAR, walking an
//! unpacked path in the disk cache, and (later) a `.ls` listing. The index turns it
//! into inodes.

/// Deeper than any real store path; bounds recursion on hostile input.
pub const MAX_DEPTH: usize = 256;
/// Linux NAME_MAX: a longer name could not be unpacked anyway.
pub const MAX_NAME_LEN: usize = 255;
/// PATH_MAX minus the terminating NUL.
pub const MAX_TARGET_LEN: usize = 4095;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Regular {
        size: u64,
        executable: bool,
        /// Where the contents start in the NAR, when known.
        nar_offset: Option<u64>,
    },
    Symlink {
        target: Box<[u8]>,
    },
    Directory {
        /// Strictly sorted by name (NAR order).
        entries: Vec<(Box<[u8]>, Entry)>,
    },
}

/// Why a name cannot be a NAR entry name; `None` if it can.
pub fn invalid_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("name '.' or '..'")
    } else if name.contains(&b'/') {
        Some("name containing '/'")
    } else if name.contains(&0) {
        Some("name containing NUL")
    } else if name.len() > MAX_NAME_LEN {
        Some("name longer than 255 bytes")
    } else {
        None
    }
}

/// Why a symlink target cannot be served; `None` if it can.
pub fn invalid_target(target: &[u8]) -> Option<&'static str> {
    if target.is_empty() {
        Some("empty symlink target")
    } else if target.contains(&0) {
        Some("symlink target containing NUL")
    } else if target.len() > MAX_TARGET_LEN {
        Some("symlink target longer than PATH_MAX")
    } else {
        None
    }
}

impl Entry {
    /// Number of nodes, this one included.
    pub fn count(&self) -> usize {
        match self {
            Entry::Directory { entries } => {
                1 + entries.iter().map(|(_, e)| e.count()).sum::<usize>()
            }
            _ => 1,
        }
    }

    /// Same names, types, sizes, modes and targets (NAR offsets ignored).
    pub fn same_shape(&self, other: &Entry) -> bool {
        match (self, other) {
            (
                Entry::Regular {
                    size: a,
                    executable: x,
                    ..
                },
                Entry::Regular {
                    size: b,
                    executable: y,
                    ..
                },
            ) => a == b && x == y,
            (Entry::Symlink { target: a }, Entry::Symlink { target: b }) => a == b,
            (Entry::Directory { entries: a }, Entry::Directory { entries: b }) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((n, e), (m, f))| n == m && e.same_shape(f))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0", &[b'x'; 256]] {
            assert!(invalid_name(bad).is_some(), "{bad:?}");
        }
        for good in [
            &b"a"[..],
            b"...",
            b".hidden",
            "ünï cödé".as_bytes(),
            &[b'x'; 255],
        ] {
            assert!(invalid_name(good).is_none());
        }
        assert!(invalid_target(b"").is_some());
        assert!(invalid_target(b"a\0b").is_some());
        assert!(invalid_target(&[b'a'; 4096]).is_some());
        assert!(invalid_target(&[b'a'; 4095]).is_none());
    }
}
