//! SHA-256 hashes as Nix writes them in narinfos: `sha256:<nix32|base16|base64>`.

use base64::Engine;
use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("hash '{0}' does not start with 'sha256:' (only SHA-256 is accepted)")]
    Algorithm(String),
    #[error("hash '{0}' is not a valid nix32, base16 or base64 SHA-256 digest")]
    Digest(String),
}

impl Sha256 {
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }

    /// Accepts what Nix's `Hash::parseAny` accepts for SHA-256 with an explicit
    /// algorithm: the digest in nix32 (52 chars, what Nix writes), base16 (64) or
    /// base64 (44), after `sha256:`; also the SRI form `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let digest = if let Some(d) = s.strip_prefix("sha256:") {
            d
        } else if let Some(d) = s.strip_prefix("sha256-") {
            return Self::from_base64(d).ok_or_else(|| HashError::Digest(s.to_owned()));
        } else {
            return Err(HashError::Algorithm(truncate(s)));
        };
        let bytes = match digest.len() {
            52 => super::nixbase32::decode(digest),
            64 => decode_hex(digest),
            44 => return Self::from_base64(digest).ok_or_else(|| HashError::Digest(truncate(s))),
            _ => None,
        };
        bytes
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(Sha256)
            .ok_or_else(|| HashError::Digest(truncate(s)))
    }

    fn from_base64(d: &str) -> Option<Self> {
        let b = base64::engine::general_purpose::STANDARD.decode(d).ok()?;
        <[u8; 32]>::try_from(b).ok().map(Sha256)
    }

    /// The form Nix signs and prints: `sha256:<nix32>`.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", super::nixbase32::encode(&self.0))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Error messages quote input; never let a hostile megabyte-long value into a log line.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        s.to_owned()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

/// Incremental SHA-256 plus byte count: a NAR is checked as it streams, never buffered.
#[derive(Default, Clone)]
pub struct Hasher {
    inner: sha2::Sha256,
    len: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        self.inner.update(data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Sha256 {
        use sha2::Digest;
        Sha256(self.inner.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_encoding_nix_accepts() {
        let h = Sha256::digest(b"abc");
        let nix32 = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        let hex = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let b64 = "sha256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
        let sri = "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
        for s in [nix32, hex, b64, sri] {
            assert_eq!(Sha256::parse(s).unwrap(), h, "{s}");
        }
        assert_eq!(h.to_nix_string(), nix32);
    }

    #[test]
    fn rejects_other_algorithms_and_lengths() {
        assert!(matches!(
            Sha256::parse("md5:abc"),
            Err(HashError::Algorithm(_))
        ));
        assert!(matches!(
            Sha256::parse("1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),
            Err(HashError::Algorithm(_))
        ));
        for bad in [
            "sha256:",
            "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5",
            "sha256:eb8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "sha256:zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa!=",
        ] {
            assert!(
                matches!(Sha256::parse(bad), Err(HashError::Digest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn hasher_counts_and_hashes() {
        let mut h = Hasher::default();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.len(), 3);
        assert_eq!(h.finish(), Sha256::digest(b"abc"));
    }

    #[test]
    fn truncates_long_input() {
        let s = "é".repeat(200);
        assert!(truncate(&s).chars().count() <= 61);
    }
}
