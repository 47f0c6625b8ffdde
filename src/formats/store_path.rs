//! Store path names: `/nix/store/<32 nix32 chars>-<name>`.
//!
//! The hash part is what a binary cache is keyed by (`<hash>.narinfo`), so it is kept as
//! text (it is what every lookup compares) next to the validated name.

use std::fmt;

pub const STORE_DIR: &str = "/nix/store";
pub const HASH_LEN: usize = 32;
pub const MAX_NAME_LEN: usize = 211;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// `<hash>-<name>`, validated.
    basename: Box<str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("'{0}' is not in the store directory {STORE_DIR}")]
    NotInStore(String),
    #[error("'{0}' is too short to be a store path name (<32-char hash>-<name>)")]
    TooShort(String),
    #[error("'{0}' has an invalid hash part (not 32 nix32 characters followed by '-')")]
    BadHash(String),
    #[error("'{0}' has an invalid name: {1}")]
    BadName(String, &'static str),
}

impl StorePath {
    /// Parses `<hash>-<name>` (what a mount's root lists and a narinfo's References hold).
    pub fn from_basename(s: &str) -> Result<Self, StorePathError> {
        let q = || super::hash::truncate(s);
        if s.len() < HASH_LEN + 2 {
            return Err(StorePathError::TooShort(q()));
        }
        let b = s.as_bytes();
        if !b[..HASH_LEN]
            .iter()
            .all(|&c| super::nixbase32::is_valid_char(c))
            || b[HASH_LEN] != b'-'
        {
            return Err(StorePathError::BadHash(q()));
        }
        let name = &s[HASH_LEN + 1..];
        if name.len() > MAX_NAME_LEN {
            return Err(StorePathError::BadName(q(), "longer than 211 characters"));
        }
        if name.starts_with('.') {
            return Err(StorePathError::BadName(q(), "starts with '.'"));
        }
        if !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
        {
            return Err(StorePathError::BadName(
                q(),
                "has a character outside [A-Za-z0-9+-._?=]",
            ));
        }
        Ok(StorePath { basename: s.into() })
    }

    /// Parses `/nix/store/<hash>-<name>` (narinfo StorePath lines).
    pub fn from_absolute(s: &str) -> Result<Self, StorePathError> {
        match s.strip_prefix(STORE_DIR).and_then(|r| r.strip_prefix('/')) {
            Some(base) if !base.contains('/') => Self::from_basename(base),
            _ => Err(StorePathError::NotInStore(super::hash::truncate(s))),
        }
    }

    pub fn hash_part(&self) -> &str {
        &self.basename[..HASH_LEN]
    }
    pub fn name(&self) -> &str {
        &self.basename[HASH_LEN + 1..]
    }
    pub fn basename(&self) -> &str {
        &self.basename
    }
    pub fn absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.basename)
    }
}

/// True if `s` could be the hash part of a store path (used before any network access
/// so that junk names never turn into GETs).
pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_LEN && s.bytes().all(super::nixbase32::is_valid_char)
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.basename)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/s20n2999afk451sa4s4gyx4q7x9vsx8x-example.txt";

    #[test]
    fn parses_real_paths() {
        let p = StorePath::from_absolute(P).unwrap();
        assert_eq!(p.hash_part(), "s20n2999afk451sa4s4gyx4q7x9vsx8x");
        assert_eq!(p.name(), "example.txt");
        assert_eq!(p.to_string(), P);
        assert_eq!(
            StorePath::from_basename("01i3s2rvgbyv8zgcga77aa80qdgg4lx5-narfs-test-lib")
                .unwrap()
                .name(),
            "narfs-test-lib"
        );
        // every allowed character
        StorePath::from_basename("01i3s2rvgbyv8zgcga77aa80qdgg4lx5-aZ09+-._?=").unwrap();
    }

    #[test]
    fn rejects_every_malformation() {
        use StorePathError::*;
        let h = "s20n2999afk451sa4s4gyx4q7x9vsx8x";
        type Check = fn(&StorePathError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (format!("/nix/stor/{h}-x"), |e| matches!(e, NotInStore(_))),
            (format!("/nix/store/{h}-x/sub"), |e| {
                matches!(e, NotInStore(_))
            }),
            (format!("/nix/store/{h}"), |e| matches!(e, TooShort(_))),
            (format!("/nix/store/{h}-"), |e| matches!(e, TooShort(_))),
            (format!("/nix/store/e{}-x", &h[1..]), |e| {
                matches!(e, BadHash(_))
            }),
            (format!("/nix/store/{h}_x"), |e| matches!(e, BadHash(_))),
            (format!("/nix/store/{h}-.hidden"), |e| {
                matches!(e, BadName(..))
            }),
            (format!("/nix/store/{h}-a b"), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{h}-ü"), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{h}-a\0"), |e| matches!(e, BadName(..))),
            (format!("/nix/store/{h}-{}", "a".repeat(212)), |e| {
                matches!(e, BadName(..))
            }),
        ];
        for (s, ok) in cases {
            let e = StorePath::from_absolute(&s).unwrap_err();
            assert!(ok(&e), "{s}: {e}");
        }
        StorePath::from_basename(&format!("{h}-{}", "a".repeat(211))).unwrap();
    }

    #[test]
    fn hash_part_check() {
        assert!(is_hash_part("s20n2999afk451sa4s4gyx4q7x9vsx8x"));
        assert!(!is_hash_part("s20n2999afk451sa4s4gyx4q7x9vsx8"));
        assert!(!is_hash_part("e20n2999afk451sa4s4gyx4q7x9vsx8x"));
    }
}
