//! File indexes whose chunks are not 1 MiB: the format lets a signer pick 2^12 to 2^26
//! bytes, and every file must read back as the NAR has it, whole and at odd offsets,
//! through narfs and through FUSE passthrough.

mod common;

use common::*;
use narfs::formats::file_index::{object_key, BlockCompression, FileIndex};
use narfs::formats::hash::Sha256;
use narfs::formats::narinfo::Compression;
use narfs::formats::store_path::StorePath;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SHIFTS: std::ops::RangeInclusive<u8> = 12..=26;
/// Around the smallest chunk, over the default one, and several chunks of most.
const SIZES: [u64; 7] = [0, 1, 4095, 4096, 4097, (2 << 20) + 3, (3 << 20) + 5];

/// Pseudo-random bytes, different for every file of every path: a chunk read in the
/// wrong place can never match by chance.
fn contents(shift: u8, size: u64) -> Vec<u8> {
    // (a seed of its own for each: `noise` sets the lowest bit)
    noise(size as usize, ((shift as u64) << 40 ^ size) << 1)
}

/// A path per chunk shift, with its seekable NAR (one uncompressed file of blocks)
/// and a file index of that shift, signed by the cache's key; returns the basenames.
fn indexed_cache(cache: &SignedCache, work: &Path) -> Vec<(u8, String)> {
    std::fs::write(
        cache.dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nNarfsIndexes: 1\n",
    )
    .unwrap();
    SHIFTS
        .map(|shift| {
            let dir = work.join(format!("shift-{shift}"));
            std::fs::create_dir(&dir).unwrap();
            for size in SIZES {
                std::fs::write(dir.join(format!("f{size}")), contents(shift, size)).unwrap();
            }
            let nar = nar_of(&dir);
            let (packed, file) = narfs::publish::seekable::pack(
                &nar[..],
                Vec::new(),
                BlockCompression::None,
                narfs::publish::seekable::DEFAULT_BLOCK_TARGET,
                None,
            )
            .unwrap();
            let name = format!("shift-{shift}");
            let base = cache.put(&name, &nar, Compression::None, &file, |i| {
                i.index = Some(object_key(i.store_path.hash_part()));
            });
            let store_path = StorePath::from_basename(&base).unwrap();
            let index = FileIndex {
                url: format!("nar/{}.nar", &packed.file_hash.to_nix_string()[7..]),
                store_path: store_path.clone(),
                nar_hash: packed.nar_hash,
                nar_size: packed.nar_size,
                compression: BlockCompression::None,
                file_size: packed.file_size,
                file_hash: packed.file_hash,
                chunk_shift: shift,
                blocks: packed.blocks,
                root: narfs::formats::nar::parse(
                    &mut &nar[..],
                    &mut narfs::formats::nar::TreeOnly,
                    shift,
                )
                .unwrap(),
            };
            assert_eq!(packed.file_hash, Sha256::digest(&file));
            std::fs::write(
                cache.dir.join(object_key(store_path.hash_part())),
                index.to_bytes(&[&cache.sk]),
            )
            .unwrap();
            (shift, base)
        })
        .collect()
}

/// Reads every file of every path at odd offsets (around chunk boundaries), then
/// whole, and compares with its source in `work`.
fn reads_back(m: &Mounted, paths: &[(u8, String)], work: &Path) {
    for (shift, base) in paths {
        let chunk = 1u64 << shift;
        for size in SIZES {
            let p = m.p(base).join(format!("f{size}"));
            let want = std::fs::read(work.join(format!("shift-{shift}/f{size}"))).unwrap();
            let what = format!("{} (chunks of 2^{shift})", p.display());
            let f = std::fs::File::open(&p).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(f.metadata().unwrap().len(), size, "{what}");
            for at in [
                1,
                4095,
                4097,
                chunk - 1,
                chunk + 1,
                size / 2 + 7,
                size.saturating_sub(3),
            ] {
                let mut buf = vec![0; 10_000];
                let mut n = 0;
                while n < buf.len() {
                    match f.read_at(&mut buf[n..], at + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => panic!("{what} at {at}: {e}"),
                    }
                }
                let from = (at.min(size)) as usize;
                let end = (at + buf.len() as u64).min(size) as usize;
                assert!(
                    buf[..n] == want[from..end],
                    "{what}: {n} bytes at {at} are not the file's {} bytes there",
                    end - from
                );
            }
            let got = std::fs::read(&p).unwrap();
            assert!(
                got == want,
                "{what}: read {} bytes, not the file's {size}",
                got.len()
            );
        }
    }
}

#[test]
fn every_chunk_size_an_index_may_use_reads_back_exactly() {
    let s3 = S3Server::start();
    let cache = SignedCache::new(&s3);
    let work = tempfile::tempdir().unwrap();
    let paths = indexed_cache(&cache, work.path());
    let url = s3.url(s3.port, "h");
    let pk = cache.public_key();
    for mode in [&[][..], &["--passthrough"]] {
        let m = Mounted::start(&url, &[&pk], None, mode);
        reads_back(&m, &paths, work.path());
        let log = m.log_text();
        assert!(!log.contains("ERROR"), "{mode:?}:\n{log}");
        if !mode.is_empty() {
            assert!(
                log.contains("FUSE passthrough offered by the kernel"),
                "{log}"
            );
            assert!(!log.contains("FUSE passthrough refused"), "{log}");
        }
        assert!(
            m.stat("block_requests_total{result=\"fetched\"}") > 0,
            "{mode:?}: not read through the indexes"
        );
        assert_eq!(
            m.stat("nar_requests_total{result=\"fetched\"}"),
            0,
            "{mode:?}"
        );
    }
}
