//! The trust boundary, tried as an attacker would: forged-but-signed objects in the
//! cache, over many fresh mounts so that a race would show.

mod common;

use common::*;
use narfs::formats::listing::Entry;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn file(size: u64, executable: bool) -> Entry {
    Entry::Regular {
        size,
        executable,
        nar_offset: None,
    }
}

fn dir(entries: Vec<(&str, Entry)>) -> Entry {
    Entry::Directory {
        entries: entries
            .into_iter()
            .map(|(n, e)| (n.as_bytes().into(), e))
            .collect(),
    }
}

fn write(path: &Path, contents: &str, executable: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
    // as a store path holds it (and the mount shows it)
    let mode = if executable { 0o555 } else { 0o444 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Store paths whose signed NARs are sound but whose unsigned listings lie about
/// sizes, exec bits and types; returns (public key, the trees on disk by name, the
/// basenames by name).
fn lying_cache(s3: &S3Server) -> (String, std::path::PathBuf, Vec<(&'static str, String)>) {
    let cache = SignedCache::new(s3);
    let src = tempfile::tempdir().unwrap().keep();
    let mut names = Vec::new();
    let mut add = |name: &'static str, listing: Entry| {
        let base = cache.put_tree(name, &src.join(name));
        cache.put_listing(&base, &listing);
        names.push((name, base));
    };
    // a single-file path: the listing claims fewer bytes and an exec bit
    write(
        &src.join("single"),
        "the whole of a single-file path\n",
        false,
    );
    add("single", file(4, true));
    // a nested file cut short, a program shown as plain data
    write(
        &src.join("nested/data/long.txt"),
        &"0123456789".repeat(500),
        false,
    );
    write(
        &src.join("nested/bin/tool"),
        "#!/bin/sh\necho real tool\n",
        true,
    );
    add(
        "nested",
        dir(vec![
            ("bin", dir(vec![("tool", file(2, false))])),
            ("data", dir(vec![("long.txt", file(7, false))])),
        ]),
    );
    // types: a directory shown as a file, a file shown as a directory, a symlink
    // shown as a file, a file shown as a symlink out of the store
    write(&src.join("is-a-dir/inner"), "inner file\n", false);
    add("is-a-dir", file(3, false));
    write(&src.join("is-a-file"), "just a file\n", false);
    add("is-a-file", dir(vec![("inner", file(3, false))]));
    write(&src.join("links/target"), "link target\n", false);
    std::os::unix::fs::symlink("target", src.join("links/link")).unwrap();
    write(&src.join("links/plain"), "plain, not a link\n", false);
    add(
        "links",
        dir(vec![
            ("link", file(5, true)),
            (
                "plain",
                Entry::Symlink {
                    target: b"/etc/passwd".to_vec().into(),
                },
            ),
            ("target", file(12, false)),
        ]),
    );
    // a script the listing calls executable, though the NAR says it is not
    write(
        &src.join("not-exec"),
        "#!/bin/sh\necho must not run\n",
        false,
    );
    add("not-exec", file(28, true));
    run(std::process::Command::new("find").arg(&src).args([
        "-mindepth",
        "1",
        "-type",
        "d",
        "-exec",
        "chmod",
        "555",
        "{}",
        "+",
    ]));
    (cache.public_key(), src, names)
}

/// What a user sees of `p` through the mount: every file's bytes, sizes, modes and
/// link targets, in a stable order.
fn seen(p: &Path) -> String {
    let mut out = shape(p);
    let files = run(std::process::Command::new("find")
        .arg(p)
        .args(["-type", "f"]));
    let mut files: Vec<&str> = files.lines().collect();
    files.sort();
    for line in files {
        out += &format!("\n{line}: {:?}", std::fs::read_to_string(line).unwrap());
    }
    out
}

fn forged_listings_never_reach_the_kernel(mode: &[&str], mounts: usize) {
    let s3 = S3Server::start();
    let (key, src, names) = lying_cache(&s3);
    let url = s3.url(s3.port, "h");
    let want: Vec<String> = names.iter().map(|(n, _)| seen(&src.join(n))).collect();
    for round in 0..mounts {
        let m = Mounted::start(&url, &[&key], None, mode);
        let p = |name: &str| m.p(&names.iter().find(|(n, _)| *n == name).unwrap().1);
        // first contact as users make it, each in its own order: stat, then read
        let single = p("single");
        let _ = std::fs::metadata(&single);
        assert_eq!(
            std::fs::read_to_string(&single).unwrap(),
            "the whole of a single-file path\n",
            "round {round}"
        );
        let long = p("nested").join("data/long.txt");
        let _ = std::fs::metadata(&long);
        assert_eq!(
            std::fs::read(&long).unwrap().len(),
            5000,
            "round {round}: a listing's size cut the read short"
        );
        // a program runs with its real contents; a file the listing calls
        // executable does not run
        let out = run(&mut std::process::Command::new(
            p("nested").join("bin/tool"),
        ));
        assert_eq!(out, "real tool\n", "round {round}");
        let _ = std::fs::metadata(p("not-exec"));
        let r = std::process::Command::new(p("not-exec")).output();
        assert!(
            r.as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EACCES)),
            "round {round}: a non-executable file ran: {r:?}"
        );
        // types: a directory the listing calls a file is not entered until its NAR
        // is verified (which opening it does); then it is entered
        let inner = p("is-a-dir").join("inner");
        match std::fs::read_to_string(&inner) {
            Ok(s) => assert_eq!(s, "inner file\n"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "round {round}"),
        }
        assert!(std::fs::read(p("is-a-dir")).is_err());
        assert_eq!(std::fs::read_to_string(&inner).unwrap(), "inner file\n");
        // a file the listing calls a directory reads as one until a file the
        // listing puts inside it is opened (and its NAR verified)
        let _ = std::fs::metadata(p("is-a-file").join("inner"));
        match std::fs::read_to_string(p("is-a-file")) {
            Ok(s) => assert_eq!(s, "just a file\n"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "round {round}"),
        }
        assert!(std::fs::read(p("is-a-file").join("inner")).is_err());
        assert_eq!(
            std::fs::read_to_string(p("is-a-file")).unwrap(),
            "just a file\n"
        );
        let _ = std::fs::metadata(p("links").join("plain"));
        assert_eq!(
            std::fs::read_to_string(p("links").join("plain")).unwrap(),
            "plain, not a link\n"
        );
        assert_eq!(
            std::fs::read_link(p("links").join("link")).unwrap(),
            Path::new("target")
        );
        // and afterwards everything the kernel shows is the NAR's
        for ((name, _), want) in names.iter().zip(&want) {
            let got = seen(&p(name));
            let strip = |s: &str, root: &Path| s.replace(&root.display().to_string(), "");
            assert_eq!(
                strip(&got, &p(name)),
                strip(want, &src.join(name)),
                "round {round}: {name}\n{}",
                m.log_text()
            );
        }
        if !mode.contains(&"--no-open") {
            assert!(m.log_text().contains("disagrees with its verified NAR"));
        }
    }
}

#[test]
fn forged_listings_never_reach_the_kernel_in_page_cache_mode() {
    forged_listings_never_reach_the_kernel(&["--prefetch-references", "false"], 50);
}

#[test]
fn forged_listings_never_reach_the_kernel_in_passthrough_mode() {
    forged_listings_never_reach_the_kernel(&["--passthrough"], 50);
}

#[test]
fn forged_listings_never_reach_the_kernel_in_no_open_mode() {
    forged_listings_never_reach_the_kernel(&["--no-open"], 10);
}

/// `.ls` text of a directory of `n` empty files named `{i:x}` padded to `width`.
fn huge_listing(n: usize, width: usize) -> String {
    let mut s = String::from(r#"{"version":1,"root":{"type":"directory","entries":{"#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s += &format!(r#""{i:0width$x}":{{"type":"regular","size":0}}"#);
    }
    s + "}}}"
}

#[test]
fn a_forged_listing_of_millions_of_entries_costs_bounded_memory() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let good = cache.put_good("neighbour");
    // signed paths that claim NARs big enough for any listing; their listings are
    // forged: 1.5 million entries plain (58 MB) and zstd-compressed (a few MB that
    // decompress to 58 MB), and 100,000 entries with long names (22 MB)
    let nar = file_nar(b"x");
    let put = |name: &str, ls: Vec<u8>| {
        let base = cache.put(
            name,
            &nar,
            narfs::formats::narinfo::Compression::None,
            &nar,
            |i| i.nar_size = 1 << 36,
        );
        std::fs::write(cache.dir.join(format!("{}.ls", &base[..32])), ls).unwrap();
        base
    };
    let million = huge_listing(1_500_000, 1);
    let bombs = [
        put("plain", million.clone().into_bytes()),
        put("zstd", zstd::encode_all(million.as_bytes(), 3).unwrap()),
        put("fat", huge_listing(100_000, 200).into_bytes()),
    ];
    drop(million);
    let m = Mounted::start(&s3.url(s3.port, "h"), &[&cache.public_key()], None, &[]);
    let readers: Vec<_> = bombs
        .iter()
        .map(|b| {
            let p = m.p(b);
            std::thread::spawn(move || std::fs::read_dir(p).map(|d| d.count()))
        })
        .collect();
    // other paths are served meanwhile
    assert_eq!(std::fs::read(m.p(&good)).unwrap(), b"good content\n");
    for r in readers {
        // the listing was refused and the NAR (which does not exist) was tried
        assert!(r.join().unwrap().is_err());
    }
    let (_, peak_kib) = rss_kib(m.pid());
    assert!(
        peak_kib < 256 * 1024,
        "peak RSS {} MiB\n{}",
        peak_kib / 1024,
        m.log_text()
    );
    let log = m.log_text();
    assert!(log.contains("more than 16777216 bytes of JSON"), "{log}");
    assert!(log.contains("more than 250000 entries"), "{log}");
    assert_eq!(std::fs::read(m.p(&good)).unwrap(), b"good content\n");
}

#[test]
fn secrets_in_urls_never_reach_logs_and_netrc_keeps_them_out_of_urls() {
    let f = fixture();
    let http = HttpServer::start(&f.cache);
    let proxy = common::proxy::Proxy::start(http.port);
    const SECRET: &str = "pw-S3CRET-1";
    proxy.require_basic_auth("narfs", SECRET);
    let lib = f.path("narfs-test-lib");
    // a NAR that fails, so its URL is shown in an error
    let nar = f.narinfo_field("narfs-test-app", "URL");
    proxy.fault(&nar, common::proxy::Fault::Status(404), usize::MAX);
    let with_secret = format!("http://narfs:{SECRET}@127.0.0.1:{}/", proxy.port);
    let m = Mounted::start(&with_secret, &[&f.public_key], None, &[]);
    assert_eq!(
        std::fs::read_to_string(m.p(lib).join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    assert!(read_err(&m.p(f.path("narfs-test-app")).join("bin/app")).is_some());
    let log = m.log_text();
    assert!(log.contains("cache answered") && log.contains("the NAR does not exist"));
    assert!(log.contains(&nar), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    drop(m);
    // errors of the command line tools and of a malformed URL
    let (code, _, err) = out(narfs()
        .args(["cat", "--trusted-public-key", &f.public_key, &with_secret])
        .arg(format!("/nix/store/{}/bin/app", f.path("narfs-test-app"))));
    assert_eq!(code, 1);
    assert!(err.contains(&nar) && !err.contains(SECRET), "{err}");
    let bad = with_secret.replace("http://", "htp://");
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = out(narfs()
        .args(["mount", "--trusted-public-key", &f.public_key, &bad])
        .arg(tmp.path()));
    assert_eq!(code, 2);
    assert!(
        err.contains("unsupported scheme") && !err.contains(SECRET),
        "{err}"
    );

    // the credentials in a netrc file instead (nix.conf's netrc-file), and without
    // them the cache refuses
    let plain = format!("http://127.0.0.1:{}/", proxy.port);
    let (code, _, err) = out(narfs()
        .args(["ls", "--trusted-public-key", &f.public_key, &plain])
        .arg(format!("/nix/store/{lib}")));
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let netrc = tmp.path().join("netrc");
    std::fs::write(
        &netrc,
        format!("machine other.example.org login x password y\nmachine 127.0.0.1\n  login narfs\n  password {SECRET}\n"),
    )
    .unwrap();
    let netrc_arg = netrc.to_str().unwrap();
    let m = Mounted::start(&plain, &[&f.public_key], None, &["--netrc-file", netrc_arg]);
    assert_eq!(
        std::fs::read_to_string(m.p(lib).join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    assert!(!m.log_text().contains(SECRET));
    let (code, text, err) = out(narfs()
        .args(["cat", "--netrc-file", netrc_arg])
        .args(["--trusted-public-key", &f.public_key, &plain])
        .arg(format!("/nix/store/{lib}/lib/greet.sh")));
    assert_eq!(
        (code, text.as_str()),
        (0, "greet() { echo \"hello from lib\"; }\n"),
        "{err}"
    );
    // a netrc file that cannot be read is a usage error naming it
    let (code, _, err) = out(narfs()
        .args(["mount", "--netrc-file", "/nonexistent/netrc"])
        .args(["--trusted-public-key", &f.public_key, &plain])
        .arg(tmp.path()));
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/netrc"), "{err}");
}

#[test]
fn a_narinfo_url_cannot_leave_the_cache_prefix() {
    // an http cache under /h/ of a server that holds, outside it, a NAR that would
    // even verify; narinfos point at it with dot segments in disguise
    let root = tempfile::tempdir().unwrap();
    let cache = SignedCache::at(&root.path().join("h"));
    let nar = file_nar(b"outside the prefix\n");
    std::fs::write(root.path().join("x.nar"), &nar).unwrap();
    let mut names = Vec::new();
    for (i, url) in [
        "nar/%2e%2e/%2e%2e/x.nar",
        "nar/%2E%2E/%2E%2E/x.nar",
        "nar/..%2f..%2fx.nar",
        "nar/..\\..\\x.nar",
        "nar/../../x.nar",
        "/x.nar",
        "http://127.0.0.1:1/x.nar",
    ]
    .into_iter()
    .enumerate()
    {
        names.push(cache.put(
            &format!("escape-{i}"),
            &nar,
            narfs::formats::narinfo::Compression::None,
            &nar,
            |info| info.url = url.to_owned(),
        ));
    }
    let good = cache.put_good("inside");
    let http = HttpServer::start(root.path());
    let proxy = common::proxy::Proxy::start(http.port);
    let url = format!("http://127.0.0.1:{}/h", proxy.port);
    let m = Mounted::start(&url, &[&cache.public_key()], None, &[]);
    for n in &names {
        assert_eq!(read_err(&m.p(n)), Some(libc::ENOENT), "{n}");
    }
    assert_eq!(std::fs::read(m.p(&good)).unwrap(), b"good content\n");
    let outside: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET /h/"))
        .collect();
    assert!(
        outside.is_empty(),
        "requests outside the prefix: {outside:?}"
    );
    let log = m.log_text();
    assert!(
        log.contains("is not a plain relative key inside the cache"),
        "{log}"
    );
}
