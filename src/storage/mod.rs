//! Where a binary cache's objects live. The only module that knows S3 or files: the
//! rest of narfs sees keys relative to the cache root and byte streams.

mod file;
mod http;
pub mod netrc;
mod s3;
pub mod tls;

pub use file::FileStorage;
pub use http::HttpStorage;
pub use s3::S3Storage;

use crate::cache_url::CacheUrl;
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

/// Opens the cache at `url`. An http(s) cache without credentials in its URL takes
/// those `netrc` has for its host, as Nix does.
/// The hash part of every `<hash>.narinfo` at the cache's root: the paths it holds.
pub async fn narinfo_hashes(storage: &dyn Storage) -> Result<Vec<String>, String> {
    let mut token = None;
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
        match page.next {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

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

/// Refuses a key that could leave the cache root (a narinfo's unsigned URL is checked
/// when parsed; this holds for every backend whatever asks).
fn check_key(s: &dyn Storage, op: &'static str, key: &str) -> Result<(), StorageError> {
    match crate::cache_url::unsafe_key(key) {
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
