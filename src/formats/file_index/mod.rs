//! The narfs file index: a signed, per-store-path object that makes single files of a
//! NAR verifiable without the rest (docs/file-index.md has the whole format).
//!
//! What is signed: the header's fingerprint binds the store path, NarHash, NarSize and
//! the hash of the body; the body holds the tree (names, types, modes, sizes, link
//! targets), a SHA-256 per chunk of every file, and the block table of the seekable
//! compressed NAR. A parsed `FileIndex` has passed every check of the format; nothing
//! here does I/O.

use super::hash::Sha256;
use super::keys::{PublicKey, SecretKey, TrustedKeys, Untrusted};
use super::listing::Entry;
use super::store_path::StorePath;

mod body;
pub use body::{decode_tree, encode_tree};

pub const VERSION: u32 = 1;
/// Never a prefix of Nix's narinfo fingerprint (`1;/nix/store/...`).
pub const FINGERPRINT_PREFIX: &str = "narfs-index-1;";
const MAGIC: &[u8; 4] = b"NIB1";
const MAX_HEADER: usize = 16 << 10;
const MAX_SIGS: usize = 16;
/// The body as stored (compressed).
pub const MAX_BODY: u64 = 64 << 20;
const MAX_BODY_DECOMPRESSED: u64 = 256 << 20;
pub const MAX_NODES: usize = 1_000_000;
/// The most NAR bytes one block may decode to: bounds what a block can cost.
pub const MAX_BLOCK_NAR: u32 = 64 << 20;

/// How the blocks of the compressed NAR are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockCompression {
    None,
    /// Each block a whole xz stream (the object is their concatenation).
    Xz,
    /// Each block a zstd frame.
    Zstd,
}

impl BlockCompression {
    fn code(self) -> u8 {
        match self {
            BlockCompression::None => 0,
            BlockCompression::Xz => 1,
            BlockCompression::Zstd => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BlockCompression::None => "none",
            BlockCompression::Xz => "xz",
            BlockCompression::Zstd => "zstd",
        }
    }
}

/// One independently decodable block: `comp_len` bytes at `comp_offset` of the
/// compressed object decode to the `nar_len` NAR bytes at `nar_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub comp_offset: u64,
    pub comp_len: u32,
    pub nar_offset: u64,
    pub nar_len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIndex {
    pub store_path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// The compressed NAR's key, relative to the cache root.
    pub url: String,
    pub compression: BlockCompression,
    pub file_size: u64,
    pub file_hash: Sha256,
    pub chunk_shift: u8,
    pub blocks: Vec<Block>,
    /// Every regular file has `nar_offset` and `chunks`.
    pub root: Entry,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("file index header: {0}")]
    Header(String),
    #[error("file index is for {found}, not {expected}")]
    WrongPath { expected: String, found: String },
    #[error("file index has {field} {found}, its signed narinfo {expected}")]
    Mismatch {
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("file index of {path} {source}")]
    Untrusted { path: String, source: Untrusted },
    #[error("file index body: {0}")]
    Body(String),
}

fn header_err(s: impl Into<String>) -> IndexError {
    IndexError::Header(s.into())
}

fn body_err(s: impl Into<String>) -> IndexError {
    IndexError::Body(s.into())
}

/// Where `narfs push` and `narfs index` put a path's index: next to its narinfo. A
/// narinfo's `NarfsIndex:` line names it; this name only lets a reader ask for it
/// before that narinfo arrived.
pub fn object_key(hash_part: &str) -> String {
    format!("{hash_part}.narfs-index")
}

/// The signed header fields, parsed.
struct Header<'a> {
    store_path: StorePath,
    nar_hash: Sha256,
    nar_size: u64,
    body_hash: Sha256,
    body_size: u64,
    sigs: Vec<&'a str>,
}

fn fingerprint(
    store_path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    body_hash: &Sha256,
    body_size: u64,
) -> String {
    format!(
        "{FINGERPRINT_PREFIX}{store_path};{};{nar_size};{};{body_size}",
        nar_hash.to_nix_string(),
        body_hash.to_nix_string()
    )
}

fn parse_header(text: &str) -> Result<Header<'_>, IndexError> {
    let mut lines = text.split('\n');
    let mut field = |name: &str| -> Result<&str, IndexError> {
        let line = lines
            .next()
            .ok_or_else(|| header_err(format!("missing {name}")))?;
        line.strip_prefix(name)
            .and_then(|l| l.strip_prefix(": "))
            .ok_or_else(|| header_err(format!("expected '{name}: ...', found {:?}", cut(line))))
    };
    let version = field("NarfsIndex")?;
    if version != VERSION.to_string() {
        return Err(header_err(format!(
            "version {:?}, only {VERSION} is known",
            cut(version)
        )));
    }
    let store_path = StorePath::from_absolute(field("StorePath")?)
        .map_err(|e| header_err(format!("StorePath: {e}")))?;
    let nar_hash = Sha256::parse(field("NarHash")?).map_err(|e| header_err(e.to_string()))?;
    let nar_size = number(field("NarSize")?, "NarSize")?;
    let body_hash = Sha256::parse(field("BodyHash")?).map_err(|e| header_err(e.to_string()))?;
    let body_size = number(field("BodySize")?, "BodySize")?;
    if body_size > MAX_BODY {
        return Err(header_err(format!(
            "BodySize {body_size} is over {MAX_BODY}"
        )));
    }
    let mut sigs = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        let sig = line
            .strip_prefix("Sig: ")
            .ok_or_else(|| header_err(format!("expected 'Sig: ...', found {:?}", cut(line))))?;
        if sigs.len() == MAX_SIGS {
            return Err(header_err(format!("more than {MAX_SIGS} signatures")));
        }
        sigs.push(sig);
    }
    if sigs.is_empty() {
        return Err(header_err("no Sig: line"));
    }
    Ok(Header {
        store_path,
        nar_hash,
        nar_size,
        body_hash,
        body_size,
        sigs,
    })
}

/// An index object around `body` (uncompressed), signed with each of `keys`. Tests
/// use it to sign bodies that are not what `FileIndex::body` would write.
pub fn encode(
    store_path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    body: &[u8],
    keys: &[&SecretKey],
) -> Vec<u8> {
    let body = zstd::bulk::compress(body, 19).expect("zstd compresses to memory");
    let body_hash = Sha256::digest(&body);
    let fp = fingerprint(
        store_path,
        nar_hash,
        nar_size,
        &body_hash,
        body.len() as u64,
    );
    let mut out = format!(
        "NarfsIndex: {VERSION}\nStorePath: {store_path}\nNarHash: {}\nNarSize: {nar_size}\nBodyHash: {}\nBodySize: {}\n",
        nar_hash.to_nix_string(),
        body_hash.to_nix_string(),
        body.len()
    );
    for k in keys {
        out += &format!("Sig: {}\n", k.sign(fp.as_bytes()));
    }
    out.push('\n');
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

fn number(s: &str, what: &str) -> Result<u64, IndexError> {
    s.parse::<u64>()
        .ok()
        // digits only, no leading zeros: one text per number
        .filter(|_| s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0')))
        .filter(|&n| n <= super::narinfo::MAX_SIZE)
        .ok_or_else(|| header_err(format!("{what}: {:?} is not a size", cut(s))))
}

/// What a verified header promises of the body after it: a reader may fetch that many
/// bytes (at most `MAX_BODY`) knowing they were signed for, before it has them.
#[derive(Debug)]
pub struct VerifiedHeader<'k> {
    pub store_path: StorePath,
    pub nar_hash: Sha256,
    pub body_size: u64,
    pub body_hash: Sha256,
    pub signer: &'k PublicKey,
}

/// The most bytes a header (blank line included) may take.
pub const MAX_HEADER_BYTES: usize = MAX_HEADER + 2;

/// The length of the header at the start of `bytes`, blank line included, once its
/// end is there (within `MAX_HEADER` bytes).
pub fn header_len(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(2)
        .take(MAX_HEADER)
        .position(|w| w == b"\n\n")
        .map(|at| at + 2)
}

/// Checks a header (`header_len` bytes): for `store_path` with this signed NarHash and
/// NarSize, signed by a trusted key over the body's hash and size. An index that is
/// not for this path, or not signed, is refused here, before its body is read.
pub fn verify_header<'k>(
    header: &[u8],
    store_path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    keys: &'k TrustedKeys,
) -> Result<VerifiedHeader<'k>, IndexError> {
    let text = header
        .strip_suffix(b"\n")
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| header_err("not UTF-8 text"))?;
    let h = parse_header(text)?;
    if h.store_path != *store_path {
        return Err(IndexError::WrongPath {
            expected: store_path.to_string(),
            found: h.store_path.to_string(),
        });
    }
    if h.nar_hash != *nar_hash {
        return Err(IndexError::Mismatch {
            field: "NarHash",
            expected: nar_hash.to_nix_string(),
            found: h.nar_hash.to_nix_string(),
        });
    }
    if h.nar_size != nar_size {
        return Err(IndexError::Mismatch {
            field: "NarSize",
            expected: nar_size.to_string(),
            found: h.nar_size.to_string(),
        });
    }
    let fp = fingerprint(
        &h.store_path,
        &h.nar_hash,
        h.nar_size,
        &h.body_hash,
        h.body_size,
    );
    let signer = keys
        .verify(fp.as_bytes(), h.sigs.iter().copied())
        .map_err(|source| IndexError::Untrusted {
            path: store_path.to_string(),
            source,
        })?;
    Ok(VerifiedHeader {
        store_path: h.store_path,
        nar_hash: h.nar_hash,
        body_size: h.body_size,
        body_hash: h.body_hash,
        signer,
    })
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

impl FileIndex {
    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunk_shift
    }

    /// The fingerprint a signature covers, for a body of this hash and size.
    pub fn fingerprint(&self, body_hash: &Sha256, body_size: u64) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            body_hash,
            body_size,
        )
    }

    /// The object as stored in a cache, signed with each of `keys`.
    pub fn to_bytes(&self, keys: &[&SecretKey]) -> Vec<u8> {
        encode(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.body(),
            keys,
        )
    }

    /// Parses an index and checks everything docs/file-index.md lists: that it is for
    /// `store_path` with this (signed) NarHash and NarSize, signed by a trusted key,
    /// and sound throughout. Returns the key that signed.
    pub fn parse_verified<'k>(
        bytes: &[u8],
        store_path: &StorePath,
        nar_hash: &Sha256,
        nar_size: u64,
        keys: &'k TrustedKeys,
    ) -> Result<(Self, &'k PublicKey), IndexError> {
        let split = header_len(bytes)
            .ok_or_else(|| header_err(format!("no end of header within {MAX_HEADER} bytes")))?;
        let h = verify_header(&bytes[..split], store_path, nar_hash, nar_size, keys)?;
        let index = Self::from_verified_body(&h, &bytes[split..], nar_size)?;
        Ok((index, h.signer))
    }

    /// The range of blocks holding NAR bytes `[start, end)`.
    pub fn blocks_covering(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        let first = self
            .blocks
            .partition_point(|b| b.nar_offset + b.nar_len as u64 <= start);
        let last = self.blocks.partition_point(|b| b.nar_offset < end);
        first..last.max(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &[u8], executable: bool) -> Entry {
        let chunks = contents
            .chunks(1 << 12)
            .map(Sha256::digest)
            .collect::<Vec<_>>()
            .into();
        Entry::Regular {
            size: contents.len() as u64,
            executable,
            nar_offset: None,
            chunks: Some(chunks),
        }
    }

    /// An index of a small tree (4 KiB chunks) and its signing key.
    pub(crate) fn sample() -> (FileIndex, SecretKey) {
        let mut root = Entry::Directory {
            entries: vec![
                (b"big".to_vec().into(), file(&[7u8; 10_000], false)),
                (
                    b"bin".to_vec().into(),
                    Entry::Directory {
                        entries: vec![(
                            b"app".to_vec().into(),
                            file(b"#!/bin/sh\necho hi\n", true),
                        )],
                    },
                ),
                (b"empty".to_vec().into(), file(b"", false)),
                (
                    b"link".to_vec().into(),
                    Entry::Symlink {
                        target: b"bin/app".to_vec().into(),
                    },
                ),
            ],
        };
        let nar_size = super::super::nar::lay_out(&mut root);
        let index = FileIndex {
            store_path: StorePath::from_basename("00000000000000000000000000000000-sample")
                .unwrap(),
            nar_hash: Sha256::digest(b"the nar"),
            nar_size,
            url: "nar/abc.nar.xz".into(),
            compression: BlockCompression::Xz,
            file_size: 300,
            file_hash: Sha256::digest(b"the file"),
            chunk_shift: 12,
            blocks: vec![
                Block {
                    comp_offset: 0,
                    comp_len: 100,
                    nar_offset: 0,
                    nar_len: 4000,
                },
                Block {
                    comp_offset: 100,
                    comp_len: 200,
                    nar_offset: 4000,
                    nar_len: (nar_size - 4000) as u32,
                },
            ],
            root,
        };
        (index, SecretKey::from_seed("idx-test-1", [4; 32]))
    }

    fn trusted(sk: &SecretKey) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add(sk.public());
        t
    }

    fn check(bytes: &[u8], i: &FileIndex, keys: &TrustedKeys) -> Result<FileIndex, IndexError> {
        FileIndex::parse_verified(bytes, &i.store_path, &i.nar_hash, i.nar_size, keys)
            .map(|(x, _)| x)
    }

    #[test]
    fn round_trips_and_verifies() {
        let (i, sk) = sample();
        let bytes = i.to_bytes(&[&sk]);
        let got = check(&bytes, &i, &trusted(&sk)).unwrap();
        assert_eq!(got, i);
        assert_eq!(i.blocks_covering(0, 1), 0..1);
        assert_eq!(i.blocks_covering(3999, 4001), 0..2);
        assert_eq!(i.blocks_covering(4000, 4001), 1..2);
        assert_eq!(i.blocks_covering(i.nar_size, i.nar_size), 2..2);
        // the header is text a person can read
        let text = String::from_utf8_lossy(&bytes[..200]);
        assert!(
            text.starts_with("NarfsIndex: 1\nStorePath: /nix/store/0000"),
            "{text}"
        );
    }

    #[test]
    fn the_fingerprint_has_its_own_domain() {
        let (i, _) = sample();
        let fp = i.fingerprint(&Sha256::digest(b""), 0);
        assert!(fp.starts_with("narfs-index-1;/nix/store/"));
        assert!(!fp.starts_with("1;"));
    }

    #[test]
    fn refuses_what_does_not_match_or_is_not_signed() {
        let (i, sk) = sample();
        let keys = trusted(&sk);
        let bytes = i.to_bytes(&[&sk]);
        let other = StorePath::from_basename("11111111111111111111111111111111-sample").unwrap();
        let e =
            FileIndex::parse_verified(&bytes, &other, &i.nar_hash, i.nar_size, &keys).unwrap_err();
        assert!(matches!(e, IndexError::WrongPath { .. }), "{e}");
        let e = FileIndex::parse_verified(
            &bytes,
            &i.store_path,
            &Sha256::digest(b"x"),
            i.nar_size,
            &keys,
        )
        .unwrap_err();
        assert!(e.to_string().contains("NarHash"), "{e}");
        let e =
            FileIndex::parse_verified(&bytes, &i.store_path, &i.nar_hash, i.nar_size + 1, &keys)
                .unwrap_err();
        assert!(e.to_string().contains("NarSize"), "{e}");
        let stranger = SecretKey::from_seed("idx-test-1", [5; 32]);
        let e = check(&i.to_bytes(&[&stranger]), &i, &keys).unwrap_err();
        assert!(matches!(e, IndexError::Untrusted { .. }), "{e}");
        // a narinfo signature never passes for an index signature
        let nar_fp = format!(
            "1;{};{};{};",
            i.store_path,
            i.nar_hash.to_nix_string(),
            i.nar_size
        );
        let mut text = bytes.clone();
        let sig_at = text.windows(5).position(|w| w == b"Sig: ").unwrap();
        let end = sig_at + text[sig_at..].iter().position(|&b| b == b'\n').unwrap();
        let nar_sig = sk.sign(nar_fp.as_bytes());
        text.splice(sig_at + 5..end, nar_sig.bytes());
        assert!(matches!(
            check(&text, &i, &keys),
            Err(IndexError::Untrusted { .. })
        ));
    }

    #[test]
    fn body_faults_are_refused() {
        let (i, sk) = sample();
        let keys = trusted(&sk);
        type Edit = Box<dyn Fn(&mut FileIndex)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("url", Box::new(|x| x.url = "nar/../x".into())),
            (
                "lays out",
                Box::new(|x| {
                    if let Entry::Directory { entries } = &mut x.root {
                        entries.pop();
                    }
                }),
            ),
            ("blocks hold", Box::new(|x| x.blocks[1].nar_len -= 1)),
            ("blocks hold", Box::new(|x| x.file_size += 1)),
            ("chunk_shift", Box::new(|x| x.chunk_shift = 30)),
            (
                "unsorted",
                Box::new(|x| {
                    if let Entry::Directory { entries } = &mut x.root {
                        entries.swap(0, 1);
                    }
                }),
            ),
        ];
        for (why, edit) in cases {
            let mut x = i.clone();
            edit(&mut x);
            let e = check(&x.to_bytes(&[&sk]), &i, &keys).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
        // a body that is not the one signed
        let mut bytes = i.to_bytes(&[&sk]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(check(&bytes, &i, &keys)
            .unwrap_err()
            .to_string()
            .contains("BodyHash"));
        bytes.push(0);
        assert!(check(&bytes, &i, &keys).is_err());
        // truncated anywhere
        let bytes = i.to_bytes(&[&sk]);
        for n in (0..bytes.len()).step_by(7) {
            assert!(check(&bytes[..n], &i, &keys).is_err(), "{n}");
        }
    }
}
