//! Which certificate authorities https connections trust, found as Nix finds its
//! `ssl-cert-file`: a cache or an S3 endpoint whose certificate comes from a private
//! CA then works for narfs exactly when it works for nix.

use rustls::pki_types::{pem::PemObject, CertificateDer};
use std::path::{Path, PathBuf};

/// Nix's default `ssl-cert-file`: the first of these that exists (the system's trust
/// store, then that of a Nix installed without one).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
];

/// The roots https connections trust.
pub struct Trust {
    /// `None` where there is no bundle at all (a minimal container): the roots built
    /// into narfs, as curl falls back to its own.
    pub bundle: Option<Bundle>,
}

pub struct Bundle {
    pub path: PathBuf,
    /// What chose the file, for messages.
    pub source: &'static str,
    /// Only those rustls takes as trust anchors: one it cannot use must not stop
    /// the rest (nor make a client builder panic).
    pub certs: Vec<CertificateDer<'static>>,
}

/// The file Nix would use: `explicit` (`--ssl-cert-file`, what nix.conf's
/// `ssl-cert-file` is to nix), else `NIX_SSL_CERT_FILE`, else `SSL_CERT_FILE`, else
/// the system's.
fn find(explicit: Option<&Path>) -> Option<(PathBuf, &'static str)> {
    if let Some(p) = explicit {
        return Some((p.to_owned(), "--ssl-cert-file"));
    }
    for var in ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Some((v.into(), var));
        }
    }
    SYSTEM_BUNDLES
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(|p| (p.to_owned(), "the system's default"))
}

/// Loads the bundle; one that was named but cannot be read or holds no usable
/// certificate is an error naming it (trusting something else instead would hide
/// the mistake).
pub fn load(explicit: Option<&Path>) -> Result<Trust, String> {
    let Some((path, source)) = find(explicit) else {
        return Ok(Trust { bundle: None });
    };
    let fail = |e: &dyn std::fmt::Display| {
        format!("CA certificates {} (from {source}): {e}", path.display())
    };
    let pem = std::fs::read(&path).map_err(|e| fail(&e))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| fail(&format!("not a PEM file: {e}")))?;
    let usable: Vec<_> = certs
        .into_iter()
        .filter(|c| rustls::RootCertStore::empty().add(c.clone()).is_ok())
        .collect();
    if usable.is_empty() {
        return Err(fail(&"holds no usable PEM certificate"));
    }
    tracing::debug!(
        path = %path.display(),
        source,
        certificates = usable.len(),
        "trusted certificate authorities"
    );
    Ok(Trust {
        bundle: Some(Bundle {
            path,
            source,
            certs: usable,
        }),
    })
}

impl Bundle {
    /// The certificates as PEM, for clients that take only that.
    pub fn pem(&self) -> Vec<u8> {
        use base64::Engine;
        let mut out = String::new();
        for c in &self.certs {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c);
            out += "-----BEGIN CERTIFICATE-----\n";
            for line in b64.as_bytes().chunks(64) {
                out += std::str::from_utf8(line).unwrap_or_default();
                out.push('\n');
            }
            out += "-----END CERTIFICATE-----\n";
        }
        out.into_bytes()
    }
}

/// `detail` of a failed request, with the way out when the server's certificate
/// comes from a CA narfs does not trust.
pub fn explain(detail: String) -> String {
    if detail.contains("UnknownIssuer") {
        format!(
            "{detail} (the server's certificate is not signed by a CA narfs trusts: if it \
             comes from a private CA, give narfs that CA's PEM file with --ssl-cert-file, \
             ssl-cert-file= in mount options, or SSL_CERT_FILE / NIX_SSL_CERT_FILE, as for nix)"
        )
    } else {
        detail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_file_that_is_missing_empty_or_not_pem_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load(Some(&missing)).err().unwrap();
        assert!(
            e.contains("missing.pem") && e.contains("--ssl-cert-file"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = load(Some(&empty)).err().unwrap();
        assert!(e.contains("empty.pem") && e.contains("no usable"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        let e = load(Some(&junk)).err().unwrap();
        assert!(e.contains("junk.pem"), "{e}");
    }
}
