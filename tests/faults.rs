//! Faults: error statuses, connections cut mid-NAR, stalled streams, the server killed
//! and restarted, narfs killed mid-download, a full disk, and what logs may say.

mod common;

use common::proxy::{Fault, Proxy};
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn big_file() -> (String, Vec<u8>) {
    let f = fixture();
    let want = std::fs::read(f.real("narfs-test-big").join("data/numbers.txt")).unwrap();
    (
        format!("{}/data/numbers.txt", f.path("narfs-test-big")),
        want,
    )
}

#[test]
fn server_errors_are_retried() {
    let f = fixture();
    let e = env();
    let nar = f.narinfo_field("narfs-test-single.txt", "URL");
    e.proxy.fault(&nar, Fault::Status(503), 4);
    e.proxy.fault(
        &format!("{}.narinfo", f.hash("narfs-test-lib")),
        Fault::Status(500),
        2,
    );
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--refresh-interval", "0"]);
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-single.txt"))).unwrap(),
        b"asdf"
    );
    assert!(e.proxy.downloads(&nar) >= 5, "{}", e.proxy.downloads(&nar));
    assert!(std::fs::metadata(m.p(f.path("narfs-test-lib")))
        .unwrap()
        .is_dir());
}

#[test]
fn a_connection_cut_mid_nar_is_retried() {
    let f = fixture();
    let e = env();
    let nar = f.narinfo_field("narfs-test-big", "URL");
    e.proxy.fault(&nar, Fault::CutAfter(200_000), 2);
    let m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    let (rel, want) = big_file();
    assert!(std::fs::read(m.p(&rel)).unwrap() == want);
    assert_eq!(e.proxy.downloads(&nar), 3);
    assert!(m.log_text().contains("retrying"), "{}", m.log_text());
}

#[test]
fn a_stalled_stream_fails_within_the_timeout_and_the_next_access_works() {
    let f = fixture();
    let e = env();
    let nar = f.narinfo_field("narfs-test-big", "URL");
    e.proxy.fault(&nar, Fault::Trickle(1), usize::MAX);
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--timeout", "3"]);
    let (rel, want) = big_file();
    let t = Instant::now();
    assert_eq!(read_err(&m.p(&rel)), Some(libc::EIO));
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "a stalled read took {took:?}"
    );
    assert_eq!(
        std::fs::read_dir(m.cache_dir.join("tmp")).unwrap().count(),
        0
    );
    // a failure to fetch, not a verdict on the NAR
    assert!(m.stat("nar_requests_total{result=\"failed\"}") >= 1);
    assert_eq!(m.stat("verification_failures_total{kind=\"nar\"}"), 0);
    e.proxy.clear_faults();
    assert!(std::fs::read(m.p(&rel)).unwrap() == want);
    eprintln!("stalled read failed after {} ms", took.as_millis());
}

#[test]
fn server_killed_and_restarted_while_mounted() {
    let f = fixture();
    let mut e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--timeout", "3"]);
    m.wait_root(f.paths.len());
    e.s3.kill();
    let single = m.p(f.path("narfs-test-single.txt"));
    let t = Instant::now();
    assert_eq!(read_err(&single), Some(libc::EIO));
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "{:?}\n{}",
        t.elapsed(),
        m.log_text()
    );
    e.s3.restart();
    assert_eq!(std::fs::read(&single).unwrap(), b"asdf");
}

#[test]
fn kill_9_mid_download_then_remount_serves_identical_content() {
    let f = fixture();
    let e = env();
    let nar = f.narinfo_field("narfs-test-big", "URL");
    e.proxy.fault(&nar, Fault::Trickle(400_000), 1);
    let cache_dir = tempfile::tempdir().unwrap();
    let m = Mounted::start(&e.url, &[&f.public_key], Some(cache_dir.path()), &[]);
    let (rel, want) = big_file();
    let p = m.p(&rel);
    let reader = std::thread::spawn(move || read_err(&p));
    // wait until blobs are being written (a marker of unflushed writes), then crash
    wait_for("unflushed blobs", Duration::from_secs(20), || {
        std::fs::read_dir(cache_dir.path().join("pending"))
            .unwrap()
            .count()
            > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    m.kill9();
    assert!(
        reader.join().unwrap().is_some(),
        "the read of a crashed mount cannot succeed"
    );
    assert!(!cache_holds(
        cache_dir.path(),
        &f.narinfo_field("narfs-test-big", "NarHash"),
        &[]
    ));
    let m = Mounted::start(&e.url, &[&f.public_key], Some(cache_dir.path()), &[]);
    // the blobs written since the unfinished flush were hashed again
    assert!(
        m.log_text().contains("written since an unfinished flush"),
        "{}",
        m.log_text()
    );
    for d in ["tmp", "pending"] {
        assert_eq!(
            std::fs::read_dir(cache_dir.path().join(d)).unwrap().count(),
            0,
            "{d}"
        );
    }
    assert!(std::fs::read(m.p(&rel)).unwrap() == want);
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(m.p(f.path("narfs-test-big")))
        .arg(f.real("narfs-test-big")));
}

#[test]
fn a_full_disk_fails_that_path_only() {
    let f = fixture();
    let e = env();
    let tmpfs = Tmpfs::new("4m");
    let dir = tmpfs.0.as_path();
    let m = Mounted::start(&e.url, &[&f.public_key], Some(dir), &[]);
    let (rel, _) = big_file();
    assert_eq!(read_err(&m.p(&rel)), Some(libc::EIO));
    assert!(
        m.log_text()
            .contains("writing the unpacked path: No space left on device"),
        "{}",
        m.log_text()
    );
    // a local fault, not a verdict on the NAR
    assert_eq!(m.stat("verification_failures_total{kind=\"nar\"}"), 0);
    assert!(m.stat("nar_requests_total{result=\"failed\"}") >= 1);
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    assert!(!cache_holds(
        dir,
        &f.narinfo_field("narfs-test-big", "NarHash"),
        &[]
    ));
    // the mount keeps serving what fits
    assert_eq!(
        std::fs::read(m.p(f.path("narfs-test-single.txt"))).unwrap(),
        b"asdf"
    );
    m.runs_the_app();
}

#[test]
fn credentials_never_reach_the_logs() {
    let f = fixture();
    let e = env();
    let (base, mnt) = mountpoint();
    let log = base.path().join("log");
    let mut child = narfs()
        .env("RUST_LOG", "trace")
        .args([
            "mount",
            "-vv",
            "--refresh-interval",
            "0",
            "--trusted-public-key",
            &f.public_key,
        ])
        .arg("--cache-dir")
        .arg(base.path().join("c"))
        .arg(&e.url)
        .arg(&mnt)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    serve_then_unmount(&mnt, &mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.len() > 10_000,
        "trace logging was on: {} bytes",
        text.len()
    );
    assert!(
        !text.contains(SECRET_KEY),
        "the secret key appears in the trace log"
    );
    // a failing mount's error message does not carry it either
    let out = narfs()
        .args(["mount", "--trusted-public-key", &f.public_key])
        .arg(format!(
            "s3://nope?endpoint=127.0.0.1:{}&scheme=http",
            free_port()
        ))
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains(SECRET_KEY));
}

/// Empties the kernel's page cache so reads reach narfs again (root only).
fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

#[test]
fn the_disk_quota_holds_while_reading_three_times_its_size_twice() {
    let (s3, _, key, names) = generated("q", 9, 2 << 20, 0);
    let proxy = Proxy::start(s3.port);
    let quota: u64 = 6 << 20;
    let m = Mounted::start(
        &s3.url(proxy.port, "q"),
        &[&key],
        None,
        &["--cache-size", "6M"],
    );
    let store = m.cache_dir.join("blobs");
    let mut peak = 0;
    let mut dropped = true;
    for pass in 0..2 {
        if pass == 1 {
            dropped = drop_page_cache();
        }
        for name in &names {
            for f in 0..4 {
                let data = std::fs::read(m.p(name).join(format!("f{f}"))).unwrap();
                assert_eq!(data.len(), (2 << 20) / 4, "pass {pass} {name}");
            }
            let used = narfs::disk_cache::disk_usage(&store);
            peak = peak.max(used);
            assert!(
                used as f64 <= quota as f64 * 1.05,
                "pass {pass}: {used} bytes in the cache, quota {quota}"
            );
        }
    }
    // evicted paths were fetched again on the second pass
    let nar_gets = proxy.downloads(".nar?");
    assert!(dropped, "the tests run as root and can drop the page cache");
    assert!(nar_gets >= 15, "{nar_gets} NAR GETs for 18 path reads");
    eprintln!(
        "quota {} MiB: peak {:.2} MiB over 2 passes of 18 MiB; {nar_gets} NAR GETs",
        quota >> 20,
        peak as f64 / (1 << 20) as f64
    );
}

#[test]
fn an_open_file_is_never_evicted_and_a_path_over_the_quota_is_still_served() {
    let (s3, dir, key, names) = generated("q", 3, 4 << 20, 0);
    for passthrough in [false, true] {
        let extra: &[&str] = if passthrough {
            &["--cache-size", "3M", "--passthrough"]
        } else {
            &["--cache-size", "3M"]
        };
        let m = Mounted::start(&s3.url(s3.port, "q"), &[&key], None, extra);
        // a path larger than the whole quota is served
        let held = std::fs::File::open(m.p(&names[0]).join("f0")).unwrap();
        let mut first = vec![0u8; 4096];
        std::io::Read::read_exact(&mut &held, &mut first).unwrap();
        // reading the others does not evict the open one
        for name in &names[1..] {
            std::fs::read(m.p(name).join("f1")).unwrap();
        }
        let held_file =
            |name: &str| cache_holds(&m.cache_dir, &narinfo_nar_hash(&dir, name), &["f0"]);
        assert!(
            held_file(&names[0]),
            "an open file was evicted (passthrough: {passthrough})"
        );
        drop_page_cache();
        // the reader goes on reading the same verified bytes either way
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut rest).unwrap();
        assert_eq!(first.len() + rest.len(), 1 << 20);
        let again = std::fs::read(m.p(&names[0]).join("f0")).unwrap();
        assert_eq!(&again[..4096], &first[..]);
        assert_eq!(&again[4096..], &rest[..]);
        drop(held);
        // once closed it is the least recently used and goes first
        std::fs::read(m.p(&names[1]).join("f2")).unwrap();
        std::fs::read(m.p(&names[2]).join("f2")).unwrap();
        assert!(!held_file(&names[0]));
    }
}
