//! `http(s)://` caches (nix-serve, cache.nixos.org-style servers, a CDN or a caching
//! proxy in front of a bucket). HTTP cannot list a cache: paths are found by name.

use super::{Body, ListPage, Storage, StorageError, Upload};
use crate::storage::cache_url::Credentials;
use async_trait::async_trait;
use futures::TryStreamExt;
use std::time::Duration;

pub struct HttpStorage {
    client: reqwest::Client,
    /// Without credentials.
    base: String,
    credentials: Option<Credentials>,
}

impl HttpStorage {
    pub fn new(
        base: &str,
        credentials: Option<Credentials>,
        trust: &super::tls::Trust,
    ) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("narfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30));
        if let Some(bundle) = &trust.bundle {
            b = b.tls_built_in_root_certs(false);
            for c in &bundle.certs {
                let cert = reqwest::Certificate::from_der(c)
                    .map_err(|e| format!("{}: {}", bundle.path.display(), error_chain(&e)))?;
                b = b.add_root_certificate(cert);
            }
        }
        let client = b
            .build()
            .map_err(|e| format!("HTTP client for {base}: {}", error_chain(&e)))?;
        Ok(HttpStorage {
            client,
            base: base.to_owned(),
            credentials,
        })
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }

    fn request(&self, method: reqwest::Method, key: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, self.url(key));
        match &self.credentials {
            Some(c) => r.basic_auth(&c.user, Some(&c.password)),
            None => r,
        }
    }

    fn error(&self, op: &'static str, key: &str, detail: String) -> StorageError {
        StorageError {
            op,
            location: self.location(key),
            detail,
        }
    }

    /// `None` for the statuses Nix treats as "not in this cache".
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>, StorageError> {
        let res = req
            .send()
            .await
            .map_err(|e| self.error(op, key, error_chain(&e)))?;
        match res.status().as_u16() {
            200..=299 => Ok(Some(res)),
            403 | 404 | 410 => Ok(None),
            s => Err(self.error(op, key, format!("HTTP status {s}"))),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s = format!("{s}: {m}");
        }
        cur = c.source();
    }
    super::tls::explain(s)
}

#[async_trait]
impl Storage for HttpStorage {
    async fn get(&self, key: &str) -> Result<Option<Body>, StorageError> {
        super::check_key(self, "GET", key)?;
        let Some(res) = self
            .send("GET", key, self.request(reqwest::Method::GET, key))
            .await?
        else {
            return Ok(None);
        };
        let stream = res.bytes_stream().map_err(std::io::Error::other);
        Ok(Some(Box::pin(tokio_util::io::StreamReader::new(stream))))
    }

    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<Body>, StorageError> {
        super::check_key(self, "GET", key)?;
        if len == 0 {
            return Ok(Some(Box::pin(tokio::io::empty())));
        }
        let req = self
            .request(reqwest::Method::GET, key)
            .header("Range", format!("bytes={offset}-{}", offset + len - 1));
        let Some(res) = self.send("GET", key, req).await? else {
            return Ok(None);
        };
        // a 200 is the whole object, whatever its headers say
        let content_range = (res.status().as_u16() == 206).then(|| {
            res.headers()
                .get(reqwest::header::CONTENT_RANGE)
                .map_or("(none)", |v| v.to_str().unwrap_or("(not text)"))
                .to_owned()
        });
        let stream = res.bytes_stream().map_err(std::io::Error::other);
        let body: Body = Box::pin(tokio_util::io::StreamReader::new(stream));
        super::ranged(self, key, body, content_range.as_deref(), offset, len)
            .await
            .map(Some)
    }

    async fn list_page(&self, _token: Option<String>) -> Result<ListPage, StorageError> {
        Err(self.error("LIST", "", "an HTTP cache cannot be listed".into()))
    }

    fn can_list(&self) -> bool {
        false
    }

    fn location(&self, key: &str) -> String {
        // the base holds no credentials; redact() hides secret-looking query values
        crate::storage::cache_url::redact(&self.url(key))
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        super::check_key(self, "HEAD", key)?;
        Ok(self
            .send("HEAD", key, self.request(reqwest::Method::HEAD, key))
            .await?
            .is_some())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        Err(self.error(
            "DELETE",
            key,
            "narfs does not write to HTTP caches; index the s3:// or file:// cache behind it"
                .into(),
        ))
    }

    async fn put(&self, key: &str, _data: Upload, _ct: &str) -> Result<(), StorageError> {
        Err(self.error(
            "PUT",
            key,
            "narfs does not write to HTTP caches; push to the s3:// or file:// cache behind it"
                .into(),
        ))
    }
}
