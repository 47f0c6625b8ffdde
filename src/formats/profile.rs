//! Start-up profiles (docs/profiles.md): the record file `narfs profile record` writes
//! and `narfs profile push` reads, and the signed manifest a mount replays a pack by.
//! A manifest is strict and bounded, but it only ever says which bytes to fetch: every
//! chunk it names is checked against a signed file index before it is stored.

use super::hash::{Hasher, Sha256};
use super::keys::{SecretKey, TrustedKeys, Untrusted};
use super::store_path::StorePath;

pub const RECORD_MAGIC: &str = "narfs-profile-record 1";
pub const FINGERPRINT_PREFIX: &str = "narfs-profile-1;";
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
pub const MAX_CHUNKS: usize = 65_536;
pub const MAX_FRAMES: usize = 4_096;
pub const MAX_PATHS: usize = 1_024;
/// A frame decodes to at most this: a replay holds no more of it at once.
pub const MAX_FRAME: u64 = 16 << 20;
/// A chunk is at most 2^26 bytes, the largest chunk a file index may have.
pub const MAX_CHUNK: u64 = 1 << 26;

/// One chunk a program read first, where it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub path: StorePath,
    pub hash: Sha256,
    pub len: u64,
    /// The file, relative to the store path: for people reading the record.
    pub file: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {why}")]
pub struct ProfileError {
    pub line: usize,
    pub why: String,
}

fn err(line: usize, why: impl Into<String>) -> ProfileError {
    ProfileError {
        line,
        why: why.into(),
    }
}

/// `\xNN` for bytes outside printable ASCII, space and `\`: one token per name.
fn escape(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        if c.is_ascii_graphic() && c != b'\\' {
            s.push(c as char);
        } else {
            s += &format!("\\x{c:02x}");
        }
    }
    s
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let hex = s
                .get(i + 2..i + 4)
                .filter(|_| b.get(i + 1) == Some(&b'x'))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn chunk_fields(
    line: usize,
    path: &str,
    hash: &str,
    len: &str,
) -> Result<(StorePath, Sha256, u64), ProfileError> {
    let path = StorePath::from_basename(path).map_err(|e| err(line, e.to_string()))?;
    let hash = Sha256::parse(hash).map_err(|e| err(line, e.to_string()))?;
    let len = len
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0 && n <= MAX_CHUNK && !len.starts_with('+'))
        .ok_or_else(|| err(line, format!("'{len}' is not a chunk length")))?;
    Ok((path, hash, len))
}

pub fn record_to_text(chunks: &[Recorded]) -> String {
    let mut s = format!("{RECORD_MAGIC}\n");
    for c in chunks {
        s += &format!(
            "{} {} {} {}\n",
            c.path.basename(),
            c.hash.to_nix_string(),
            c.len,
            escape(&c.file)
        );
    }
    s
}

pub fn parse_record(text: &str) -> Result<Vec<Recorded>, ProfileError> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, RECORD_MAGIC)) => {}
        _ => {
            return Err(err(
                1,
                format!("not a profile record (no '{RECORD_MAGIC}')"),
            ))
        }
    }
    let mut out = Vec::new();
    for (i, l) in lines {
        let n = i + 1;
        let f: Vec<&str> = l.split(' ').collect();
        let [path, hash, len, file] = f[..] else {
            return Err(err(n, "not 'PATH HASH LENGTH FILE'"));
        };
        let (path, hash, len) = chunk_fields(n, path, hash, len)?;
        let file = unescape(file).ok_or_else(|| err(n, "a bad escape in the file name"))?;
        out.push(Recorded {
            path,
            hash,
            len,
            file,
        });
        if out.len() > MAX_CHUNKS {
            return Err(err(n, format!("more than {MAX_CHUNKS} chunks")));
        }
    }
    Ok(out)
}

/// A run of the pack that decodes on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub comp_len: u64,
    pub raw_len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackChunk {
    pub path: StorePath,
    pub hash: Sha256,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub store_path: StorePath,
    /// The pack's key in the cache, relative to its root.
    pub pack: String,
    pub pack_size: u64,
    pub frames: Vec<Frame>,
    pub chunks: Vec<PackChunk>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Bad(#[from] ProfileError),
    #[error("it is for {found}, not {expected}")]
    WrongPath { expected: String, found: String },
    #[error("{0}")]
    Untrusted(#[from] Untrusted),
}

impl Manifest {
    /// Where the manifest of `store_path` lives, next to its narinfo.
    pub fn object_key(store_path: &StorePath) -> String {
        format!("{}.narfs-profile", store_path.hash_part())
    }

    fn unsigned_text(&self) -> String {
        let mut s = format!(
            "NarfsProfile: 1\nStorePath: {}\nPack: {}\nPackSize: {}\n",
            self.store_path.absolute(),
            self.pack,
            self.pack_size
        );
        s.push('\n');
        for f in &self.frames {
            s += &format!("frame {} {}\n", f.comp_len, f.raw_len);
        }
        for c in &self.chunks {
            s += &format!(
                "chunk {} {} {}\n",
                c.path.basename(),
                c.hash.to_nix_string(),
                c.len
            );
        }
        s
    }

    /// What a signature covers: the path and the hash of every byte but the `Sig:`
    /// lines.
    fn fingerprint(store_path: &StorePath, unsigned: &Sha256) -> String {
        format!(
            "{FINGERPRINT_PREFIX}{};{}",
            store_path.absolute(),
            unsigned.to_nix_string()
        )
    }

    /// The manifest's bytes, signed by each of `keys`: the `Sig:` lines go after
    /// `PackSize:`, and the fingerprint covers every other byte.
    pub fn to_bytes(&self, keys: &[&SecretKey]) -> Vec<u8> {
        let text = self.unsigned_text();
        let fp = Self::fingerprint(&self.store_path, &Sha256::digest(text.as_bytes()));
        let (head, body) = text.split_once("\n\n").expect("a blank line");
        let mut out = format!("{head}\n");
        for k in keys {
            out += &format!("Sig: {}\n", k.sign(fp.as_bytes()));
        }
        out += "\n";
        out += body;
        out.into_bytes()
    }

    /// Parses and checks a manifest fetched for `store_path`: strict, bounded, signed
    /// by a trusted key, every length consistent.
    pub fn parse_verified(
        bytes: &[u8],
        store_path: &StorePath,
        keys: &TrustedKeys,
    ) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| err(0, "not UTF-8 text"))?;
        let mut unsigned = Hasher::default();
        let mut sigs = Vec::new();
        let mut head: Vec<(&str, &str)> = Vec::new();
        let mut lines = text.split_inclusive('\n').enumerate();
        for (i, raw) in lines.by_ref() {
            let l = raw
                .strip_suffix('\n')
                .ok_or_else(|| err(i + 1, "no newline at the end"))?;
            if l.is_empty() {
                unsigned.update(raw.as_bytes());
                break;
            }
            let (k, v) = l
                .split_once(": ")
                .ok_or_else(|| err(i + 1, "not 'Key: value'"))?;
            if k == "Sig" {
                sigs.push(v);
                if sigs.len() > 16 {
                    return Err(err(i + 1, "more than 16 signatures").into());
                }
                continue;
            }
            unsigned.update(raw.as_bytes());
            head.push((k, v));
        }
        let want = ["NarfsProfile", "StorePath", "Pack", "PackSize"];
        if head.len() != want.len() || head.iter().zip(want).any(|((k, _), w)| *k != w) {
            return Err(err(1, format!("the header is not {}", want.join(", "))).into());
        }
        if head[0].1 != "1" {
            return Err(err(1, format!("unknown version '{}'", head[0].1)).into());
        }
        let found = StorePath::from_absolute(head[1].1).map_err(|e| err(2, e.to_string()))?;
        if found != *store_path {
            return Err(ManifestError::WrongPath {
                expected: store_path.to_string(),
                found: found.to_string(),
            });
        }
        let pack = head[2].1.to_owned();
        if let Some(why) = super::object_key::unsafe_key(&pack) {
            return Err(err(3, format!("Pack '{pack}': {why}")).into());
        }
        let pack_size = head[3]
            .1
            .parse::<u64>()
            .map_err(|_| err(4, "PackSize is not a number"))?;
        let mut frames = Vec::new();
        let mut chunks = Vec::new();
        let mut paths = std::collections::HashSet::new();
        for (i, raw) in lines {
            let n = i + 1;
            unsigned.update(raw.as_bytes());
            let l = raw
                .strip_suffix('\n')
                .ok_or_else(|| err(n, "no newline at the end"))?;
            let f: Vec<&str> = l.split(' ').collect();
            match f[..] {
                ["frame", c, r] if chunks.is_empty() => {
                    let num = |s: &str| s.parse::<u64>().ok().filter(|&x| x > 0);
                    let (Some(comp_len), Some(raw_len)) = (num(c), num(r)) else {
                        return Err(err(n, "a frame's lengths are not positive numbers").into());
                    };
                    // zstd never needs more than this for what does not compress
                    if raw_len > MAX_FRAME || comp_len > raw_len + raw_len / 128 + 1024 {
                        return Err(err(
                            n,
                            format!("a frame over {MAX_FRAME} bytes, or larger than it decodes to"),
                        )
                        .into());
                    }
                    frames.push(Frame { comp_len, raw_len });
                    if frames.len() > MAX_FRAMES {
                        return Err(err(n, format!("more than {MAX_FRAMES} frames")).into());
                    }
                }
                ["chunk", p, h, len] => {
                    let (path, hash, len) = chunk_fields(n, p, h, len)?;
                    paths.insert(path.clone());
                    chunks.push(PackChunk { path, hash, len });
                    if chunks.len() > MAX_CHUNKS || paths.len() > MAX_PATHS {
                        return Err(err(
                            n,
                            format!("more than {MAX_CHUNKS} chunks or {MAX_PATHS} store paths"),
                        )
                        .into());
                    }
                }
                _ => return Err(err(n, "not a frame or chunk line in order").into()),
            }
        }
        let comp: u64 = frames.iter().map(|f| f.comp_len).sum();
        let raw: u64 = frames.iter().map(|f| f.raw_len).sum();
        let chunked: u64 = chunks.iter().map(|c| c.len).sum();
        if comp != pack_size || raw != chunked || chunks.is_empty() {
            return Err(err(
                0,
                format!(
                    "the frames hold {comp} bytes decoding to {raw}, PackSize is {pack_size}, the chunks take {chunked}"
                ),
            )
            .into());
        }
        let fp = Self::fingerprint(&found, &unsigned.finish());
        keys.verify(fp.as_bytes(), sigs.iter().copied())?;
        Ok(Manifest {
            store_path: found,
            pack,
            pack_size,
            frames,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::keys::SecretKey;

    fn sp(c: char) -> StorePath {
        StorePath::from_basename(&format!("{}-x", c.to_string().repeat(32))).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            store_path: sp('a'),
            pack: "profile/p.pack.zst".into(),
            pack_size: 30,
            frames: vec![
                Frame {
                    comp_len: 10,
                    raw_len: 5,
                },
                Frame {
                    comp_len: 20,
                    raw_len: 7,
                },
            ],
            chunks: vec![
                PackChunk {
                    path: sp('a'),
                    hash: Sha256::digest(b"1"),
                    len: 5,
                },
                PackChunk {
                    path: sp('b'),
                    hash: Sha256::digest(b"2"),
                    len: 7,
                },
            ],
        }
    }

    fn keys() -> (SecretKey, TrustedKeys) {
        let k = SecretKey::from_seed("k-1", [7; 32]);
        let mut t = TrustedKeys::default();
        t.add(k.public());
        (k, t)
    }

    #[test]
    fn a_signed_manifest_round_trips_and_nothing_else_verifies() {
        let (k, t) = keys();
        let m = manifest();
        let b = m.to_bytes(&[&k]);
        assert_eq!(Manifest::parse_verified(&b, &sp('a'), &t).unwrap(), m);
        // for another path
        assert!(matches!(
            Manifest::parse_verified(&b, &sp('b'), &t),
            Err(ManifestError::WrongPath { .. })
        ));
        // any byte changed outside the signatures: refused
        let text = String::from_utf8(b.clone()).unwrap();
        for (from, to) in [
            ("frame 10 5", "frame 11 5"),
            ("PackSize: 30", "PackSize: 31"),
            ("p.pack.zst", "q.pack.zst"),
            ("chunk bbbb", "chunk cccc"),
        ] {
            let forged = text.replacen(from, to, 1);
            assert_ne!(forged, text);
            assert!(
                Manifest::parse_verified(forged.as_bytes(), &sp('a'), &t).is_err(),
                "{from} -> {to}"
            );
        }
        // consistent but unsigned or signed by an untrusted key
        let other = SecretKey::from_seed("k-1", [8; 32]);
        assert!(matches!(
            Manifest::parse_verified(&m.to_bytes(&[&other]), &sp('a'), &t),
            Err(ManifestError::Untrusted(_))
        ));
        assert!(Manifest::parse_verified(&m.to_bytes(&[]), &sp('a'), &t).is_err());
    }

    #[test]
    fn inconsistent_or_unsafe_manifests_are_refused() {
        let (k, t) = keys();
        let mut m = manifest();
        m.pack_size = 31;
        assert!(Manifest::parse_verified(&m.to_bytes(&[&k]), &sp('a'), &t).is_err());
        let mut m = manifest();
        m.chunks[1].len = 8;
        assert!(Manifest::parse_verified(&m.to_bytes(&[&k]), &sp('a'), &t).is_err());
        let mut m = manifest();
        m.pack = "../x".into();
        assert!(Manifest::parse_verified(&m.to_bytes(&[&k]), &sp('a'), &t).is_err());
        let mut m = manifest();
        m.frames[0].raw_len = MAX_FRAME + 1;
        assert!(Manifest::parse_verified(&m.to_bytes(&[&k]), &sp('a'), &t).is_err());
        assert!(Manifest::parse_verified(b"\xff", &sp('a'), &t).is_err());
        let big = vec![b'a'; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            Manifest::parse_verified(&big, &sp('a'), &t),
            Err(ManifestError::TooLarge)
        ));
    }

    #[test]
    fn records_round_trip_with_any_file_name() {
        let r = vec![
            Recorded {
                path: sp('a'),
                hash: Sha256::digest(b"1"),
                len: 3,
                file: b"lib/a b\\c\n\xff".to_vec(),
            },
            Recorded {
                path: sp('b'),
                hash: Sha256::digest(b"2"),
                len: 1 << 20,
                file: b"x".to_vec(),
            },
        ];
        let text = record_to_text(&r);
        assert_eq!(text.lines().count(), 3);
        assert_eq!(parse_record(&text).unwrap(), r);
        assert!(parse_record("nope\n").is_err());
        assert!(parse_record(&format!("{RECORD_MAGIC}\na b c\n")).is_err());
        let zero = text.replace(" 3 ", " 0 ");
        assert!(parse_record(&zero).is_err());
    }
}
