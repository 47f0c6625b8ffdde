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
        chunks: None,
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
    let m = cache.mount(&s3, &[]);
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
    // nor an S3 endpoint's
    let (code, _, err) = out(narfs()
        .args(["ls", "--trusted-public-key", &f.public_key])
        .arg(format!(
            "s3://b/p?endpoint=http://alice:{SECRET}@127.0.0.1:1"
        ))
        .arg("/nix/store/00000000000000000000000000000000-x"));
    assert_eq!(code, 1);
    assert!(
        err.contains("may not hold credentials") && !err.contains(SECRET),
        "{err}"
    );
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

/// Every entry under `dir` (not following links) whose mode lets group or others
/// write, as "mode path".
fn writable_by_others(dir: &Path) -> Vec<String> {
    run(std::process::Command::new("find")
        .arg(dir)
        .args(["!", "-type", "l", "-perm", "/022", "-printf", "%m %p\n"]))
    .lines()
    .map(str::to_owned)
    .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_cache_directory_is_the_users_alone() {
    let f = fixture();
    let e = env();
    let base = tempfile::tempdir().unwrap();
    let keys = [f.public_key.as_str()];
    let dir = base.path().join("new/cache");
    // created under umask 000, it and everything in it are still the user's alone
    let m = Mounted::try_start_umask(&e.url, &keys, Some(&dir), &[], &[], Some(0)).unwrap();
    let lib = m.p(f.path("narfs-test-lib"));
    assert_eq!(
        std::fs::read_to_string(lib.join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    drop(m);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(dir.parent().unwrap()), 0o700);
    assert!(cache_holds(
        &dir,
        &f.narinfo_field("narfs-test-lib", "NarHash"),
        &[]
    ));
    assert_eq!(writable_by_others(&dir), Vec::<String>::new());

    // a directory others may write to, or that another user owns, is refused
    let start = || Mounted::try_start(&e.url, &keys, Some(&dir), &[]).map(drop);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (st, log) = start().unwrap_err();
    assert_eq!(st.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!("refusing cache directory {}", dir.display())),
        "{log}"
    );
    assert!(log.contains("chmod go-w"), "{log}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
    let (st, log) = start().unwrap_err();
    assert_eq!(st.code(), Some(2), "{log}");
    assert!(log.contains("belongs to uid 65534"), "{log}");
    std::os::unix::fs::chown(&dir, Some(0), None).unwrap();

    // symlinks planted inside are never followed: clean-up removes links, not what
    // they point to, and a linked subdirectory or lock file is refused
    let victim = base.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "keep me").unwrap();
    std::fs::rename(dir.join("trash"), base.path().join("old-trash")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("trash")).unwrap();
    let (st, log) = start().unwrap_err();
    assert_eq!(st.code(), Some(2), "{log}");
    assert!(log.contains("trash") && log.contains("symlink"), "{log}");
    std::fs::remove_file(dir.join("trash")).unwrap();
    // links in tmp/ and in an older narfs's store/ (removed at start), and a link
    // where a blob shard would be
    std::os::unix::fs::symlink(&victim, dir.join("tmp/leftover")).unwrap();
    std::fs::create_dir_all(dir.join("store")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("store/linked")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("blobs/zz")).unwrap();
    let m = Mounted::start(&e.url, &keys, Some(&dir), &[]);
    assert_eq!(
        std::fs::read_to_string(lib_path(&m, f)).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    drop(m);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        std::fs::read_to_string(victim.join("precious")).unwrap(),
        "keep me"
    );
    assert!(!dir.join("tmp/leftover").exists() && !dir.join("store").exists());
    std::fs::remove_file(dir.join("lock")).unwrap();
    let target = base.path().join("lock-target");
    std::os::unix::fs::symlink(&target, dir.join("lock")).unwrap();
    let (st, log) = start().unwrap_err();
    assert_ne!(st.code(), Some(0), "{log}");
    assert!(log.contains("lock"), "{log}");
    assert!(!target.exists());
}

fn lib_path(m: &Mounted, f: &Fixture) -> std::path::PathBuf {
    m.p(f.path("narfs-test-lib")).join("lib/greet.sh")
}

#[test]
fn narinfo_records_on_disk_are_verified_again() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let kept = cache.put_good("kept");
    let url = s3.url(s3.port, "h");
    let key = cache.public_key();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("cache");
    let m = Mounted::start(&url, &[&key], Some(&dir), &[]);
    assert_eq!(std::fs::read(m.p(&kept)).unwrap(), b"good content\n");
    drop(m);
    // planted next to the records the trusted key verified: a path the cache does not
    // have, signed by someone else, with an unpacked tree and a "verified" marker; and
    // the kept record edited (a NarSize the signature does not cover any more)
    let id = narfs::formats::keys::PublicKey::parse(&key).unwrap().id();
    let records = dir.join("narinfo").join(&id);
    let intruder = narfs::formats::keys::SecretKey::from_seed("intruder", [5; 32]);
    let planted_nar = file_nar(b"planted\n");
    let sp = narfs::formats::store_path::StorePath::from_basename(
        "0pl4nd00000000000000000000000000-planted",
    )
    .unwrap();
    let mut info = narfs::formats::narinfo::NarInfo::parse(
        &std::fs::read_to_string(records.join(format!("{}.narinfo", &kept[..32]))).unwrap(),
    )
    .unwrap();
    let mut planted = info.clone();
    planted.store_path = sp.clone();
    planted.nar_hash = narfs::formats::hash::Sha256::digest(&planted_nar);
    planted.nar_size = planted_nar.len() as u64;
    planted.sigs = vec![intruder.sign(planted.fingerprint().as_bytes())];
    std::fs::write(
        records.join(format!("{}.narinfo", sp.hash_part())),
        planted.to_text(),
    )
    .unwrap();
    // its tree and contents, as narfs keeps them
    let tree = narfs::formats::nar::parse(
        &mut &planted_nar[..],
        &mut narfs::formats::nar::TreeOnly,
        20,
    )
    .unwrap();
    let h = planted.nar_hash.to_nix_string();
    std::fs::write(
        dir.join("trees").join(&h[7..]),
        narfs::formats::file_index::encode_tree(&tree, planted.nar_size, 20),
    )
    .unwrap();
    let blob = dir.join(narfs::disk_cache::blob_rel_path(
        &narfs::formats::hash::Sha256::digest(b"planted\n"),
    ));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(blob, "planted\n").unwrap();
    info.nar_size += 1;
    std::fs::write(
        records.join(format!("{}.narinfo", &kept[..32])),
        info.to_text(),
    )
    .unwrap();
    let m = Mounted::start(&url, &[&key], Some(&dir), &["--refresh-interval", "0"]);
    m.wait_log("loaded verified paths from the cache directory");
    assert_eq!(read_err(&m.p(sp.basename())), Some(libc::ENOENT));
    let names = m.wait_root(1);
    assert_eq!(names, vec![kept.clone()], "{}", m.log_text());
    // the edited record was dropped and the narinfo fetched afresh
    assert_eq!(std::fs::read(m.p(&kept)).unwrap(), b"good content\n");
    let log = m.log_text();
    assert!(
        log.contains("ignoring the narinfo record of 0pl4nd"),
        "{log}"
    );
    assert!(
        log.contains(&format!("ignoring the narinfo record of {}", &kept[..32])),
        "{log}"
    );
}

#[test]
fn the_control_socket_answers_its_user_alone() {
    // in a mount namespace of its own, with a private /run/narfs, so that loosening
    // modes on purpose cannot touch other mounts
    let f = fixture();
    let e = env();
    let (base, mnt) = mountpoint();
    std::fs::create_dir_all("/run/narfs").unwrap();
    let script = r#"
        set -u
        mount -t tmpfs -o mode=0755 none /run/narfs
        "$NARFS" mount --daemon --cache-dir "$BASE/cache" --trusted-public-key "$KEY" "$URL" "$MNT" || exit 9
        sock=$(ls /run/narfs/*.sock)
        echo "dir $(stat -c %a /run/narfs) sock $(stat -c %a "$sock")"
        "$NARFS" stats "$MNT" >/dev/null && echo "stats ok"
        # another user, let in by modes loosened on purpose, is turned away by the mount
        chmod 711 /run/narfs; chmod 666 "$sock"
        python3 -c 'import os,socket,sys
os.setgid(65534); os.setuid(65534)
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
try:
    s.sendall(b"metrics\n"); n=len(s.recv(100))
except (ConnectionResetError, BrokenPipeError):
    # turned away before or after its request went out
    n=0
print("other user got", n, "bytes")' "$sock"
        # a socket whose directory others may write to is not trusted by the client
        chmod 777 /run/narfs
        "$NARFS" stats "$MNT" 2>&1 | head -1 | sed "s|$sock|SOCK|"
        chmod 700 /run/narfs
        "$NARFS" stats "$MNT" >/dev/null && echo "stats ok again"
        fusermount3 -u "$MNT"
    "#;
    let o = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("NARFS", env!("CARGO_BIN_EXE_narfs"))
        .env("BASE", base.path())
        .env("KEY", &f.public_key)
        .env("URL", &e.url)
        .env("MNT", &mnt)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "dir 700 sock 600",
            "stats ok",
            "other user got 0 bytes",
            // the socket's name holds the mount's device number, known only inside
            "narfs: refusing to talk to SOCK: /run/narfs may be written by group or others (mode 0777)",
            "stats ok again",
        ],
        "{err}"
    );
    let log = std::fs::read_to_string(base.path().join("cache/narfs.log")).unwrap();
    assert!(log.contains("refused a client of another user"), "{log}");
}

#[test]
fn narfs_ls_escapes_names_and_shows_only_verified_link_targets() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("evil\x1b[2J\nname"), "x").unwrap();
    std::os::unix::fs::symlink("real-target", tree.join("link")).unwrap();
    let base = cache.put_tree("escapes", &tree);
    // the listing agrees, but for the link's target
    cache.put_listing(
        &base,
        &dir(vec![
            ("evil\x1b[2J\nname", file(1, false)),
            (
                "link",
                Entry::Symlink {
                    target: b"/forged/target".to_vec().into(),
                },
            ),
        ]),
    );
    let url = s3.url(s3.port, "h");
    let (code, text, err) = out(narfs()
        .args([
            "ls",
            "-l",
            "--trusted-public-key",
            &cache.public_key(),
            &url,
        ])
        .arg(format!("/nix/store/{base}")));
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("./evil\\033[2J\\nname\n"), "{text:?}");
    assert!(text.contains("./link -> real-target\n"), "{text:?}");
    assert!(
        !text.contains("forged") && !text.contains('\x1b'),
        "{text:?}"
    );
}

#[test]
fn slow_metrics_clients_do_not_hold_up_a_scrape() {
    let f = fixture();
    let e = env();
    let (_, addr) = free_addr();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--metrics-addr", &addr]);
    m.wait_log("serving metrics");
    // clients that connect and then say nothing, or send half a request
    let idle: Vec<std::net::TcpStream> = (0..20)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            if i % 2 == 0 {
                use std::io::Write;
                s.write_all(b"GET /metr").unwrap();
            }
            s
        })
        .collect();
    let t = std::time::Instant::now();
    let body = run(std::process::Command::new("curl")
        .args(["-sS", "--max-time", "3"])
        .arg(format!("http://{addr}/metrics")));
    assert!(body.contains("narfs_"), "{body}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    // and the idle ones are let go within the deadline
    std::thread::sleep(std::time::Duration::from_secs(6));
    for mut s in idle {
        use std::io::Read;
        s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
}

#[test]
fn the_quota_holds_at_every_moment_and_prefetch_never_evicts() {
    // a closure of 12 paths of 2 MiB, each referencing the next three (so every open
    // prefetches), read twice in order through a 10 MiB quota, the cache directory
    // measured every few milliseconds meanwhile
    let (s3, _, key, names) = generated("q", 12, 2 << 20, 3);
    let proxy = common::proxy::Proxy::start(s3.port);
    let quota: u64 = 10 << 20;
    let tmpfs = Tmpfs::new("64m");
    let m = Mounted::start(
        &s3.url(proxy.port, "q"),
        &[&key],
        Some(&tmpfs.0),
        &["--cache-size", "10M", "--jobs", "4"],
    );
    let mut sampler = Sampler::start(&tmpfs.0);
    for pass in 0..2 {
        if pass == 1 {
            assert!(std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok());
        }
        for name in &names {
            for f in 0..4 {
                let data = std::fs::read(m.p(name).join(format!("f{f}"))).unwrap();
                assert_eq!(data.len(), (2 << 20) / 4, "pass {pass} {name}");
            }
        }
    }
    let peak = sampler.stop();
    let gets = proxy.downloads(".nar?");
    eprintln!(
        "quota {} MiB: peak {:.2} MiB in the cache directory; {gets} NAR GETs for 2 passes of 12 paths",
        quota >> 20,
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        peak as f64 <= quota as f64 * 1.05,
        "peak {peak} bytes in the cache directory, quota {quota}\n{}",
        m.log_text()
    );
    // nothing fetched was thrown away by a prefetch and fetched again: at most one GET
    // per path and pass
    assert!(
        gets <= 2 * names.len(),
        "{gets} NAR GETs\n{:?}",
        proxy.requests()
    );
}

#[test]
fn a_cache_directory_swapped_under_a_running_mount_is_never_read() {
    // the cache directory in a parent others may write: whoever may, renames it away
    // and puts one of theirs in its place, with planted trees and "verified" markers
    let f = fixture();
    let e = env();
    let base = tempfile::tempdir().unwrap();
    let parent = base.path().join("shared");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
    let dir = parent.join("cache");
    let m = Mounted::start(
        &e.url,
        &[&f.public_key],
        Some(&dir),
        &["--prefetch-references", "false"],
    );
    let greet = m.p(f.path("narfs-test-lib")).join("lib/greet.sh");
    assert_eq!(
        std::fs::read_to_string(&greet).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    std::fs::rename(&dir, parent.join("cache.old")).unwrap();
    // the new one says, as narfs would, that lib's greet.sh is a blob of theirs (of the
    // same size, so that the tree is sound)
    let pwned = b"greet() { echo \"PWNED from lib\"; }\n";
    let nar = narfs::formats::nar::Writer::new(Vec::new())
        .dump_path(&f.real("narfs-test-lib"))
        .unwrap();
    let mut tree =
        narfs::formats::nar::parse(&mut &nar[..], &mut narfs::formats::nar::TreeOnly, 20).unwrap();
    let h = narfs::formats::hash::Sha256::digest(pwned);
    {
        use narfs::formats::listing::Entry;
        let Entry::Directory { entries } = &mut tree else {
            panic!()
        };
        let lib = &mut entries.iter_mut().find(|(n, _)| &**n == b"lib").unwrap().1;
        let Entry::Directory { entries } = lib else {
            panic!()
        };
        let greet = &mut entries
            .iter_mut()
            .find(|(n, _)| &**n == b"greet.sh")
            .unwrap()
            .1;
        let Entry::Regular { chunks, .. } = greet else {
            panic!()
        };
        *chunks = Some(vec![h].into());
    }
    for d in ["trees", "blobs"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let nar_hash = f.narinfo_field("narfs-test-lib", "NarHash");
    std::fs::write(
        dir.join("trees").join(&nar_hash[7..]),
        narfs::formats::file_index::encode_tree(&tree, nar.len() as u64, 20),
    )
    .unwrap();
    let blob = dir.join(narfs::disk_cache::blob_rel_path(&h));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(blob, pwned).unwrap();
    assert!(std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok());
    assert_eq!(
        std::fs::read_to_string(&greet).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    m.runs_the_app();
}

#[test]
fn listings_together_cost_bounded_memory() {
    // six signed paths, each with a listing just within every per-listing bound
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let nar = file_nar(b"x");
    let listing = huge_listing(249_000, 1).into_bytes();
    let names: Vec<String> = (0..6)
        .map(|i| {
            let base = cache.put(
                &format!("many-{i}"),
                &nar,
                narfs::formats::narinfo::Compression::None,
                &nar,
                |info| info.nar_size = 1 << 36,
            );
            std::fs::write(cache.dir.join(format!("{}.ls", &base[..32])), &listing).unwrap();
            base
        })
        .collect();
    let good = cache.put_good("neighbour");
    let m = cache.mount(&s3, &[]);
    let mut listed = 0;
    for n in &names {
        // a directory listed from its listing, or an error once listings are full
        // (its NAR, which does not exist, was tried instead)
        if let Ok(d) = std::fs::read_dir(m.p(n)) {
            listed += usize::from(d.count() == 249_000);
        }
    }
    let (_, peak_kib) = rss_kib(m.pid());
    let log = m.log_text();
    assert_eq!(listed, 2, "{log}");
    assert!(log.contains("listings already hold 500000 nodes"), "{log}");
    assert!(peak_kib < 256 * 1024, "peak RSS {} MiB", peak_kib / 1024);
    assert_eq!(std::fs::read(m.p(&good)).unwrap(), b"good content\n");
}

/// An HTTP cache that answers every narinfo with 1 MiB of junk.
fn junk_narinfo_server() -> (std::process::Child, u16) {
    let script = r#"
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"StoreDir: /nix/store\n" if self.path.endswith("nix-cache-info") else b"A" * (1 << 20)
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        try: self.wfile.write(body)
        except Exception: pass
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; request_queue_size = 4096
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    spawn_listening("the junk narinfo server", |port| {
        let mut c = std::process::Command::new("python3");
        c.args(["-c", script, &port.to_string()]);
        c
    })
}

#[test]
fn a_flood_of_lookups_of_huge_narinfos_costs_bounded_memory() {
    let (mut server, port) = junk_narinfo_server();
    let key = narfs::formats::keys::SecretKey::from_seed("any", [1; 32])
        .public()
        .to_nix_string();
    let m = Mounted::start(&format!("http://127.0.0.1:{port}"), &[&key], None, &[]);
    let names: String = (0..1500u32)
        .map(|i| {
            let h = narfs::formats::hash::Sha256::digest(&i.to_le_bytes());
            format!("{}-x\n", narfs::formats::nixbase32::encode(&h.0[..20]))
        })
        .collect();
    let list = m.cache_dir.parent().unwrap().join("names");
    std::fs::write(&list, names).unwrap();
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg("xargs -P 600 -a \"$1\" -I{} stat \"$2/{}\" >/dev/null 2>&1")
        .args(["sh", list.to_str().unwrap(), m.mnt.to_str().unwrap()])
        .status();
    let (_, peak_kib) = rss_kib(m.pid());
    let _ = server.kill();
    let _ = server.wait();
    assert!(peak_kib < 256 * 1024, "peak RSS {} MiB", peak_kib / 1024);
}

#[test]
fn parallel_downloads_keep_the_quota_and_it_is_restored_after() {
    let (s3, _, key, names) = generated("q", 6, 3 << 20, 0);
    let quota: u64 = 5 << 20;
    for mode in [&[][..], &["--no-open"][..]] {
        let mut args = vec!["--cache-size", "5M", "--jobs", "4"];
        args.extend_from_slice(mode);
        let tmpfs = Tmpfs::new("64m");
        let m = Mounted::start(&s3.url(s3.port, "q"), &[&key], Some(&tmpfs.0), &args);
        let mut sampler = Sampler::start(&tmpfs.0);
        let readers: Vec<_> = names
            .iter()
            .map(|n| {
                let p = m.p(n).join("f0");
                std::thread::spawn(move || std::fs::read(p).map(|d| d.len()))
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().unwrap().unwrap(), (3 << 20) / 4, "{mode:?}");
        }
        let peak = sampler.stop();
        assert!(
            peak as f64 <= quota as f64 * 1.05,
            "{mode:?}: peak {peak} bytes, quota {quota}\n{}",
            m.log_text()
        );
        let left = fs_used(&tmpfs.0) - sampler.base;
        assert!(left <= quota, "{mode:?}: {left} bytes left");
    }
}

#[test]
fn odd_crash_markers_and_file_cache_symlinks_are_never_followed() {
    let f = fixture();
    let e = env();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("cache");
    let keys = [f.public_key.as_str()];
    let m = Mounted::start(&e.url, &keys, Some(&dir), &[]);
    std::fs::read(lib_path(&m, f)).unwrap();
    drop(m);
    for marker in ["..x", "...", ".", "x/..", "0.1"] {
        let _ = std::fs::write(dir.join("pending").join(marker), "");
    }
    let m = Mounted::start(&e.url, &keys, Some(&dir), &[]);
    assert!(dir.join("lock").exists() && dir.join("narinfo").exists());
    assert!(cache_holds(
        &dir,
        &f.narinfo_field("narfs-test-lib", "NarHash"),
        &[]
    ));
    assert_eq!(std::fs::read_dir(dir.join("pending")).unwrap().count(), 0);
    drop(m);

    // a file:// cache whose NAR is a symlink to a host file
    let cache = base.path().join("filecache");
    run(std::process::Command::new("cp")
        .arg("-r")
        .arg(&f.cache)
        .arg(&cache));
    let nar = f.narinfo_field("narfs-test-single.txt", "URL");
    let secret = base.path().join("host-secret");
    std::fs::write(&secret, "host secret").unwrap();
    std::fs::remove_file(cache.join(&nar)).unwrap();
    std::os::unix::fs::symlink(&secret, cache.join(&nar)).unwrap();
    let m = Mounted::start(&format!("file://{}", cache.display()), &keys, None, &[]);
    assert_eq!(
        read_err(&m.p(f.path("narfs-test-single.txt"))),
        Some(libc::EIO)
    );
    let log = m.log_text();
    assert!(log.contains("symlink, which narfs never follows"), "{log}");
    // and narfs cat names only files inside the path
    let (code, text, err) = out(narfs()
        .args(["cat", "--trusted-public-key", &f.public_key])
        .arg(format!("file://{}", f.cache.display()))
        .arg(format!(
            "/nix/store/{}/../../../..{}",
            f.path("narfs-test-lib"),
            secret.display()
        )));
    assert_eq!(code, 1, "{text}");
    assert!(
        !text.contains("host secret") && err.contains("'..'"),
        "{err}"
    );
}

/// Samples the use of a file system every 2 ms, above what it held at the start (the
/// cache directory's skeleton, its records): the peak of what was unpacked.
struct Sampler {
    base: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Sampler {
    fn start(dir: &Path) -> Self {
        let base = fs_used(dir);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, d) = (stop.clone(), dir.to_owned());
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(fs_used(&d).saturating_sub(base));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        Sampler {
            base,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}
