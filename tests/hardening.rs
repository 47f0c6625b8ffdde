//! What a slow link and a hostile server could still break: readers that wait behind
//! paused prefetches, listings that page forever, unbounded index hints, wasted
//! requests, Range replies that are not what was asked, and exits after unmounts.

mod common;

use common::proxy::{http_200, Fault, Proxy};
use common::*;
use narfs::formats::narinfo::Compression;
use narfs::formats::store_path::StorePath;
use std::time::{Duration, Instant};

/// A cache of three single-file paths in s3s-fs behind a proxy: A (small) references
/// B (48 MiB), C (24 MiB) is unrelated. Returns (s3, proxy, cache, url, [A, B, C]).
fn a_b_c() -> (S3Server, Proxy, SignedCache, String, [String; 3], Vec<u8>) {
    let s3 = S3Server::start();
    let c = SignedCache::new(&s3);
    let b_nar = file_nar(&noise(48 << 20, 11));
    let b = c.put_nar("prefetched-b", &b_nar);
    let c_data = noise(24 << 20, 12);
    let c_nar = file_nar(&c_data);
    let cc = c.put_nar("read-c", &c_nar);
    let a_nar = file_nar(b"a\n");
    let b_path = StorePath::from_basename(&b).unwrap();
    let a = c.put("reader-a", &a_nar, Compression::None, &a_nar, |i| {
        i.references = vec![b_path.clone()]
    });
    let proxy = Proxy::start(s3.port);
    let url = s3.url(proxy.port, "h");
    (s3, proxy, c, url, [a, b, cc], c_data)
}

/// Issue 16.1: B's reference prefetch, paused while C's reader waits, must not hold the
/// quota C needs (it used to: C waited for room forever and B never went on). Both
/// orders; B trickles at 256 KiB/s, the quota fits C beside what B wrote, not beside B.
#[test]
fn a_paused_reference_prefetch_never_holds_room_a_reader_needs() {
    for prefetch_first in [true, false] {
        let (_s3, proxy, cache, url, [a, b, c], c_data) = a_b_c();
        let b_nar = cache.field(&b, "URL");
        let c_nar = cache.field(&c, "URL");
        proxy.fault(&b_nar, Fault::Trickle(256 << 10), usize::MAX);
        // C's reader waits long enough for B to make way (and let go of its link)
        proxy.fault(
            &c_nar,
            Fault::Delay(Duration::from_millis(1500)),
            usize::MAX,
        );
        let m = Mounted::start(
            &url,
            &[&cache.public_key()],
            None,
            &[
                "--cache-size",
                "64M",
                "--timeout",
                "10",
                "--refresh-interval",
                "0",
            ],
        );
        let (pa, pc) = (m.p(&a), m.p(&c));
        let read_c = move || std::fs::read(pc).map(|d| d == c_data);
        let t = Instant::now();
        let got = if prefetch_first {
            assert_eq!(std::fs::read(&pa).unwrap(), b"a\n");
            let t = Instant::now();
            while proxy.gets(&b_nar) == 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "B was never prefetched"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            within(Duration::from_secs(40), read_c)
        } else {
            let reader = std::thread::spawn(read_c);
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(std::fs::read(&pa).unwrap(), b"a\n");
            within(Duration::from_secs(40), move || reader.join().unwrap())
        };
        let got = got.unwrap_or_else(|| {
            panic!(
                "C's reader hung (prefetch first: {prefetch_first}):\n{}",
                m.log_text()
            )
        });
        assert!(got.unwrap(), "C read back wrong");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "C took {:?}",
            t.elapsed()
        );
        if prefetch_first {
            // B made way while C's reader waited, and goes on from where it stopped
            // once no reader waits
            let t = Instant::now();
            while !proxy
                .requests()
                .iter()
                .any(|r| r.contains(&b_nar) && r.contains("range=bytes="))
            {
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "B's prefetch never went on: {:?}\n{}",
                    proxy.requests(),
                    m.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A ListObjectsV2 reply: `keys` under the cache prefix, and a continuation token if
/// `next` (with `IsTruncated` as `truncated` says).
fn list_reply(keys: &[String], next: Option<&str>, truncated: bool) -> Vec<u8> {
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <Name>narfs-bucket</Name><Prefix>cache/</Prefix><Delimiter>/</Delimiter>\
         <MaxKeys>1000</MaxKeys>",
    );
    xml += &format!("<KeyCount>{}</KeyCount>", keys.len());
    xml += &format!("<IsTruncated>{truncated}</IsTruncated>");
    for k in keys {
        xml += &format!("<Contents><Key>cache/{k}</Key><Size>1</Size></Contents>");
    }
    if let Some(t) = next {
        xml += &format!("<NextContinuationToken>{t}</NextContinuationToken>");
    }
    xml += "</ListBucketResult>";
    http_200("application/xml", xml.as_bytes())
}

/// Issue 16.2: a server whose listing never ends (the same token again, fresh tokens
/// forever, a token with `IsTruncated: false`) holds neither a pass nor the first `ls`.
#[test]
fn a_listing_that_pages_forever_holds_neither_the_root_nor_a_pass() {
    let f = fixture();
    let narinfos: Vec<String> = f
        .paths
        .keys()
        .map(|n| format!("{}.narinfo", f.hash(n)))
        .collect();
    let n = narinfos.len();
    type Pager = fn(usize, &[String]) -> Vec<u8>;
    let cases: [(&str, Pager, &str); 3] = [
        (
            "the same token again",
            |_, keys| list_reply(keys, Some("again"), true),
            "same continuation token",
        ),
        (
            "fresh tokens forever",
            |i, keys| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let mut keys = keys.to_vec();
                keys.push(format!("junk-{i}"));
                list_reply(&keys, Some(&format!("t{i}")), true)
            },
            "takes longer than --timeout",
        ),
        (
            "a token that is not truncated",
            |_, keys| list_reply(keys, Some("ignored"), false),
            "listed the cache",
        ),
    ];
    for (what, pager, logged) in cases {
        let e = env();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (calls2, keys) = (calls.clone(), narinfos.clone());
        e.proxy.fault(
            "list-type=2",
            Fault::Respond(std::sync::Arc::new(move |_| {
                let i = calls2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let page: &[String] = if i == 0 { &keys } else { &[] };
                pager(i, page)
            })),
            usize::MAX,
        );
        let m = Mounted::start(
            &e.url,
            &[&f.public_key],
            None,
            &["--timeout", "3", "--refresh-interval", "0"],
        );
        let root = m.mnt.clone();
        let t = Instant::now();
        let names = within(Duration::from_secs(20), move || {
            std::fs::read_dir(root).unwrap().count()
        })
        .unwrap_or_else(|| panic!("{what}: the first ls hung:\n{}", m.log_text()));
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{what}: the first ls took {:?}",
            t.elapsed()
        );
        assert_eq!(names, n, "{what}: the paths of the first page are shown");
        m.wait_log(logged);
        if what.contains("not truncated") {
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "{what}");
        }
        // lookups by name work throughout
        let lib = f.path("narfs-test-lib");
        assert!(std::fs::metadata(m.p(lib)).unwrap().is_dir(), "{what}");
    }
}

/// Issue 16.3: `NarfsIndex:` is an unsigned hint. 64 validly signed narinfos naming one
/// 64 MiB object of junk as their index, looked into at once, must cost bounded memory
/// (the whole junk used to be read for each: 2.9 GB), and each path is still served
/// from its NAR.
#[test]
fn junk_named_as_file_indexes_costs_bounded_memory() {
    let s3 = S3Server::start();
    let c = SignedCache::new(&s3);
    std::fs::write(c.dir.join("junk.narfs-index"), noise(64 << 20, 5)).unwrap();
    let names: Vec<String> = (0..64)
        .map(|i| {
            let nar = file_nar(format!("path {i}\n").as_bytes());
            c.put(
                &format!("junk-index-{i}"),
                &nar,
                Compression::None,
                &nar,
                |info| info.index = Some("junk.narfs-index".into()),
            )
        })
        .collect();
    let m = c.mount(&s3, &["--refresh-interval", "0"]);
    assert_eq!(m.wait_root(64).len(), 64);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(names.len()));
    let readers: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (p, b) = (m.p(n), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                assert_eq!(std::fs::read(p).unwrap(), format!("path {i}\n").as_bytes());
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let (_, hwm) = rss_kib(m.pid());
    eprintln!(
        "peak RSS with 64 junk indexes looked into at once: {} MiB",
        hwm >> 10
    );
    assert!(hwm < 256 << 10, "peak RSS {} MiB", hwm >> 10);
    m.wait_log("reading its NAR instead");
}

/// `stat` and `ls` of a name, three times over: what a shell's tab completion or a
/// script probing for a path does.
fn probe_missing(m: &Mounted, name: &str) {
    for _ in 0..3 {
        assert!(std::fs::metadata(m.p(name)).is_err());
        let (code, _, _) = out(std::process::Command::new("ls").arg(m.p(name)));
        assert_ne!(code, 0);
    }
}

/// Issue 16.7: a missing path costs one request per negative TTL, and a cache that does
/// not announce file indexes is never asked for one it has not named.
#[test]
fn a_miss_costs_one_request_and_caches_nix_wrote_get_no_index_requests() {
    let f = fixture();
    let missing = "0123456789abcdfghijklmnpqrsvwxyz-not-here";
    // a cache nix wrote: read everything, probe a missing path
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, &["--refresh-interval", "0"]);
    m.wait_root(f.paths.len());
    for name in f.paths.keys() {
        let (code, _, err) = out(std::process::Command::new("find")
            .arg(m.p(f.path(name)))
            .args(["-type", "f", "-exec", "cat", "{}", "+"]));
        assert_eq!(code, 0, "{err}");
    }
    e.proxy.clear();
    probe_missing(&m, missing);
    assert_eq!(
        e.proxy.requests(),
        vec![format!(
            "GET /{BUCKET}/cache/{}.narinfo?x-id=GetObject",
            &missing[..32]
        )],
        "one request for a missing path"
    );
    assert!(
        !m.log_text().contains(".narfs-index"),
        "a cache nix wrote was asked for an index:\n{}",
        m.log_text()
    );
    drop(m);
    let asked = e.proxy.requests_with(".narfs-index");
    assert!(asked.is_empty(), "{asked:?}");

    // a cache with file indexes, once its listing is complete: the same
    let (_s3, proxy, m) = indexed_mount("xz", &["--refresh-interval", "0"]);
    m.wait_root(f.paths.len());
    m.wait_log("listed the cache");
    proxy.clear();
    probe_missing(&m, missing);
    assert_eq!(
        proxy.requests(),
        vec![format!(
            "GET /{BUCKET}/ix/{}.narinfo?x-id=GetObject",
            &missing[..32]
        )],
        "one request for a missing path of an indexed cache"
    );
}

/// Issue 16.8: narfs exits (0) within 2 s of its mount going away, however it went,
/// with narinfo, listing and NAR fetches in flight behind a slow server; in a loop.
#[test]
fn narfs_exits_within_two_seconds_of_its_mount_going_away() {
    use std::process::{Command, Stdio};
    let f = fixture();
    let big = format!("{}/data/numbers.txt", f.path("narfs-test-big"));
    for round in 0..3 {
        for way in ["fusermount3 -u", "umount -l", "SIGTERM", "SIGINT"] {
            let e = env();
            e.proxy.delay(".narinfo", Duration::from_millis(150));
            e.proxy.delay(".ls", Duration::from_millis(150));
            e.proxy.delay("list-type=2", Duration::from_millis(800));
            e.proxy.fault(
                &f.narinfo_field("narfs-test-big", "URL"),
                Fault::Trickle(64 << 10),
                usize::MAX,
            );
            let mut m = Mounted::start(&e.url, &[&f.public_key], None, &["--timeout", "10"]);
            let readers: Vec<std::process::Child> = [
                Command::new("ls")
                    .arg("-lR")
                    .arg(&m.mnt)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn(),
                Command::new("cat")
                    .arg(m.p(&big))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn(),
            ]
            .into_iter()
            .map(Result::unwrap)
            .collect();
            std::thread::sleep(Duration::from_millis(600));
            let stop_readers = |readers: Vec<std::process::Child>| {
                for mut r in readers {
                    let _ = r.kill();
                    let _ = r.wait();
                }
            };
            let mut readers = Some(readers);
            match way {
                "fusermount3 -u" => {
                    // a plain unmount needs the readers gone; their fetches go on
                    stop_readers(readers.take().unwrap());
                    let (code, _, err) = out(Command::new("fusermount3").arg("-u").arg(&m.mnt));
                    assert_eq!(code, 0, "fusermount3 -u: {err}");
                }
                "umount -l" => {
                    let (code, _, err) = out(Command::new("umount").arg("-l").arg(&m.mnt));
                    assert_eq!(code, 0, "umount -l: {err}");
                }
                signal => unsafe {
                    libc::kill(
                        m.pid() as i32,
                        if signal == "SIGTERM" {
                            libc::SIGTERM
                        } else {
                            libc::SIGINT
                        },
                    );
                },
            }
            let st = m.exited_within(Duration::from_secs(2));
            assert!(
                st.success(),
                "round {round}, {way}: {st:?}\n{}",
                m.log_text()
            );
            assert!(!is_mounted(&m.mnt), "round {round}, {way}");
            if let Some(r) = readers {
                stop_readers(r);
            }
        }
    }
}

/// Issue 16.8: a mount namespace made while narfs was mounted keeps a copy of the
/// mount; unmounted here, narfs serves the copy on, and SIGTERM then ends it: exit 0.
#[test]
fn a_copy_in_another_mount_namespace_is_served_until_sigterm() {
    use std::process::Command;
    let f = fixture();
    let e = env();
    let mut m = Mounted::start(&e.url, &[&f.public_key], None, &[]);
    m.wait_root(f.paths.len());
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    // the copy of this mount only: the namespace lets go of the other tests' FUSE
    // mounts, or their narfs would rightly serve on when those tests unmount
    let script = format!(
        "awk '$9 ~ /^fuse/ && $5 != \"{}\" {{print $5}}' /proc/self/mountinfo | xargs -r -n1 umount -l; exec sleep 60",
        m.mnt.display()
    );
    let mut holder = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let ns = format!("/proc/{}/ns/mnt", holder.id());
    wait_for("unshare to run", Duration::from_secs(10), || {
        std::fs::read_link(&ns).ok().is_some_and(|n| n != own_ns)
    });
    let (code, _, err) = out(Command::new("fusermount3").arg("-u").arg(&m.mnt));
    assert_eq!(code, 0, "{err}");
    assert!(!is_mounted(&m.mnt));
    let single = m.p(f.path("narfs-test-single.txt"));
    let in_copy = || {
        out(Command::new("nsenter")
            .args(["-t", &holder.id().to_string(), "-m", "cat"])
            .arg(&single))
    };
    std::thread::sleep(Duration::from_secs(1));
    let (code, text, err) = in_copy();
    assert_eq!(
        (code, text.as_str()),
        (0, "asdf"),
        "{err}\n{}",
        m.log_text()
    );
    m.wait_log("another mount namespace holds a copy");
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let st = m.exited_within(Duration::from_secs(2));
    assert!(st.success(), "{st:?}\n{}", m.log_text());
    assert_ne!(in_copy().0, 0, "the copy is served no more");
    let _ = holder.kill();
    let _ = holder.wait();
}

/// Issue 16.8: a server or proxy that answers a Range GET with 200 and the whole
/// object, or with another range than asked: the reader still gets the file's bytes
/// (skipped to the range; the wrong range refused and asked again).
#[test]
fn range_replies_are_checked_against_what_was_asked() {
    let f = fixture();
    let rel = format!("{}/data/numbers.txt", f.path("narfs-test-big"));
    let want = std::fs::read(f.real("narfs-test-big").join("data/numbers.txt")).unwrap();
    for lie in ["200 and the whole object", "206 and another range"] {
        let s3 = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let key = push_closure(&s3, dir.path());
        let proxy = Proxy::start(s3.port);
        let ix = s3.root.join(BUCKET).join("ix");
        let url = narinfo_field_in(&ix, f.hash("narfs-test-big"), "URL");
        let object = std::fs::read(ix.join(&url)).unwrap();
        let whole = lie.starts_with("200");
        proxy.fault(
            &url,
            Fault::Respond(std::sync::Arc::new(move |target: &str| {
                let (a, b) = target
                    .split_once("range=bytes=")
                    .and_then(|(_, r)| r.split_once('-'))
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
                    .expect("a Range GET");
                if whole {
                    return http_200("application/octet-stream", &object);
                }
                let (a, b) = (a + 1, (b + 1).min(object.len() - 1));
                let mut r = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\n\r\n",
                    object.len(),
                    b + 1 - a
                )
                .into_bytes();
                r.extend_from_slice(&object[a..=b]);
                r
            })),
            if whole { usize::MAX } else { 1 },
        );
        let m = Mounted::start(&s3.url(proxy.port, "ix"), &[&key], None, &[]);
        let got =
            std::fs::read(m.p(&rel)).unwrap_or_else(|e| panic!("{lie}: {e}\n{}", m.log_text()));
        assert!(got == want, "{lie}: other bytes");
        if !whole {
            m.wait_log("Content-Range");
        }
    }
}
