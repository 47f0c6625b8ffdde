//! Counters a running mount keeps, rendered in the Prometheus text format for
//! `--metrics-addr` (served by `mount::metrics`) and for `narfs stats`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the NAR fetch latency histogram.
const BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
pub struct Metrics {
    pub narinfo_disk_hits: AtomicU64,
    pub narinfo_fetched: AtomicU64,
    pub narinfo_missing: AtomicU64,
    pub narinfo_invalid: AtomicU64,
    pub narinfo_untrusted: AtomicU64,
    pub nar_disk_hits: AtomicU64,
    pub nar_fetched: AtomicU64,
    pub nar_failed: AtomicU64,
    /// Complete NARs that failed verification (hash, size or format), as opposed to
    /// fetches that failed for want of an answer.
    pub nar_refused: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub bytes_unpacked: AtomicU64,
    /// Range GETs of blocks of indexed paths, by result.
    pub block_requests: AtomicU64,
    pub block_failed: AtomicU64,
    /// Blocks that were had but did not decode (or held no chunk the index names).
    pub block_refused: AtomicU64,
    pub block_bytes: AtomicU64,
    /// File indexes fetched and verified, and refused.
    pub index_fetched: AtomicU64,
    pub index_refused: AtomicU64,
    pub evictions: AtomicU64,
    /// Start-up profiles: packs fetched (Range GETs), refused (manifest or bytes),
    /// their compressed bytes, and the chunks they stored.
    pub profile_requests: AtomicU64,
    pub profile_refused: AtomicU64,
    pub profile_bytes: AtomicU64,
    pub profile_chunks: AtomicU64,
    /// getxattr and listxattr requests from the kernel (answered by the mount, not
    /// the fetcher, but counted with the rest).
    pub xattr_requests: AtomicU64,
    pub inflight: AtomicI64,
    fetch_buckets: [AtomicU64; BUCKETS.len()],
    fetch_count: AtomicU64,
    fetch_micros: AtomicU64,
}

/// What the metrics do not count themselves: read from the cache and index on demand.
pub struct Gauges {
    pub cache_bytes_used: u64,
    pub cache_bytes_quota: u64,
    pub paths_known: u64,
    /// Established TCP connections of the process (see [`tcp_connections`]).
    pub tcp_connections: u64,
}

/// TCP connections this process holds established now, found by the socket inodes of
/// its descriptors in `/proc/self/net/tcp{,6}`: a handful when connections to the cache
/// are kept alive and reused, many when each object pays for a new one.
pub fn tcp_connections() -> u64 {
    let mut mine = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                mine.insert(inode);
            }
        }
    }
    let mut n = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 01 is ESTABLISHED; column 9 the socket's inode
            if cols.len() > 9
                && cols[3] == "01"
                && cols[9].parse::<u64>().is_ok_and(|i| mine.contains(&i))
            {
                n += 1;
            }
        }
    }
    n
}

/// Decrements the in-flight gauge however the fetch ends.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn in_flight(&self) -> InFlight<'_> {
        self.inflight.fetch_add(1, Relaxed);
        InFlight(self)
    }

    /// One NAR fetched, verified and unpacked.
    pub fn fetched(&self, took: Duration, file_bytes: u64, nar_bytes: u64) {
        Self::inc(&self.nar_fetched);
        self.bytes_fetched.fetch_add(file_bytes, Relaxed);
        self.bytes_unpacked.fetch_add(nar_bytes, Relaxed);
        let s = took.as_secs_f64();
        for (b, le) in self.fetch_buckets.iter().zip(BUCKETS) {
            if s <= le {
                b.fetch_add(1, Relaxed);
            }
        }
        self.fetch_count.fetch_add(1, Relaxed);
        self.fetch_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// One Range GET of blocks, of `bytes` compressed bytes.
    pub fn block_fetched(&self, bytes: u64) {
        Self::inc(&self.block_requests);
        self.block_bytes.fetch_add(bytes, Relaxed);
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
            let _ = writeln!(s, "# HELP narfs_{name} {help}\n# TYPE narfs_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "narfs_{name}{labels} {v}");
            }
        };
        let get = |c: &AtomicU64| c.load(Relaxed).to_string();
        metric(
            "narinfo_lookups_total",
            "counter",
            "narinfo lookups by result (disk_hit: verified before, no request)",
            &[
                ("{result=\"disk_hit\"}", get(&self.narinfo_disk_hits)),
                ("{result=\"fetched\"}", get(&self.narinfo_fetched)),
                ("{result=\"missing\"}", get(&self.narinfo_missing)),
            ],
        );
        metric(
            "nar_requests_total",
            "counter",
            "store path contents asked for, by result (disk_hit: already unpacked)",
            &[
                ("{result=\"disk_hit\"}", get(&self.nar_disk_hits)),
                ("{result=\"fetched\"}", get(&self.nar_fetched)),
                ("{result=\"failed\"}", get(&self.nar_failed)),
            ],
        );
        metric(
            "verification_failures_total",
            "counter",
            "objects refused, by kind",
            &[
                ("{kind=\"narinfo_invalid\"}", get(&self.narinfo_invalid)),
                ("{kind=\"narinfo_untrusted\"}", get(&self.narinfo_untrusted)),
                ("{kind=\"nar\"}", get(&self.nar_refused)),
            ],
        );
        metric(
            "block_requests_total",
            "counter",
            "Range GETs of blocks of indexed paths, by result",
            &[
                ("{result=\"fetched\"}", get(&self.block_requests)),
                ("{result=\"failed\"}", get(&self.block_failed)),
                ("{result=\"refused\"}", get(&self.block_refused)),
            ],
        );
        metric(
            "block_bytes_total",
            "counter",
            "compressed bytes of blocks downloaded",
            &[("", get(&self.block_bytes))],
        );
        metric(
            "profile_requests_total",
            "counter",
            "start-up profile packs fetched, and profiles refused (manifest or bytes)",
            &[
                ("{result=\"fetched\"}", get(&self.profile_requests)),
                ("{result=\"refused\"}", get(&self.profile_refused)),
            ],
        );
        metric(
            "profile_bytes_total",
            "counter",
            "compressed bytes of start-up profile packs downloaded",
            &[("", get(&self.profile_bytes))],
        );
        metric(
            "profile_chunks_total",
            "counter",
            "chunks stored from start-up profile packs (each verified)",
            &[("", get(&self.profile_chunks))],
        );
        metric(
            "file_indexes_total",
            "counter",
            "file indexes fetched, by result",
            &[
                ("{result=\"verified\"}", get(&self.index_fetched)),
                ("{result=\"refused\"}", get(&self.index_refused)),
            ],
        );
        metric(
            "fetched_bytes_total",
            "counter",
            "compressed NAR bytes downloaded",
            &[("", get(&self.bytes_fetched))],
        );
        metric(
            "unpacked_bytes_total",
            "counter",
            "NAR bytes verified and unpacked",
            &[("", get(&self.bytes_unpacked))],
        );
        let mut h: Vec<(String, String)> = BUCKETS
            .iter()
            .zip(&self.fetch_buckets)
            .map(|(le, c)| (format!("_bucket{{le=\"{le}\"}}"), get(c)))
            .collect();
        h.push(("_bucket{le=\"+Inf\"}".into(), get(&self.fetch_count)));
        h.push((
            "_sum".into(),
            format!("{}", self.fetch_micros.load(Relaxed) as f64 / 1e6),
        ));
        h.push(("_count".into(), get(&self.fetch_count)));
        let h: Vec<(&str, String)> = h.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        metric(
            "nar_fetch_seconds",
            "histogram",
            "time to fetch, verify and unpack one NAR",
            &h,
        );
        metric(
            "fetches_in_flight",
            "gauge",
            "NAR downloads running now",
            &[("", self.inflight.load(Relaxed).to_string())],
        );
        metric(
            "evictions_total",
            "counter",
            "file contents (blobs) evicted from the cache directory",
            &[("", get(&self.evictions))],
        );
        metric(
            "xattr_requests_total",
            "counter",
            "getxattr and listxattr requests the kernel sent (each a round trip)",
            &[("", get(&self.xattr_requests))],
        );
        metric(
            "cache_bytes",
            "gauge",
            "bytes of file contents in the cache directory",
            &[("", g.cache_bytes_used.to_string())],
        );
        metric(
            "cache_quota_bytes",
            "gauge",
            "the cache directory's quota",
            &[("", g.cache_bytes_quota.to_string())],
        );
        metric(
            "store_paths",
            "gauge",
            "store paths the mount knows",
            &[("", g.paths_known.to_string())],
        );
        metric(
            "tcp_connections",
            "gauge",
            "TCP connections open now (to the cache; a scraper's own included)",
            &[("", g.tcp_connections.to_string())],
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_its_own_established_connections() {
        // other tests of this process open connections too: one quiet moment suffices
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let counted = (0..50).any(|_| {
            let before = tcp_connections();
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            // both ends are this process's
            let with = tcp_connections();
            drop((c, s));
            with == before + 2
        });
        assert!(counted);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.fetched(Duration::from_millis(300), 100, 400);
        Metrics::inc(&m.narinfo_fetched);
        let t = m.render(&Gauges {
            cache_bytes_used: 5,
            cache_bytes_quota: 10,
            paths_known: 3,
            tcp_connections: 2,
        });
        assert!(t.contains("narfs_tcp_connections 2\n"), "{t}");
        assert!(
            t.contains("narfs_narinfo_lookups_total{result=\"fetched\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("narfs_nar_fetch_seconds_bucket{le=\"0.25\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("narfs_nar_fetch_seconds_bucket{le=\"0.5\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("narfs_nar_fetch_seconds_count 1\n"), "{t}");
        assert!(t.contains("narfs_fetched_bytes_total 100\n"), "{t}");
        assert!(t.contains("narfs_cache_quota_bytes 10\n"), "{t}");
        assert!(
            t.contains("# TYPE narfs_nar_fetch_seconds histogram\n"),
            "{t}"
        );
    }
}
