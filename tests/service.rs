//! Running narfs in the Nix world: HTTP caches, `narfs prefetch`, `narfs stats` and
//! `--metrics-addr`, against caches the real nix wrote.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn http_caches_are_read_by_name() {
    let f = fixture();
    let http = HttpServer::start(&f.cache);
    let url = format!("http://127.0.0.1:{}/", http.port);
    let m = Mounted::start(&url, &[&f.public_key], None, &[]);
    m.wait_log("cannot be listed");
    // nothing is listed, but every path is there by name, verified
    assert!(std::fs::read_dir(&m.mnt).unwrap().next().is_none());
    for name in ["narfs-test-app", "narfs-test-lib", "narfs-test-big"] {
        assert_eq!(shape(&m.p(f.path(name))), shape(&f.real(name)), "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(m.p(f.path("narfs-test-lib")).join("lib/greet.sh")).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    assert_eq!(
        read_err(&m.p("00000000000000000000000000000000-missing")),
        Some(libc::ENOENT)
    );
    // looked-up paths now show in the root
    assert!(std::fs::read_dir(&m.mnt).unwrap().count() >= 3);
    // an untrusted key sees nothing, as with S3
    let tmp = tempfile::tempdir().unwrap();
    let (_, other) = keygen(tmp.path(), "other-1");
    let m2 = Mounted::start(&url, &[&other], None, &[]);
    assert_eq!(
        read_err(&m2.p(f.path("narfs-test-lib"))),
        Some(libc::ENOENT)
    );
    // the inspecting commands read HTTP caches too
    let (code, text, err) = out(narfs()
        .args(["cat", "--trusted-public-key", &f.public_key, &url])
        .arg(format!("/nix/store/{}", f.path("narfs-test-single.txt"))));
    assert_eq!(code, 0, "{err}");
    assert_eq!(text, "asdf");
    // and cannot write to them
    let empty = HttpServer::start(tmp.path());
    let (code, _, err) = out(narfs()
        .args(["push", "--store", &f.store])
        .arg(format!("http://127.0.0.1:{}", empty.port))
        .arg(format!("/nix/store/{}", f.path("narfs-test-single.txt"))));
    assert_eq!(code, 1);
    assert!(err.contains("does not write to HTTP caches"), "{err}");
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

#[test]
fn prefetch_stats_and_metrics() {
    let f = fixture();
    let e = env();
    let (port, addr) = free_addr();
    let m = Mounted::start(
        &e.url,
        &[&f.public_key],
        None,
        &["--prefetch-references", "false", "--metrics-addr", &addr],
    );
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let (code, _, err) = out(narfs().arg("prefetch").arg(&m.mnt).arg(&app));
    assert_eq!(code, 0, "{err}\n{}", m.log_text());
    assert!(err.contains("prefetching 4 paths"), "{err}");
    assert_eq!(err.matches("fetched /nix/store/").count(), 4, "{err}");
    assert_eq!(e.proxy.downloads(".nar.xz"), 4);
    for name in f.paths.keys() {
        assert!(
            cache_holds(&m.cache_dir, &f.narinfo_field(name, "NarHash"), &[]),
            "{name}"
        );
    }
    // reading after a prefetch downloads nothing more
    let big = m.p(f.path("narfs-test-big")).join("data/small.txt");
    assert_eq!(std::fs::read_to_string(big).unwrap(), "small\n");
    assert_eq!(e.proxy.downloads(".nar.xz"), 4);
    // a second prefetch finds everything there
    let (code, _, err) = out(narfs()
        .arg("prefetch")
        .arg(&m.mnt)
        .arg(f.path("narfs-test-lib")));
    assert_eq!(code, 0, "{err}");
    assert_eq!(e.proxy.downloads(".nar.xz"), 4);

    let (code, text, err) = out(narfs().arg("stats").arg(&m.mnt));
    assert_eq!(code, 0, "{err}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        line("nar_requests_total{result=\"fetched\"}"),
        "4",
        "{text}"
    );
    assert_eq!(line("store_paths"), "4", "{text}");
    assert_eq!(line("fetches_in_flight"), "0", "{text}");
    let fetched: u64 = line("fetched_bytes_total").parse().unwrap();
    let want: u64 = f
        .paths
        .keys()
        .map(|n| f.narinfo_field(n, "FileSize").parse::<u64>().unwrap())
        .sum();
    assert_eq!(fetched, want);

    let r = http_get(port, "/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    assert!(
        r.contains("narfs_nar_requests_total{result=\"fetched\"} 4\n"),
        "{r}"
    );
    assert!(r.contains("narfs_nar_fetch_seconds_count 4\n"), "{r}");
    assert!(http_get(port, "/other").starts_with("HTTP/1.1 404"));

    // what cannot be fetched is reported, and the exit status says so
    let (code, _, err) = out(narfs()
        .arg("prefetch")
        .arg(&m.mnt)
        .arg("/nix/store/00000000000000000000000000000000-missing"));
    assert_eq!(code, 1);
    assert!(
        err.contains("FAILED /nix/store/00000000000000000000000000000000-missing"),
        "{err}"
    );
    let (code, _, err) = out(narfs()
        .arg("prefetch")
        .arg(&m.mnt)
        .arg("/tmp/not-a-store-path"));
    assert_eq!(code, 1);
    assert!(err.contains("not a store path"), "{err}");
    // a directory narfs does not serve
    let (code, _, err) = out(narfs().arg("stats").arg("/tmp"));
    assert_eq!(code, 1);
    assert!(err.contains("no narfs mount answers for /tmp"), "{err}");
}

#[test]
fn fstab_form_mounts_in_the_background() {
    let f = fixture();
    let e = env();
    let tmp = tempfile::tempdir().unwrap();
    let (mnt, cache) = (tmp.path().join("mnt"), tmp.path().join("cache"));
    std::fs::create_dir(&mnt).unwrap();
    let opts = format!(
        "ro,nofail,_netdev,x-systemd.automount,trusted-public-key={},cache-dir={}",
        f.public_key,
        cache.display()
    );
    // what an fstab line does: mount(8) → mount.fuse3 → `narfs URL DIR -o OPTS`, which
    // must return once the mount serves (`PROG#SOURCE` names the program for
    // mount.fuse3 without installing it)
    let t = Instant::now();
    let mut mount = Command::new("mount");
    for (k, v) in narfs().get_envs() {
        if let Some(v) = v {
            mount.env(k, v);
        }
    }
    let (code, _, err) = out(mount
        .args(["-t", "fuse"])
        .arg(format!("{}#{}", env!("CARGO_BIN_EXE_narfs"), e.url))
        .arg(&mnt)
        .args(["-o", &opts]));
    assert_eq!(code, 0, "{err}");
    assert!(
        is_mounted(&mnt),
        "mount returned before the mount was there"
    );
    eprintln!("mount(8) returned after {:?}", t.elapsed());
    let lib = mnt.join(f.path("narfs-test-lib")).join("lib/greet.sh");
    assert_eq!(
        std::fs::read_to_string(&lib).unwrap(),
        "greet() { echo \"hello from lib\"; }\n"
    );
    let log = cache.join("narfs.log");
    assert!(std::fs::read_to_string(&log).unwrap().contains("mounted"));
    run(Command::new("umount").arg(&mnt));
    wait_for(
        "the background mount to exit",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("unmounted from outside")
        },
    );
    let mnt_s = mnt.to_str().unwrap().to_owned();
    wait_for(
        "the background mount to exit",
        Duration::from_secs(20),
        || {
            !Command::new("pgrep")
                .args(["-f", &mnt_s])
                .status()
                .unwrap()
                .success()
        },
    );

    // the same form, run directly, with options narfs does not know or a cache
    // that does not answer: a clear error, nothing mounted
    let (code, _, err) = out(narfs().arg(&e.url).arg(&mnt).args(["-o", "colour=red"]));
    assert_eq!(code, 2);
    assert!(err.contains("unknown mount option 'colour=red'"), "{err}");
    let dead = format!(
        "s3://{BUCKET}/cache?endpoint=127.0.0.1:{}&scheme=http&region=us-east-1",
        free_port()
    );
    let (code, _, err) = out(narfs()
        .arg(&dead)
        .arg(&mnt)
        .args(["-o", &format!("{opts},timeout=2")]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the mount failed"), "{err}");
    assert!(err.contains("cannot reach the cache"), "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn mounted_at_nix_store_in_a_private_namespace_programs_run_from_the_cache() {
    // narfs at /nix/store inside `unshare -m`: a program from the cache runs, and
    // what it loads from another cached path resolves through the same mount. A
    // tmpfs goes over /nix first, so the host's /nix is never touched.
    let f = fixture();
    let e = env();
    let tmp = tempfile::tempdir().unwrap();
    let (app, lib) = (f.path("narfs-test-app"), f.path("narfs-test-lib"));
    let script = format!(
        r#"set -e
mount -t tmpfs narfs-test /nix
mkdir /nix/store
"$NARFS" mount --cache-dir "$DIR/cache" --trusted-public-key "$KEY" "$URL" /nix/store 2>"$DIR/log" &
pid=$!
i=0
until [ -d /nix/store/{app} ]; do
  i=$((i+1)); [ $i -lt 400 ] || {{ echo "never mounted"; cat "$DIR/log"; exit 1; }}
  sleep 0.05
done
/nix/store/{app}/bin/app
. /nix/store/{app}/lib/greet.sh
greet
readlink /nix/store/{app}/lib
kill $pid
wait $pid
"#
    );
    let mut cmd = Command::new("unshare");
    for (k, v) in narfs().get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let (code, text, err) = out(cmd
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("NARFS", env!("CARGO_BIN_EXE_narfs"))
        .env("DIR", tmp.path())
        .env("KEY", &f.public_key)
        .env("URL", &e.url));
    assert_eq!(code, 0, "{text}\n{err}");
    assert_eq!(
        text,
        format!("hello from lib\nhello from lib\n/nix/store/{lib}/lib\n"),
        "{err}"
    );
    // both paths came from the cache, verified
    assert_eq!(
        e.proxy.downloads(&f.narinfo_field("narfs-test-lib", "URL")),
        1
    );
    assert_eq!(
        e.proxy.downloads(&f.narinfo_field("narfs-test-app", "URL")),
        1
    );
    // and nothing of it is visible outside the namespace
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(" /nix/store "));
}
