//! `narfs push` writes a cache the real nix accepts, from the real nix's local store,
//! to the real S3 server.

mod common;

use common::*;
use std::process::Command;

#[test]
fn pushed_closures_are_accepted_by_nix_and_narfs() {
    let f = fixture();
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "push-test-1");
    let url = s3.url(s3.port, "pushed");
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let push = || {
        let (code, _, err) = out(narfs()
            .args(["push", "--store", &f.store, "--key-file", &sk])
            .arg(&url)
            .arg(&app));
        assert_eq!(code, 0, "{err}");
        err
    };
    let err = push();
    assert!(err.contains("4 paths pushed"), "{err}");
    assert!(err.contains("0 already in the cache"), "{err}");
    let cache = s3.root.join(BUCKET).join("pushed");
    // nix's own signature is kept and ours is added
    let info = std::fs::read_to_string(cache.join(format!("{}.narinfo", f.hash("narfs-test-app"))))
        .unwrap();
    assert!(info.contains("Sig: narfs-test-1:"), "{info}");
    assert!(info.contains("Sig: push-test-1:"), "{info}");
    assert!(info.contains("Compression: xz"), "{info}");
    assert!(cache
        .join(format!("{}.ls", f.hash("narfs-test-lib")))
        .is_file());
    assert_eq!(
        std::fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\nNarfsIndexes: 1\n"
    );

    // every path has a file index, signed by our key, describing its seekable NAR:
    // each block decodes alone to its part of the NAR
    let mut keys = narfs::formats::keys::TrustedKeys::default();
    keys.add(narfs::formats::keys::PublicKey::parse(&pk).unwrap());
    for name in f.paths.keys() {
        let info = narfs::formats::narinfo::NarInfo::parse(
            &std::fs::read_to_string(cache.join(format!("{}.narinfo", f.hash(name)))).unwrap(),
        )
        .unwrap();
        let key = info.index.clone().expect("a NarfsIndex line");
        assert_eq!(key, format!("{}.narfs-index", f.hash(name)));
        let (index, signer) = narfs::formats::file_index::FileIndex::parse_verified(
            &std::fs::read(cache.join(&key)).unwrap(),
            &info.store_path,
            &info.nar_hash,
            info.nar_size,
            &keys,
        )
        .unwrap();
        assert_eq!(signer.name, "push-test-1");
        assert_eq!(index.url, info.url);
        let object = std::fs::read(cache.join(&index.url)).unwrap();
        assert_eq!(object.len() as u64, index.file_size);
        let nar = narfs::formats::nar::Writer::new(Vec::new())
            .dump_path(&f.real(name))
            .unwrap();
        for b in &index.blocks {
            let comp = &object[b.comp_offset as usize..][..b.comp_len as usize];
            let plain =
                narfs::fetch::decompress::decode_block(index.compression, comp, b.nar_len).unwrap();
            assert!(
                plain == nar[b.nar_offset as usize..][..b.nar_len as usize],
                "{name}"
            );
        }
        if name == "narfs-test-big" {
            assert!(index.blocks.len() >= 3, "{} blocks", index.blocks.len());
        }
    }

    // the real nix copies the closure back, trusting only our key
    let back = tmp.path().join("back");
    let back_store = format!("local?root={}", back.display());
    run(nix(&["copy", "--option", "substituters", ""])
        .args(["--option", "trusted-public-keys", &pk])
        .arg("--from")
        .arg(format!("file://{}", cache.display()))
        .args(["--to", &back_store])
        .arg(&app));
    assert_eq!(nar_hashes(&back_store, &app), nar_hashes(&f.store, &app));

    // narfs reads it, verified with our key alone
    let (code, text, err) = out(narfs()
        .args(["cat", "--trusted-public-key", &pk, &url])
        .arg(format!(
            "/nix/store/{}/lib/greet.sh",
            f.path("narfs-test-lib")
        )));
    assert_eq!(code, 0, "{err}");
    assert_eq!(text, "greet() { echo \"hello from lib\"; }\n");
    let (code, text, err) = out(narfs().args(["verify", "--trusted-public-key", &pk, &url]));
    assert_eq!(code, 0, "{text}{err}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        4,
        "{text}"
    );

    // a second push finds everything there
    let err = push();
    assert!(err.contains("0 paths pushed"), "{err}");
    assert!(err.contains("4 already in the cache"), "{err}");
}

#[test]
fn zstd_and_uncompressed_pushes_to_file_caches() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "push-test-2");
    let lib = format!("/nix/store/{}", f.path("narfs-test-lib"));
    for c in ["zstd", "none"] {
        let cache = tmp.path().join(c);
        let url = format!("file://{}", cache.display());
        // as nix copy takes them: in the URL (zstd), or as flags (none, and no index)
        let mut cmd = narfs();
        cmd.args(["push", "--store", &f.store]);
        if c == "zstd" {
            cmd.arg(format!("{url}?compression=zstd&secret-key={sk}"));
        } else {
            cmd.args(["--compression", c, "--key-file", &sk, "--no-index"])
                .arg(&url);
        }
        let (code, _, err) = out(cmd.arg(&lib));
        assert_eq!(code, 0, "{err}");
        let narinfo = cache.join(format!("{}.narinfo", f.hash("narfs-test-lib")));
        let text = std::fs::read_to_string(&narinfo).unwrap();
        assert!(text.contains(&format!("Compression: {c}\n")), "{text}");
        assert!(text.contains("Sig: push-test-2:"), "{text}");
        let index = cache.join(format!("{}.narfs-index", f.hash("narfs-test-lib")));
        assert_eq!(index.exists(), c == "zstd", "{c}");
        assert_eq!(text.contains("NarfsIndex: "), c == "zstd", "{text}");
        // readable by a web server, as nix writes them
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&narinfo).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let back = format!(
            "local?root={}",
            tmp.path().join(format!("back-{c}")).display()
        );
        run(nix(&["copy", "--option", "substituters", ""])
            .args(["--option", "trusted-public-keys", &pk])
            .args(["--from", &url, "--to", &back])
            .arg(&lib));
        assert_eq!(nar_hashes(&back, &lib), nar_hashes(&f.store, &lib), "{c}");
    }
}

#[test]
fn push_refuses_clearly() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("c").display());
    let lib = format!("/nix/store/{}", f.path("narfs-test-lib"));
    // a path the store does not have
    let (code, _, err) = out(narfs()
        .args(["push", "--store", &f.store])
        .arg(&url)
        .arg("/nix/store/00000000000000000000000000000000-nothing"));
    assert_eq!(code, 1);
    assert!(err.contains("nix path-info failed"), "{err}");
    // a missing key file, a bad compression
    let (code, _, err) = out(narfs()
        .args([
            "push",
            "--store",
            &f.store,
            "--key-file",
            "/nonexistent/key",
        ])
        .arg(&url)
        .arg(&lib));
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/key"), "{err}");
    let (code, _, err) = out(narfs()
        .args(["push", "--compression", "lz4", "--store", &f.store])
        .arg(&url)
        .arg(&lib));
    assert_eq!(code, 1);
    assert!(err.contains("unknown compression 'lz4'"), "{err}");
    // files that no longer match the store's NarHash are never uploaded
    let copy = tmp.path().join("root");
    run(Command::new("cp")
        .arg("-a")
        .arg(f.dir.join("root"))
        .arg(&copy));
    let copied_file = copy
        .join("nix/store")
        .join(f.path("narfs-test-lib"))
        .join("lib/greet.sh");
    run(Command::new("chmod").arg("-R").arg("u+w").arg(&copy));
    std::fs::write(&copied_file, "tampered\n").unwrap();
    let (code, _, err) = out(narfs()
        .args(["push", "--store", &format!("local?root={}", copy.display())])
        .arg(&url)
        .arg(&lib));
    assert_eq!(code, 1);
    assert!(
        err.contains("do not match what the store registered"),
        "{err}"
    );
    assert!(!tmp
        .path()
        .join("c")
        .join(format!("{}.narinfo", f.hash("narfs-test-lib")))
        .exists());
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&copy)
        .status();
}

#[test]
fn a_nar_over_64_mib_goes_up_to_s3_in_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", tmp.path().join("root").display());
    let big = run(Command::new("nix-build")
        .args(["--store", &store, "--no-out-link"])
        .args(["--option", "sandbox", "true"])
        .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64"])
        .args(["--option", "substituters", ""])
        .args([
            "-E",
            r#"derivation { name = "narfs-test-70m"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "head -c 70000000 /dev/urandom > $out" ]; }"#,
        ])
        .env("PATH", "/usr/bin:/bin")
        .env_remove("NIX_REMOTE"));
    let big = big.trim();
    let (sk, pk) = keygen(tmp.path(), "push-test-3");
    let s3 = S3Server::start();
    let url = s3.url(s3.port, "big");
    let (code, _, err) = out(narfs()
        .args([
            "push",
            "--store",
            &store,
            "--compression",
            "none",
            "--key-file",
            &sk,
        ])
        .arg(&url)
        .arg(big));
    assert_eq!(code, 0, "{err}");
    // 70 MB in 16 MiB parts
    assert!(
        err.contains("uploaded in parts") && err.contains("parts=5"),
        "{err}"
    );
    let (code, text, err) = out(narfs().args(["verify", "--trusted-public-key", &pk, &url]));
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains(&format!("ok {big}")), "{text}");
    // and the real nix gets the same path back
    let back = format!("local?root={}", tmp.path().join("back").display());
    let cache = s3.root.join(BUCKET).join("big");
    run(nix(&["copy", "--option", "substituters", ""])
        .args(["--option", "trusted-public-keys", &pk])
        .arg("--from")
        .arg(format!("file://{}", cache.display()))
        .args(["--to", &back])
        .arg(big));
    assert_eq!(nar_hashes(&back, big), nar_hashes(&store, big));
}
