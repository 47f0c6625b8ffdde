//! Signing keys in Nix's formats: public `name:base64(32 bytes)`, secret
//! `name:base64(64 bytes)` (libsodium's seed ‖ public key), as written by
//! `nix-store --generate-binary-cache-key` and read by `trusted-public-keys`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key '{0}' is not of the form NAME:BASE64")]
    Form(String),
    #[error("key '{name}': the part after ':' is not valid base64")]
    Base64 { name: String },
    #[error("key '{name}': expected {expected} bytes after base64 decoding, got {got}")]
    Length {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("key '{name}': not a valid Ed25519 key")]
    Invalid { name: String },
}

/// `NAME:BASE64` of a key of `N` bytes.
fn split<const N: usize>(s: &str) -> Result<(&str, [u8; N]), KeyError> {
    let s = s.trim();
    let (name, b64) = s
        .split_once(':')
        .filter(|(n, b)| !n.is_empty() && !b.is_empty())
        .ok_or_else(|| KeyError::Form(super::hash::truncate(s)))?;
    let bytes = B64.decode(b64).map_err(|_| KeyError::Base64 {
        name: name.to_owned(),
    })?;
    let arr = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
        name: name.to_owned(),
        expected: N,
        got: bytes.len(),
    })?;
    Ok((name, arr))
}

#[derive(Clone, Debug)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, arr) = split::<32>(s)?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::Invalid {
            name: name.to_owned(),
        })?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn verify(&self, message: &[u8], sig: &[u8; 64]) -> bool {
        self.key
            .verify_strict(message, &Signature::from_bytes(sig))
            .is_ok()
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }

    /// A short, file-name-safe identifier of this exact key (name and bytes), under
    /// which the disk cache files what this key verified.
    pub fn id(&self) -> String {
        let h = super::hash::Sha256::digest(self.to_nix_string().as_bytes());
        super::nixbase32::encode(&h.0[..10])
    }
}

/// A secret key; narfs signs only in tests and `narfs push`, but it must read the files
/// Nix writes (and write files Nix reads).
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

impl SecretKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, arr) = split::<64>(s)?;
        let key = SigningKey::from_keypair_bytes(&arr).map_err(|_| KeyError::Invalid {
            name: name.to_owned(),
        })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `name:base64(sig)`, the value of a narinfo `Sig:` line.
    pub fn sign(&self, message: &[u8]) -> String {
        let sig = self.key.sign(message);
        format!("{}:{}", self.name, B64.encode(sig.to_bytes()))
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }
}

/// The set of keys a mount trusts, as in nix.conf's `trusted-public-keys`.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    by_name: HashMap<String, Vec<PublicKey>>,
}

/// Why no signature was accepted; the names let a user see which key they forgot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", describe(.sig_names))]
pub struct Untrusted {
    pub sig_names: Vec<String>,
}

fn describe(names: &[String]) -> String {
    if names.is_empty() {
        "lacks a signature by a trusted key (it has no signatures)".to_owned()
    } else {
        format!(
            "lacks a signature by a trusted key (it is signed by: {})",
            names.join(", ")
        )
    }
}

impl TrustedKeys {
    /// Parses whitespace-separated keys, the syntax of `trusted-public-keys`.
    pub fn parse_list(s: &str) -> Result<Vec<PublicKey>, KeyError> {
        s.split_whitespace().map(PublicKey::parse).collect()
    }

    pub fn add(&mut self, key: PublicKey) {
        self.by_name.entry(key.name.clone()).or_default().push(key);
    }

    pub fn len(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.by_name.values().flatten()
    }

    /// Accepts if any `Sig:` value (`name:base64`) is by a trusted key name and verifies
    /// over `fingerprint`, like Nix's `ValidPathInfo::checkSignatures`. Returns the key
    /// that signed.
    pub fn verify<'a>(
        &self,
        fingerprint: &[u8],
        sigs: impl IntoIterator<Item = &'a str>,
    ) -> Result<&PublicKey, Untrusted> {
        let mut names = Vec::new();
        for sig in sigs {
            let Some((name, b64)) = sig.split_once(':') else {
                names.push("<malformed>".to_owned());
                continue;
            };
            names.push(super::hash::truncate(name));
            let Some(keys) = self.by_name.get(name) else {
                continue;
            };
            let Ok(bytes) = B64.decode(b64) else { continue };
            let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else {
                continue;
            };
            if let Some(k) = keys.iter().find(|k| k.verify(fingerprint, &arr)) {
                return Ok(k);
            }
        }
        Err(Untrusted { sig_names: names })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix-store --generate-binary-cache-key test-key sk pk` (Nix 2.8).
    pub const NIX_PUBLIC: &str = "test-key:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=";

    #[test]
    fn parses_nix_public_key() {
        let k = PublicKey::parse(NIX_PUBLIC).unwrap();
        assert_eq!(k.name, "test-key");
        assert_eq!(k.to_nix_string(), NIX_PUBLIC);
    }

    #[test]
    fn secret_round_trip_and_sign() {
        let sk = SecretKey::from_seed("k1", [7; 32]);
        let text = sk.to_nix_string();
        let sk2 = SecretKey::parse(&text).unwrap();
        assert_eq!(sk2.public().to_nix_string(), sk.public().to_nix_string());
        let sig = sk.sign(b"msg");
        let mut t = TrustedKeys::default();
        t.add(sk.public());
        assert_eq!(t.verify(b"msg", [sig.as_str()]).unwrap().name, "k1");
        let e = t.verify(b"other", [sig.as_str()]).unwrap_err();
        assert_eq!(e.sig_names, vec!["k1"]);
    }

    #[test]
    fn rejects_malformed_keys() {
        assert!(matches!(
            PublicKey::parse("nocolon"),
            Err(KeyError::Form(_))
        ));
        assert!(matches!(PublicKey::parse(":abc"), Err(KeyError::Form(_))));
        assert!(matches!(PublicKey::parse("n:"), Err(KeyError::Form(_))));
        assert!(matches!(
            PublicKey::parse("n:!!!"),
            Err(KeyError::Base64 { .. })
        ));
        assert!(matches!(
            PublicKey::parse("n:AAAA"),
            Err(KeyError::Length { got: 3, .. })
        ));
        // a secret key given where a public key is expected
        let sk = SecretKey::from_seed("k", [1; 32]).to_nix_string();
        assert!(matches!(
            PublicKey::parse(&sk),
            Err(KeyError::Length { got: 64, .. })
        ));
        // 64 bytes whose second half is not the matching public key
        let bad = format!("k:{}", B64.encode([1u8; 64]));
        assert!(matches!(
            SecretKey::parse(&bad),
            Err(KeyError::Invalid { .. })
        ));
    }

    #[test]
    fn untrusted_names_signers() {
        let sk = SecretKey::from_seed("other", [3; 32]);
        let mut t = TrustedKeys::default();
        t.add(SecretKey::from_seed("mine", [4; 32]).public());
        let sig = sk.sign(b"m");
        let e = t.verify(b"m", [sig.as_str(), "garbage"]).unwrap_err();
        assert_eq!(e.sig_names, vec!["other", "<malformed>"]);
        assert!(e.to_string().contains("signed by: other"));
        let e = t.verify(b"m", []).unwrap_err();
        assert!(e.to_string().contains("no signatures"));
        // same name, wrong key: not accepted
        let forged = SecretKey::from_seed("mine", [5; 32]).sign(b"m");
        assert!(t.verify(b"m", [forged.as_str()]).is_err());
    }

    #[test]
    fn parse_list_like_nix_conf() {
        let two = format!(
            "  {NIX_PUBLIC}\t{} ",
            SecretKey::from_seed("b", [2; 32]).public().to_nix_string()
        );
        assert_eq!(TrustedKeys::parse_list(&two).unwrap().len(), 2);
        assert!(TrustedKeys::parse_list("a:b c").is_err());
    }
}
