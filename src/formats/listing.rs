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

/// `.ls` files are a hint: narfs refuses anything larger rather than buffer it.
pub const MAX_LISTING_BYTES: usize = 64 << 20;

#[derive(serde::Deserialize)]
struct LsFile {
    version: u64,
    root: LsNode,
}

#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum LsNode {
    Regular {
        size: u64,
        #[serde(default)]
        executable: bool,
        #[serde(rename = "narOffset", default)]
        nar_offset: Option<u64>,
    },
    Symlink {
        target: String,
    },
    Directory {
        entries: std::collections::BTreeMap<String, LsNode>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListingError {
    #[error("listing is larger than {MAX_LISTING_BYTES} bytes")]
    TooLarge,
    #[error("listing is not valid JSON of the .ls format: {0}")]
    Json(String),
    #[error("listing has version {0}, only version 1 is known")]
    Version(u64),
    #[error("listing entry {path:?}: {what}")]
    Entry { path: String, what: String },
}

/// Writes a `.ls` listing as `nix copy --to ...?write-nar-listing=1` does (keys in
/// NAR order). `None` when a name or link target is not UTF-8, which JSON cannot hold;
/// such a path is pushed without a listing (readers fall back to its NAR).
pub fn to_ls_json(root: &Entry) -> Option<String> {
    fn node(e: &Entry) -> Option<serde_json::Value> {
        use serde_json::{json, Map, Value};
        Some(match e {
            Entry::Regular {
                size,
                executable,
                nar_offset,
            } => {
                let mut m = Map::new();
                m.insert("type".into(), json!("regular"));
                m.insert("size".into(), json!(size));
                if *executable {
                    m.insert("executable".into(), json!(true));
                }
                if let Some(o) = nar_offset {
                    m.insert("narOffset".into(), json!(o));
                }
                Value::Object(m)
            }
            Entry::Symlink { target } => {
                json!({"type": "symlink", "target": std::str::from_utf8(target).ok()?})
            }
            Entry::Directory { entries } => {
                let mut m = Map::new();
                for (name, child) in entries {
                    m.insert(std::str::from_utf8(name).ok()?.to_owned(), node(child)?);
                }
                json!({"type": "directory", "entries": Value::Object(m)})
            }
        })
    }
    Some(serde_json::json!({"version": 1, "root": node(root)?}).to_string())
}

/// Parses a `.ls` listing (written by `nix copy --to ...?write-nar-listing=1`) and
/// checks it could describe a NAR of `nar_size` bytes: valid names and targets, no
/// file larger than the NAR, no deeper nesting than a NAR may have.
pub fn parse_ls(bytes: &[u8], nar_size: u64) -> Result<Entry, ListingError> {
    if bytes.len() > MAX_LISTING_BYTES {
        return Err(ListingError::TooLarge);
    }
    let f: LsFile = serde_json::from_slice(bytes).map_err(|e| ListingError::Json(e.to_string()))?;
    if f.version != 1 {
        return Err(ListingError::Version(f.version));
    }
    let tree = convert(f.root, &mut String::new(), 0, nar_size)?;
    // Every NAR entry takes at least ~100 bytes of archive: a listing with more
    // entries than that cannot describe this NAR (and would cost memory for nothing).
    if tree.count() as u64 > nar_size / 64 + 1 {
        return Err(ListingError::Entry {
            path: "/".into(),
            what: format!(
                "{} entries cannot fit in a NAR of {nar_size} bytes",
                tree.count()
            ),
        });
    }
    Ok(tree)
}

fn convert(
    n: LsNode,
    path: &mut String,
    depth: usize,
    nar_size: u64,
) -> Result<Entry, ListingError> {
    let bad = |path: &str, what: &str| ListingError::Entry {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        },
        what: what.to_owned(),
    };
    if depth > MAX_DEPTH {
        return Err(bad(path, "nested too deeply"));
    }
    Ok(match n {
        LsNode::Regular {
            size,
            executable,
            nar_offset,
        } => {
            if size > nar_size || nar_offset.is_some_and(|o| o.saturating_add(size) > nar_size) {
                return Err(bad(path, "size or offset beyond the NAR's size"));
            }
            Entry::Regular {
                size,
                executable,
                nar_offset,
            }
        }
        LsNode::Symlink { target } => {
            if let Some(what) = invalid_target(target.as_bytes()) {
                return Err(bad(path, what));
            }
            Entry::Symlink {
                target: target.into_bytes().into(),
            }
        }
        LsNode::Directory { entries } => {
            let mut out = Vec::with_capacity(entries.len());
            for (name, child) in entries {
                if let Some(what) = invalid_name(name.as_bytes()) {
                    return Err(bad(path, what));
                }
                let len = path.len();
                path.push('/');
                path.push_str(&name);
                let e = convert(child, path, depth + 1, nar_size)?;
                path.truncate(len);
                out.push((name.into_bytes().into(), e));
            }
            Entry::Directory { entries: out }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix copy --to file://...?write-nar-listing=1` (Nix 2.8).
    #[test]
    fn written_listings_read_back_the_same() {
        let tree = parse_ls(NIX_LS.as_bytes(), 10_000).unwrap();
        let text = to_ls_json(&tree).unwrap();
        assert_eq!(parse_ls(text.as_bytes(), 10_000).unwrap(), tree);
        let bad = Entry::Symlink {
            target: b"\xff"[..].into(),
        };
        assert_eq!(to_ls_json(&bad), None);
    }

    const NIX_LS: &str = r#"{"version":1,"root":{"type":"directory","entries":{"bin":{"type":"directory","entries":{"app":{"type":"regular","size":90,"executable":true,"narOffset":400},"app-link":{"type":"symlink","target":"app"},"dangling":{"type":"symlink","target":"/nonexistent/dangling"}}},"lib":{"type":"symlink","target":"/nix/store/01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib/lib"}}}}"#;

    #[test]
    fn parses_nix_listing() {
        let e = parse_ls(NIX_LS.as_bytes(), 1224).unwrap();
        assert_eq!(e.count(), 6);
        let Entry::Directory { entries } = &e else {
            panic!()
        };
        assert_eq!(&*entries[0].0, b"bin");
        let Entry::Directory { entries: bin } = &entries[0].1 else {
            panic!()
        };
        assert_eq!(
            bin[0].1,
            Entry::Regular {
                size: 90,
                executable: true,
                nar_offset: Some(400)
            }
        );
        // a top-level file
        let f = parse_ls(
            br#"{"version":1,"root":{"type":"regular","size":4,"narOffset":96}}"#,
            120,
        )
        .unwrap();
        assert!(matches!(
            f,
            Entry::Regular {
                size: 4,
                executable: false,
                ..
            }
        ));
    }

    #[test]
    fn rejects_malformed_listings() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"version":2,"root":{"type":"regular","size":1}}"#,
                "version 2",
            ),
            (r#"{"version":1,"root":{"type":"fifo"}}"#, "JSON"),
            (
                r#"{"version":1,"root":{"type":"regular","size":-1}}"#,
                "JSON",
            ),
            (
                r#"{"version":1,"root":{"type":"regular","size":"1"}}"#,
                "JSON",
            ),
            (
                r#"{"version":1,"root":{"type":"regular","size":99999}}"#,
                "beyond",
            ),
            (
                r#"{"version":1,"root":{"type":"regular","size":10,"narOffset":1000}}"#,
                "beyond",
            ),
            (
                r#"{"version":1,"root":{"type":"symlink","target":""}}"#,
                "empty symlink",
            ),
            (
                r#"{"version":1,"root":{"type":"directory","entries":{"..":{"type":"regular","size":1}}}}"#,
                "'.' or '..'",
            ),
            (
                r#"{"version":1,"root":{"type":"directory","entries":{"a/b":{"type":"regular","size":1}}}}"#,
                "'/'",
            ),
            (
                r#"{"version":1,"root":{"type":"directory","entries":{"":{"type":"regular","size":1}}}}"#,
                "empty name",
            ),
            (
                r#"{"version":1,"root":{"type":"directory","entries":{"a\u0000":{"type":"regular","size":1}}}}"#,
                "NUL",
            ),
            ("not json", "JSON"),
            ("", "JSON"),
        ];
        for (text, why) in cases {
            let e = parse_ls(text.as_bytes(), 1000).unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
        // nesting deeper than serde_json or our bound allows: an error, not a crash
        let deep = format!(
            r#"{{"version":1,"root":{}{}}}"#,
            r#"{"type":"directory","entries":{"d":"#.repeat(400),
            "}}".repeat(400)
        );
        assert!(parse_ls(deep.as_bytes(), 1000).is_err());
        // more entries than the NAR could hold
        let many: Vec<String> = (0..100)
            .map(|i| format!("\"f{i}\":{{\"type\":\"regular\",\"size\":0}}"))
            .collect();
        let text = format!(
            r#"{{"version":1,"root":{{"type":"directory","entries":{{{}}}}}}}"#,
            many.join(",")
        );
        assert!(parse_ls(text.as_bytes(), 1000)
            .unwrap_err()
            .to_string()
            .contains("cannot fit"));
        assert!(parse_ls(text.as_bytes(), 100_000).is_ok());
    }

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
