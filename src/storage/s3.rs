//! S3-compatible buckets through the AWS SDK: the same credential chain as Nix
//! (environment, `profile=` from the shared files, instance metadata) and path-style
//! requests whenever an endpoint is given.

use super::{Body, ListPage, Storage, StorageError, Upload};
use crate::storage::cache_url::S3Url;
use async_trait::async_trait;
use aws_sdk_s3::config::Region;
use std::time::Duration;

pub struct S3Storage {
    client: aws_sdk_s3::Client,
    url: S3Url,
    endpoint: String,
    /// AWS itself (no endpoint given), not another S3 implementation.
    aws: bool,
}

impl S3Storage {
    pub async fn new(url: &S3Url, trust: &super::tls::Trust) -> Result<Self, String> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(url.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(p) = &url.profile {
            loader = loader.profile_name(p);
        }
        if let Some(bundle) = &trust.bundle {
            loader = loader.http_client(https_client(bundle)?);
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(e) = url.endpoint_url() {
            // Other S3 implementations do not all take the checksums the SDK adds by
            // default (NARs are verified by their hashes anyway).
            conf = conf
                .endpoint_url(e)
                .force_path_style(true)
                .request_checksum_calculation(
                    aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                )
                .response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                );
        }
        Ok(S3Storage {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            endpoint: url
                .endpoint_url()
                .unwrap_or_else(|| format!("AWS S3 {}", url.region)),
            url: url.clone(),
            aws: url.endpoint_url().is_none()
                && std::env::var_os("AWS_ENDPOINT_URL").is_none()
                && std::env::var_os("AWS_ENDPOINT_URL_S3").is_none(),
        })
    }

    fn error(&self, op: &'static str, key: &str, e: impl std::error::Error) -> StorageError {
        StorageError {
            op,
            location: self.location(key),
            detail: error_chain(&e),
        }
    }
}

/// One PUT takes at most 5 GB; above this size a file goes up in parts.
const MULTIPART_OVER: u64 = 64 << 20;
/// Smallest part; S3 allows at most 10000 parts, so big files get bigger parts.
const MIN_PART: u64 = 16 << 20;

impl S3Storage {
    /// A multipart upload of `path`. Whatever ends it early (an error, or the push
    /// being dropped) aborts it, so no parts are left behind to be billed.
    async fn put_multipart(
        &self,
        key: &str,
        path: &std::path::Path,
        size: u64,
        content_type: &str,
    ) -> Result<(), StorageError> {
        use aws_sdk_s3::primitives::{ByteStream, Length};
        use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
        let full_key = self.url.key(key);
        let fail = |detail: String| StorageError {
            op: "PUT",
            location: self.location(key),
            detail,
        };
        let step =
            |what: &str, e: &dyn std::error::Error| fail(format!("{what}: {}", error_chain(e)));
        // On AWS the SDK checksums each part; the upload must then say so up front.
        let checksum = self.aws.then_some(ChecksumAlgorithm::Crc32);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.url.bucket)
            .key(&full_key)
            .content_type(content_type)
            .set_checksum_algorithm(checksum.clone())
            .send()
            .await
            .map_err(|e| step("starting a multipart upload", &e))?;
        let Some(id) = created.upload_id() else {
            return Err(fail(
                "the server started a multipart upload without an upload id".into(),
            ));
        };
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.url.bucket.clone(),
            key: full_key.clone(),
            id: id.to_owned(),
            armed: true,
        };
        let uploaded = async {
            let part_size = MIN_PART.max(size.div_ceil(9_000));
            let mut parts = Vec::new();
            let mut offset = 0;
            for number in 1.. {
                if offset >= size {
                    break;
                }
                let len = part_size.min(size - offset);
                let body = ByteStream::read_from()
                    .path(path)
                    .offset(offset)
                    .length(Length::Exact(len))
                    .build()
                    .await
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                let done = self
                    .client
                    .upload_part()
                    .bucket(&self.url.bucket)
                    .key(&full_key)
                    .upload_id(id)
                    .part_number(number)
                    .set_checksum_algorithm(checksum.clone())
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| step(&format!("part {number}"), &e))?;
                let Some(etag) = done.e_tag() else {
                    return Err(fail(format!("part {number}: the server returned no ETag")));
                };
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .e_tag(etag)
                        .set_checksum_crc32(done.checksum_crc32().map(str::to_owned))
                        .build(),
                );
                offset += len;
            }
            let n = parts.len();
            self.client
                .complete_multipart_upload()
                .bucket(&self.url.bucket)
                .key(&full_key)
                .upload_id(id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| step(&format!("completing the upload of {n} parts"), &e))?;
            Ok::<_, StorageError>(n)
        }
        .await;
        guard.armed = false;
        match uploaded {
            Ok(n) => {
                tracing::debug!(key = full_key, size, parts = n, "uploaded in parts");
                Ok(())
            }
            Err(e) => {
                // awaited here: a push that fails next exits, and a spawned abort
                // would die with it
                guard.abort().await;
                Err(e)
            }
        }
    }
}

/// Aborts a multipart upload that did not complete, from wherever it was left.
struct AbortOnDrop {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    id: String,
    armed: bool,
}

impl AbortOnDrop {
    fn abort(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let call = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.id);
        let (key, id) = (self.key.clone(), self.id.clone());
        async move {
            if let Err(e) = call.send().await {
                tracing::warn!(
                    "could not abort the multipart upload {id} of {key} ({}); its parts stay until a lifecycle rule removes them",
                    error_chain(&e)
                );
            }
        }
    }
}

impl Drop for AbortOnDrop {
    /// Cancelled mid-upload (the push was dropped): abort in the background, as
    /// well as the runtime still allows.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(self.abort());
        }
    }
}

impl S3Storage {
    /// GetObject, whole or of `range` (`bytes=a-b`); `Ok(None)` if the key does not
    /// exist. 403 counts as missing too: a bucket that does not grant listing answers
    /// AccessDenied for keys that do not exist (as Nix treats it).
    async fn get_object(
        &self,
        key: &str,
        range: Option<String>,
    ) -> Result<Option<(Body, Option<String>)>, StorageError> {
        super::check_key(self, "GET", key)?;
        let res = self
            .client
            .get_object()
            .bucket(&self.url.bucket)
            .key(self.url.key(key))
            .set_range(range)
            .send()
            .await;
        match res {
            Ok(out) => {
                let content_range = out.content_range().map(str::to_owned);
                Ok(Some((Box::pin(out.body.into_async_read()), content_range)))
            }
            Err(e) => {
                let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || e.raw_response()
                        .is_some_and(|r| matches!(r.status().as_u16(), 403 | 404));
                if missing {
                    Ok(None)
                } else {
                    Err(self.error("GET", key, e))
                }
            }
        }
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn get(&self, key: &str) -> Result<Option<Body>, StorageError> {
        Ok(self.get_object(key, None).await?.map(|(body, _)| body))
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
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let Some((body, content_range)) = self.get_object(key, Some(range)).await? else {
            return Ok(None);
        };
        super::ranged(self, key, body, content_range.as_deref(), offset, len)
            .await
            .map(Some)
    }

    async fn list_page(&self, token: Option<String>) -> Result<ListPage, StorageError> {
        let prefix = self.url.key("");
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.url.bucket)
            .prefix(&prefix)
            .delimiter("/")
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| self.error("LIST", "", e))?;
        let keys = out
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect();
        // a token with `IsTruncated: false` (or none) ends the listing
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok(ListPage { keys, next })
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        super::check_key(self, "HEAD", key)?;
        let res = self
            .client
            .head_object()
            .bucket(&self.url.bucket)
            .key(self.url.key(key))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) => {
                let missing = e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response()
                        .is_some_and(|r| matches!(r.status().as_u16(), 403 | 404));
                if missing {
                    Ok(false)
                } else {
                    Err(self.error("HEAD", key, e))
                }
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        super::check_key(self, "DELETE", key)?;
        self.client
            .delete_object()
            .bucket(&self.url.bucket)
            .key(self.url.key(key))
            .send()
            .await
            .map_err(|e| self.error("DELETE", key, e))?;
        Ok(())
    }

    async fn put(&self, key: &str, data: Upload, content_type: &str) -> Result<(), StorageError> {
        super::check_key(self, "PUT", key)?;
        use aws_sdk_s3::primitives::ByteStream;
        let file_err = |p: &std::path::Path, e: &dyn std::fmt::Display| StorageError {
            op: "PUT",
            location: self.location(key),
            detail: format!("{}: {e}", p.display()),
        };
        let body = match data {
            Upload::Bytes(b) => ByteStream::from(b),
            Upload::File(p) => {
                let size = std::fs::metadata(&p).map_err(|e| file_err(&p, &e))?.len();
                if size > MULTIPART_OVER {
                    return self.put_multipart(key, &p, size, content_type).await;
                }
                ByteStream::from_path(&p)
                    .await
                    .map_err(|e| file_err(&p, &e))?
            }
        };
        self.client
            .put_object()
            .bucket(&self.url.bucket)
            .key(self.url.key(key))
            .content_type(content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| self.error("PUT", key, e))?;
        Ok(())
    }

    fn location(&self, key: &str) -> String {
        format!(
            "s3://{}/{} (endpoint {})",
            self.url.bucket,
            self.url.key(key),
            self.endpoint
        )
    }
}

/// `outer: cause: root cause`, without the SDK's debug dump (which can hold request
/// details) and without repeating a message its wrapper already says.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    let mut out = parts.join(": ");
    if out.contains("credentials") {
        out.push_str(" (no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, add profile= to the URL, or run with an instance role)");
    }
    super::tls::explain(out)
}

/// The SDK's default client (rustls with aws-lc, proxies from the environment),
/// trusting `bundle` alone; for every request of the SDK, credentials included.
fn https_client(
    bundle: &super::tls::Bundle,
) -> Result<aws_sdk_s3::config::SharedHttpClient, String> {
    use aws_smithy_http_client::{proxy::ProxyConfig, tls, Builder, ConnectorBuilder};
    let context = tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::empty().with_pem_certificate(bundle.pem()))
        .build()
        .map_err(|e| format!("{}: {}", bundle.path.display(), error_chain(&e)))?;
    Ok(
        Builder::new().build_with_connector_fn(move |settings, components| {
            let mut b = ConnectorBuilder::default()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(context.clone());
            b.set_connector_settings(settings.cloned());
            if let Some(c) = components {
                b.set_sleep_impl(c.sleep_impl());
            }
            b.set_proxy_config(Some(ProxyConfig::from_env()));
            b.build()
        }),
    )
}
