//! Start-up profiles (docs/profiles.md): recorded on one mount, pushed as a pack and a
//! signed manifest, replayed by a fresh mount in one request so reads need no block;
//! and every lie of a manifest or a pack costing bounded bytes, never a wrong byte.

mod common;

use common::proxy::Proxy;
use common::*;
use narfs::formats::keys::{SecretKey, TrustedKeys};
use narfs::formats::profile::Manifest;
use narfs::formats::store_path::StorePath;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Cache {
    s3: S3Server,
    proxy: Proxy,
    sk: String,
    pk: String,
    _keys: tempfile::TempDir,
}

fn cache() -> Cache {
    let s3 = S3Server::start();
    let keys = tempfile::tempdir().unwrap();
    let pk = push_closure_with(&s3, keys.path(), "xz");
    let sk = keys.path().join("ix-1.sec").display().to_string();
    let proxy = Proxy::start(s3.port);
    Cache {
        s3,
        proxy,
        sk,
        pk,
        _keys: keys,
    }
}

impl Cache {
    fn url(&self) -> String {
        self.s3.url(self.proxy.port, "ix")
    }
    fn mount(&self) -> Mounted {
        Mounted::start(&self.url(), &[&self.pk], None, &[])
    }
    fn object(&self, key: &str) -> PathBuf {
        self.s3.root.join(BUCKET).join("ix").join(key)
    }
}

fn app() -> String {
    fixture().path("narfs-test-app").to_owned()
}

/// What the recorded program reads: files of three paths, one of them a slice of a
/// big file.
fn program(m: &Path) -> String {
    let f = fixture();
    format!(
        "cat {m}/{app}/share/app/greet.sh '{m}/{lib}/share/a file with spaces' {m}/{big}/data/small.txt >/dev/null && head -c 100 {m}/{big}/data/numbers.txt >/dev/null",
        m = m.display(),
        app = f.path("narfs-test-app"),
        lib = f.path("narfs-test-lib"),
        big = f.path("narfs-test-big"),
    )
}

/// Records `program` on a fresh mount of `c` (while a program of another process
/// group reads another file) and pushes it for the app's path; returns the record.
fn record_and_push(c: &Cache) -> String {
    let f = fixture();
    let m = c.mount();
    let rec = m.mnt.parent().unwrap().join("startup.profile");
    // another program, in a process group of its own, reads while the recording runs
    let other = format!(
        "sleep 0.3; cat {}/{}/lib/libanswer.so >/dev/null",
        m.mnt.display(),
        f.path("narfs-test-lib")
    );
    let mut bystander = Command::new("sh");
    std::os::unix::process::CommandExt::process_group(bystander.arg("-c").arg(other), 0);
    let mut bystander = bystander.spawn().unwrap();
    let (code, _, err) = out(narfs()
        .args(["profile", "record", "--mount"])
        .arg(&m.mnt)
        .arg("--out")
        .arg(&rec)
        .args(["--", "sh", "-c"])
        .arg(format!("sleep 0.6; {}", program(&m.mnt))));
    assert_eq!(code, 0, "{err}");
    assert!(bystander.wait().unwrap().success());
    let text = std::fs::read_to_string(&rec).unwrap();
    let files: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    // in the order read, each chunk once; the big file by the one chunk read
    assert_eq!(
        files,
        [
            "share/app/greet.sh",
            "share/a\\x20file\\x20with\\x20spaces",
            "data/small.txt",
            "data/numbers.txt"
        ],
        "{text}"
    );
    let (code, _, err) = out(narfs()
        .args(["profile", "push", "--key-file", &c.sk, "--for"])
        .arg(format!("/nix/store/{}", app()))
        .arg(c.s3.url(c.s3.port, "ix"))
        .arg(&rec));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("4 chunks"), "{err}");
    text
}

/// Reads the program's files on `m` and checks every byte against the store.
fn reads_right(m: &Mounted) {
    let f = fixture();
    for (name, rel) in [
        ("narfs-test-app", "share/app/greet.sh"),
        ("narfs-test-lib", "share/a file with spaces"),
        ("narfs-test-big", "data/small.txt"),
        ("narfs-test-big", "data/numbers.txt"),
    ] {
        // of the big file, what the program read: its first bytes
        let head = |p: PathBuf| {
            use std::io::Read;
            let mut b = Vec::new();
            let f = std::fs::File::open(p).unwrap();
            f.take(100).read_to_end(&mut b).unwrap();
            b
        };
        let got = head(m.p(f.path(name)).join(rel));
        assert_eq!(got, head(f.real(name).join(rel)), "{rel}");
    }
}

fn block_gets(p: &Proxy) -> usize {
    p.requests_with("/nar/")
        .iter()
        .filter(|r| r.starts_with("GET "))
        .count()
}

#[test]
fn a_recorded_profile_is_replayed_in_one_request_and_its_reads_need_no_block() {
    let c = cache();
    record_and_push(&c);
    let narinfo = std::fs::read_to_string(c.object(&format!("{}.narinfo", &app()[..32]))).unwrap();
    assert!(
        narinfo.contains(&format!("NarfsProfile: {}.narfs-profile", &app()[..32])),
        "{narinfo}"
    );
    // a fresh mount: the first look into the app's path fetches the manifest, looks
    // up the paths it names and fetches the pack, once
    c.proxy.clear();
    let m = c.mount();
    std::fs::read_dir(m.p(&app())).unwrap().for_each(drop);
    m.wait_log("replayed its start-up profile");
    assert!(m.log_text().contains("stored=4"), "{}", m.log_text());
    assert_eq!(c.proxy.gets("/profile/"), 1);
    assert_eq!(c.proxy.gets(".narfs-profile"), 1);
    // then the program reads every file it read before without a block request
    let before = block_gets(&c.proxy);
    assert_eq!(before, 0, "{:?}", c.proxy.requests());
    run(Command::new("sh").arg("-c").arg(program(&m.mnt)));
    reads_right(&m);
    assert_eq!(block_gets(&c.proxy), 0, "{:?}", c.proxy.requests());
    // a file it did not read comes from its blocks as ever
    let f = fixture();
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-lib")).join("lib/libanswer.so")).unwrap(),
        std::fs::read(f.real("narfs-test-lib").join("lib/libanswer.so")).unwrap()
    );
    assert_eq!(block_gets(&c.proxy), 1);
    // a second mount with the chunks already on disk fetches no pack
    let dir = m.cache_dir.clone();
    drop(m);
    c.proxy.clear();
    let m = Mounted::start(&c.url(), &[&c.pk], Some(&dir), &[]);
    std::fs::read_dir(m.p(&app())).unwrap().for_each(drop);
    m.wait_log("replayed its start-up profile");
    assert_eq!(c.proxy.gets("/profile/"), 0);
    reads_right(&m);
    assert_eq!(block_gets(&c.proxy), 0);
}

/// A reader whose chunk the pack is bringing waits for the pack rather than fetching
/// its block: here the indexes are slow, so the program reads while the pack (slower
/// still) is on its way, and its reads cost no block at all.
#[test]
fn readers_wait_for_a_pack_that_brings_their_chunks() {
    let c = cache();
    record_and_push(&c);
    c.proxy.clear();
    c.proxy
        .delay(".narfs-index", std::time::Duration::from_millis(300));
    c.proxy
        .delay("/profile/", std::time::Duration::from_millis(800));
    let m = c.mount();
    let t = std::time::Instant::now();
    run(Command::new("sh").arg("-c").arg(program(&m.mnt)));
    let took = t.elapsed();
    reads_right(&m);
    assert_eq!(block_gets(&c.proxy), 0, "{:?}", c.proxy.requests());
    assert_eq!(c.proxy.gets("/profile/"), 1);
    assert!(
        took >= std::time::Duration::from_millis(800),
        "the program did not wait for the pack: {took:?}"
    );
    m.wait_log("replayed its start-up profile");
}

/// The manifest `bytes` (as pushed), re-signed after `edit`.
fn resigned(c: &Cache, bytes: &[u8], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let sp = StorePath::from_basename(&app()).unwrap();
    let mut trusted = TrustedKeys::default();
    let pk = narfs::formats::keys::PublicKey::parse(&c.pk).unwrap();
    trusted.add(pk);
    let mut m = Manifest::parse_verified(bytes, &sp, &trusted).unwrap();
    edit(&mut m);
    let sk = SecretKey::parse(std::fs::read_to_string(&c.sk).unwrap().trim()).unwrap();
    m.to_bytes(&[&sk])
}

/// A fresh mount looks into the app's path and reads the program's files: every byte
/// right, a warning with `needle`, and what the replay stored.
fn replay_survives(c: &Cache, needle: &str) -> String {
    let m = c.mount();
    std::fs::read_dir(m.p(&app())).unwrap().for_each(drop);
    m.wait_log(needle);
    reads_right(&m);
    let log = m.log_text();
    assert!(log.contains(&app()), "the warning names the path: {log}");
    log
}

#[test]
fn lying_manifests_and_packs_cost_bounded_bytes_and_never_a_wrong_byte() {
    let c = cache();
    record_and_push(&c);
    let sp = StorePath::from_basename(&app()).unwrap();
    let manifest_key = Manifest::object_key(&sp);
    let good = std::fs::read(c.object(&manifest_key)).unwrap();
    let put = |b: &[u8]| std::fs::write(c.object(&manifest_key), b).unwrap();

    // signed by a key the mount does not trust: never used, not even its pack fetched
    let other = SecretKey::from_seed("ix-1", [9; 32]);
    let mut m = Manifest::parse_verified(&good, &sp, &{
        let mut t = TrustedKeys::default();
        t.add(narfs::formats::keys::PublicKey::parse(&c.pk).unwrap());
        t
    })
    .unwrap();
    put(&m.to_bytes(&[&other]));
    c.proxy.clear();
    replay_survives(&c, "start-up profile ignored");
    assert_eq!(c.proxy.gets("/profile/"), 0);

    // naming a chunk no index holds (and the pack's bytes do not hash to): that chunk
    // is not stored, the rest is
    let forged = resigned(&c, &good, |m| {
        m.chunks[1].hash = narfs::formats::hash::Sha256::digest(b"not in any index")
    });
    put(&forged);
    let log = replay_survives(&c, "names 1 chunks that no signed index here holds");
    assert!(log.contains("replayed its start-up profile"), "{log}");
    assert!(log.contains("stored=3"), "{log}");
    assert!(log.contains("(1 chunks so): not stored"), "{log}");

    // a pack whose bytes do not hash to the chunks named: the replay stops at the
    // first one, the reads come from blocks
    put(&good);
    let pack = c.object(&m.pack);
    let bytes = std::fs::read(&pack).unwrap();
    let mut spoiled = bytes.clone();
    let n = spoiled.len();
    for b in &mut spoiled[n / 4..] {
        *b ^= 0x5a;
    }
    std::fs::write(&pack, &spoiled).unwrap();
    replay_survives(&c, "reads go on from the blocks");

    // a pack cut short (offsets outside the object): the same
    std::fs::write(&pack, &bytes[..bytes.len() / 3]).unwrap();
    replay_survives(&c, "reads go on from the blocks");

    // a frame that decodes to other bytes than the chunks named, re-signed: refused
    std::fs::write(&pack, &bytes).unwrap();
    let forged = resigned(&c, &good, |m| {
        let sk = m.chunks.swap_remove(0);
        m.chunks.push(sk);
    });
    put(&forged);
    replay_survives(&c, "do not hash to it");

    // a signed profile of kilobytes read naming 1.6 GB more that no index holds: the
    // first 8 MiB are asked for at once, nothing beyond (no index names it)
    std::fs::write(&pack, &bytes).unwrap();
    m = Manifest::parse_verified(&good, &sp, &{
        let mut t = TrustedKeys::default();
        t.add(narfs::formats::keys::PublicKey::parse(&c.pk).unwrap());
        t
    })
    .unwrap();
    let huge = resigned(&c, &good, |x| {
        for i in 0..100u32 {
            x.frames.push(narfs::formats::profile::Frame {
                comp_len: 16 << 20,
                raw_len: 16 << 20,
            });
            x.pack_size += 16 << 20;
            x.chunks.push(narfs::formats::profile::PackChunk {
                path: m.chunks[0].path.clone(),
                hash: narfs::formats::hash::Sha256::digest(&i.to_le_bytes()),
                len: 16 << 20,
            });
        }
    });
    put(&huge);
    c.proxy.clear();
    replay_survives(&c, "names 100 chunks that no signed index here holds");
    assert!(
        c.proxy.range_bytes("/profile/") <= bytes.len() as u64 + (16 << 20),
        "{:?}",
        c.proxy.requests()
    );
}
