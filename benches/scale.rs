//! Scale: a bucket of N signed narinfos (default 100,000; `NARFS_SCALE_N` to change)
//! on a local s3s-fs, mounted by narfs. Prints mount-ready time, time to a full root
//! listing, a cold lookup, RSS, and the same for a remount on the same cache dir.
//! Run: `cargo bench --bench scale`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};

fn count(m: &Mounted) -> usize {
    std::fs::read_dir(&m.mnt).unwrap().count()
}

fn wait_count(m: &Mounted, n: usize, limit: Duration) -> Duration {
    let t = Instant::now();
    while count(m) < n {
        assert!(t.elapsed() < limit, "root listed only {} of {n}", count(m));
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

fn main() {
    let n: usize = std::env::var("NARFS_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let s3 = S3Server::start();
    let dir = s3.root.join(BUCKET).join("scale");
    let t = Instant::now();
    let key = generate_cache(&dir, n, 100);
    println!(
        "generated {n} signed narinfos in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let url = s3.url(s3.port, "scale");
    let cache_dir = tempfile::tempdir().unwrap();
    let probe = {
        // a path with a .ls that the listing reaches late (keys are listed in order)
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .into_string()
                    .ok()?
                    .strip_suffix(".ls")
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        let hash = names.last().unwrap().clone();
        let text = std::fs::read_to_string(dir.join(format!("{hash}.narinfo"))).unwrap();
        text.lines()
            .next()
            .unwrap()
            .trim_start_matches("StorePath: /nix/store/")
            .to_owned()
    };

    for round in ["cold", "remount"] {
        let t0 = Instant::now();
        let m = Mounted::start(
            &url,
            &[&key],
            Some(cache_dir.path()),
            &["--refresh-interval", "0"],
        );
        let ready = t0.elapsed();
        let (rss_ready, _) = rss_kib(m.pid());
        let t = Instant::now();
        let meta = std::fs::metadata(m.p(&probe));
        let lookup = t.elapsed();
        assert!(meta.is_ok(), "{probe}: {meta:?}");
        let full = wait_count(&m, n, Duration::from_secs(1800)) + t.elapsed();
        let t = Instant::now();
        let listed = count(&m);
        let ls_time = t.elapsed();
        let (rss, hwm) = rss_kib(m.pid());
        println!(
            "{round}: mount ready {:.0} ms | cold lookup of a not-yet-listed path {:.1} ms | \
             root fully listed ({listed} entries) {:.2} s after mount | one full readdir {:.0} ms | \
             RSS {:.1} MB (peak {:.1} MB, {:.0} bytes per known path above the at-ready RSS)",
            ready.as_secs_f64() * 1e3,
            lookup.as_secs_f64() * 1e3,
            full.as_secs_f64(),
            ls_time.as_secs_f64() * 1e3,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            (rss.saturating_sub(rss_ready) * 1024) as f64 / n as f64,
        );
        let log = std::env::temp_dir().join(format!("narfs-scale-{round}.log"));
        let _ = std::fs::copy(&m.log, &log);
        println!("  (narfs log: {})", log.display());
        assert!(m.stop().success());
    }
}
