//! Paths with a signed file index (as `narfs push` writes them): metadata without NARs,
//! single files through Range GETs of their blocks, and every fault of an index or a
//! block ending in the whole-NAR path or in EIO for the files it touches, never in a
//! wrong byte.

mod common;

use common::proxy::Proxy;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn object(s3: &S3Server, key: &str) -> PathBuf {
    s3.root.join(BUCKET).join("ix").join(key)
}

/// NAR requests (whole or ranges), not narinfos.
fn nar_gets(p: &Proxy) -> Vec<String> {
    p.requests_with("/nar/")
        .into_iter()
        .filter(|r| r.starts_with("GET "))
        .collect()
}

/// `ls -lR` of a mount of the fixture's closure, each path's shape as in the store,
/// and no NAR asked for; returns the listing.
fn listed_without_nars(m: &Mounted, proxy: &Proxy) -> String {
    let f = fixture();
    m.wait_root(f.paths.len());
    let ls = run(Command::new("ls").arg("-lR").arg(&m.mnt));
    for name in f.paths.keys() {
        assert_eq!(shape(&m.p(f.path(name))), shape(&f.real(name)), "{name}");
    }
    assert_eq!(nar_gets(proxy), Vec::<String>::new());
    ls
}

/// Reads the small file of the big path, which takes Range GETs of its blocks alone;
/// returns the bytes they fetched.
fn small_file_by_its_blocks(m: &Mounted, proxy: &Proxy) -> u64 {
    let small = m.p(fixture().path("narfs-test-big")).join("data/small.txt");
    assert_eq!(std::fs::read_to_string(&small).unwrap(), "small\n");
    let gets = nar_gets(proxy);
    assert!(
        !gets.is_empty() && gets.iter().all(|g| g.contains(" range=bytes=")),
        "{gets:?}"
    );
    proxy.range_bytes("/nar/")
}

#[test]
fn indexed_paths_list_without_nars_and_read_files_by_their_blocks() {
    let f = fixture();
    let (_s3, proxy, m) = indexed_mount("xz", &[]);
    // ls -lR with link targets: every name, mode, size and target, no NAR at all
    let ls = listed_without_nars(&m, &proxy);
    assert!(ls.contains("app-link -> app"), "{ls}");
    assert_eq!(proxy.gets(".narfs-index"), f.paths.len());
    // a small file of the big path: its blocks only, with a Range GET
    let big_nar = f.narinfo_field("narfs-test-big", "NarSize");
    let fetched = small_file_by_its_blocks(&m, &proxy);
    assert!(
        fetched < 2 << 20,
        "{fetched} bytes fetched for a 6-byte file of a {big_nar}-byte NAR"
    );
    // every file, byte for byte, through blocks alone
    for name in f.paths.keys() {
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(m.p(f.path(name)))
            .arg(f.real(name)));
    }
    assert!(nar_gets(&proxy).iter().all(|g| g.contains(" range=")));
    m.runs_the_app();
    assert!(m.stat("block_requests_total{result=\"fetched\"}") > 0);
    assert_eq!(m.stat("nar_requests_total{result=\"fetched\"}"), 0);
}

/// The big path pushed with `compression`, its NAR object spoiled by `spoil`, mounted:
/// the file whose block is bad (numbers.txt) fails with EIO, the other file of the path
/// is served; once the object is repaired the file reads whole without a remount.
/// Returns the log of the spoiled reads.
fn spoiled_nar_fails_one_file_until_repaired(
    compression: &str,
    spoil: impl Fn(&mut [u8]),
) -> String {
    let f = fixture();
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let pk = push_closure_with(&s3, tmp.path(), compression);
    let url = narinfo_field_in(
        &s3.root.join(BUCKET).join("ix"),
        f.hash("narfs-test-big"),
        "URL",
    );
    let good = std::fs::read(object(&s3, &url)).unwrap();
    let mut bad = good.clone();
    spoil(&mut bad);
    std::fs::write(object(&s3, &url), &bad).unwrap();
    let m = Mounted::start(&s3.url(s3.port, "ix"), &[&pk], None, &["--timeout", "3"]);
    let big = m.p(f.path("narfs-test-big"));
    assert_eq!(read_err(&big.join("data/numbers.txt")), Some(libc::EIO));
    assert_eq!(
        std::fs::read_to_string(big.join("data/small.txt")).unwrap(),
        "small\n"
    );
    let log = m.log_text();
    // repaired: read again without a remount
    std::fs::write(object(&s3, &url), &good).unwrap();
    assert!(
        std::fs::read(big.join("data/numbers.txt")).unwrap()
            == std::fs::read(f.real("narfs-test-big").join("data/numbers.txt")).unwrap()
    );
    log
}

#[test]
fn a_block_that_decodes_to_other_bytes_fails_its_files_only_until_repaired() {
    // its first block (numbers.txt) spoiled
    let log = spoiled_nar_fails_one_file_until_repaired("xz", |bad| {
        for b in &mut bad[100..200] {
            *b ^= 0x55;
        }
    });
    assert!(
        log.contains(&format!("/nix/store/{}", fixture().path("narfs-test-big"))),
        "{log}"
    );
    assert!(log.contains("the block does not decode"), "{log}");
}

#[test]
fn forged_indexes_are_ignored_and_the_nar_is_read() {
    let f = fixture();
    let stranger = narfs::formats::keys::SecretKey::from_seed("ix-1", [9; 32]);
    type Forge = Box<dyn Fn(&S3Server, &str)>;
    let index_of = |s3: &S3Server, name: &str| object(s3, &format!("{name}.narfs-index"));
    let cases: Vec<(&str, Forge, &str)> = vec![
        (
            "signed by an untrusted key of the same name",
            Box::new(move |s3, h| {
                let path = index_of(s3, h);
                let bytes = std::fs::read(&path).unwrap();
                let at = bytes.windows(2).position(|w| w == b"\n\n").unwrap();
                let body = &bytes[at + 2..];
                let text = String::from_utf8_lossy(&bytes[..at]).into_owned();
                let fp = {
                    let get = |k: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                            .unwrap()
                            .to_owned()
                    };
                    format!(
                        "narfs-index-1;{};{};{};{};{}",
                        get("StorePath"),
                        get("NarHash"),
                        get("NarSize"),
                        get("BodyHash"),
                        get("BodySize")
                    )
                };
                let head: Vec<&str> = text.lines().filter(|l| !l.starts_with("Sig: ")).collect();
                let mut out = format!(
                    "{}\nSig: {}\n\n",
                    head.join("\n"),
                    stranger.sign(fp.as_bytes())
                )
                .into_bytes();
                out.extend_from_slice(body);
                std::fs::write(path, out).unwrap();
            }),
            "lacks a signature by a trusted key",
        ),
        (
            "of another store path",
            Box::new(move |s3, h| {
                let other = fixture().hash("narfs-test-lib").to_owned();
                std::fs::copy(index_of(s3, &other), index_of(s3, h)).unwrap();
            }),
            "file index is for",
        ),
        (
            "with its body changed",
            Box::new(move |s3, h| {
                let path = index_of(s3, h);
                let mut bytes = std::fs::read(&path).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(path, bytes).unwrap();
            }),
            "BodyHash",
        ),
        (
            "cut short",
            Box::new(move |s3, h| {
                let path = index_of(s3, h);
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
            }),
            "ignoring the file index",
        ),
        (
            "missing",
            Box::new(move |s3, h| std::fs::remove_file(index_of(s3, h)).unwrap()),
            "which the cache does not have",
        ),
    ];
    for (what, forge, why) in cases {
        let s3 = S3Server::start();
        let keys = tempfile::tempdir().unwrap();
        let pk = push_closure(&s3, keys.path());
        let h = f.hash("narfs-test-big");
        forge(&s3, h);
        let proxy = Proxy::start(s3.port);
        let m = Mounted::start(&s3.url(proxy.port, "ix"), &[&pk], None, &[]);
        let big = m.p(f.path("narfs-test-big"));
        run(Command::new("diff")
            .arg("-r")
            .arg(&big)
            .arg(f.real("narfs-test-big")));
        let log = m.log_text();
        assert!(log.contains(why), "{what}: {log}");
        assert!(
            log.contains(&format!("/nix/store/{}", f.path("narfs-test-big"))),
            "{what}"
        );
        // read from its whole NAR
        assert!(
            nar_gets(&proxy).iter().any(|g| !g.contains(" range=")),
            "{what}: {:?}",
            nar_gets(&proxy)
        );
        drop(m);
    }
}

#[test]
fn a_block_that_decodes_to_other_bytes_than_signed_fails_that_file() {
    // uncompressed blocks: a byte of numbers.txt changed decodes fine, to other bytes
    let log = spoiled_nar_fails_one_file_until_repaired("none", |bad| {
        let at = bad.windows(8).position(|w| w == b"\n123456\n").unwrap();
        bad[at + 1] = b'9';
    });
    assert!(log.contains("than the signed index says"), "{log}");
    assert!(
        log.contains("do not match their hash in the signed index"),
        "{log}"
    );
}

/// The narinfo objects of a cache under `prefix`, by hash.
fn narinfos(s3: &S3Server, prefix: &str) -> std::collections::BTreeMap<String, String> {
    let dir = s3.root.join(BUCKET).join(prefix);
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let hash = name.strip_suffix(".narinfo")?.to_owned();
            Some((hash, std::fs::read_to_string(dir.join(&name)).unwrap()))
        })
        .collect()
}

fn field<'a>(narinfo: &'a str, name: &str) -> Vec<&'a str> {
    narinfo
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
        .collect()
}

#[test]
fn a_cache_nix_wrote_is_indexed_in_place_and_nix_still_reads_it() {
    let f = fixture();
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = s3.upload_cache(&f.cache, "nix");
    let url = s3.url(s3.port, "nix");
    let sk = f.secret_key_file.to_str().unwrap();
    let index = |extra: &[&str]| {
        out(narfs()
            .args(["index", "--key-file", sk])
            .args(["--trusted-public-key", &f.public_key])
            .args(extra)
            .arg(&url))
    };
    // indexes with `extra`, and says `said` of every path
    let every_path = |extra: &[&str], said: &str| {
        let (code, _, err) = index(extra);
        assert_eq!(code, 0, "{err}");
        assert_eq!(err.matches(said).count(), f.paths.len(), "{err}");
    };
    let before = narinfos(&s3, "nix");
    assert_eq!(before.len(), f.paths.len());

    // --dry-run says what it would do and changes nothing
    every_path(&["--dry-run"], "would index ");
    assert_eq!(narinfos(&s3, "nix"), before);

    // a key the narinfos are not signed by, and no other: nothing is touched
    let (code, _, err) = out(narfs()
        .args(["index", "--key-file"])
        .arg(tmp.path().join("missing.sec"))
        .arg(&url));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing.sec"), "{err}");

    every_path(&[], "indexed /nix/store/");
    let after = narinfos(&s3, "nix");
    let mut replaced = 0;
    for (hash, old) in &before {
        let new = &after[hash];
        // what nix signed is as it was, signatures included
        for name in [
            "StorePath",
            "NarHash",
            "NarSize",
            "References",
            "Sig",
            "Deriver",
        ] {
            assert_eq!(field(old, name), field(new, name), "{name} of {hash}");
        }
        let index_key = field(new, "NarfsIndex");
        assert_eq!(index_key, vec![format!("{hash}.narfs-index")], "{new}");
        assert!(root.join(index_key[0]).exists());
        // the new NAR is there; the one nix wrote is gone unless it is the same
        // bytes (a one-block NAR packed as nix packs it)
        assert!(root.join(field(new, "URL")[0]).exists(), "{new}");
        if field(old, "URL") != field(new, "URL") {
            replaced += 1;
            assert!(!root.join(field(old, "URL")[0]).exists(), "{old}");
        }
    }
    let big_hash = f.hash("narfs-test-big");
    assert_ne!(
        field(&before[big_hash], "URL"),
        field(&after[big_hash], "URL")
    );
    assert!(replaced >= 1);

    // again: nothing to do
    every_path(&[], "already indexed ");
    assert_eq!(narinfos(&s3, "nix"), after);

    // the real nix copies the closure back from it, with the key it trusted before
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let back = format!("local?root={}", tmp.path().join("back").display());
    run(nix(&["copy", "--option", "substituters", ""])
        .args(["--option", "trusted-public-keys", &f.public_key])
        .arg("--from")
        .arg(format!("file://{}", root.display()))
        .args(["--to", &back])
        .arg(&app));
    assert_eq!(nar_hashes(&back, &app), nar_hashes(&f.store, &app));

    // a mount lists it without a NAR and reads a small file by its blocks
    let proxy = Proxy::start(s3.port);
    let purl = s3.url(proxy.port, "nix");
    {
        let m = Mounted::start(&purl, &[&f.public_key], None, &[]);
        listed_without_nars(&m, &proxy);
        assert!(small_file_by_its_blocks(&m, &proxy) < 2 << 20);
    }

    // narfs ls and cat: the index, no NAR; a file by its blocks only
    proxy.clear();
    let big = format!("/nix/store/{}", f.path("narfs-test-big"));
    let (code, text, err) = out(narfs()
        .args(["ls", "-lR", "--trusted-public-key", &f.public_key, &purl])
        .arg(format!("/nix/store/{}", f.path("narfs-test-app"))));
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("app-link -> app"), "{text}");
    assert_eq!(nar_gets(&proxy), Vec::<String>::new());
    let (code, text, err) = out(narfs()
        .args(["cat", "--trusted-public-key", &f.public_key, &purl])
        .arg(format!("{big}/data/small.txt")));
    assert_eq!(code, 0, "{err}");
    assert_eq!(text, "small\n");
    let gets = nar_gets(&proxy);
    assert!(
        !gets.is_empty() && gets.iter().all(|g| g.contains(" range=bytes=")),
        "{gets:?}"
    );

    // narfs verify checks every index against its NAR
    let (code, text, err) =
        out(narfs().args(["verify", "--trusted-public-key", &f.public_key, &url]));
    assert_eq!(code, 0, "{text}{err}");
    assert_eq!(text.matches("ok ").count(), f.paths.len(), "{text}");
    // another path's index, signed by the same trusted key, in the big path's place
    let lib_index = root.join(format!("{}.narfs-index", f.hash("narfs-test-lib")));
    std::fs::copy(&lib_index, root.join(format!("{big_hash}.narfs-index"))).unwrap();
    let (code, text, _) = out(narfs()
        .args(["verify", "--trusted-public-key", &f.public_key, &url])
        .arg(&big));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("FAILED {big}: file index")) && text.contains(".narfs-index"),
        "{text}"
    );
}

#[test]
fn a_slice_of_a_big_file_costs_about_its_own_size() {
    use std::io::{Read, Seek, SeekFrom};
    let f = fixture();
    let (_s3, proxy, m) = indexed_mount("none", &[]);
    let rel = "data/numbers.txt";
    let real = std::fs::read(f.real("narfs-test-big").join(rel)).unwrap();
    assert!(real.len() > 20 << 20);
    // 1 MiB from the middle of a 20 MiB file
    let mut file = std::fs::File::open(m.p(f.path("narfs-test-big")).join(rel)).unwrap();
    file.seek(SeekFrom::Start(10 << 20)).unwrap();
    let mut got = vec![0; 1 << 20];
    file.read_exact(&mut got).unwrap();
    assert!(got == real[10 << 20..11 << 20]);
    let fetched = proxy.range_bytes("/nar/");
    assert_eq!(proxy.gets("/nar/"), nar_gets(&proxy).len());
    assert!(
        nar_gets(&proxy).iter().all(|g| g.contains(" range=bytes=")),
        "{:?}",
        nar_gets(&proxy)
    );
    // the chunk(s) it spans and the blocks around them, not the file
    assert!(
        (1 << 20..=4 << 20).contains(&fetched),
        "{fetched} bytes fetched for 1 MiB of a {}-byte file",
        real.len()
    );
}

#[test]
fn blocks_cut_off_midway_are_fetched_again_and_served_whole() {
    use common::proxy::Fault;
    let f = fixture();
    let (_s3, proxy, m) = indexed_mount("xz", &[]);
    let big = m.p(f.path("narfs-test-big"));
    // the first block responses die after a few KiB (while the decoder is streaming
    // them), one more gets a 500
    proxy.fault("/nar/", Fault::CutAfter(3000), 2);
    proxy.fault("/nar/", Fault::Status(500), 1);
    let got = std::fs::read(big.join("data/numbers.txt")).unwrap();
    assert!(got == std::fs::read(f.real("narfs-test-big").join("data/numbers.txt")).unwrap());
    assert!(nar_gets(&proxy).len() >= 4, "{:?}", nar_gets(&proxy));
    assert!(
        !m.log_text().contains("decode to other bytes"),
        "{}",
        m.log_text()
    );
}

#[test]
fn a_cache_with_indexes_is_read_without_opens_and_never_from_a_listing() {
    let f = fixture();
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "ix-1");
    let push = |extra: &[&str], name: &str| {
        let (code, _, err) = out(narfs()
            .args(["push", "--store", &f.store, "--key-file"])
            .arg(&sk)
            .args(extra)
            .arg(s3.url(s3.port, "ix"))
            .arg(format!("/nix/store/{}", f.path(name))));
        assert_eq!(code, 0, "{err}");
    };
    // the library without an index, then the closure with: the library keeps none
    push(&["--no-index"], "narfs-test-lib");
    let info = std::fs::read_to_string(object(&s3, "nix-cache-info")).unwrap();
    assert!(!info.contains("NarfsIndexes"), "{info}");
    push(&[], "narfs-test-app");
    let info = std::fs::read_to_string(object(&s3, "nix-cache-info")).unwrap();
    assert!(
        info.contains("StoreDir: /nix/store\n") && info.contains("NarfsIndexes: 1\n"),
        "{info}"
    );
    let lib_hash = f.hash("narfs-test-lib");
    assert!(!object(&s3, &format!("{lib_hash}.narfs-index")).exists());
    // the library's unsigned listing lies about a size
    let ls = object(&s3, &format!("{lib_hash}.ls"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ls).unwrap()).unwrap();
    let size = &mut v["root"]["entries"]["lib"]["entries"]["greet.sh"]["size"];
    assert_eq!(*size, 35);
    *size = 5.into();
    std::fs::write(&ls, v.to_string()).unwrap();

    let m = Mounted::start(&s3.url(s3.port, "ix"), &[&pk], None, &[]);
    m.wait_log("opens need no round trip");
    let real = f.real("narfs-test-lib").join("lib/greet.sh");
    let greet = m.p(f.path("narfs-test-lib")).join("lib/greet.sh");
    assert_eq!(
        std::fs::metadata(&greet).unwrap().len(),
        std::fs::metadata(&real).unwrap().len()
    );
    assert_eq!(
        std::fs::read(&greet).unwrap(),
        std::fs::read(&real).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(m.p(f.path("narfs-test-big")).join("data/small.txt")).unwrap(),
        "small\n"
    );
    m.runs_the_app();
    drop(m);
    // --page-cache keeps the open round trip and uses the listing (its size given
    // with no cache time, refuted once the NAR is read)
    let m = Mounted::start(&s3.url(s3.port, "ix"), &[&pk], None, &["--page-cache"]);
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-lib")).join("lib/greet.sh")).unwrap(),
        std::fs::read(&real).unwrap()
    );
    assert!(!m.log_text().contains("opens need no round trip"));
}

/// `narfs index` of the cache under `prefix`, signing with the fixture's key.
fn index_with_fixture_key(s3: &S3Server, prefix: &str) -> (i32, String, String) {
    let f = fixture();
    out(narfs()
        .args(["index", "--key-file"])
        .arg(&f.secret_key_file)
        .args(["--trusted-public-key", &f.public_key])
        .arg(s3.url(s3.port, prefix)))
}

/// The real nix copies `paths` out of the `file://` cache at `root` into a new store
/// under `dir`; returns that store.
fn nix_copy_from(root: &Path, paths: &[&str], dir: &Path) -> String {
    let back = format!("local?root={}", dir.join("back").display());
    run(nix(&["copy", "--option", "substituters", ""])
        .args(["--option", "trusted-public-keys", &fixture().public_key])
        .arg("--from")
        .arg(format!("file://{}", root.display()))
        .args(["--to", &back])
        .args(paths));
    back
}

#[test]
fn index_replaces_an_object_planted_where_the_packed_nar_goes() {
    let f = fixture();
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let big = f.hash("narfs-test-big");
    // the key of a repacked NAR is deterministic: indexing a copy of the cache tells it
    let probe = s3.upload_cache(&f.cache, "probe");
    let (code, _, err) = index_with_fixture_key(&s3, "probe");
    assert_eq!(code, 0, "{err}");
    let new_url = field(&narinfos(&s3, "probe")[big], "URL")[0].to_owned();
    let packed = std::fs::read(probe.join(&new_url)).unwrap();
    let root = s3.upload_cache(&f.cache, "nix");
    assert_ne!(field(&narinfos(&s3, "nix")[big], "URL"), [new_url.as_str()]);
    std::fs::write(root.join(&new_url), vec![0x5a; 4096]).unwrap();

    let (code, _, err) = index_with_fixture_key(&s3, "nix");
    assert_eq!(code, 0, "{err}");
    assert_eq!(field(&narinfos(&s3, "nix")[big], "URL"), [new_url.as_str()]);
    assert!(
        std::fs::read(root.join(&new_url)).unwrap() == packed,
        "the narinfo names the planted object"
    );
    assert!(
        err.contains(&new_url) && err.contains("replacing it"),
        "{err}"
    );
    let (code, text, err) = out(narfs().args([
        "verify",
        "--trusted-public-key",
        &f.public_key,
        &s3.url(s3.port, "nix"),
    ]));
    assert_eq!(code, 0, "{text}{err}");
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let back = nix_copy_from(&root, &[&app], tmp.path());
    assert_eq!(nar_hashes(&back, &app), nar_hashes(&f.store, &app));
}

#[test]
fn index_keeps_a_nar_that_a_narinfo_repeating_its_url_line_still_names() {
    let f = fixture();
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    // two paths with the same contents: nix writes one NAR both narinfos name
    // (uncompressed, so that narfs's packing of it gets another key)
    let store = format!("local?root={}", tmp.path().join("root").display());
    let mut paths = Vec::new();
    for name in ["shared-a", "shared-b"] {
        let file = tmp.path().join(name);
        std::fs::write(&file, "the same bytes\n").unwrap();
        let p = run(nix(&["store", "add-file", "--store", &store]).arg(&file));
        paths.push(p.trim().to_owned());
    }
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    run(nix(&["store", "sign", "--store", &store, "--key-file"])
        .arg(&f.secret_key_file)
        .args(&paths));
    let cache = tmp.path().join("cache");
    run(
        nix(&["copy", "--store", &store, "--option", "substituters", ""])
            .arg("--to")
            .arg(format!("file://{}?compression=none", cache.display()))
            .args(&paths),
    );
    let root = s3.upload_cache(&cache, "dup");
    let hash = |p: &str| p["/nix/store/".len()..][..32].to_owned();
    let (a, b) = (hash(paths[0]), hash(paths[1]));
    let read = |h: &str| std::fs::read_to_string(root.join(format!("{h}.narinfo"))).unwrap();
    let shared = field(&read(&a), "URL")[0].to_owned();
    assert_eq!(field(&read(&b), "URL"), [shared.as_str()]);
    // b's narinfo says its URL twice: nix reads it, and its signature still holds
    let b_info = format!("{}URL: {shared}\n", read(&b));
    std::fs::write(root.join(format!("{b}.narinfo")), b_info).unwrap();

    let (code, _, err) = index_with_fixture_key(&s3, "dup");
    // a is indexed; b is refused by narfs's strict parser and left as it was
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("indexed {}", paths[0])), "{err}");
    assert!(
        err.contains(&format!("{b}.narinfo")) && err.contains("URL appears more than once"),
        "{err}"
    );
    assert_ne!(field(&read(&a), "URL"), [shared.as_str()]);
    assert!(root.join(&shared).exists(), "{err}");
    let back = nix_copy_from(&root, &paths, tmp.path());
    for p in paths {
        assert_eq!(nar_hashes(&back, p), nar_hashes(&store, p));
    }
}
