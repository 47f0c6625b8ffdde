//! The content-addressed disk cache: file contents stored once by their hash, shared
//! by every store path and every cache that holds them.

mod common;

use common::*;
use std::path::Path;

fn tree(dir: &Path, files: &[(&str, &[u8])]) {
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

#[test]
fn identical_files_take_disk_space_once_for_every_path_and_every_cache() {
    let s3 = S3Server::start();
    let src = tempfile::tempdir().unwrap();
    let big = noise(3 << 20, 7);
    tree(
        &src.path().join("one"),
        &[("lib/big.so", &big), ("a", b"only in one\n")],
    );
    tree(
        &src.path().join("two"),
        &[("share/big.so", &big), ("b", b"only in two\n")],
    );
    tree(&src.path().join("three"), &[("big.so", &big)]);
    let first = SignedCache::new(&s3);
    let one = first.put_tree("one", &src.path().join("one"));
    let two = first.put_tree("two", &src.path().join("two"));
    // another cache, another key
    let second = SignedCache::at(&s3.root.join(BUCKET).join("other"));
    let mut second = second;
    second.sk = narfs::formats::keys::SecretKey::from_seed("other-cache", [3; 32]);
    let three = second.put_tree("three", &src.path().join("three"));

    let tmpfs = Tmpfs::new("64m");
    let base = fs_used(&tmpfs.0);
    // a cache mounted with the one cache directory on the tmpfs
    let mount = |prefix: &str, cache: &SignedCache| {
        Mounted::start(
            &s3.url(s3.port, prefix),
            &[&cache.public_key()],
            Some(&tmpfs.0),
            &[],
        )
    };
    let m = mount("h", &first);
    assert!(std::fs::read(m.p(&one).join("lib/big.so")).unwrap() == big);
    assert!(std::fs::read(m.p(&two).join("share/big.so")).unwrap() == big);
    assert_eq!(
        std::fs::read(m.p(&two).join("b")).unwrap(),
        b"only in two\n"
    );
    drop(m);
    // 3 chunks of the big file, once; one small file each
    assert_eq!(blob_files(&tmpfs.0), 5);
    let used = fs_used(&tmpfs.0) - base;
    let sum = 2 * (big.len() as u64 + 4096);
    assert!(
        used as f64 <= sum as f64 * 0.6,
        "{used} bytes used for two paths of {sum} bytes"
    );
    // the same file from another cache: its NAR is fetched and verified, but nothing
    // of it is stored again
    let m = mount("other", &second);
    assert!(std::fs::read(m.p(&three).join("big.so")).unwrap() == big);
    assert_eq!(blob_files(&tmpfs.0), 5);
    assert!(fs_used(&tmpfs.0) - base < used + 16384);
}
