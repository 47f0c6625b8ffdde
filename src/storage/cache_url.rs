//! Cache URLs exactly as Nix reads them, so users paste what they already use:
//! `s3://BUCKET[/PREFIX]?endpoint=HOST[:PORT]&scheme=https|http&region=R&profile=P`
//! and `file:///DIR`.

use std::fmt;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUrl {
    S3(S3Url),
    File {
        root: PathBuf,
    },
    /// `http(s)://HOST[/PATH]`: nix-serve, cache.nixos.org-style caches, a CDN or a
    /// caching proxy in front of a bucket. Read by name only (HTTP cannot list).
    Http {
        /// Without credentials: safe to show.
        base: String,
        /// `user:password@` of the URL, kept apart so it is never shown; a netrc file
        /// is the better place for them.
        credentials: Option<Credentials>,
    },
}

/// HTTP basic credentials. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.user)
    }
}

/// `s` with credentials hidden: the `user:password@` of a URL and the values of
/// query parameters whose names say they are secret. For every place a URL the user
/// gave is shown (logs, errors).
pub fn redact(s: &str) -> String {
    // userinfo: everything between `://` and the last `@`, wherever it is (a password
    // may hold `/` or `?`, however wrongly; an endpoint parameter may hold a URL)
    let s = match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(j)) if j > i + 3 => format!("{}***{}", &s[..i + 3], &s[j..]),
        _ => s.to_owned(),
    };
    let (head, query) = match s.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (s.as_str(), None),
    };
    let mut out = head.to_owned();
    if let Some(q) = query {
        out.push('?');
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// The cache URL as the mount's source (/proc/mounts, `findmnt`, `df`): redacted,
/// with what mount tables and fusermount3's option string treat specially (`,`,
/// whitespace, `\`, control characters) percent-encoded, so it still reads as the URL.
pub fn mount_source(url: &str) -> String {
    let mut out = String::new();
    for c in redact(url).chars() {
        if c == ',' || c == '\\' || c.is_whitespace() || c.is_control() {
            let mut b = [0; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out += &format!("%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn is_secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "secret",
        "password",
        "passwd",
        "token",
        "signature",
        "credential",
        "auth",
    ]
    .iter()
    .any(|w| n.contains(w))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (empty for the bucket root).
    pub prefix: String,
    /// `HOST[:PORT]` or a full URL; when set, requests are path-style (as in Nix).
    pub endpoint: Option<String>,
    pub scheme: String,
    pub region: String,
    pub profile: Option<String>,
}

impl S3Url {
    /// The endpoint URL handed to the SDK, if one was given.
    pub fn endpoint_url(&self) -> Option<String> {
        self.endpoint.as_ref().map(|e| {
            if e.contains("://") {
                e.clone()
            } else {
                format!("{}://{}", self.scheme, e)
            }
        })
    }

    /// Full object key for a key relative to the cache root.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{}", self.prefix, rel)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid cache URL '{url}': {why}")]
pub struct UrlError {
    pub url: String,
    pub why: String,
}

/// A parsed URL plus the warnings (unknown parameters) a user should see.
#[derive(Debug)]
pub struct Parsed {
    pub url: CacheUrl,
    pub warnings: Vec<String>,
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parameters Nix's binary cache stores accept that only matter when writing, or that
/// narfs has no use for; they are accepted silently.
const KNOWN_IGNORED: &[&str] = &[
    "compression",
    "write-nar-listing",
    "write-debug-info",
    "parallel-compression",
    "compression-level",
    "secret-key",
    "want-mass-query",
    "priority",
    "trusted",
    "multipart-upload",
    "buffer-size",
    "narinfo-compression",
    "ls-compression",
    "log-compression",
    "index-debug-info",
    "local-nar-cache",
];

pub fn parse(input: &str) -> Result<Parsed, UrlError> {
    let err = |why: &str| UrlError {
        url: redact(input),
        why: why.to_owned(),
    };
    let (scheme, rest) = input
        .split_once("://")
        .ok_or_else(|| err("expected s3://BUCKET[/PREFIX]?... or file:///DIR"))?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut params = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| {
            err(&format!(
                "parameter '{k}' is not valid percent-encoded UTF-8"
            ))
        })?;
        params.push((k.to_owned(), v));
    }
    let mut warnings = Vec::new();
    match scheme {
        "s3" => {
            let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
            if bucket.is_empty() {
                return Err(err("missing bucket name after s3://"));
            }
            if !bucket
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c))
            {
                return Err(err(&format!("'{bucket}' is not a valid bucket name")));
            }
            let mut u = S3Url {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
                endpoint: None,
                scheme: "https".into(),
                region: "us-east-1".into(),
                profile: None,
            };
            for (k, v) in params {
                match k.as_str() {
                    "endpoint" if v.contains('@') => {
                        return Err(err(
                            "the endpoint may not hold credentials: S3 credentials come from the AWS chain (AWS_ACCESS_KEY_ID, profile=, ...)",
                        ))
                    }
                    "endpoint" if !v.is_empty() => u.endpoint = Some(v),
                    "scheme" => match v.as_str() {
                        "http" | "https" => u.scheme = v,
                        _ => return Err(err(&format!("scheme must be http or https, not '{v}'"))),
                    },
                    "region" if !v.is_empty() => u.region = v,
                    "profile" => u.profile = Some(v).filter(|p| !p.is_empty()),
                    k if KNOWN_IGNORED.contains(&k) => {}
                    _ => warnings.push(format!("ignoring unknown cache URL parameter '{k}'")),
                }
            }
            Ok(Parsed {
                url: CacheUrl::S3(u),
                warnings,
            })
        }
        "file" => {
            if !path.starts_with('/') {
                return Err(err(
                    "file:// URLs need an absolute path, e.g. file:///var/cache/nix",
                ));
            }
            let root = percent_decode(path)
                .ok_or_else(|| err("path is not valid percent-encoded UTF-8"))?;
            for (k, _) in params {
                if !KNOWN_IGNORED.contains(&k.as_str()) {
                    warnings.push(format!("ignoring unknown cache URL parameter '{k}'"));
                }
            }
            Ok(Parsed {
                url: CacheUrl::File { root: root.into() },
                warnings,
            })
        }
        "http" | "https" => {
            let (authority, rest) = path.split_once('/').unwrap_or((path, ""));
            // an `@` past the authority means credentials with a raw `/`, `?` or `@`
            if rest.contains('@') || query.is_some_and(|q| q.contains('@')) {
                return Err(err(
                    "percent-encode '/', '?' and '@' in a user name or password (or use a netrc file)",
                ));
            }
            let (credentials, host) = match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                    let decode = |s| {
                        percent_decode(s).ok_or_else(|| {
                            err("user name or password is not valid percent-encoded UTF-8")
                        })
                    };
                    let c = Credentials {
                        user: decode(user)?,
                        password: decode(password)?,
                    };
                    (Some(c), host)
                }
                None => (None, authority),
            };
            if host.is_empty() {
                return Err(err("missing host name"));
            }
            for (k, _) in params {
                if !KNOWN_IGNORED.contains(&k.as_str()) {
                    warnings.push(format!("ignoring unknown cache URL parameter '{k}'"));
                }
            }
            let base = format!("{scheme}://{host}/{rest}");
            Ok(Parsed {
                url: CacheUrl::Http {
                    base: base.trim_end_matches('/').to_owned(),
                    credentials,
                },
                warnings,
            })
        }
        other => Err(err(&format!(
            "unsupported scheme '{other}://' (narfs reads s3://, http(s):// and file:// caches)"
        ))),
    }
}

impl fmt::Display for CacheUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheUrl::S3(u) => {
                write!(f, "s3://{}", u.bucket)?;
                if !u.prefix.is_empty() {
                    write!(f, "/{}", u.prefix)?;
                }
                if let Some(e) = u.endpoint_url() {
                    write!(
                        f,
                        " (endpoint {e}, bucket '{}', region {})",
                        u.bucket, u.region
                    )?;
                } else {
                    write!(f, " (AWS S3, bucket '{}', region {})", u.bucket, u.region)?;
                }
                Ok(())
            }
            CacheUrl::File { root } => write!(f, "file://{}", root.display()),
            CacheUrl::Http { base, .. } => f.write_str(base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls() {
        for (input, base) in [
            ("https://cache.nixos.org", "https://cache.nixos.org"),
            ("https://cache.nixos.org/", "https://cache.nixos.org"),
            (
                "http://127.0.0.1:8080/sub/dir/?priority=30",
                "http://127.0.0.1:8080/sub/dir",
            ),
        ] {
            assert_eq!(
                parse(input).unwrap().url,
                CacheUrl::Http {
                    base: base.into(),
                    credentials: None
                },
                "{input}"
            );
        }
        assert!(parse("http:///x").is_err());
        assert_eq!(
            parse("https://c.example?x=1").unwrap().warnings,
            vec!["ignoring unknown cache URL parameter 'x'".to_owned()]
        );
    }

    fn s3(s: &str) -> S3Url {
        match parse(s).unwrap().url {
            CacheUrl::S3(u) => u,
            _ => panic!(),
        }
    }

    #[test]
    fn seed_backblaze_form() {
        let u = s3("s3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com");
        assert_eq!(u.bucket, "demo-store");
        assert_eq!(u.prefix, "cache");
        assert_eq!(u.key("nix-cache-info"), "cache/nix-cache-info");
        assert_eq!(
            u.endpoint_url().unwrap(),
            "https://s3.eu-central-003.backblazeb2.com"
        );
        assert_eq!(u.region, "us-east-1");
    }

    #[test]
    fn seed_digitalocean_form() {
        // path-style: https://demo-store.ams3.digitaloceanspaces.com/cache/KEY
        let u = s3("s3://cache?endpoint=demo-store.ams3.digitaloceanspaces.com");
        assert_eq!(u.bucket, "cache");
        assert_eq!(u.prefix, "");
        assert_eq!(u.key("x.narinfo"), "x.narinfo");
        assert_eq!(
            u.endpoint_url().unwrap(),
            "https://demo-store.ams3.digitaloceanspaces.com"
        );
    }

    #[test]
    fn all_parameters() {
        let p = parse("s3://b/a/b/?endpoint=127.0.0.1:9000&scheme=http&region=eu-west-1&profile=dev&compression=xz&foo=1").unwrap();
        let CacheUrl::S3(u) = p.url else { panic!() };
        assert_eq!(u.prefix, "a/b");
        assert_eq!(u.endpoint_url().unwrap(), "http://127.0.0.1:9000");
        assert_eq!(u.region, "eu-west-1");
        assert_eq!(u.profile.as_deref(), Some("dev"));
        assert_eq!(
            p.warnings,
            vec!["ignoring unknown cache URL parameter 'foo'"]
        );
        let u = s3("s3://bucket");
        assert_eq!((u.endpoint, u.scheme.as_str()), (None, "https"));
    }

    #[test]
    fn file_urls() {
        let p = parse("file:///tmp/my%20cache?compression=xz&write-nar-listing=1").unwrap();
        assert_eq!(
            p.url,
            CacheUrl::File {
                root: "/tmp/my cache".into()
            }
        );
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn credentials_are_kept_apart_and_never_shown() {
        let p = parse("https://us%40er:p%3Ass@cache.example.org:8443/sub/?x=1").unwrap();
        let CacheUrl::Http { base, credentials } = &p.url else {
            panic!()
        };
        assert_eq!(base, "https://cache.example.org:8443/sub");
        let c = credentials.clone().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("us@er", "p:ss"));
        assert!(!format!("{:?} {}", p.url, p.url).contains("p:ss"));
        assert_eq!(
            redact("http://u:pw@h:1/p?compression=xz&token=abc&secret-key=/k"),
            "http://***@h:1/p?compression=xz&token=***&secret-key=***"
        );
        assert_eq!(redact("s3://b/p?endpoint=e"), "s3://b/p?endpoint=e");
        for leaky in [
            "http://alice:pa?ss@h/",
            "http://alice:pa/ss@h/",
            "s3://b/p?endpoint=http://alice:pw@127.0.0.1:1",
        ] {
            let shown = redact(leaky);
            assert!(!shown.contains("pa") || !shown.contains("alice"), "{shown}");
            assert!(!shown.contains("alice"), "{shown}");
            let e = parse(leaky).unwrap_err().to_string();
            assert!(!e.contains("alice") && !e.contains("ss@"), "{e}");
        }
        let e = parse("http://u:pw@/x").unwrap_err().to_string();
        assert!(e.contains("missing host") && !e.contains("pw"), "{e}");
        let e = parse("gopher://u:pw@h/").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn mount_sources_are_redacted_and_plain() {
        assert_eq!(
            mount_source("http://u:pw@h:1/a b,c\\d\te?token=x,y&x=1,2"),
            "http://***@h:1/a%20b%2Cc%5Cd%09e?token=***&x=1%2C2"
        );
        assert_eq!(
            mount_source("s3://b/p?endpoint=e&region=r"),
            "s3://b/p?endpoint=e&region=r"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        for (bad, why) in [
            ("demo-store", "expected s3://"),
            ("s3://", "missing bucket"),
            ("s3://?endpoint=x", "missing bucket"),
            ("s3://b?scheme=ftp", "scheme must be"),
            ("s3://b a", "not a valid bucket"),
            ("gs://b", "unsupported scheme"),
            ("file://relative", "absolute path"),
            ("s3://b?endpoint=%zz", "percent"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }
}
