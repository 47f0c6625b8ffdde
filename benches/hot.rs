//! The hot pieces, measured alone: narinfo parse + signature verify per second, and
//! the NAR pipeline (xz → NarHash/NarSize check → unpack) in MB/s next to the floor of
//! `xz -dc NAR.xz | sha256sum` on the same archive. Medians of 5 runs (3 for the NAR).
//! Run: `cargo bench --bench hot` (under `cargo test` it runs small, as a smoke test).

#[path = "../tests/common/mod.rs"]
mod common;

use narfs::formats::hash::Sha256;
use narfs::formats::keys::{SecretKey, TrustedKeys};
use narfs::formats::narinfo::{Compression, NarInfo};
use narfs::formats::store_path::StorePath;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");

    // narinfo parse + verify
    let sk = SecretKey::from_seed("bench-1", [5; 32]);
    let mut keys = TrustedKeys::default();
    keys.add(sk.public());
    let texts: Vec<(String, String)> = (0..2000)
        .map(|i| {
            let h = Sha256::digest(format!("{i}").as_bytes());
            let sp = StorePath::from_basename(&format!(
                "{}-bench-{i}",
                narfs::formats::nixbase32::encode(&h.0[..20])
            ))
            .unwrap();
            let mut info = NarInfo {
                store_path: sp.clone(),
                url: format!("nar/{}.nar.xz", &h.to_nix_string()[7..]),
                compression: Compression::Xz,
                file_hash: Some(h),
                file_size: Some(1234),
                nar_hash: h,
                nar_size: 5678,
                references: vec![sp.clone()],
                deriver: Some(format!("{}.drv", sp.basename())),
                sigs: vec![],
                ca: None,
                index: None,
                profile: None,
            };
            info.sigs.push(sk.sign(info.fingerprint().as_bytes()));
            (sp.hash_part().to_owned(), info.to_text())
        })
        .collect();
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for (hash, text) in &texts {
                let i = NarInfo::parse(text).unwrap();
                i.verify(hash, &keys).unwrap();
            }
            texts.len() as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    println!(
        "narinfo parse + verify: {:.0} per second (median of 5)",
        median(runs)
    );

    // the NAR pipeline against the floor
    let src = if full {
        "/usr/lib/python3.11"
    } else {
        "/usr/share/perl5"
    };
    let nar = narfs::formats::nar::Writer::new(Vec::new())
        .dump_path(std::path::Path::new(src))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let xz_path = dir.path().join("nar.xz");
    let mut enc = liblzma::write::XzEncoder::new(std::fs::File::create(&xz_path).unwrap(), 6);
    enc.write_all(&nar).unwrap();
    enc.finish().unwrap();
    let xz = std::fs::read(&xz_path).unwrap();
    let sp = StorePath::from_basename("00000000000000000000000000000000-bench").unwrap();
    let info = common::narinfo_of(&sp, "nar/x", Compression::Xz, &nar, Some(&xz));
    let mb = nar.len() as f64 / 1e6;
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for i in 0..3 {
        let dest = dir.path().join(format!("out{i}"));
        let t = Instant::now();
        narfs::fetch::unpack::unpack_verified(std::fs::File::open(&xz_path).unwrap(), &info, &dest)
            .unwrap();
        ours.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("xz -dc {} | sha256sum", xz_path.display()))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        floor.push(t.elapsed().as_secs_f64());
    }
    let (o, f) = (median(ours), median(floor));
    println!(
        "NAR of {src}: {mb:.1} MB ({:.1} MB xz): narfs verify+unpack {:.3} s = {:.0} MB/s; \
         floor `xz -dc | sha256sum` {:.3} s = {:.0} MB/s; ratio {:.2}x",
        xz.len() as f64 / 1e6,
        o,
        mb / o,
        f,
        mb / f,
        o / f
    );
}
