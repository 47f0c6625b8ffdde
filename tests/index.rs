//! The lazy index: metadata from narinfos and `.ls` listings without NAR downloads,
//! single-flight fetches, the negative cache and remounts served from disk.

mod common;

use common::proxy::Proxy;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn ls_lr_of_the_closure_downloads_no_nar() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(
        &e.url,
        &[&f.public_key],
        None,
        &["--prefetch-references", "false"],
    );
    m.wait_root(f.paths.len());
    // paths without symlinks: names, types, modes and sizes with no NAR at all
    let no_links = ["narfs-test-lib", "narfs-test-big", "narfs-test-single.txt"];
    for name in no_links {
        assert_eq!(shape(&m.p(f.path(name))), shape(&f.real(name)), "{name}");
    }
    let ls = run(Command::new("ls").arg("-lR").arg(&m.mnt));
    assert!(ls.contains("numbers.txt"));
    // symlink targets are content: showing them fetches (and verifies) exactly the
    // NAR of the one path that has symlinks, never trusting the unsigned listing
    let app_nar = f.narinfo_field("narfs-test-app", "URL");
    assert_eq!(e.proxy.downloads(".nar.xz"), 1, "{:?}", e.proxy.requests());
    assert_eq!(e.proxy.downloads(&app_nar), 1);
    assert_eq!(
        shape(&m.p(f.path("narfs-test-app"))),
        shape(&f.real("narfs-test-app"))
    );
    // reading one file fetches exactly its path's NAR
    let lib = m.p(f.path("narfs-test-lib"));
    assert_eq!(
        std::fs::read_to_string(lib.join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    assert_eq!(e.proxy.downloads(".nar.xz"), 2);
    assert_eq!(
        e.proxy.downloads(&f.narinfo_field("narfs-test-lib", "URL")),
        1
    );
    // and each .ls was asked for once
    for name in f.paths.keys() {
        assert_eq!(e.proxy.gets(&format!("{}.ls", f.hash(name))), 1, "{name}");
    }
}

#[test]
fn fifty_cold_readers_one_nar_get() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let p = m.p(f.path("narfs-test-big")).join("data/numbers.txt");
    let want = std::fs::read(f.real("narfs-test-big").join("data/numbers.txt")).unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(50));
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let (p, b) = (p.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                std::fs::read(p).unwrap()
            })
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == want);
    }
    assert_eq!(
        e.proxy.downloads(&f.narinfo_field("narfs-test-big", "URL")),
        1
    );
    assert_eq!(
        e.proxy
            .gets(&format!("{}.narinfo", f.hash("narfs-test-big"))),
        1
    );
}

#[test]
fn missing_path_is_asked_for_once_within_the_ttl() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--refresh-interval", "0"]);
    let missing = "0000000000000000000000000000000a-not-there";
    for _ in 0..5 {
        assert_eq!(read_err(&m.p(missing)), Some(libc::ENOENT));
    }
    assert_eq!(e.proxy.gets("0000000000000000000000000000000a.narinfo"), 1);
    // with a zero TTL every lookup asks again, and a path pushed later appears
    let single = f.path("narfs-test-single.txt");
    let key = e.object_of("narfs-test-single.txt", "narinfo");
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let m2 = Mounted::start(
        &e.url,
        &[&f.public_key],
        None,
        &["--negative-ttl", "0", "--refresh-interval", "0"],
    );
    assert_eq!(read_err(&m2.p(single)), Some(libc::ENOENT));
    std::fs::write(&key, saved).unwrap();
    assert_eq!(std::fs::read(m2.p(single)).unwrap(), b"asdf");
}

#[test]
fn lookups_work_without_list_rights_and_new_paths_appear_on_refresh() {
    let f = fixture();
    let e = env();
    // the bucket starts with only nix-cache-info and the single file's narinfo
    let hidden = tempfile::tempdir().unwrap();
    for name in ["narfs-test-app", "narfs-test-lib", "narfs-test-big"] {
        let k = format!("{}.narinfo", f.hash(name));
        std::fs::rename(e.object(&k), hidden.path().join(&k)).unwrap();
    }
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--refresh-interval", "1"]);
    assert_eq!(
        m.wait_root(1),
        vec![f.path("narfs-test-single.txt").to_owned()]
    );
    for name in ["narfs-test-app", "narfs-test-lib", "narfs-test-big"] {
        let k = format!("{}.narinfo", f.hash(name));
        std::fs::rename(hidden.path().join(&k), e.object(&k)).unwrap();
    }
    // a name not listed yet is looked up directly
    let app = m.p(f.path("narfs-test-app"));
    assert_eq!(
        run(&mut Command::new(app.join("bin/app"))),
        "hello from lib\n"
    );
    // and the rest appears with the next listing, without remounting
    wait_for("the new paths", Duration::from_secs(10), || {
        m.wait_root(0).len() >= f.paths.len()
    });
}

#[test]
fn remount_serves_from_disk_without_gets() {
    let f = fixture();
    let e = env();
    let cache_dir = tempfile::tempdir().unwrap();
    {
        let m = Mounted::start(
            &e.url,
            &[&f.public_key],
            Some(cache_dir.path()),
            &["--prefetch-references", "false"],
        );
        m.wait_log("listed the cache");
        run(Command::new("cat").arg(m.p(f.path("narfs-test-app")).join("bin/app")));
        assert!(m.stop().success());
    }
    e.proxy.clear();
    let m = Mounted::start(
        &e.url,
        &[&f.public_key],
        Some(cache_dir.path()),
        &["--refresh-interval", "0", "--prefetch-references", "false"],
    );
    // the root is ready from disk
    m.wait_log("loaded verified paths from the cache directory");
    let t = Instant::now();
    assert_eq!(m.wait_root(f.paths.len()).len(), f.paths.len());
    eprintln!("root listing after remount: {} ms", t.elapsed().as_millis());
    run(Command::new("cat").arg(m.p(f.path("narfs-test-app")).join("bin/app")));
    let gets = e.proxy.requests_with(".nar");
    assert!(gets.is_empty(), "{gets:?}");
    // a different trusted key does not inherit what the first one verified
    drop(m);
    e.proxy.clear();
    let other = "other-key:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=";
    let m = Mounted::start(
        &e.url,
        &[other],
        Some(cache_dir.path()),
        &["--refresh-interval", "0"],
    );
    m.wait_log("listed the cache");
    assert!(m.wait_root(0).is_empty());
}

#[test]
fn listing_disagreeing_with_the_nar_loses() {
    let f = fixture();
    let e = env();
    // a .ls claiming a different size and an extra file
    e.edit_object_of("narfs-test-lib", "ls", |text| {
        let lie = text
            .replace(
                "\"greet.sh\":{\"type\":\"regular\",\"size\":35",
                "\"greet.sh\":{\"type\":\"regular\",\"size\":99",
            )
            .replace(
                "\"entries\":{\"greet.sh\"",
                "\"entries\":{\"extra\":{\"type\":\"regular\",\"size\":1},\"greet.sh\"",
            );
        assert_ne!(lie, text);
        lie
    });
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let lib = m.p(f.path("narfs-test-lib")).join("lib");
    assert_eq!(std::fs::metadata(lib.join("greet.sh")).unwrap().len(), 99);
    // content comes from the verified NAR, and the metadata follows it
    let content = std::fs::read_to_string(lib.join("greet.sh")).unwrap();
    assert_eq!(content, "greet() { echo \"hello from lib\"; }\n");
    let t = Instant::now();
    loop {
        let size = std::fs::metadata(lib.join("greet.sh")).unwrap().len();
        let extra = lib.join("extra").exists();
        if size == 35 && !extra {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "kernel still shows the listing: size {size}, extra {extra}\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(m.log_text().contains("disagrees with its verified NAR"));
    assert_eq!(
        shape(&m.p(f.path("narfs-test-lib"))),
        shape(&f.real("narfs-test-lib"))
    );
}

#[test]
fn listing_sizes_never_shorten_or_empty_a_file() {
    // sizes come from the unsigned listing until the NAR is verified; an open waits
    // for the NAR, so a lying size can neither empty nor cut what is read
    let f = fixture();
    let e = env();
    let args = ["--prefetch-references", "false"];
    let m = Mounted::start(&e.url, &[&f.public_key], None, &args);
    let empty = m.p(f.path("narfs-test-lib")).join("share/empty-file");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    assert_eq!(e.proxy.downloads(".nar.xz"), 0);
    assert_eq!(std::fs::read(&empty).unwrap(), b"");
    assert_eq!(e.proxy.downloads(".nar.xz"), 1, "{:?}", e.proxy.requests());
    drop(m);

    let e = env();
    e.edit_object_of("narfs-test-lib", "ls", |text| {
        let lie = text
            .replace(
                "\"a file with spaces\":{\"type\":\"regular\",\"size\":11",
                "\"a file with spaces\":{\"type\":\"regular\",\"size\":0",
            )
            .replace(
                "\"greet.sh\":{\"type\":\"regular\",\"size\":35",
                "\"greet.sh\":{\"type\":\"regular\",\"size\":5",
            );
        assert_eq!(
            lie.matches("\"size\":0").count(),
            text.matches("\"size\":0").count() + 1
        );
        lie
    });
    let m = Mounted::start(&e.url, &[&f.public_key], None, &args);
    let lib = m.p(f.path("narfs-test-lib"));
    let spaces = lib.join("share/a file with spaces");
    let greet = lib.join("lib/greet.sh");
    assert_eq!(std::fs::metadata(&spaces).unwrap().len(), 0);
    assert_eq!(std::fs::metadata(&greet).unwrap().len(), 5);
    assert_eq!(std::fs::read(&spaces).unwrap(), b"with space\n");
    assert_eq!(
        std::fs::read_to_string(&greet).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    // mmap after fstat, as many readers do
    let py = run(Command::new("python3").arg("-c").arg(
        "import mmap,sys\nwith open(sys.argv[1],'rb') as f:\n  m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n  sys.stdout.write(m[:].decode())",
    ).arg(&greet));
    assert_eq!(py, "greet() { echo \"hello from lib\"; }\n");
    assert_eq!(e.proxy.downloads(".nar.xz"), 1);
}

#[test]
fn no_open_mode_uses_no_listing_and_serves_the_closure() {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--no-open"]);
    for name in f.paths.keys() {
        assert_eq!(shape(&m.p(f.path(name))), shape(&f.real(name)), "{name}");
    }
    let lib = m.p(f.path("narfs-test-lib"));
    assert_eq!(std::fs::read(lib.join("share/empty-file")).unwrap(), b"");
    assert_eq!(
        std::fs::read_to_string(lib.join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    // the first look inside each path fetched its NAR; no listing was asked for
    assert_eq!(e.proxy.gets(".ls"), 0, "{:?}", e.proxy.requests());
    assert_eq!(e.proxy.downloads(".nar.xz"), f.paths.len());
    // and reading everything again asks for nothing
    let before = e.proxy.requests().len();
    for name in f.paths.keys() {
        let _ = Command::new("sh")
            .arg("-c")
            .arg("find . -type f -exec cat {} + >/dev/null")
            .current_dir(m.p(f.path(name)))
            .status();
    }
    assert_eq!(e.proxy.requests().len(), before);
}

#[test]
fn malformed_listing_falls_back_to_the_nar() {
    let f = fixture();
    let e = env();
    std::fs::write(
        e.object_of("narfs-test-app", "ls"),
        b"{\"version\":7,\"root\":{\"type\":\"regular\",\"size\":1}}",
    )
    .unwrap();
    std::fs::write(e.object_of("narfs-test-lib", "ls"), b"\xff\xfe garbage").unwrap();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    for name in ["narfs-test-app", "narfs-test-lib"] {
        assert_eq!(shape(&m.p(f.path(name))), shape(&f.real(name)), "{name}");
    }
    let log = m.log_text();
    assert!(log.contains("only version 1 is known"), "{log}");
    assert!(log.contains("its NAR will be used instead"), "{log}");
}

#[test]
fn thousands_of_paths_list_across_pages() {
    let s3 = S3Server::start();
    let dir = s3.root.join(BUCKET).join("gen");
    let key = generate_cache(&dir, 2500, 10);
    let proxy = Proxy::start(s3.port);
    let m = Mounted::start(
        &s3.url(proxy.port, "gen"),
        &[&key],
        None,
        &["--refresh-interval", "0"],
    );
    m.wait_log("listed the cache");
    assert_eq!(m.wait_root(2500).len(), 2500);
    assert!(
        proxy.gets("list-type=2") >= 3,
        "ListObjectsV2 is paginated: {:?}",
        proxy.gets("list-type=2")
    );
    // a path with a listing shows its tree without any NAR
    let first = m
        .wait_root(2500)
        .into_iter()
        .find(|n| n.ends_with("-generated-path-0"))
        .unwrap();
    let tool = m.p(&first).join("bin/tool");
    let meta = std::fs::metadata(&tool).unwrap();
    assert_eq!(meta.len(), 100);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o555);
    assert_eq!(proxy.downloads(".nar.xz"), 0);
    // its content cannot be read: the generated cache has no NARs
    assert_eq!(read_err(&tool), Some(libc::EIO));
    let (rss, _) = rss_kib(m.pid());
    eprintln!("2500 paths listed; narfs RSS {rss} KiB");
}

#[test]
fn opening_a_path_prefetches_its_references() {
    let f = fixture();
    let e = env();
    let app = f.path("narfs-test-app");
    let lib_nar = f.narinfo_field("narfs-test-lib", "URL");
    {
        let m = Mounted::start(
            &e.url,
            &[&f.public_key],
            None,
            &["--prefetch-references", "false"],
        );
        std::fs::read(m.p(app).join("bin/app")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            e.proxy.downloads(&lib_nar),
            0,
            "prefetched although disabled"
        );
    }
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    std::fs::read(m.p(app).join("bin/app")).unwrap();
    let t = Instant::now();
    for name in ["narfs-test-lib", "narfs-test-big", "narfs-test-single.txt"] {
        while !cache_holds(&m.cache_dir, &f.narinfo_field(name, "NarHash"), &[]) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{name} was not prefetched:\n{}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(e.proxy.downloads(&lib_nar), 1);
    // and reading it now needs no download
    assert_eq!(
        std::fs::read_to_string(m.p(f.path("narfs-test-lib")).join("lib/greet.sh"))
            .unwrap()
            .len(),
        35
    );
    assert_eq!(e.proxy.downloads(&lib_nar), 1);
}

#[test]
fn a_forged_listing_never_redirects_a_symlink_or_a_path() {
    let f = fixture();
    let e = env();
    // the listing claims bin/app-link points to /tmp/evil, and that the app's
    // `lib` symlink is a directory holding `secret`
    e.edit_object_of("narfs-test-app", "ls", |text| {
    let forged = text
        .replace("\"app-link\":{\"type\":\"symlink\",\"target\":\"app\"}", "\"app-link\":{\"type\":\"symlink\",\"target\":\"/tmp/evil\"}")
        .replace(
            &format!("\"lib\":{{\"type\":\"symlink\",\"target\":\"/nix/store/{}/lib\"}}", f.path("narfs-test-lib")),
            "\"lib\":{\"type\":\"directory\",\"entries\":{\"secret\":{\"type\":\"regular\",\"size\":10}}}",
        );
    assert!(
        forged.contains("/tmp/evil") && forged.contains("secret"),
        "{forged}"
    );
    forged
    });
    let m = Mounted::start(
        &e.url,
        &[&f.public_key],
        None,
        &["--prefetch-references", "false"],
    );
    let app = m.p(f.path("narfs-test-app"));
    // the target shown is the NAR's
    assert_eq!(
        std::fs::read_link(app.join("bin/app-link")).unwrap(),
        std::path::Path::new("app")
    );
    // the forged directory is gone, and what was looked up through it is stale
    let secret = app.join("lib/secret");
    let err = std::fs::read(&secret).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ESTALE) | Some(libc::ENOTDIR)
        ),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(app.join("lib"))
        .unwrap()
        .file_type()
        .is_symlink());
}
