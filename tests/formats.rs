//! The format modules against what the real nix writes: NARs from `nix-store --dump`,
//! keys from `nix-store --generate-binary-cache-key`, narinfos from `nix copy`.

mod common;

use common::*;
use narfs::formats::keys::{PublicKey, SecretKey, TrustedKeys};
use narfs::formats::nar;
use narfs::formats::narinfo::NarInfo;
use std::process::Command;

fn dump(f: &Fixture, name: &str) -> Vec<u8> {
    let out = Command::new("nix")
        .args([
            "--experimental-features",
            "nix-command",
            "store",
            "dump-path",
            "--store",
            &f.store,
        ])
        .arg(format!("/nix/store/{}", f.path(name)))
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn nars_written_by_nix_unpack_to_the_real_tree_and_rewrite_identically() {
    let f = fixture();
    for name in f.paths.keys() {
        let bytes = dump(f, name);
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let tree = nar::unpack(&mut &bytes[..], &dest).unwrap();
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&dest)
            .arg(f.real(name)));
        // (directories are 0755 in the disk cache so it can evict them; the mount
        // shows 0555, see tests/mount.rs)
        assert!(tree.count() >= 1);
        // our writer produces the very bytes nix wrote, from the real path and from ours
        assert_eq!(
            nar::Writer::new(Vec::new())
                .dump_path(&f.real(name))
                .unwrap(),
            bytes,
            "{name}"
        );
        assert_eq!(
            nar::Writer::new(Vec::new()).dump_path(&dest).unwrap(),
            bytes,
            "{name}"
        );
        // and hashes to the NarHash nix signed
        let info = NarInfo::parse(&f.narinfo(name)).unwrap();
        assert_eq!(narfs::formats::hash::Sha256::digest(&bytes), info.nar_hash);
        assert_eq!(bytes.len() as u64, info.nar_size);
    }
}

#[test]
fn every_narinfo_nix_wrote_verifies_with_its_key() {
    let f = fixture();
    let mut keys = TrustedKeys::default();
    keys.add(PublicKey::parse(&f.public_key).unwrap());
    for name in f.paths.keys() {
        let info = NarInfo::parse(&f.narinfo(name)).unwrap();
        assert_eq!(
            info.verify(f.hash(name), &keys).unwrap().name,
            "narfs-test-1"
        );
        assert_eq!(NarInfo::parse(&info.to_text()).unwrap(), info);
    }
}

#[test]
fn secret_keys_written_by_nix_sign_what_nix_accepts() {
    let f = fixture();
    let sk = SecretKey::parse(&std::fs::read_to_string(&f.secret_key_file).unwrap()).unwrap();
    assert_eq!(sk.public().to_nix_string(), f.public_key);
    // re-sign a narinfo with our code: same signature as nix's (ed25519 is deterministic)
    let info = NarInfo::parse(&f.narinfo("narfs-test-app")).unwrap();
    assert_eq!(sk.sign(info.fingerprint().as_bytes()), info.sigs[0]);
}
