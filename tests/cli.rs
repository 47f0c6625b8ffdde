//! The inspecting subcommands (`ls`, `cat`, `verify`) and `keygen`, against a cache
//! written by the real nix and served by a real S3 server.

mod common;

use common::*;
use std::process::Command;

fn env() -> (S3Server, String) {
    let f = fixture();
    let s3 = S3Server::start();
    s3.upload_cache(&f.cache, "cache");
    let url = s3.url(s3.port, "cache");
    (s3, url)
}

/// Runs narfs as a user does: no RUST_LOG.
fn out(args: &[&str]) -> (i32, String, String) {
    let o = narfs().env_remove("RUST_LOG").args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Under umask 000 too: the scratch cache a command uses is its own, never one
/// others may write to (which narfs would refuse).
#[test]
fn cat_works_under_umask_000() {
    let f = fixture();
    let (_s3, url) = env();
    let file = format!("/nix/store/{}/bin/app", f.path("narfs-test-app"));
    let mut cmd = narfs();
    // umask(2) is async-signal-safe: sound between fork and exec
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0);
            Ok(())
        });
    }
    let o = cmd
        .env_remove("RUST_LOG")
        .args(["cat", "--trusted-public-key", &f.public_key, &url, &file])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        o.stdout,
        std::fs::read(f.real("narfs-test-app").join("bin/app")).unwrap()
    );
}

#[test]
fn ls_and_cat_without_mounting() {
    let f = fixture();
    let (_s3, url) = env();
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let (code, text, err) = out(&[
        "ls",
        "-R",
        "--trusted-public-key",
        &f.public_key,
        &url,
        &app,
    ]);
    assert_eq!(code, 0, "{err}");
    let mut want: Vec<String> = run(Command::new("find")
        .arg(".")
        .arg("-mindepth")
        .arg("1")
        .current_dir(f.real("narfs-test-app")))
    .lines()
    .map(str::to_owned)
    .collect();
    want.sort();
    let mut got: Vec<String> = text.lines().map(str::to_owned).collect();
    got.sort();
    assert_eq!(got, want);
    let (code, text, _) = out(&[
        "ls",
        "-l",
        "--trusted-public-key",
        &f.public_key,
        &url,
        &format!("{app}/bin"),
    ]);
    assert_eq!(code, 0);
    assert!(
        text.contains("-r-xr-xr-x") && text.contains("./bin/app-link -> app"),
        "{text}"
    );
    let (code, text, err) = out(&[
        "cat",
        "--trusted-public-key",
        &f.public_key,
        &url,
        &format!("{app}/bin/app"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        text.as_bytes(),
        std::fs::read(f.real("narfs-test-app").join("bin/app")).unwrap()
    );
    // like nix store cat: nothing on stderr on success; -v says what was fetched
    assert_eq!(err, "");
    let (code, text, err) = out(&[
        "cat",
        "-v",
        "--trusted-public-key",
        &f.public_key,
        &url,
        &format!("{app}/bin/app"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(text.starts_with("#!/bin/sh"), "{text}");
    assert!(err.contains("INFO") && err.contains(&app), "{err}");
    // an empty RUST_LOG (as `RUST_LOG= cmd` leaves it) does not silence -v
    let o = narfs()
        .env("RUST_LOG", "")
        .args(["cat", "-v", "--trusted-public-key", &f.public_key, &url])
        .arg(format!("{app}/bin/app"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("INFO") && err.contains(&app), "{err}");
    let (code, _, err) = out(&[
        "ls",
        "-lR",
        "--trusted-public-key",
        &f.public_key,
        &url,
        &app,
    ]);
    assert_eq!((code, err.as_str()), (0, ""));
    let (code, _, err) = out(&["verify", "--trusted-public-key", &f.public_key, &url, &app]);
    assert_eq!((code, err.as_str()), (0, "1 verified, 0 failed\n"));
    // untrusted: refused, naming the path
    let other = "other:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=";
    let (code, _, err) = out(&[
        "cat",
        "--trusted-public-key",
        other,
        &url,
        &format!("{app}/bin/app"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains(&app) && err.contains("rejected"), "{err}");
    let cat = |path: &str| out(&["cat", "--trusted-public-key", &f.public_key, &url, path]);
    // never through a symlink to the host's /nix/store
    let (code, _, err) = cat(&format!("{app}/lib/greet.sh"));
    assert_eq!(code, 1);
    assert!(err.contains("symbolic link"), "{err}");
    let single = format!("/nix/store/{}", f.path("narfs-test-single.txt"));
    let (code, text, _) = cat(&single);
    assert_eq!((code, text.as_str()), (0, "asdf"));
    let (code, _, err) = cat(&format!("{app}/bin/nope"));
    assert_eq!(code, 1);
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn verify_reports_each_failure() {
    let f = fixture();
    let (s3, url) = env();
    let (code, text, err) = out(&["verify", "--trusted-public-key", &f.public_key, &url]);
    assert_eq!(code, 0, "{text}{err}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        f.paths.len()
    );
    // break one NAR: verify names it and fails
    let url_lib = f.narinfo_field("narfs-test-lib", "URL");
    let nar = s3.root.join(BUCKET).join("cache").join(&url_lib);
    let mut bytes = std::fs::read(&nar).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&nar, bytes).unwrap();
    let (code, text, _) = out(&["verify", "--trusted-public-key", &f.public_key, &url]);
    assert_eq!(code, 1);
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(failed[0].contains(f.path("narfs-test-lib")), "{text}");
    // named paths only
    let single = format!("/nix/store/{}", f.path("narfs-test-single.txt"));
    let (code, text, _) = out(&[
        "verify",
        "--trusted-public-key",
        &f.public_key,
        &url,
        &single,
    ]);
    assert_eq!(code, 0);
    assert_eq!(text.trim(), format!("ok {single}"));
}

#[test]
fn keygen_writes_keys_nix_reads_and_nix_keys_we_read() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("sk"), d.path().join("pk"));
    let (code, _, err) = out(&[
        "keygen",
        "my-cache-1",
        sk.to_str().unwrap(),
        pk.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = std::fs::read_to_string(&pk).unwrap();
    assert!(public.starts_with("my-cache-1:"));
    // nix signs with our secret key, and accepts it: copy the fixture cache, re-sign
    // its narinfos with nix using our key, and let nix verify them with our public key
    let store = tempfile::tempdir().unwrap();
    let st = format!("local?root={}", store.path().display());
    run(Command::new("nix")
        .args([
            "--experimental-features",
            "nix-command",
            "copy",
            "--no-check-sigs",
            "--from",
            &f.store,
            "--to",
            &st,
        ])
        .arg(format!("/nix/store/{}", f.path("narfs-test-single.txt")))
        .env("PATH", "/usr/bin:/bin"));
    run(Command::new("nix")
        .args([
            "--experimental-features",
            "nix-command",
            "store",
            "sign",
            "--store",
            &st,
            "--key-file",
        ])
        .arg(&sk)
        .arg(format!("/nix/store/{}", f.path("narfs-test-single.txt")))
        .env("PATH", "/usr/bin:/bin"));
    let info = run(Command::new("nix")
        .args([
            "--experimental-features",
            "nix-command",
            "path-info",
            "--sigs",
            "--store",
            &st,
        ])
        .arg(format!("/nix/store/{}", f.path("narfs-test-single.txt")))
        .env("PATH", "/usr/bin:/bin"));
    let sig = info
        .split_whitespace()
        .find(|w| w.starts_with("my-cache-1:"))
        .expect("nix signed with our key");
    // and our verifier accepts nix's signature made with our key
    let mut keys = narfs::formats::keys::TrustedKeys::default();
    keys.add(narfs::formats::keys::PublicKey::parse(&public).unwrap());
    let mut ni =
        narfs::formats::narinfo::NarInfo::parse(&f.narinfo("narfs-test-single.txt")).unwrap();
    ni.sigs = vec![sig.to_owned()];
    assert_eq!(
        ni.verify(f.hash("narfs-test-single.txt"), &keys)
            .unwrap()
            .name,
        "my-cache-1"
    );
    // refuses to overwrite and bad names
    let (code, _, err) = out(&[
        "keygen",
        "my-cache-1",
        sk.to_str().unwrap(),
        pk.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("exists"), "{err}");
    let (code, _, _) = out(&["keygen", "bad:name", "/tmp/x1", "/tmp/x2"]);
    assert_eq!(code, 1);
}
