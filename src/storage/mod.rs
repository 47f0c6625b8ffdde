//! Everything that speaks a protocol: cache URLs, S3, http(s), local files, netrc and
//! TLS trust, and what `nix-cache-info` says. May use `formats` only. The rest of
//! narfs sees keys relative to the cache root and byte streams, behind `Storage`.

pub mod beneath;
pub mod cache_info;
pub mod cache_url;
mod file;
mod http;
pub mod netrc;
mod s3;
pub mod tls;

pub use file::FileStorage;
pub use http::HttpStorage;
pub use s3::S3Storage;

use crate::storage::cache_url::CacheUrl;
use async_trait::async_trait;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};

pub type Body = Pin<Box<dyn AsyncRead + Send>>;

/// What `put` uploads: small objects from memory, NARs from a file (never whole in
/// memory).
pub enum Upload {
    Bytes(Vec<u8>),
    File(std::path::PathBuf),
}

/// One page of a listing of the cache root (no recursion into `nar/`).
#[derive(Debug, Default)]
pub struct ListPage {
    pub keys: Vec<String>,
    pub next: Option<String>,
}

/// A failure to talk to the cache. The message names the object and where it was
/// asked for; it never contains credentials.
#[derive(Debug, thiserror::Error)]
#[error("{op} {location}: {detail}")]
pub struct StorageError {
    pub op: &'static str,
    pub location: String,
    pub detail: String,
}

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// `Ok(None)` when the object does not exist.
    async fn get(&self, key: &str) -> Result<Option<Body>, StorageError>;
    /// `len` bytes of the object from `offset` on (a Range GET): the stream holds
    /// exactly those bytes, or fewer if the object is shorter (the caller checks).
    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<Body>, StorageError>;
    /// Whether `list_page` can work at all (HTTP caches cannot be listed).
    fn can_list(&self) -> bool {
        true
    }
    /// Lists keys at the cache root, one page at a time.
    async fn list_page(&self, token: Option<String>) -> Result<ListPage, StorageError>;
    /// Human-readable location of a key, for logs and errors.
    fn location(&self, key: &str) -> String;
    /// Whether the object exists, without reading it.
    async fn exists(&self, key: &str) -> Result<bool, StorageError>;
    /// Writes an object whole; readers see the old object or the new one, never a
    /// part (S3 PUT semantics; a temp file and a rename for files).
    async fn put(&self, key: &str, data: Upload, content_type: &str) -> Result<(), StorageError>;
    /// Removes an object (gone already is fine).
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
}

/// Reads a small object whole, refusing more than `max` bytes (a hostile cache must
/// not make narfs buffer a multi-gigabyte "narinfo").
pub async fn get_small(
    s: &dyn Storage,
    key: &str,
    max: usize,
) -> Result<Option<Vec<u8>>, StorageError> {
    let Some(body) = s.get(key).await? else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    body.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| StorageError {
            op: "GET",
            location: s.location(key),
            detail: e.to_string(),
        })?;
    if buf.len() > max {
        return Err(StorageError {
            op: "GET",
            location: s.location(key),
            detail: format!("object is larger than {max} bytes"),
        });
    }
    Ok(Some(buf))
}

/// Bounds one pass over a cache's listing. A server (or proxy) that pages forever, with
/// fresh continuation tokens or the same one again, must not hold a pass (and the
/// first `ls` of a mount) without end.
#[derive(Default)]
pub struct ListPass {
    /// Hashes of the tokens seen in this pass.
    tokens: std::collections::HashSet<u64>,
    pub pages: usize,
    pub keys: usize,
    empty_in_a_row: usize,
}

/// Pages per pass, at most (1,000 keys a page on S3: 50 million keys).
pub const MAX_LIST_PAGES: usize = 50_000;
/// Keys per pass, at most.
pub const MAX_LIST_KEYS: usize = 20_000_000;
/// Empty pages in a row that still claim more, at most.
const MAX_EMPTY_PAGES: usize = 100;

impl ListPass {
    /// The token to ask for the next page with, `None` once the pass is complete, or
    /// why the pass must end before the server says it is complete.
    pub fn next(&mut self, page: &ListPage) -> Result<Option<String>, String> {
        self.pages += 1;
        self.keys += page.keys.len();
        self.empty_in_a_row = if page.keys.is_empty() {
            self.empty_in_a_row + 1
        } else {
            0
        };
        let Some(token) = &page.next else {
            return Ok(None);
        };
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        token.hash(&mut h);
        if !self.tokens.insert(h.finish()) {
            return Err(format!(
                "the server gave the same continuation token again after {} pages",
                self.pages
            ));
        }
        if self.empty_in_a_row >= MAX_EMPTY_PAGES {
            return Err(format!(
                "the server sent {MAX_EMPTY_PAGES} empty pages in a row that each claimed more"
            ));
        }
        if self.pages >= MAX_LIST_PAGES || self.keys >= MAX_LIST_KEYS {
            return Err(format!(
                "{} pages and {} keys in one pass, the most narfs lists",
                self.pages, self.keys
            ));
        }
        Ok(Some(token.clone()))
    }
}

/// The hash part of every `<hash>.narinfo` at the cache's root: the paths it holds. An
/// error if the listing could not be completed (see [`ListPass`]).
pub async fn narinfo_hashes(storage: &dyn Storage) -> Result<Vec<String>, String> {
    let mut token = None;
    let mut pass = ListPass::default();
    let mut out = Vec::new();
    loop {
        let page = storage
            .list_page(token.take())
            .await
            .map_err(|e| e.to_string())?;
        out.extend(
            page.keys
                .iter()
                .filter_map(|k| k.strip_suffix(".narinfo"))
                .filter(|h| crate::formats::store_path::is_hash_part(h))
                .map(str::to_owned),
        );
        match pass.next(&page) {
            Ok(Some(t)) => token = Some(t),
            Ok(None) => return Ok(out),
            Err(why) => {
                return Err(format!(
                    "listing {} did not complete: {why}",
                    storage.location("")
                ))
            }
        }
    }
}

/// Opens the cache at `url`. An http(s) cache without credentials in its URL takes
/// those `netrc` has for its host, as Nix does; TLS trusts what Nix would (see `tls`).
pub async fn open(
    url: &CacheUrl,
    netrc: Option<&netrc::Netrc>,
    ssl_cert_file: Option<&std::path::Path>,
) -> Result<Arc<dyn Storage>, String> {
    Ok(match url {
        CacheUrl::S3(u) => Arc::new(S3Storage::new(u, &tls::load(ssl_cert_file)?).await?),
        CacheUrl::File { root } => Arc::new(FileStorage::new(root.clone())),
        CacheUrl::Http { base, credentials } => {
            let host = base
                .split_once("://")
                .map_or("", |(_, r)| r.split(['/', ':']).next().unwrap_or(""));
            let credentials = credentials
                .clone()
                .or_else(|| netrc.and_then(|n| n.lookup(host)).cloned());
            Arc::new(HttpStorage::new(
                base,
                credentials,
                &tls::load(ssl_cert_file)?,
            )?)
        }
    })
}

/// The netrc file to use: `explicit` if given (it must load), else Nix's default
/// `/etc/nix/netrc` when it exists (a warning if it cannot be read).
pub fn load_netrc(
    explicit: Option<&std::path::Path>,
) -> Result<Option<netrc::Netrc>, netrc::NetrcError> {
    match explicit {
        Some(p) => netrc::Netrc::load(p).map(Some),
        None => {
            let p = std::path::Path::new(netrc::NIX_DEFAULT);
            if !p.exists() {
                return Ok(None);
            }
            match netrc::Netrc::load(p) {
                Ok(n) => Ok(Some(n)),
                Err(e) => {
                    tracing::warn!("ignoring {e}");
                    Ok(None)
                }
            }
        }
    }
}

/// How a server answered a Range GET for `len` bytes at `offset`, told by its
/// `Content-Range` (`None`: a 200 without one): exactly that range (or less, where
/// the object ends), or the whole object (a server or proxy that ignores Range: the
/// caller skips to `offset`). Any other range is refused: those would be other bytes.
fn range_reply(content_range: Option<&str>, offset: u64, len: u64) -> Result<bool, String> {
    let Some(cr) = content_range else {
        return Ok(false);
    };
    let last = offset + len - 1;
    let got = cr
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(r, _)| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    match got {
        Some((a, b)) if a == offset && a <= b && b <= last => Ok(true),
        _ => Err(format!(
            "asked for bytes={offset}-{last}, the server answered Content-Range {:?}",
            cr.chars().take(100).collect::<String>()
        )),
    }
}

/// `body` from `offset` on, `len` bytes at most, whatever the server answered a Range
/// GET with (see `range_reply`).
async fn ranged(
    s: &dyn Storage,
    key: &str,
    mut body: Body,
    content_range: Option<&str>,
    offset: u64,
    len: u64,
) -> Result<Body, StorageError> {
    use tokio::io::AsyncReadExt;
    let fail = |detail: String| StorageError {
        op: "GET",
        location: s.location(key),
        detail,
    };
    if !range_reply(content_range, offset, len).map_err(fail)? {
        tracing::debug!(
            key,
            "the server ignored a Range request: skipping to the range"
        );
        let mut skip = (&mut body).take(offset);
        tokio::io::copy(&mut skip, &mut tokio::io::sink())
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(Box::pin(body.take(len)))
}

/// Refuses a key that could leave the cache root (a narinfo's unsigned URL is checked
/// when parsed; this holds for every backend whatever asks).
fn check_key(s: &dyn Storage, op: &'static str, key: &str) -> Result<(), StorageError> {
    match crate::formats::object_key::unsafe_key(key) {
        None => Ok(()),
        Some(why) => Err(StorageError {
            op,
            location: s.location(""),
            detail: format!(
                "refusing key {:?}: {why}",
                key.chars().take(200).collect::<String>()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::range_reply;

    #[test]
    fn range_replies_are_what_was_asked_or_the_whole_object() {
        assert_eq!(range_reply(Some("bytes 10-19/100"), 10, 10), Ok(true));
        // the object ends before the range does
        assert_eq!(range_reply(Some("bytes 10-14/15"), 10, 10), Ok(true));
        assert_eq!(range_reply(Some("bytes 10-19/*"), 10, 10), Ok(true));
        // a 200 without Content-Range: the whole object
        assert_eq!(range_reply(None, 10, 10), Ok(false));
        for other in [
            "bytes 11-20/100",
            "bytes 0-19/100",
            "bytes 10-20/100",
            "bytes */100",
            "bytes 19-10/100",
            "(none)",
            "",
        ] {
            assert!(range_reply(Some(other), 10, 10).is_err(), "{other}");
        }
    }
}
