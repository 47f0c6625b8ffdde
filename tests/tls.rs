//! TLS trust as Nix has it: an https cache or S3 endpoint whose certificate comes from
//! a private CA is refused with the way out in the message, and read once narfs is
//! given that CA in any of the ways nix is (`--ssl-cert-file` as nix.conf's
//! `ssl-cert-file`, `NIX_SSL_CERT_FILE`, `SSL_CERT_FILE`).

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Child, Command};

/// A CA made for the test, and a certificate it signed for 127.0.0.1.
struct Ca {
    dir: tempfile::TempDir,
}

impl Ca {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(dir.path()));
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let ec: Vec<&str> = ec.split(' ').collect();
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={name}"),
                ][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-subj", "/CN=127.0.0.1"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat(),
        );
        std::fs::write(
            dir.path().join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]);
        Ca { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }
}

/// TLS (the certificate `Ca` signed) in front of a plain TCP server on 127.0.0.1:
/// neither s3s-fs nor python's http.server speaks it.
struct TlsFront {
    child: Child,
    port: u16,
}

const FRONT: &str = r#"
import asyncio, ssl, sys
port, upstream, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
async def pump(r, w):
    try:
        while d := await r.read(65536):
            w.write(d)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
    except OSError:
        cw.close()
        return
    await asyncio.gather(pump(cr, uw), pump(ur, cw))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

impl TlsFront {
    fn start(upstream: u16, ca: &Ca) -> Self {
        let (child, port) = spawn_listening("the TLS front", |port| {
            let mut c = Command::new("python3");
            c.args(["-c", FRONT, &port.to_string(), &upstream.to_string()])
                .args([ca.file("server.pem"), ca.file("server.key")]);
            c
        });
        TlsFront { child, port }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Neither variable set: the system's bundle, which does not hold the test's CA.
const NO_VARS: [(&str, &str); 2] = [("NIX_SSL_CERT_FILE", ""), ("SSL_CERT_FILE", "")];

/// Mounts `url` and reads a file of the fixture through it.
fn reads_through(url: &str, extra: &[&str], envs: &[(&str, &str)]) {
    let f = fixture();
    let m = Mounted::try_start_umask(url, &[&f.public_key], None, extra, envs, None)
        .unwrap_or_else(|(st, log)| panic!("{extra:?} {envs:?}: narfs exited {st:?}:\n{log}"));
    let rel = PathBuf::from(f.path("narfs-test-lib")).join("lib/greet.sh");
    assert_eq!(
        std::fs::read(m.p(rel.to_str().unwrap())).unwrap(),
        std::fs::read(f.real("narfs-test-lib").join("lib/greet.sh")).unwrap(),
        "{extra:?} {envs:?}"
    );
}

/// The exit status and log of a mount of `url` that must not come up.
fn refused(url: &str, extra: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    match Mounted::try_start_umask(url, &[&fixture().public_key], None, extra, envs, None) {
        Ok(m) => panic!("{extra:?} {envs:?}: mounted:\n{}", m.log_text()),
        Err((st, log)) => (st.code(), log),
    }
}

/// Refused for the CA, with the fix named.
fn assert_untrusted(url: &str, extra: &[&str], envs: &[(&str, &str)]) {
    let (code, log) = refused(url, extra, envs);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("UnknownIssuer")
            && log.contains("--ssl-cert-file")
            && log.contains("SSL_CERT_FILE"),
        "{log}"
    );
}

/// Every way Nix takes a CA bundle, in its order.
fn trusted_each_way_nix_takes_a_bundle(url: &str, ca: &Ca) {
    let pem = ca.file("ca.pem");
    reads_through(url, &["--ssl-cert-file", &pem], &NO_VARS);
    reads_through(
        url,
        &[],
        &[("NIX_SSL_CERT_FILE", &pem), ("SSL_CERT_FILE", "")],
    );
    reads_through(
        url,
        &[],
        &[("NIX_SSL_CERT_FILE", ""), ("SSL_CERT_FILE", &pem)],
    );
    // NIX_SSL_CERT_FILE before SSL_CERT_FILE, the option before both
    let other_ca = Ca::new("another-ca");
    let other = other_ca.file("ca.pem");
    let (nix, ssl) = ("NIX_SSL_CERT_FILE", "SSL_CERT_FILE");
    assert_untrusted(url, &[], &[(nix, &other), (ssl, &pem)]);
    reads_through(
        url,
        &["--ssl-cert-file", &pem],
        &[(nix, &other), (ssl, &other)],
    );
}

#[test]
fn an_https_cache_behind_a_private_ca_is_read_once_given_the_ca_as_nix_takes_it() {
    let f = fixture();
    let ca = Ca::new("narfs-test-ca");
    let http = HttpServer::start(&f.cache);
    let front = TlsFront::start(http.port, &ca);
    let url = format!("https://127.0.0.1:{}", front.port);
    assert_untrusted(&url, &[], &NO_VARS);
    trusted_each_way_nix_takes_a_bundle(&url, &ca);

    // a bundle that is named but missing, or holds no certificate: exit 2, naming it
    let missing = ca.file("missing.pem");
    let (code, log) = refused(&url, &["--ssl-cert-file", &missing], &NO_VARS);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&missing) && log.contains("--ssl-cert-file"),
        "{log}"
    );
    let key = ca.file("server.key");
    let (code, log) = refused(
        &url,
        &[],
        &[("NIX_SSL_CERT_FILE", ""), ("SSL_CERT_FILE", &key)],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&key) && log.contains("SSL_CERT_FILE") && log.contains("no usable"),
        "{log}"
    );
}

#[test]
fn an_s3_endpoint_behind_a_private_ca_is_read_once_given_the_ca_as_nix_takes_it() {
    let f = fixture();
    let ca = Ca::new("narfs-test-ca");
    let s3 = S3Server::start();
    s3.upload_cache(&f.cache, "cache");
    let front = TlsFront::start(s3.port, &ca);
    let url = format!(
        "s3://{BUCKET}/cache?endpoint=127.0.0.1:{}&scheme=https&region=us-east-1",
        front.port
    );
    assert_untrusted(&url, &[], &NO_VARS);
    trusted_each_way_nix_takes_a_bundle(&url, &ca);
}
