//! End to end: a closure built by the real nix, served by a real S3 server, mounted by
//! the real narfs binary over FUSE.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn nar_hash_of(path: &Path) -> String {
    let out = run(Command::new("nix")
        .args([
            "--experimental-features",
            "nix-command",
            "hash",
            "path",
            "--base32",
            "--type",
            "sha256",
        ])
        .arg(path));
    format!("sha256:{}", out.trim())
}

#[test]
fn serves_the_closure_exactly_as_nix_built_it() {
    let f = fixture();
    let e = env();
    let t0 = Instant::now();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let mount_ms = t0.elapsed().as_millis();
    let mut expected: Vec<&String> = f.paths.values().collect();
    expected.sort();
    assert_eq!(
        m.wait_root(f.paths.len()),
        expected.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );

    for (name, base) in &f.paths {
        let mounted = m.p(base);
        // types, modes, sizes and link targets identical to the real store path
        assert_eq!(shape(&mounted), shape(&f.real(name)), "{name}");
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&mounted)
            .arg(f.real(name)));
        // and the NAR of what the mount shows is the signed NarHash
        assert_eq!(
            nar_hash_of(&mounted),
            f.narinfo_field(name, "NarHash"),
            "{name}"
        );
    }
    // every NAR was fetched exactly once
    for name in f.paths.keys() {
        let url = f.narinfo_field(name, "URL");
        assert_eq!(e.proxy.downloads(&url), 1, "{url}");
    }

    let app = m.p(f.path("narfs-test-app"));
    let lib = m.p(f.path("narfs-test-lib"));
    // a script executed straight from the mount
    let out = run(&mut Command::new(app.join("bin/app")));
    assert_eq!(out, "hello from lib\n");
    // a shared library mapped by the dynamic loader
    let py = format!(
        "import ctypes; print(ctypes.CDLL('{}').narfs_answer())",
        lib.join("lib/libanswer.so").display()
    );
    assert_eq!(run(Command::new("python3").args(["-c", &py])), "42\n");
    // details
    assert_eq!(
        std::fs::read_link(app.join("bin/dangling")).unwrap(),
        Path::new("/nonexistent/dangling")
    );
    assert_eq!(std::fs::read(lib.join("share/empty-file")).unwrap(), b"");
    assert_eq!(
        std::fs::read_to_string(lib.join("share/ünïcödé name.txt")).unwrap(),
        "ünïcödé\n"
    );
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-single.txt"))).unwrap(),
        b"asdf"
    );
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(app.join("bin/app")).unwrap();
    let b = std::fs::metadata(app.join("bin/app")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.mtime(), 1);
    assert_eq!(a.mode() & 0o7777, 0o555);
    // whole 4 KiB blocks, as on a disk (tests/tools.rs compares `du` with the store)
    assert_eq!(a.blocks(), a.size().div_ceil(4096) * 8);
    // read-only
    for target in [m.p("new-file"), app.join("bin/new"), app.join("bin/app")] {
        let err = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{target:?}");
    }
    assert_eq!(
        std::fs::create_dir(app.join("d"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(
        std::fs::remove_file(app.join("bin/app"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    run(Command::new("stat").arg("-f").arg(&m.mnt));
    // unknown names: ENOENT, and junk names never reach the network
    let before = e.proxy.requests().len();
    assert_eq!(read_err(&m.p("not-a-store-path")), Some(libc::ENOENT));
    assert_eq!(e.proxy.requests().len(), before);
    assert_eq!(
        read_err(&m.p("00000000000000000000000000000000-missing")),
        Some(libc::ENOENT)
    );
    assert_eq!(read_err(&app.join("no-such-file")), Some(libc::ENOENT));

    eprintln!("mount ready in {mount_ms} ms");
    assert!(m.stop().success());
}

#[test]
fn one_download_per_nar_and_other_paths_served_meanwhile() {
    let f = fixture();
    let e = env();
    let big_url = f.narinfo_field("narfs-test-big", "URL");
    e.proxy.delay(&big_url, Duration::from_secs(2));
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_root(f.paths.len());
    let numbers = m.p(f.path("narfs-test-big")).join("data/numbers.txt");
    let expected_len = std::fs::metadata(f.real("narfs-test-big").join("data/numbers.txt"))
        .unwrap()
        .len();
    let readers: Vec<_> = (0..20)
        .map(|_| {
            let p = numbers.clone();
            std::thread::spawn(move || std::fs::read(p).unwrap().len() as u64)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // the big NAR is still held back by the proxy; another path answers at once
    let t = Instant::now();
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-single.txt"))).unwrap(),
        b"asdf"
    );
    let other_ms = t.elapsed().as_millis();
    assert!(
        !readers.iter().all(|r| r.is_finished()),
        "the delayed readers finished too early"
    );
    assert!(
        other_ms < 1500,
        "another path took {other_ms} ms while a NAR downloaded:\n{}\n{:?}",
        m.log_text(),
        e.proxy.requests()
    );
    for r in readers {
        assert_eq!(r.join().unwrap(), expected_len);
    }
    assert_eq!(
        e.proxy.downloads(&big_url),
        1,
        "20 cold readers must cause one GET"
    );
    eprintln!("other path served in {other_ms} ms during a held download");
}

#[test]
fn first_read_of_a_file_in_a_20mb_nar() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let big = m.p(f.path("narfs-test-big"));
    let t = Instant::now();
    assert_eq!(
        std::fs::read_to_string(big.join("data/small.txt")).unwrap(),
        "small\n"
    );
    let first = t.elapsed();
    let t = Instant::now();
    std::fs::read_to_string(big.join("data/small.txt")).unwrap();
    let second = t.elapsed();
    eprintln!(
        "first read in a {} byte NAR: {} ms; again: {} µs",
        f.narinfo_field("narfs-test-big", "NarSize"),
        first.as_millis(),
        second.as_micros()
    );
}

#[test]
fn untrusted_key_hides_everything() {
    let f = fixture();
    let e = env();
    let other = "someone-else:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=";
    let m = Mounted::start(&e.url, &[other], None, &[]);
    m.wait_log("listed the cache");
    assert!(m.wait_root(0).is_empty());
    assert_eq!(read_err(&m.p(f.path("narfs-test-app"))), Some(libc::ENOENT));
    let log = m.log_text();
    assert!(
        log.contains("lacks a signature by a trusted key (it is signed by: narfs-test-1)"),
        "{log}"
    );
    assert!(log.contains(f.path("narfs-test-app")), "{log}");
    assert_eq!(e.proxy.downloads(".nar.xz"), 0);
}

#[test]
fn unsigned_narinfo_is_not_served_and_neighbours_are() {
    let f = fixture();
    let e = env();
    e.edit_object_of("narfs-test-single.txt", "narinfo", |t| {
        without_lines(t, "Sig:")
    });
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_log("listed the cache");
    let names = m.wait_root(f.paths.len() - 1);
    assert_eq!(names.len(), f.paths.len() - 1);
    assert!(!names.contains(&f.path("narfs-test-single.txt").to_owned()));
    assert_eq!(
        read_err(&m.p(f.path("narfs-test-single.txt"))),
        Some(libc::ENOENT)
    );
    assert!(m.log_text().contains("it has no signatures"));
    assert_eq!(
        read_err(&m.p(f.path("narfs-test-app")).join("bin/app")),
        None
    );
}

#[test]
fn narinfo_for_another_path_is_rejected() {
    let f = fixture();
    let e = env();
    // the app's (validly signed) narinfo stored under the single file's key
    std::fs::copy(
        e.object_of("narfs-test-app", "narinfo"),
        e.object_of("narfs-test-single.txt", "narinfo"),
    )
    .unwrap();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_log("listed the cache");
    assert_eq!(
        read_err(&m.p(f.path("narfs-test-single.txt"))),
        Some(libc::ENOENT)
    );
    let log = m.log_text();
    assert!(
        log.contains(&format!(
            "narinfo {}.narinfo describes /nix/store/{}",
            f.hash("narfs-test-single.txt"),
            f.path("narfs-test-app")
        )),
        "{log}"
    );
    assert_eq!(m.wait_root(f.paths.len()).len(), f.paths.len() - 1);
}

fn nix32_sha256(data: &[u8]) -> String {
    narfs::formats::hash::Sha256::digest(data).to_nix_string()
}

/// Replaces `name`'s NAR by one with a single content byte changed; URL, FileHash and
/// FileSize are fixed up (they are not signed), so only the signed NarHash can tell.
fn flip_one_byte(e: &Env, name: &str, needle: &[u8]) -> String {
    let f = fixture();
    let url = f.narinfo_field(name, "URL");
    let xz = std::fs::read(f.cache.join(&url)).unwrap();
    let mut nar = Vec::new();
    std::io::Read::read_to_end(&mut liblzma::read::XzDecoder::new(&xz[..]), &mut nar).unwrap();
    let at = nar
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in NAR");
    nar[at] ^= 0x01;
    let mut bad = Vec::new();
    std::io::Write::write_all(&mut liblzma::write::XzEncoder::new(&mut bad, 6), &nar).unwrap();
    let file_hash = nix32_sha256(&bad);
    let new_url = format!("nar/{}.nar.xz", &file_hash[7..]);
    std::fs::write(e.object(&new_url), &bad).unwrap();
    let info = f
        .narinfo(name)
        .replace(&url, &new_url)
        .replace(&f.narinfo_field(name, "FileHash"), &file_hash)
        .replace(
            &format!("FileSize: {}", f.narinfo_field(name, "FileSize")),
            &format!("FileSize: {}", bad.len()),
        );
    std::fs::write(e.object_of(name, "narinfo"), info).unwrap();
    new_url
}

#[test]
fn nar_with_one_byte_flipped_is_never_served() {
    let f = fixture();
    let e = env();
    flip_one_byte(&e, "narfs-test-lib", b"hello from lib");
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let lib = m.p(f.path("narfs-test-lib"));
    assert_eq!(read_err(&lib.join("lib/greet.sh")), Some(libc::EIO));
    assert_eq!(read_err(&lib.join("share/empty-file")), Some(libc::EIO));
    assert_eq!(read_err(&lib.join("lib/libanswer.so")), Some(libc::EIO));
    // names still list (from the unsigned .ls hint), but no byte is served
    assert!(std::fs::read_dir(lib.join("share")).unwrap().count() >= 3);
    // neighbours are served
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-single.txt"))).unwrap(),
        b"asdf"
    );
    let log = m.log_text();
    let expected = f.narinfo_field("narfs-test-lib", "NarHash");
    assert!(
        log.contains(&format!(
            "NarHash mismatch: expected {expected}, got sha256:"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("/nix/store/{}", f.path("narfs-test-lib"))),
        "{log}"
    );
    assert!(m.stat("verification_failures_total{kind=\"nar\"}") >= 1);
    // nothing of it is on disk
    assert!(!tree_kept(
        &m.cache_dir,
        &f.narinfo_field("narfs-test-lib", "NarHash")
    ));
    assert_eq!(
        std::fs::read_dir(m.cache_dir.join("tmp")).unwrap().count(),
        0
    );
    // a later access tries again: once the cache is repaired, the path is served
    std::fs::copy(
        f.cache
            .join(format!("{}.narinfo", f.hash("narfs-test-lib"))),
        e.object_of("narfs-test-lib", "narinfo"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(lib.join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
}

#[test]
fn remount_reuses_the_cache_dir() {
    let f = fixture();
    let e = env();
    let cache_dir = tempfile::tempdir().unwrap();
    let app = f.path("narfs-test-app").to_owned();
    let mount = || {
        Mounted::start(
            &e.url,
            &[&f.public_key],
            Some(cache_dir.path()),
            &["--prefetch-references", "false"],
        )
    };
    {
        let m = mount();
        m.runs_the_app();
        assert!(m.stop().success());
    }
    e.proxy.clear();
    let m = mount();
    m.runs_the_app();
    assert_eq!(e.proxy.downloads(".nar.xz"), 0, "{:?}", e.proxy.requests());
    assert_eq!(
        e.proxy.gets(&format!("{}.narinfo", &app[..32])),
        0,
        "{:?}",
        e.proxy.requests()
    );
}

#[test]
fn mount_fails_clearly_when_the_cache_does_not_answer() {
    let f = fixture();
    let port = free_port();
    let url = format!("s3://some-bucket/pre?endpoint=127.0.0.1:{port}&scheme=http");
    let Err((st, log)) = Mounted::try_start(&url, &[&f.public_key], None, &[]) else {
        panic!("mounted an unreachable cache");
    };
    assert_eq!(st.code(), Some(1), "{log}");
    for needle in [
        &format!("http://127.0.0.1:{port}")[..],
        "some-bucket",
        "s3://some-bucket/pre",
        "Connection refused",
    ] {
        assert!(log.contains(needle), "missing {needle}: {log}");
    }
    // a reachable server with no cache under that prefix
    let e = env();
    let Err((st, log)) = Mounted::try_start(
        &e.s3.url(e.proxy.port, "wrong-prefix"),
        &[&f.public_key],
        None,
        &[],
    ) else {
        panic!("mounted a prefix without nix-cache-info");
    };
    assert_eq!(st.code(), Some(1));
    assert!(
        log.contains("is not a Nix binary cache") && log.contains("wrong-prefix/nix-cache-info"),
        "{log}"
    );
}

#[test]
fn malformed_input_exits_2_with_a_message() {
    let f = fixture();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--trusted-public-key".into(),
                "nonsense".into(),
                "file:///tmp".into(),
                "/tmp".into(),
            ],
            "not of the form NAME:BASE64",
        ),
        (
            vec![
                "--trusted-public-key".into(),
                "k:AAAA".into(),
                "file:///tmp".into(),
                "/tmp".into(),
            ],
            "expected 32 bytes",
        ),
        (
            vec![
                "--trusted-public-key".into(),
                f.public_key.clone(),
                "http:/x".into(),
                "/tmp".into(),
            ],
            "invalid cache URL 'http:/x'",
        ),
        (
            vec![
                "--trusted-public-key".into(),
                f.public_key.clone(),
                "s3://b?scheme=gopher".into(),
                "/tmp".into(),
            ],
            "scheme must be",
        ),
        (
            vec!["file:///tmp".into(), "/tmp".into()],
            "no trusted public key",
        ),
        (vec!["--bogus".into()], "--bogus"),
    ];
    for (args, needle) in cases {
        let out = narfs().arg("mount").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // keys from the environment, as nix.conf's trusted-public-keys
    let out = narfs()
        .env("NARFS_TRUSTED_PUBLIC_KEYS", format!("{} bad", f.public_key))
        .args(["mount", "file:///tmp", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key 'bad'"));
}

/// `narfs mount` of the fixture's file:// cache at `mnt` (in the foreground), its cache
/// directory in `base`; the caller gives the keys.
fn mount_command(base: &Path, mnt: &Path) -> Command {
    let mut c = narfs();
    c.arg("mount")
        .arg("--cache-dir")
        .arg(base.join("c"))
        .arg(format!("file://{}", fixture().cache.display()))
        .arg(mnt)
        .stderr(std::process::Stdio::null());
    c
}

#[test]
fn exits_0_when_unmounted_from_outside_and_keys_from_env_work() {
    let f = fixture();
    let (base, mnt) = mountpoint();
    let mut child = mount_command(base.path(), &mnt)
        .env("NARFS_TRUSTED_PUBLIC_KEYS", &f.public_key)
        .spawn()
        .unwrap();
    assert!(serve_then_unmount(&mnt, &mut child).success());
}

#[test]
fn tells_systemd_when_ready_and_stopping() {
    let f = fixture();
    let (base, mnt) = mountpoint();
    let sock_path = base.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = mount_command(base.path(), &mnt)
        .env("NOTIFY_SOCKET", &sock_path)
        .args(["--trusted-public-key", &f.public_key])
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // READY means mounted
    assert_eq!(
        std::fs::read(mnt.join(f.path("narfs-test-single.txt"))).unwrap(),
        b"asdf"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(wait_timeout(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn passthrough_mode_serves_the_same_bytes() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--passthrough"]);
    for name in ["narfs-test-lib", "narfs-test-big"] {
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(m.p(f.path(name)))
            .arg(f.real(name)));
    }
    let py = format!(
        "import ctypes; print(ctypes.CDLL('{}').narfs_answer())",
        m.p(f.path("narfs-test-lib"))
            .join("lib/libanswer.so")
            .display()
    );
    assert_eq!(run(Command::new("python3").args(["-c", &py])), "42\n");
    m.runs_the_app();
}

#[test]
fn directories_of_verified_paths_are_listed_by_narfs_once() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture();
    let e = env();
    let m = Mounted::start_logging(&e.url, &[&f.public_key], "trace");
    m.wait_root(f.paths.len());
    let lib = m.p(f.path("narfs-test-lib"));
    let dir = lib.join("lib");
    let ino = std::fs::metadata(&dir).unwrap().ino();
    let lists = |ino: u64| {
        m.log_text()
            .lines()
            .filter(|l| l.contains(" readdir") && l.contains(&format!(" ino={ino} offset=0")))
            .count()
    };
    let list = |d: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let names = list(&dir);
    assert!(names.iter().any(|n| n == "greet.sh"), "{names:?}");

    // built from the unsigned listing: asked every time (its NAR may yet replace it)
    assert_eq!(list(&dir), names);
    assert_eq!(lists(ino), 2, "{}", m.log_text());
    // the root changes when the bucket is listed again: asked every time
    let before = lists(1);
    list(&m.mnt);
    list(&m.mnt);
    assert_eq!(lists(1), before + 2);

    // verified: asked once more, then listed from the kernel's cache
    assert_eq!(
        std::fs::read_to_string(dir.join("greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    for _ in 0..3 {
        assert_eq!(list(&dir), names);
    }
    assert_eq!(lists(ino), 3, "{}", m.log_text());
}

/// As the real nix writes them (`compression=br` or `gzip`), with the listings
/// brotli-compressed as nix's S3 store stores them for `ls-compression=br` (the
/// setting cache.nixos.org uses).
#[test]
fn br_and_gzip_caches_with_compressed_listings() {
    use std::io::Write;
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::start();
    let proxy = common::proxy::Proxy::start(s3.port);
    let lib = format!("/nix/store/{}", f.path("narfs-test-lib"));
    for c in ["br", "gzip"] {
        let cache = tmp.path().join(c);
        run(
            nix(&["copy", "--store", &f.store, "--option", "substituters", ""])
                .arg("--to")
                .arg(format!(
                    "file://{}?compression={c}&write-nar-listing=1",
                    cache.display()
                ))
                .arg(&lib),
        );
        for e in std::fs::read_dir(&cache).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "ls") {
                let json = std::fs::read(&p).unwrap();
                let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
                w.write_all(&json).unwrap();
                std::fs::write(&p, w.into_inner()).unwrap();
            }
        }
        s3.upload_cache(&cache, c);
        let m = Mounted::start(&s3.url(proxy.port, c), &[&f.public_key], None, &[]);
        let mounted = m.p(f.path("narfs-test-lib"));
        // sizes from the compressed listing: no NAR fetched
        assert_eq!(
            std::fs::metadata(mounted.join("lib/greet.sh"))
                .unwrap()
                .len(),
            35
        );
        assert_eq!(proxy.downloads(&format!("{c}/nar/")), 0, "{}", m.log_text());
        assert!(
            !m.log_text().contains("ignoring listing"),
            "{}",
            m.log_text()
        );
        // contents from the verified NAR, identical to the store's
        assert_eq!(shape(&mounted), shape(&f.real("narfs-test-lib")), "{c}");
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&mounted)
            .arg(f.real("narfs-test-lib")));
        assert_eq!(proxy.downloads(&format!("{c}/nar/")), 1, "{c}");
    }
}

#[test]
fn noexec_mounts_serve_files_but_run_nothing() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--noexec"]);
    let app = m.p(f.path("narfs-test-app")).join("bin/app");
    assert!(std::fs::read(&app).unwrap().starts_with(b"#!"));
    let err = Command::new(&app).status().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    drop(m);
    // and without it, the same program runs
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let app = m.p(f.path("narfs-test-app")).join("bin/app");
    assert_eq!(run(&mut Command::new(&app)), "hello from lib\n");
}

#[test]
fn the_first_ls_shows_the_whole_cache_and_a_remount_answers_at_once() {
    let f = fixture();
    let e = env();
    let cache_dir = tempfile::tempdir().unwrap();
    let names = |m: &Mounted| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(&m.mnt)
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let want: std::collections::BTreeSet<String> = f.paths.values().cloned().collect();
    // a slow cache: every narinfo takes 300 ms
    e.proxy.delay(".narinfo", Duration::from_millis(300));
    {
        let m = Mounted::start(&e.url, &[&f.public_key], Some(cache_dir.path()), &[]);
        // right after the mount came up: the whole cache, not what was listed so far
        assert_eq!(names(&m), want);
        // a lookup by name does not wait for the listing
        let t = Instant::now();
        assert!(m.p(f.path("narfs-test-single.txt")).exists());
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    // a remount answers from what the last one verified, while listing takes 5 s
    e.proxy.clear_faults();
    e.proxy.delay("list-type", Duration::from_secs(5));
    let m = Mounted::start(&e.url, &[&f.public_key], Some(cache_dir.path()), &[]);
    let t = Instant::now();
    assert_eq!(names(&m), want);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_traversal_of_many_paths_fetches_what_it_listed_and_nothing_else() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_root(f.paths.len());
    // `find` looks into every path, from their listings: no NAR yet
    run(Command::new("find").arg(&m.mnt));
    assert_eq!(e.proxy.downloads("/nar/"), 0);
    // one path read (it references nothing) well after the look around: its NAR alone
    std::thread::sleep(Duration::from_millis(3500));
    let big = m.p(f.path("narfs-test-big"));
    assert_eq!(
        std::fs::read_to_string(big.join("data/small.txt")).unwrap(),
        "small\n"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(e.proxy.downloads("/nar/"), 1);
    // a second path read right after: a traversal, so the paths it listed and has not
    // read yet come in parallel, before anyone asks
    assert_eq!(
        std::fs::read_to_string(m.p(f.path("narfs-test-single.txt"))).unwrap(),
        "asdf"
    );
    let t = Instant::now();
    while e.proxy.downloads("/nar/") < f.paths.len() {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(m
        .log_text()
        .contains("prefetching a path the traversal listed"));
    // each once
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.proxy.downloads("/nar/"), f.paths.len());

    // a traversal that looks into a path while it reads another (as `find | xargs
    // cat` runs ahead of its reader): that path is fetched as soon as it is looked into
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_root(f.paths.len());
    let lib_nar = f.narinfo_field("narfs-test-lib", "URL");
    let before = e.proxy.downloads(&lib_nar);
    assert_eq!(
        std::fs::read_to_string(m.p(f.path("narfs-test-big")).join("data/small.txt")).unwrap(),
        "small\n"
    );
    run(Command::new("ls").arg(m.p(f.path("narfs-test-lib")).join("share")));
    let t = Instant::now();
    while e.proxy.downloads(&lib_nar) == before {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_traversal_that_looked_into_a_whole_closure_fetches_all_of_it_at_its_first_read() {
    let f = fixture();
    let e = env();
    let nar = |name: &str| f.narinfo_field(name, "URL");
    // `find` looks into big and lib only, and big is read at once: no closure holding
    // big was looked into whole but big's own, so nothing else comes
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_root(f.paths.len());
    for name in ["narfs-test-big", "narfs-test-lib"] {
        run(Command::new("find").arg(m.p(f.path(name))));
    }
    let small = m.p(f.path("narfs-test-big")).join("data/small.txt");
    assert_eq!(std::fs::read_to_string(&small).unwrap(), "small\n");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(e.proxy.downloads(&nar("narfs-test-big")), 1);
    assert_eq!(e.proxy.downloads("/nar/"), 1, "{}", m.log_text());
    drop(m);
    // `find` of every path and a read at once (`find | xargs cat`): app's closure
    // (app, lib, big, single) was looked into whole and holds big, so all of it is
    // fetched before anyone asks, each NAR once
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_root(f.paths.len());
    let before = e.proxy.downloads("/nar/");
    run(Command::new("find").arg(&m.mnt));
    let small = m.p(f.path("narfs-test-big")).join("data/small.txt");
    assert_eq!(std::fs::read_to_string(&small).unwrap(), "small\n");
    let t = Instant::now();
    while e.proxy.downloads("/nar/") < before + f.paths.len() {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.proxy.downloads("/nar/"), before + f.paths.len());
    for name in ["narfs-test-app", "narfs-test-lib", "narfs-test-single.txt"] {
        assert_eq!(e.proxy.downloads(&nar(name)), 1, "{name}");
    }
}

/// The object key (`nar/…`) a generated narinfo names.
fn nar_url(dir: &Path, basename: &str) -> String {
    narinfo_field_in(dir, basename, "URL")
}

#[test]
fn reference_prefetch_makes_way_for_readers_and_goes_on_for_its_own() {
    // gen-0 references gen-1: reading gen-0 prefetches gen-1, whose NAR comes slowly
    let (s3, dir, key, names) = generated("p", 3, 4 << 20, 1);
    let proxy = common::proxy::Proxy::start(s3.port);
    let (slow, waited) = (nar_url(&dir, &names[1]), nar_url(&dir, &names[2]));
    proxy.fault(&slow, common::proxy::Fault::Trickle(2 << 20), 1);
    proxy.fault(
        &waited,
        common::proxy::Fault::Delay(Duration::from_secs(6)),
        1,
    );
    let m = Mounted::start(&s3.url(proxy.port, "p"), &[&key], None, &[]);
    assert_eq!(
        std::fs::read(m.p(&names[0]).join("f0")).unwrap().len(),
        1 << 20
    );
    m.wait_log("prefetching a reference");
    // a reader waits for gen-2 (its NAR held back 6 s): the prefetch of gen-1 pauses
    let p2 = m.p(&names[2]).join("f0");
    let t = Instant::now();
    let reader = std::thread::spawn(move || {
        let n = std::fs::read(p2).unwrap().len();
        (n, Instant::now())
    });
    m.wait_log("prefetch paused: a reader waits for the network");
    // a reader of gen-1 itself lifts the pause: served long before gen-2
    assert_eq!(
        std::fs::read(m.p(&names[1]).join("f0")).unwrap().len(),
        1 << 20
    );
    let gen1_done = Instant::now();
    let (n, gen2_done) = reader.join().unwrap();
    assert_eq!(n, 1 << 20);
    assert!(
        gen1_done < gen2_done,
        "gen-1 after {:?}, gen-2 after {:?}\n{}",
        gen1_done - t,
        gen2_done - t,
        m.log_text()
    );
    // the prefetch let go of its connection and went on from where it stopped
    let log = m.log_text();
    assert!(log.contains("prefetch goes on"), "{log}");
    assert_eq!(proxy.gets(&slow), 2, "{:?}", proxy.requests());
}
