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
        /// SHA-256 of each chunk of the contents (see `chunk_count`), when known: from
        /// a verified NAR or file index, never from a listing.
        chunks: Option<Box<[crate::formats::hash::Sha256]>>,
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

/// `.ls` files are a hint: narfs refuses anything larger (decompressed) rather than
/// read it, and falls back to the NAR.
pub const MAX_LISTING_BYTES: usize = 16 << 20;
/// The most entries a listing may hold: more than any real store path has (a full
/// TeX Live tree has about 200,000 files in many paths); beyond it the NAR is used.
/// Counted while parsing, so a forged listing of millions of entries stops here.
pub const MAX_LISTING_ENTRIES: usize = 250_000;

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
    #[error("listing has more than {0} entries")]
    TooMany(usize),
    #[error("listing cannot be read: {0}")]
    Unreadable(String),
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
                ..
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
/// file larger than the NAR, no deeper nesting than a NAR may have, and no more
/// entries than the NAR could hold or `MAX_LISTING_ENTRIES`.
pub fn parse_ls(bytes: &[u8], nar_size: u64) -> Result<Entry, ListingError> {
    if bytes.len() > MAX_LISTING_BYTES {
        return Err(ListingError::TooLarge);
    }
    parse(&mut serde_json::Deserializer::from_slice(bytes), nar_size)
}

/// `parse_ls` over a stream (a decompressor, say), so a listing is never held whole
/// in memory; the stream must end with the JSON.
pub fn parse_ls_reader(r: impl std::io::Read, nar_size: u64) -> Result<Entry, ListingError> {
    parse(&mut serde_json::Deserializer::from_reader(r), nar_size)
}

fn parse<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    nar_size: u64,
) -> Result<Entry, ListingError> {
    use serde::de::DeserializeSeed;
    // Every NAR entry takes at least ~100 bytes of archive: a listing with more
    // entries than that cannot describe this NAR (and would cost memory for nothing).
    let fits = usize::try_from(nar_size / 64 + 1).unwrap_or(usize::MAX);
    let st = ParseState {
        nar_size,
        left: std::cell::Cell::new(fits.min(MAX_LISTING_ENTRIES)),
        fits,
        path: std::cell::RefCell::new(String::new()),
        fault: std::cell::RefCell::new(None),
    };
    let r = FileSeed(&st)
        .deserialize(&mut *de)
        .and_then(|t| de.end().map(|()| t));
    if let Some(fault) = st.fault.into_inner() {
        return Err(fault);
    }
    r.map_err(|e| match e.is_io() {
        true => ListingError::Unreadable(e.to_string()),
        false => ListingError::Json(e.to_string()),
    })
}

/// What a listing's parse has seen so far. A semantic fault is kept here (serde's
/// errors are strings) and reported in place of the JSON error that stops the parse.
struct ParseState {
    nar_size: u64,
    /// Entries still allowed.
    left: std::cell::Cell<usize>,
    /// Entries a NAR of `nar_size` could hold.
    fits: usize,
    path: std::cell::RefCell<String>,
    fault: std::cell::RefCell<Option<ListingError>>,
}

impl ParseState {
    fn fail<E: serde::de::Error>(&self, what: &str) -> E {
        let path = self.path.borrow();
        *self.fault.borrow_mut() = Some(ListingError::Entry {
            path: if path.is_empty() {
                "/".into()
            } else {
                path.clone()
            },
            what: what.to_owned(),
        });
        E::custom(what)
    }

    fn take_entry<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(n) => {
                self.left.set(n);
                Ok(())
            }
            None => {
                let fault = if self.fits <= MAX_LISTING_ENTRIES {
                    ListingError::Entry {
                        path: "/".into(),
                        what: format!("more entries than fit in a NAR of {} bytes", self.nar_size),
                    }
                } else {
                    ListingError::TooMany(MAX_LISTING_ENTRIES)
                };
                *self.fault.borrow_mut() = Some(fault);
                Err(E::custom("too many entries"))
            }
        }
    }
}

struct FileSeed<'a>(&'a ParseState);
struct NodeSeed<'a> {
    st: &'a ParseState,
    depth: usize,
}
struct EntriesSeed<'a> {
    st: &'a ParseState,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for FileSeed<'_> {
    type Value = Entry;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Entry, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FileSeed<'_> {
    type Value = Entry;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a listing object with version and root")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Entry, A::Error> {
        use serde::de::Error;
        let (mut version, mut root) = (None, None);
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*k {
                "version" if version.is_none() => {
                    let v: u64 = m.next_value()?;
                    if v != 1 {
                        *self.0.fault.borrow_mut() = Some(ListingError::Version(v));
                        return Err(A::Error::custom("version"));
                    }
                    version = Some(v);
                }
                "root" if root.is_none() => {
                    root = Some(m.next_value_seed(NodeSeed {
                        st: self.0,
                        depth: 0,
                    })?)
                }
                k => {
                    return Err(A::Error::custom(format!(
                        "unexpected or repeated key '{k}'"
                    )))
                }
            }
        }
        version.ok_or_else(|| A::Error::missing_field("version"))?;
        root.ok_or_else(|| A::Error::missing_field("root"))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Entry;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Entry, D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(self.st.fail("nested too deeply"));
        }
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NodeSeed<'_> {
    type Value = Entry;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a listing node")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Entry, A::Error> {
        use serde::de::Error;
        let st = self.st;
        let mut ty: Option<std::borrow::Cow<'de, str>> = None;
        let (mut size, mut executable, mut nar_offset) = (None, None, None);
        let (mut target, mut entries): (Option<String>, _) = (None, None);
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*k {
                "type" if ty.is_none() => ty = Some(m.next_value()?),
                "size" if size.is_none() => size = Some(m.next_value::<u64>()?),
                "executable" if executable.is_none() => executable = Some(m.next_value()?),
                "narOffset" if nar_offset.is_none() => {
                    nar_offset = Some(m.next_value::<Option<u64>>()?)
                }
                "target" if target.is_none() => target = Some(m.next_value()?),
                "entries" if entries.is_none() => {
                    entries = Some(m.next_value_seed(EntriesSeed {
                        st,
                        depth: self.depth,
                    })?)
                }
                k => {
                    return Err(A::Error::custom(format!(
                        "unexpected or repeated key '{k}'"
                    )))
                }
            }
        }
        let ty = ty.ok_or_else(|| A::Error::missing_field("type"))?;
        let extra = |present: bool, field: &'static str| {
            if present {
                Err(A::Error::unknown_field(field, &[]))
            } else {
                Ok(())
            }
        };
        match &*ty {
            "regular" => {
                extra(target.is_some(), "target")?;
                extra(entries.is_some(), "entries")?;
                let size = size.ok_or_else(|| A::Error::missing_field("size"))?;
                let nar_offset = nar_offset.flatten();
                if size > st.nar_size
                    || nar_offset.is_some_and(|o| o.saturating_add(size) > st.nar_size)
                {
                    return Err(st.fail("size or offset beyond the NAR's size"));
                }
                Ok(Entry::Regular {
                    size,
                    executable: executable.unwrap_or(false),
                    nar_offset,
                    chunks: None,
                })
            }
            "symlink" => {
                extra(size.is_some(), "size")?;
                extra(executable.is_some(), "executable")?;
                extra(nar_offset.is_some(), "narOffset")?;
                extra(entries.is_some(), "entries")?;
                let target = target.ok_or_else(|| A::Error::missing_field("target"))?;
                if let Some(what) = invalid_target(target.as_bytes()) {
                    return Err(st.fail(what));
                }
                Ok(Entry::Symlink {
                    target: target.into_bytes().into(),
                })
            }
            "directory" => {
                extra(size.is_some(), "size")?;
                extra(executable.is_some(), "executable")?;
                extra(nar_offset.is_some(), "narOffset")?;
                extra(target.is_some(), "target")?;
                let entries = entries.ok_or_else(|| A::Error::missing_field("entries"))?;
                Ok(Entry::Directory { entries })
            }
            other => Err(A::Error::unknown_variant(
                other,
                &["regular", "symlink", "directory"],
            )),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<(Box<[u8]>, Entry)>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<(Box<[u8]>, Entry)>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of directory entries")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let st = self.st;
        let mut out: Vec<(Box<[u8]>, Entry)> = Vec::new();
        while let Some(name) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            st.take_entry()?;
            if let Some(what) = invalid_name(name.as_bytes()) {
                return Err(st.fail(what));
            }
            let len = st.path.borrow().len();
            {
                let mut p = st.path.borrow_mut();
                p.push('/');
                p.push_str(&name);
            }
            let e = m.next_value_seed(NodeSeed {
                st,
                depth: self.depth + 1,
            })?;
            st.path.borrow_mut().truncate(len);
            out.push((name.as_bytes().into(), e));
        }
        // JSON objects are unordered; NAR entries are strictly sorted and unique
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
            let what = format!(
                "duplicate entry {:?}",
                String::from_utf8_lossy(&w[0].0).into_owned()
            );
            return Err(st.fail(&what));
        }
        Ok(out)
    }
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
                nar_offset: Some(400),
                chunks: None,
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
            .contains("more entries than fit"));
        assert!(parse_ls(text.as_bytes(), 100_000).is_ok());
    }

    #[test]
    fn entries_are_counted_while_parsing() {
        let listing = |n: usize, extra: &str| {
            let many: Vec<String> = (0..n)
                .map(|i| format!("\"f{i}\":{{\"type\":\"regular\",\"size\":0}}"))
                .collect();
            format!(
                r#"{{"version":1,"root":{{"type":"directory","entries":{{{}{extra}}}}}}}"#,
                many.join(",")
            )
        };
        let huge_nar = 1 << 40;
        let at_cap = listing(MAX_LISTING_ENTRIES, "");
        assert!(parse_ls(at_cap.as_bytes(), huge_nar).is_ok());
        let over = listing(MAX_LISTING_ENTRIES + 1, "");
        assert_eq!(
            parse_ls(over.as_bytes(), huge_nar),
            Err(ListingError::TooMany(MAX_LISTING_ENTRIES))
        );
        // the parse stops at the first entry too many: garbage after it is not seen
        let over = listing(MAX_LISTING_ENTRIES + 1, r#","junk":not json"#);
        assert_eq!(
            parse_ls_reader(over.as_bytes(), huge_nar),
            Err(ListingError::TooMany(MAX_LISTING_ENTRIES))
        );
        // keys in any order, and duplicate names refused
        let any_order = r#"{"root":{"entries":{"b":{"size":1,"type":"regular"},"a":{"target":"b","type":"symlink"}},"type":"directory"},"version":1}"#;
        let t = parse_ls(any_order.as_bytes(), 1000).unwrap();
        assert_eq!(
            t,
            parse_ls_reader(any_order.as_bytes(), 1000).unwrap(),
            "slice and stream agree"
        );
        let Entry::Directory { entries } = t else {
            panic!()
        };
        assert_eq!(&*entries[0].0, b"a");
        let dup = r#"{"version":1,"root":{"type":"directory","entries":{"a":{"type":"regular","size":1},"a":{"type":"regular","size":2}}}}"#;
        assert!(parse_ls(dup.as_bytes(), 1000)
            .unwrap_err()
            .to_string()
            .contains("duplicate entry"));
        for bad in [
            r#"{"version":1,"root":{"type":"regular","size":1,"target":"x"}}"#,
            r#"{"version":1,"root":{"type":"regular"}}"#,
            r#"{"version":1,"root":{"type":"regular","size":1},"root":{"type":"regular","size":1}}"#,
            r#"{"version":1,"root":{"type":"regular","size":1}} trailing"#,
            r#"{"version":1}"#,
        ] {
            assert!(parse_ls(bad.as_bytes(), 1000).is_err(), "{bad}");
        }
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
