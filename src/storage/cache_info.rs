//! A cache's `nix-cache-info`: what it tells narfs, checked before a mount, `narfs ls`
//! and friends start, and the line the write side adds to it.

use super::cache_url::CacheUrl;
use super::{get_small, Storage};

/// What a cache's `nix-cache-info` tells narfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheInfo {
    /// `NarfsIndexes: 1`: paths were pushed or indexed with signed file indexes. Unsigned,
    /// so it only picks between two modes that are both safe (see `OpenMode`).
    pub indexed: bool,
}

/// The `nix-cache-info` line `narfs push` and `narfs index` add (nix ignores keys it
/// does not know).
pub const INDEXED_KEY: &str = "NarfsIndexes";

/// `text` of a `nix-cache-info` with the `NarfsIndexes: 1` line, or `None` if it has it.
pub fn with_indexed_line(text: &str) -> Option<String> {
    if text
        .lines()
        .any(|l| l.split_once(':').map(|(k, v)| (k, v.trim())) == Some((INDEXED_KEY, "1")))
    {
        return None;
    }
    let mut out = text.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out += &format!("{INDEXED_KEY}: 1\n");
    Some(out)
}

/// Fetches `nix-cache-info` and checks the store directory: a wrong URL, bucket or
/// endpoint fails here, before anything is mounted.
pub async fn check_cache(storage: &dyn Storage, url: &CacheUrl) -> Result<CacheInfo, String> {
    let info = get_small(storage, "nix-cache-info", 64 * 1024)
        .await
        .map_err(|e| format!("cannot reach the cache {url}: {e}"))?
        .ok_or_else(|| {
            format!(
                "{url} is not a Nix binary cache: {} does not exist or may not be read (check the bucket, prefix, endpoint and credentials)",
                storage.location("nix-cache-info")
            )
        })?;
    let text = String::from_utf8_lossy(&info);
    let store_dir = text
        .lines()
        .find_map(|l| l.strip_prefix("StoreDir:"))
        .map(str::trim);
    let indexed = text
        .lines()
        .any(|l| l.split_once(':').map(|(k, v)| (k, v.trim())) == Some((INDEXED_KEY, "1")));
    match store_dir {
        Some("/nix/store") => Ok(CacheInfo { indexed }),
        Some(other) => Err(format!(
            "{url} is a cache for store directory {other}, not /nix/store"
        )),
        None => Err(format!(
            "{} has no StoreDir line",
            storage.location("nix-cache-info")
        )),
    }
}
