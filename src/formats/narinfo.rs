//! `.narinfo` files: a store path's metadata and the signature that makes it trusted.
//!
//! The parser is strict where a wrong value could change what is served (store path,
//! hashes, sizes, references, duplicates of any of them) and lenient where Nix is
//! (unknown keys are ignored). Only the fingerprint is signed; URL, Compression and
//! FileHash are not, which is why the NAR itself is checked against NarHash.

use super::hash::{truncate, HashError, Sha256};
use super::keys::{PublicKey, TrustedKeys, Untrusted};
use super::store_path::{StorePath, StorePathError};

/// Larger values are not real Nix store paths; refusing them early bounds the work a
/// hostile narinfo can cause.
pub const MAX_SIZE: u64 = 1 << 40;
/// A narinfo is a few hundred bytes; even a system closure's is tens of KiB.
pub const MAX_NARINFO_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
    Br,
    Gzip,
    /// Kept so the narinfo still lists; fetching its NAR fails with a clear error.
    Unknown(String),
}

impl Compression {
    fn parse(s: &str) -> Self {
        match s {
            "none" => Compression::None,
            "xz" => Compression::Xz,
            "zstd" => Compression::Zstd,
            // Nix's default when the field is missing or empty.
            "bzip2" | "" => Compression::Bzip2,
            "br" => Compression::Br,
            "gzip" => Compression::Gzip,
            other => Compression::Unknown(truncate(other)),
        }
    }
    pub fn as_str(&self) -> &str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Br => "br",
            Compression::Gzip => "gzip",
            Compression::Unknown(s) => s,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: String,
    pub compression: Compression,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted and deduplicated, as Nix holds them (a set) and signs them.
    pub references: Vec<StorePath>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// `NarfsIndex:`, a narfs extension (Nix ignores unknown keys): the key of the
    /// path's signed file index. Unsigned, a hint of where to look: the index itself
    /// must verify.
    pub index: Option<String>,
    /// `NarfsProfile:`, another unsigned hint: the key of a start-up profile's signed
    /// manifest (docs/profiles.md).
    pub profile: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo is larger than {MAX_NARINFO_BYTES} bytes")]
    TooLarge,
    #[error("narinfo is not UTF-8 text")]
    NotText,
    #[error("line {0}: not of the form 'Key: value'")]
    Line(usize),
    #[error("field {0} appears more than once")]
    Duplicate(&'static str),
    #[error("required field {0} is missing")]
    Missing(&'static str),
    #[error("{field}: {source}")]
    Hash {
        field: &'static str,
        source: HashError,
    },
    #[error("{field}: '{value}' is not a size between 1 and 2^40")]
    Size { field: &'static str, value: String },
    #[error("{field}: {source}")]
    Path {
        field: &'static str,
        source: StorePathError,
    },
    #[error("URL '{0}' is not a plain relative key inside the cache: {1}")]
    Url(String, &'static str),
}

/// Verification failures: the narinfo parsed but must not be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("narinfo {key} describes {found}, not a path with hash {expected}")]
    WrongPath {
        key: String,
        expected: String,
        found: String,
    },
    #[error("{path} {source}")]
    Untrusted { path: String, source: Untrusted },
}

fn size(field: &'static str, v: &str) -> Result<u64, NarInfoError> {
    v.parse::<u64>()
        .ok()
        .filter(|&n| n > 0 && n <= MAX_SIZE && !v.starts_with('+'))
        .ok_or_else(|| NarInfoError::Size {
            field,
            value: truncate(v),
        })
}

fn set<T>(slot: &mut Option<T>, name: &'static str, v: T) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Duplicate(name));
    }
    *slot = Some(v);
    Ok(())
}

impl NarInfo {
    pub fn parse_bytes(b: &[u8]) -> Result<Self, NarInfoError> {
        if b.len() > MAX_NARINFO_BYTES {
            return Err(NarInfoError::TooLarge);
        }
        Self::parse(std::str::from_utf8(b).map_err(|_| NarInfoError::NotText)?)
    }

    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_BYTES {
            return Err(NarInfoError::TooLarge);
        }
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references: Option<Vec<StorePath>> = None;
        let mut deriver = None;
        let mut ca = None;
        let mut index = None;
        let mut profile = None;
        let mut sigs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once(':').ok_or(NarInfoError::Line(i + 1))?;
            let value = value.strip_prefix(' ').unwrap_or(value);
            if key.is_empty() || key.contains(' ') {
                return Err(NarInfoError::Line(i + 1));
            }
            let hash =
                |field| Sha256::parse(value).map_err(|source| NarInfoError::Hash { field, source });
            match key {
                "StorePath" => set(
                    &mut store_path,
                    "StorePath",
                    StorePath::from_absolute(value).map_err(|source| NarInfoError::Path {
                        field: "StorePath",
                        source,
                    })?,
                )?,
                "URL" => {
                    // unsigned: it may only name a key under the cache's root
                    if let Some(why) = super::object_key::unsafe_key(value) {
                        return Err(NarInfoError::Url(truncate(value), why));
                    }
                    set(&mut url, "URL", value.to_owned())?
                }
                "Compression" => set(&mut compression, "Compression", Compression::parse(value))?,
                "FileHash" => set(&mut file_hash, "FileHash", hash("FileHash")?)?,
                "FileSize" => set(&mut file_size, "FileSize", size("FileSize", value)?)?,
                "NarHash" => set(&mut nar_hash, "NarHash", hash("NarHash")?)?,
                "NarSize" => set(&mut nar_size, "NarSize", size("NarSize", value)?)?,
                "References" => {
                    let mut refs = value
                        .split_whitespace()
                        .map(StorePath::from_basename)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|source| NarInfoError::Path {
                            field: "References",
                            source,
                        })?;
                    refs.sort();
                    refs.dedup();
                    set(&mut references, "References", refs)?
                }
                "Deriver" if value != "unknown-deriver" && !value.is_empty() => {
                    set(&mut deriver, "Deriver", value.to_owned())?
                }
                "Sig" => sigs.push(value.to_owned()),
                "CA" => set(&mut ca, "CA", value.to_owned())?,
                // an unusable hint is no reason to refuse the narinfo: it is ignored
                "NarfsIndex" if super::object_key::unsafe_key(value).is_none() => {
                    set(&mut index, "NarfsIndex", value.to_owned())?
                }
                "NarfsProfile" if super::object_key::unsafe_key(value).is_none() => {
                    set(&mut profile, "NarfsProfile", value.to_owned())?
                }
                _ => {}
            }
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
            index,
            profile,
        })
    }

    /// What Nix signs: `1;<path>;sha256:<nix32>;<size>;<refs as full paths, comma-joined>`.
    pub fn fingerprint(&self) -> String {
        // Nix holds references in a sorted set: the order a narinfo lists them in
        // does not matter
        let mut refs: Vec<String> = self.references.iter().map(|r| r.absolute()).collect();
        refs.sort();
        refs.dedup();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// The two checks that make a narinfo servable: it describes the path it was
    /// looked up under (`hash_part` is the key it was read from), and a trusted key
    /// signed it. Returns the key that signed.
    pub fn verify<'k>(
        &self,
        hash_part: &str,
        keys: &'k TrustedKeys,
    ) -> Result<&'k PublicKey, VerifyError> {
        if self.store_path.hash_part() != hash_part {
            return Err(VerifyError::WrongPath {
                key: format!("{hash_part}.narinfo"),
                expected: hash_part.to_owned(),
                found: self.store_path.to_string(),
            });
        }
        keys.verify(
            self.fingerprint().as_bytes(),
            self.sigs.iter().map(String::as_str),
        )
        .map_err(|source| VerifyError::Untrusted {
            path: self.store_path.to_string(),
            source,
        })
    }

    /// Drops what is only needed to verify (signatures, deriver, CA): the index keeps
    /// one of these per store path, verified copies stay on disk whole.
    pub fn compact(mut self) -> Self {
        self.sigs = Vec::new();
        self.deriver = None;
        self.ca = None;
        self.url.shrink_to_fit();
        self.references.shrink_to_fit();
        self
    }

    /// Nix's text form; used by `push` and by tests that generate caches.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "StorePath: {}\nURL: {}\nCompression: {}\n",
            self.store_path,
            self.url,
            self.compression.as_str()
        );
        if let Some(h) = &self.file_hash {
            s += &format!("FileHash: {h}\n");
        }
        if let Some(n) = self.file_size {
            s += &format!("FileSize: {n}\n");
        }
        let refs: Vec<&str> = self.references.iter().map(|r| r.basename()).collect();
        s += &format!(
            "NarHash: {}\nNarSize: {}\nReferences: {}\n",
            self.nar_hash,
            self.nar_size,
            refs.join(" ")
        );
        if let Some(d) = &self.deriver {
            s += &format!("Deriver: {d}\n");
        }
        for sig in &self.sigs {
            s += &format!("Sig: {sig}\n");
        }
        if let Some(ca) = &self.ca {
            s += &format!("CA: {ca}\n");
        }
        if let Some(index) = &self.index {
            s += &format!("NarfsIndex: {index}\n");
        }
        if let Some(p) = &self.profile {
            s += &format!("NarfsProfile: {p}\n");
        }
        s
    }
}

/// Every NAR a narinfo names, read as loosely as anything that might read it: each
/// `URL:` line counts, repeated or not (Nix keeps the last), in a narinfo the strict
/// parser refuses too. Deleting a NAR is the one step that cannot be undone, so what
/// decides it must never miss a name.
pub fn named_urls(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == b'\n')
        .filter_map(|l| l.strip_prefix(b"URL:"))
        .map(|v| String::from_utf8_lossy(v).trim().to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::keys::SecretKey;

    // Written by `nix copy --to file://...?compression=xz` (Nix 2.8), signed with the key
    // in keys.rs's tests.
    const APP: &str = "StorePath: /nix/store/qh5gghmcfn07hvgw6vhzgpili0mwicn5-narfs-test-app
URL: nar/1n7nk1myjr3ly5ay2whkkvchh9zgkx0di5kw8k473bvc9pr6nbry.nar.xz
Compression: xz
FileHash: sha256:1n7nk1myjr3ly5ay2whkkvchh9zgkx0di5kw8k473bvc9pr6nbry
FileSize: 328
NarHash: sha256:02d1qbgjc6z14638ay9wy5c7yjfpcv716cwasack0z3lfd58f9ai
NarSize: 1224
References: 01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib
Deriver: hca0hc6ss4z156p9lfdlzll8jsqkfcff-narfs-test-app.drv
Sig: test-key:8bcBe4QYw3vToU4c/9I+N81ucswmXmWqoTaK542IPsARZYRbiiw7wIRr4CzHNcL3j/oPzQGNohCfKWICnuqJDQ==
";
    const LIB: &str = "StorePath: /nix/store/01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib
URL: nar/0rsad5a18pfh5b5a1zam4pbf6pfjblywb325hkfwcf1531m93lin.nar.xz
Compression: xz
FileHash: sha256:0rsad5a18pfh5b5a1zam4pbf6pfjblywb325hkfwcf1531m93lin
FileSize: 280
NarHash: sha256:0y3yr1ypli3mw3wvc1m5dpa424y5lfpdik46ai1fdl4b9pxjyxdv
NarSize: 1240
References: 
Deriver: zb2s3adha3qh79p0dxynpcydzmcq7pdx-narfs-test-lib.drv
Sig: test-key:8puYvU71X4PBW4oQ+yIyQ29ebw6W5/Bp46N3fK7wGZZBZ9rk5jTfzFaiziaiHCXz9ISuxEjGosLHZz/MQDAgDA==
";
    const KEY: &str = "test-key:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=";

    fn trusted() -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add(PublicKey::parse(KEY).unwrap());
        t
    }

    #[test]
    fn parses_and_verifies_nix_written_narinfos() {
        for (text, hash) in [
            (APP, "qh5gghmcfn07hvgw6vhzgpili0mwicn5"),
            (LIB, "01i3s2rvgbyv8zgcga77aa80qdgg4lx5"),
        ] {
            let n = NarInfo::parse(text).unwrap();
            assert_eq!(n.compression, Compression::Xz);
            assert_eq!(n.verify(hash, &trusted()).unwrap().name, "test-key");
            // and the text form round-trips
            assert_eq!(NarInfo::parse(&n.to_text()).unwrap(), n);
        }
        let app = NarInfo::parse(APP).unwrap();
        assert_eq!(app.nar_size, 1224);
        assert_eq!(app.file_size, Some(328));
        assert_eq!(app.references.len(), 1);
        assert_eq!(
            app.fingerprint(),
            "1;/nix/store/qh5gghmcfn07hvgw6vhzgpili0mwicn5-narfs-test-app;\
             sha256:02d1qbgjc6z14638ay9wy5c7yjfpcv716cwasack0z3lfd58f9ai;1224;\
             /nix/store/01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib"
        );
    }

    #[test]
    fn any_signed_field_changed_breaks_the_signature() {
        let edits = [
            ("NarSize: 1224", "NarSize: 1225"),
            ("NarHash: sha256:02d1", "NarHash: sha256:12d1"),
            ("References: 01i3", "References: 11i3"),
            ("narfs-test-app\nURL", "narfs-test-apq\nURL"),
        ];
        for (from, to) in edits {
            let text = APP.replacen(from, to, 1);
            assert_ne!(text, APP, "{from}");
            let n = NarInfo::parse(&text).unwrap();
            let e = n.verify(n.store_path.hash_part(), &trusted()).unwrap_err();
            assert!(matches!(e, VerifyError::Untrusted { .. }), "{from}: {e}");
        }
        // Unsigned fields may change (the NAR hash check catches a bad NAR).
        let n = NarInfo::parse(&APP.replace("Compression: xz", "Compression: zstd")).unwrap();
        assert!(n
            .verify("qh5gghmcfn07hvgw6vhzgpili0mwicn5", &trusted())
            .is_ok());
    }

    #[test]
    fn wrong_key_and_missing_sig_name_the_signers() {
        let n = NarInfo::parse(APP).unwrap();
        let mut other = TrustedKeys::default();
        other.add(SecretKey::from_seed("other", [1; 32]).public());
        let e = n
            .verify("qh5gghmcfn07hvgw6vhzgpili0mwicn5", &other)
            .unwrap_err();
        assert!(e.to_string().contains("signed by: test-key"), "{e}");
        let unsigned = NarInfo::parse(
            &APP.lines()
                .filter(|l| !l.starts_with("Sig"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        let e = unsigned
            .verify("qh5gghmcfn07hvgw6vhzgpili0mwicn5", &trusted())
            .unwrap_err();
        assert!(e.to_string().contains("no signatures"), "{e}");
    }

    #[test]
    fn store_path_must_match_the_key_it_was_read_from() {
        let n = NarInfo::parse(APP).unwrap();
        let e = n
            .verify("01i3s2rvgbyv8zgcga77aa80qdgg4lx5", &trusted())
            .unwrap_err();
        assert!(matches!(e, VerifyError::WrongPath { .. }));
        assert!(e
            .to_string()
            .contains("01i3s2rvgbyv8zgcga77aa80qdgg4lx5.narinfo"));
    }

    #[test]
    fn rejects_malformed_narinfos() {
        let drop = |k: &str| {
            APP.lines()
                .filter(|l| !l.starts_with(k))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let cases: Vec<(String, NarInfoError)> = vec![
            (drop("StorePath"), NarInfoError::Missing("StorePath")),
            (drop("URL"), NarInfoError::Missing("URL")),
            (drop("NarHash"), NarInfoError::Missing("NarHash")),
            (drop("NarSize"), NarInfoError::Missing("NarSize")),
            (
                format!("{APP}NarSize: 1\n"),
                NarInfoError::Duplicate("NarSize"),
            ),
            (
                format!("{APP}StorePath: /nix/store/01i3s2rvgbyv8zgcga77aa80qdgg4lx5-x\n"),
                NarInfoError::Duplicate("StorePath"),
            ),
            (
                format!("{APP}References: \n"),
                NarInfoError::Duplicate("References"),
            ),
            (format!("{APP}garbage line\n"), NarInfoError::Line(11)),
        ];
        for (text, want) in cases {
            assert_eq!(NarInfo::parse(&text).unwrap_err(), want);
        }
        let bad = [
            APP.replace("NarSize: 1224", "NarSize: 0"),
            APP.replace("NarSize: 1224", "NarSize: -1"),
            APP.replace("NarSize: 1224", "NarSize: 99999999999999999999"),
            APP.replace("NarSize: 1224", "NarSize: 1099511627777"),
            APP.replace("FileSize: 328", "FileSize: 3x"),
            APP.replace("NarHash: sha256:02d1", "NarHash: sha256:e2d1"),
            APP.replace("NarHash: sha256:", "NarHash: md5:"),
            APP.replace("FileHash: sha256:1n7n", "FileHash: sha256:1n7"),
            APP.replace("References: 01i3", "References: ../etc"),
            APP.replace(
                "References: 01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib",
                "References: /nix/store/01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib",
            ),
            APP.replace("StorePath: /nix/store/", "StorePath: /tmp/"),
            APP.replace("URL: nar/", "URL: /nar/"),
            APP.replace("URL: nar/", "URL: ../nar/"),
            APP.replace("URL: nar/", "URL: http://evil/"),
        ];
        for text in bad {
            assert!(NarInfo::parse(&text).is_err(), "{text}");
        }
        assert_eq!(
            NarInfo::parse_bytes(&[0xff, 0xfe, 0]).unwrap_err(),
            NarInfoError::NotText
        );
        let big = "X: y\n".repeat(MAX_NARINFO_BYTES / 5 + 1);
        assert_eq!(NarInfo::parse(&big).unwrap_err(), NarInfoError::TooLarge);
    }

    #[test]
    fn lenient_like_nix() {
        // unknown keys ignored, missing Compression is bzip2, references sorted
        let text = format!("{}Foo: bar\n", APP.replace("Compression: xz\n", ""));
        let n = NarInfo::parse(&text).unwrap();
        assert_eq!(n.compression, Compression::Bzip2);
        let n = NarInfo::parse(&APP.replace("Compression: xz", "Compression: lz4")).unwrap();
        assert_eq!(n.compression, Compression::Unknown("lz4".into()));
    }

    #[test]
    fn every_url_line_is_named_even_where_the_parser_refuses() {
        let mut text = format!("{APP}URL: nar/other.nar\r\nURL:nar/third.nar\n").into_bytes();
        text.extend_from_slice(b"\xff\n");
        assert!(NarInfo::parse_bytes(&text).is_err());
        assert_eq!(
            named_urls(&text),
            [
                "nar/1n7nk1myjr3ly5ay2whkkvchh9zgkx0di5kw8k473bvc9pr6nbry.nar.xz",
                "nar/other.nar",
                "nar/third.nar"
            ]
        );
        assert_eq!(
            named_urls(b"\xffURL: x\nStorePath: y"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn never_panics_on_mutations() {
        // Cheap deterministic mutation sweep; the proptest/fuzz targets go further.
        let base = APP.as_bytes();
        for i in 0..base.len() {
            for b in [0u8, b':', b'\n', b' ', 0xff, b'z'] {
                let mut m = base.to_vec();
                m[i] = b;
                if let Ok(n) = NarInfo::parse_bytes(&m) {
                    let _ = n.verify("qh5gghmcfn07hvgw6vhzgpili0mwicn5", &trusted());
                }
            }
        }
    }
}
