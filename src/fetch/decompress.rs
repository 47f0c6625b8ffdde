//! The compressions Nix writes NARs and listings with, as readers: one place, so NARs
//! and listings accept the same set (Nix's `compression=` and `ls-compression=`).

use crate::formats::file_index::BlockCompression;
use crate::formats::narinfo::Compression;
use std::io::Read;
#[cfg(test)]
use std::io::Write;

/// The most memory an xz stream may ask the decoder for: `xz -9` needs 65 MiB; an
/// unsigned header claiming a gigabyte dictionary is refused, not obeyed.
const XZ_MEMLIMIT: u64 = 80 << 20;
/// zstd windows up to 64 MiB (level 19 uses 8 MiB; Nix writes no `--long` frames).
const ZSTD_WINDOW_LOG_MAX: u32 = 26;

/// A reader of the NAR inside `r`, compressed as its narinfo says. xz's own CRC is
/// skipped: NarHash is checked over the whole output anyway, and the CRC cost 3% of
/// the CPU of a cold traversal.
pub fn nar_reader<'a, R: Read + Send + 'a>(
    c: &Compression,
    r: R,
) -> Result<Box<dyn Read + Send + 'a>, String> {
    reader(c, r, false)
}

fn reader<'a, R: Read + Send + 'a>(
    c: &Compression,
    r: R,
    xz_check: bool,
) -> Result<Box<dyn Read + Send + 'a>, String> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Xz => {
            use liblzma::stream::{Stream, CONCATENATED, IGNORE_CHECK};
            let flags = if xz_check {
                CONCATENATED
            } else {
                CONCATENATED | IGNORE_CHECK
            };
            let stream =
                Stream::new_stream_decoder(XZ_MEMLIMIT, flags).map_err(|e| e.to_string())?;
            Box::new(liblzma::read::XzDecoder::new_stream(r, stream))
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(r).map_err(|e| e.to_string())?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| e.to_string())?;
            Box::new(d)
        }
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        Compression::Br => Box::new(brotli::Decompressor::new(r, 64 * 1024)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Unknown(c) => return Err(format!("unsupported compression '{c}'")),
    })
}

/// A decoder of one block of a seekable NAR read from `comp` (which must end where
/// the block does).
pub fn block_reader<'a, R: Read + Send + 'a>(
    c: BlockCompression,
    comp: R,
) -> Result<Box<dyn Read + Send + 'a>, String> {
    let compression = match c {
        BlockCompression::None => Compression::None,
        BlockCompression::Xz => Compression::Xz,
        BlockCompression::Zstd => Compression::Zstd,
    };
    nar_reader(&compression, comp)
}

/// Decodes one block (its compressed bytes) into exactly `nar_len` bytes: more or
/// fewer is an error, and decoding stops at `nar_len + 1` however well it compresses.
pub fn decode_block(c: BlockCompression, comp: &[u8], nar_len: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(nar_len as usize);
    block_reader(c, comp)?
        .take(nar_len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("the block does not decode: {e}"))?;
    if out.len() != nar_len as usize {
        return Err(format!(
            "the block decodes to {}{} bytes, not {nar_len}",
            if out.len() > nar_len as usize {
                "more than "
            } else {
                ""
            },
            out.len().min(nar_len as usize)
        ));
    }
    Ok(out)
}

/// A listing's JSON, as a stream. Nix may store listings compressed
/// (`ls-compression=br` on cache.nixos.org), and S3 and plain web servers hand them
/// over as stored, so the compression is told from the bytes: JSON starts with `{`,
/// xz, zstd, gzip and bzip2 have magic numbers, and brotli, which has none, is tried
/// last. Reading more than `max` bytes of JSON fails, however well the input
/// compresses.
pub fn listing_reader(raw: Vec<u8>, max: usize) -> Box<dyn Read + Send> {
    let first = raw.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let c = if first == Some(b'{') || first.is_none() {
        Compression::None
    } else if raw.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if raw.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if raw.starts_with(b"BZh") {
        Compression::Bzip2
    } else {
        Compression::Br
    };
    let what = c.as_str().to_owned();
    // no hash covers a listing: keep xz's check
    match reader(&c, std::io::Cursor::new(raw), true) {
        Ok(inner) => Box::new(Bounded {
            inner,
            left: max as u64,
            max,
            what,
        }),
        Err(e) => Box::new(Failing(e)),
    }
}

/// Passes at most `max` bytes, then fails; names the compression when it fails.
struct Bounded<R> {
    inner: R,
    left: u64,
    max: usize,
    what: String,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            std::io::Error::other(format!(
                "neither JSON nor a {}-compressed listing ({e})",
                self.what
            ))
        })?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!("more than {} bytes of JSON", self.max))
        })?;
        Ok(n)
    }
}

struct Failing(String);

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other(self.0.clone()))
    }
}

/// `data` compressed with `c`, for tests of the readers.
#[cfg(test)]
pub(crate) fn compressed(c: &Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::Xz => {
            let mut w = liblzma::write::XzEncoder::new(Vec::new(), 6);
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        Compression::Bzip2 => {
            let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        Compression::Br => {
            let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
            w.write_all(data).unwrap();
            w.into_inner()
        }
        Compression::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        _ => data.to_vec(),
    }
}

/// Every compression narfs reads, for tests.
#[cfg(test)]
pub(crate) const ALL: [Compression; 6] = [
    Compression::None,
    Compression::Xz,
    Compression::Zstd,
    Compression::Bzip2,
    Compression::Br,
    Compression::Gzip,
];

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &[u8] = br#"{"version":1,"root":{"type":"regular","size":3}}"#;

    fn listing_json(raw: Vec<u8>, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        listing_reader(raw, max)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn every_compression_of_a_listing_is_recognised() {
        for c in &ALL {
            assert_eq!(
                listing_json(compressed(c, JSON), 1 << 20).unwrap(),
                JSON,
                "{c:?}"
            );
        }
    }

    #[test]
    fn every_nar_compression_reads_back() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for c in &ALL {
            let mut out = Vec::new();
            nar_reader(c, &compressed(c, &data)[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert!(out == data, "{c:?}");
        }
        let e = nar_reader(&Compression::Unknown("lz4".into()), &b""[..]).err();
        assert_eq!(e.unwrap(), "unsupported compression 'lz4'");
    }

    #[test]
    fn a_stream_header_cannot_make_the_decoder_take_gigabytes() {
        // an xz stream whose (unsigned) block header claims a 4 GiB dictionary
        let mut xz = compressed(&Compression::Xz, b"hello, world");
        let at = 12 + xz[12..].windows(2).position(|w| w == [0x21, 0x01]).unwrap();
        xz[at + 2] = 40;
        let len = (xz[12] as usize + 1) * 4;
        let mut crc = flate2::Crc::new();
        crc.update(&xz[12..12 + len - 4]);
        xz[12 + len - 4..12 + len].copy_from_slice(&crc.sum().to_le_bytes());
        let mut out = Vec::new();
        let e = nar_reader(&Compression::Xz, &xz[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("memory"), "{e}");
        // zstd: a window beyond 64 MiB is refused too
        let mut big = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        big.window_log(27).unwrap();
        big.long_distance_matching(true).unwrap();
        big.write_all(&vec![1u8; 1 << 20]).unwrap();
        let big = big.finish().unwrap();
        assert!(nar_reader(&Compression::Zstd, &big[..])
            .unwrap()
            .read_to_end(&mut out)
            .is_err());
    }

    #[test]
    fn listings_that_are_neither_fail_and_bombs_are_bounded() {
        let e = listing_json(b"garbage, not brotli".to_vec(), 1 << 20).unwrap_err();
        assert!(
            e.contains("neither JSON nor a br-compressed listing"),
            "{e}"
        );
        let bomb = compressed(&Compression::Zstd, &vec![b' '; 10 << 20]);
        assert!(bomb.len() < 4096);
        let e = listing_json(bomb, 1 << 20).unwrap_err();
        assert!(e.contains("more than 1048576 bytes of JSON"), "{e}");
    }

    #[test]
    fn a_block_that_decodes_to_other_sizes_is_refused() {
        let comp = compressed(&Compression::Xz, &[7u8; 1000]);
        assert!(decode_block(BlockCompression::Xz, &comp, 1000).is_ok());
        assert!(decode_block(BlockCompression::Xz, &comp, 999)
            .unwrap_err()
            .contains("more than"));
        assert!(decode_block(BlockCompression::Xz, &comp, 1001)
            .unwrap_err()
            .contains("1000 bytes"));
        assert!(decode_block(BlockCompression::Xz, &comp[..20], 1000).is_err());
        // a bomb: stops at nar_len + 1
        let bomb = compressed(&Compression::Zstd, &vec![0u8; 50 << 20]);
        assert!(decode_block(BlockCompression::Zstd, &bomb, 4096).is_err());
    }
}
