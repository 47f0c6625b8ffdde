//! Hostile caches: every malformed or malicious narinfo and NAR is refused with a log
//! line naming the store path and the fault, ENOENT (narinfo) or EIO (NAR), nothing
//! left in the cache directory, neighbours still served, and a repaired object picked
//! up by the next access without remounting.

mod common;

use common::*;
use narfs::formats::hash::Sha256;
use narfs::formats::keys::SecretKey;
use narfs::formats::listing::Entry;
use narfs::formats::nar::Writer;
use narfs::formats::narinfo::{Compression, NarInfo};
use std::io::Write;

fn dir_nar(names: &[&[u8]]) -> Vec<u8> {
    let mut nar = strings(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for n in names {
        // a file holding "x"
        nar.extend(strings(&[b"entry", b"(", b"name", n, b"node", b"("]));
        nar.extend(strings(&[
            b"type",
            b"regular",
            b"contents",
            b"x",
            b")",
            b")",
        ]));
    }
    nar.extend(strings(&[b")"]));
    nar
}

fn symlink_nar(target: &[u8]) -> Vec<u8> {
    strings(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        target,
        b")",
    ])
}

/// A file holding "x" at the bottom of `depth` directories named `d`.
fn deep_nar(depth: usize) -> Vec<u8> {
    let mut e = Entry::Regular {
        size: 1,
        executable: false,
        chunks: None,
        nar_offset: None,
    };
    for _ in 0..depth {
        e = Entry::Directory {
            entries: vec![((*b"d").into(), e)],
        };
    }
    Writer::new(Vec::new())
        .dump_entry(&e, &mut |_| Ok(b"x".to_vec()))
        .unwrap()
}

/// xz of a NAR header claiming a 256 MiB file, then 256 MiB of zeros: a few hundred
/// KiB compressed.
fn bomb() -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 0);
    let mut head = strings(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    head.extend_from_slice(&(256u64 << 20).to_le_bytes());
    e.write_all(&head).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        e.write_all(&zeros).unwrap();
    }
    e.finish().unwrap()
}

/// `nar` as xz streams (one per part, split at `cuts`) of 256 KiB blocks with their
/// sizes in the headers, as Nix's `parallel-compression` writes them, so that the
/// blocks are decoded side by side.
fn xz_blocks(nar: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([&nar.len()]) {
        // xz(1) in threaded mode writes each block's sizes into its header
        let mut xz = std::process::Command::new("xz")
            .args([
                "-z",
                "-c",
                "-1",
                "-T2",
                "--block-size=262144",
                "--check=crc64",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = xz.stdin.take().unwrap();
        let part = nar[from..to].to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&part).unwrap());
        let o = xz.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(o.status.success());
        out.extend(o.stdout);
        from = to;
    }
    out
}

/// Where the second block of an xz stream starts: after the stream header (12
/// bytes) and the first block (its header, its compressed size from that header,
/// padding to 4 bytes, its CRC64).
fn second_block(xz: &[u8]) -> usize {
    let header = (xz[12] as usize + 1) * 4;
    assert!(xz[13] & 0x40 != 0, "no compressed size in the block header");
    let (mut size, mut shift, mut i) = (0usize, 0, 14);
    loop {
        size |= ((xz[i] & 0x7f) as usize) << shift;
        shift += 7;
        i += 1;
        if xz[i - 1] & 0x80 == 0 {
            break;
        }
    }
    12 + header + size.div_ceil(4) * 4 + 8
}

#[test]
fn nars_of_many_xz_blocks_and_streams_are_served() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let contents = noise(3 << 20, 7);
    let nar = file_nar(&contents);
    let base = cache.put(
        "blocks",
        &nar,
        Compression::Xz,
        &xz_blocks(&nar, &[1 << 20]),
        |_| {},
    );
    let m = cache.mount(&s3, &["--refresh-interval", "0", "--timeout", "5"]);
    assert!(std::fs::read(m.p(&base)).unwrap() == contents);
}

#[test]
fn hostile_nars_are_refused_and_repairs_picked_up() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let neighbour = cache.put_good("neighbour");
    let m = cache.mount(&s3, &["--refresh-interval", "0", "--timeout", "5"]);

    let none = |nar: Vec<u8>| (nar.clone(), Compression::None, nar);
    // each case's signed NAR is its own: a NAR already verified (the same NarHash)
    // would be served from the disk cache without a fetch, whatever the path
    let flipped = {
        let good = file_nar(b"good content 1\n");
        let mut bad = good.clone();
        let at = bad.windows(4).position(|w| w == b"good").unwrap();
        bad[at] ^= 1;
        (good, Compression::None, bad) // signed NarHash of the good one, bytes of the bad
    };
    let truncated = {
        let good = file_nar(b"good content 2\n");
        (
            good.clone(),
            Compression::None,
            good[..good.len() - 12].to_vec(),
        )
    };
    let longer = {
        let good = file_nar(b"good content 3\n");
        let mut l = good.clone();
        l.extend_from_slice(&[0u8; 64]);
        (good, Compression::None, l)
    };
    let bomb_file = bomb();
    // xz of several blocks: the second block's header damaged, or the stream cut
    let blocks = |seed: u64, edit: &dyn Fn(&mut Vec<u8>)| {
        let nar = file_nar(&noise(1 << 20, seed));
        let mut xz = xz_blocks(&nar, &[]);
        edit(&mut xz);
        (nar, Compression::Xz, xz)
    };
    let bad_header = blocks(1, &|xz| {
        let second = second_block(xz);
        xz[second + 2] ^= 0x55;
    });
    let cut = blocks(2, &|xz| xz.truncate(xz.len() * 2 / 3));
    let tiny = file_nar(b"tiny");
    type Case = (&'static str, (Vec<u8>, Compression, Vec<u8>), &'static str);
    let cases: Vec<Case> = vec![
        ("one-byte-flipped", flipped, "NarHash mismatch"),
        ("truncated", truncated, "truncated"),
        ("xz-block-header", bad_header, "data error"),
        ("xz-blocks-cut", cut, "truncated"),
        ("longer-than-narsize", longer, "longer than"),
        (
            "bomb",
            (tiny.clone(), Compression::Xz, bomb_file),
            "longer than",
        ),
        (
            "unknown-compression",
            (
                tiny.clone(),
                Compression::Unknown("lz4".into()),
                tiny.clone(),
            ),
            "unsupported compression 'lz4'",
        ),
        ("name-dot", none(dir_nar(&[b"."])), "name '.' or '..'"),
        ("name-dotdot", none(dir_nar(&[b".."])), "name '.' or '..'"),
        ("name-empty", none(dir_nar(&[b""])), "empty name"),
        ("name-slash", none(dir_nar(&[b"a/b"])), "containing '/'"),
        ("name-nul", none(dir_nar(&[b"a\0b"])), "containing NUL"),
        (
            "duplicate",
            none(dir_nar(&[b"a", b"a"])),
            "unsorted or duplicate",
        ),
        (
            "unsorted",
            none(dir_nar(&[b"b", b"a"])),
            "unsorted or duplicate",
        ),
        (
            "target-nul",
            none(symlink_nar(b"/etc\0/passwd")),
            "symlink target containing NUL",
        ),
        (
            "target-long",
            none(symlink_nar(&[b'a'; 5000])),
            "longer than 4095",
        ),
        ("deep", none(deep_nar(400)), "nests deeper"),
        (
            "unknown-tag",
            none(strings(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"])),
            "expected a node type",
        ),
        (
            "trailing",
            none({
                let mut t = file_nar(b"x");
                t.extend_from_slice(&strings(&[b"junk"]));
                t
            }),
            "trailing data",
        ),
    ];
    for (name, (signed_nar, compression, file), why) in cases {
        let base = cache.put(
            &format!("bad-{name}"),
            &signed_nar,
            compression,
            &file,
            |_| {},
        );
        let p = m.p(&base);
        let err = match std::fs::read(&p) {
            Ok(_) => panic!("{name}: served"),
            Err(e) => e.raw_os_error(),
        };
        assert_eq!(err, Some(libc::EIO), "{name}");
        let log = m.log_text();
        let line = log
            .lines()
            .rfind(|l| l.contains(&format!("/nix/store/{base}")) && l.contains("ERROR"))
            .unwrap_or_else(|| panic!("{name}: no error line naming the path:\n{log}"));
        assert!(line.contains(why), "{name}: {line}");
        // nothing of it on disk: no tree, no blob but the neighbour's
        let signed = narinfo_nar_hash(&cache.dir, &base);
        assert!(!tree_kept(&m.cache_dir, &signed), "{name}: a tree was kept");
        assert!(blob_files(&m.cache_dir) <= 1, "{name}: blobs left");
        assert_eq!(
            std::fs::read_dir(m.cache_dir.join("tmp")).unwrap().count(),
            0,
            "{name}: left in tmp/"
        );
        // the neighbour is still served
        assert_eq!(std::fs::read(m.p(&neighbour)).unwrap(), b"good content\n");
        // repair: the same path with a good NAR and narinfo is picked up, no remount
        cache.put_good(&format!("bad-{name}"));
        assert_eq!(
            std::fs::read(&p).unwrap_or_default(),
            b"good content\n",
            "{name}: repair not picked up"
        );
    }
    assert!(m.stop().success(), "narfs must survive every case");
}

#[test]
fn hostile_narinfos_are_refused_and_repairs_picked_up() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let dir = cache.dir.clone();
    let m = cache.mount(&s3, &["--refresh-interval", "0"]);
    let untrusted = SecretKey::from_seed("someone-else", [3; 32]);

    type Edit = Box<dyn Fn(&str) -> String>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unsigned",
            Box::new(|t: &str| without_lines(t, "Sig:")),
            "no signatures",
        ),
        (
            "untrusted",
            Box::new(move |t: &str| {
                let mut i = NarInfo::parse(t).unwrap();
                i.sigs = vec![untrusted.sign(i.fingerprint().as_bytes())];
                i.to_text()
            }),
            "signed by: someone-else",
        ),
        (
            "narsize-changed",
            Box::new(|t: &str| t.replace("NarSize: ", "NarSize: 1")),
            "lacks a signature",
        ),
        (
            "bad-reference",
            Box::new(|t: &str| t.replace("References: ", "References: ../../etc/passwd")),
            "References",
        ),
        (
            "missing-narhash",
            Box::new(|t: &str| without_lines(t, "NarHash")),
            "NarHash is missing",
        ),
        (
            "duplicate-storepath",
            Box::new(|t: &str| format!("{t}{}\n", t.lines().next().unwrap())),
            "appears more than once",
        ),
        (
            "bad-nix32",
            Box::new(|t: &str| t.replacen("NarHash: sha256:", "NarHash: sha256:e", 1)),
            "NarHash",
        ),
        (
            "absurd-size",
            Box::new(|t: &str| t.replace("NarSize: ", "NarSize: 9999999999999999")),
            "NarSize",
        ),
        (
            "garbage",
            Box::new(|_: &str| "\u{0}\u{1}\u{2}garbage without colons\n".repeat(10)),
            "not of the form",
        ),
        (
            "binary",
            Box::new(|_: &str| unsafe { String::from_utf8_unchecked(vec![0xff; 1000]) }),
            "not UTF-8",
        ),
        (
            "huge",
            Box::new(|t: &str| {
                format!(
                    "{t}{}",
                    "X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n".repeat(100_000)
                )
            }),
            "larger than",
        ),
    ];
    for (name, edit, why) in cases {
        let base = cache.put_good(&format!("ni-{name}"));
        let key_file = dir.join(format!("{}.narinfo", &base[..32]));
        let good = std::fs::read_to_string(&key_file).unwrap();
        std::fs::write(&key_file, edit(&good)).unwrap();
        assert_eq!(read_err(&m.p(&base)), Some(libc::ENOENT), "{name}");
        let log = m.log_text();
        let line = log
            .lines()
            .rfind(|l| l.contains(&base[..32]) && l.contains("WARN"))
            .unwrap_or_else(|| panic!("{name}: no warning naming the path:\n{log}"));
        assert!(line.contains(why), "{name}: {line}");
        std::fs::write(&key_file, &good).unwrap();
        assert_eq!(
            std::fs::read(m.p(&base)).unwrap(),
            b"good content\n",
            "{name}: repair not picked up"
        );
    }
    // a StorePath that differs from the key it is read from
    let a = cache.put_good("ni-a");
    let b = cache.put_good("ni-b");
    std::fs::copy(
        dir.join(format!("{}.narinfo", &a[..32])),
        dir.join(format!("{}.narinfo", &b[..32])),
    )
    .unwrap();
    assert_eq!(read_err(&m.p(&b)), Some(libc::ENOENT));
    assert!(m.log_text().contains(&format!("describes /nix/store/{a}")));
    assert!(m.stop().success());
}

#[test]
fn an_unpacked_copy_is_served_only_under_its_own_nar_hash() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let key = cache.public_key();
    let cache_dir = tempfile::tempdir().unwrap();
    let first = file_nar(b"first push\n");
    let base = cache.put_nar("repushed", &first);
    {
        let m = Mounted::start(&s3.url(s3.port, "h"), &[&key], Some(cache_dir.path()), &[]);
        assert_eq!(std::fs::read(m.p(&base)).unwrap(), b"first push\n");
    }
    // the same store path pushed again with other contents (a non-reproducible build)
    let second = file_nar(b"second push\n");
    cache.put_nar("repushed", &second);
    std::fs::remove_dir_all(cache_dir.path().join("narinfo")).unwrap();
    let m = Mounted::start(&s3.url(s3.port, "h"), &[&key], Some(cache_dir.path()), &[]);
    assert_eq!(std::fs::read(m.p(&base)).unwrap(), b"second push\n");
}

/// The NAR of a directory tree given as (relative path, contents) files.
fn tree_nar(files: &[(&str, &str)]) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("p");
    for (rel, text) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    Writer::new(Vec::new()).dump_path(&root).unwrap()
}

/// Pushes `name` again with the uncompressed NAR `new`, deletes its `old` NAR, and
/// reads `neighbour` so that the path is evicted: its next read must fetch.
fn repush_and_evict(
    cache: &SignedCache,
    m: &Mounted,
    name: &str,
    old: &[u8],
    new: &[u8],
    neighbour: &str,
) {
    cache.put(name, new, Compression::None, new, |_| {});
    let old_url = format!("nar/{}.nar", &Sha256::digest(old).to_nix_string()[7..]);
    std::fs::remove_file(cache.dir.join(old_url)).unwrap();
    assert_eq!(std::fs::read(m.p(neighbour)).unwrap(), b"good content\n");
    m.wait_log("evicted from the cache directory");
}

/// A path pushed again with different contents (a non-reproducible build pushed from
/// another machine) is served with its new tree once its old NAR is gone: nothing of
/// the old tree stays in the index or in the kernel's caches.
#[test]
fn a_path_pushed_again_with_other_contents_gets_its_new_tree() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let a = tree_nar(&[("bin/tool", "A\n"), ("share/a", "a\n")]);
    let name = cache.put_nar("repushed", &a);
    let neighbour = cache.put_good("neighbour");
    // room for the two files of the path, not for the neighbour's as well
    let m = cache.mount(&s3, &["--refresh-interval", "0", "--cache-size", "8K"]);
    let top = m.p(&name);
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        std::fs::read_to_string(top.join("bin/tool")).unwrap(),
        "A\n"
    );
    for _ in 0..2 {
        assert_eq!(names(&top), ["bin", "share"]);
        assert_eq!(names(&top.join("bin")), ["tool"]);
    }

    // a shell with its working directory there keeps the top directory's inode alive
    let _cwd = std::fs::File::open(&top).unwrap();

    // pushed again: new narinfo, new NAR, the old NAR gone; then the path is evicted
    // (reading the neighbour), so the next read must fetch
    let b = tree_nar(&[
        ("bin/tool", "B, longer\n"),
        ("bin/extra", "x\n"),
        ("lib/l", "l\n"),
    ]);
    repush_and_evict(&cache, &m, "repushed", &a, &b, &neighbour);

    // the first reads may fail (the old NAR is gone; the narinfo is checked again)
    let t = std::time::Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(top.join("bin/tool")) {
            assert_eq!(s, "B, longer\n");
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{}",
            m.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        m.log_text()
            .contains("was pushed again with different contents"),
        "{}",
        m.log_text()
    );
    assert_eq!(names(&top), ["bin", "lib"]);
    assert_eq!(names(&top.join("bin")), ["extra", "tool"]);
    assert_eq!(std::fs::read_to_string(top.join("lib/l")).unwrap(), "l\n");
    assert!(read_err(&top.join("share/a")).is_some());
}

/// The same for a path that is one file, re-pushed with contents of the same size:
/// the kernel keeps no page of the old contents.
#[test]
fn a_single_file_path_pushed_again_is_read_afresh() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let a = file_nar(b"AAAA\n");
    let name = cache.put_nar("solo", &a);
    let neighbour = cache.put_good("neighbour");
    let m = cache.mount(&s3, &["--refresh-interval", "0", "--cache-size", "4K"]);
    assert_eq!(std::fs::read(m.p(&name)).unwrap(), b"AAAA\n");
    repush_and_evict(&cache, &m, "solo", &a, &file_nar(b"BBBB\n"), &neighbour);
    let t = std::time::Instant::now();
    loop {
        match std::fs::read(m.p(&name)) {
            Ok(s) if s == b"BBBB\n" => break,
            r => assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "{r:?}\n{}",
                m.log_text()
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
