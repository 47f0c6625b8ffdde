//! The verifying pipeline one NAR passes through: FileHash/FileSize of the compressed
//! stream, decompression, NarHash/NarSize, the strict NAR parser. It knows no network:
//! fetches, `narfs index` and tests feed it any `Read`.

use super::stream::{ChannelReader, Chunk, CHUNK, IN_FLIGHT};
use crate::formats::hash::{Hasher, Sha256};
use crate::formats::listing::Entry;
use crate::formats::nar;
use crate::formats::narinfo::{Compression, NarInfo};
use std::io::{self, Read};

/// Why a NAR was not unpacked: the archive itself was refused (hash, size, format,
/// compression), or something local failed (disk, a panicked thread).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Local(String),
}

impl From<String> for UnpackError {
    fn from(s: String) -> Self {
        UnpackError::Refused(s)
    }
}

/// The streaming pipeline: compressed bytes → FileHash check → decompressor (its own
/// thread) → NarHash/NarSize check → NAR unpacker writing into `dest`. One pass, no
/// whole-NAR buffering. Returns the tree only if every check passed; the caller removes
/// `dest` otherwise.
pub fn unpack_verified<R: Read + Send>(
    reader: R,
    info: &NarInfo,
    dest: &std::path::Path,
) -> Result<Entry, UnpackError> {
    unpack_verified_into(reader, info, &mut nar::DiskSink::new(dest))
}

/// The same pipeline, with the NAR's nodes going to `sink` (an error from it is a
/// local fault that stops the parse).
pub fn unpack_verified_into<R: Read + Send>(
    reader: R,
    info: &NarInfo,
    sink: &mut dyn nar::Sink,
) -> Result<Entry, UnpackError> {
    let mut file = Checked {
        inner: reader,
        hasher: Hasher::default(),
        limit: info.file_size.unwrap_or(u64::MAX),
        what: "compressed NAR",
    };
    let compression = info.compression.clone();
    if let Compression::Unknown(c) = &compression {
        return Err(format!("unsupported compression '{c}'").into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(IN_FLIGHT);
    std::thread::scope(|scope| {
        let decoding = scope.spawn(move || -> Result<Hasher, String> {
            {
                let mut decoder = crate::fetch::decompress::nar_reader(&compression, &mut file)?;
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    match decoder.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.blocking_send(Ok(buf)).is_err() {
                                // the unpacker stopped: its error is the one to report
                                return Err(String::new());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
                            return Err(e.to_string());
                        }
                    }
                }
            }
            drop(tx);
            // The compressed stream may carry bytes after the end of the compressed
            // data; FileHash covers them too.
            io::copy(&mut file, &mut io::sink()).map_err(|e| e.to_string())?;
            Ok(file.hasher)
        });
        let mut nar_stream = Checked {
            inner: ChannelReader::new(rx),
            hasher: Hasher::default(),
            limit: info.nar_size,
            what: "NAR",
        };
        let unpacked = nar::parse(
            &mut nar_stream,
            sink,
            crate::formats::nar::DEFAULT_CHUNK_SHIFT,
        )
        .map_err(|e| match e {
            nar::NarError::Write(_) => UnpackError::Local(e.to_string()),
            e => UnpackError::Refused(format!("bad NAR: {e}")),
        });
        drop(nar_stream.inner); // lets a decoder blocked on a full channel finish
                                // a panicked decompressor looks like a truncated NAR to the unpacker: say
                                // what happened first
        let Ok(file_hasher) = decoding.join() else {
            return Err(UnpackError::Local("decompressor panicked".to_owned()));
        };
        let tree = unpacked?;
        let file_hasher = file_hasher?;
        let nar_hasher = nar_stream.hasher;
        if nar_hasher.len() != info.nar_size {
            return Err(format!(
                "NarSize mismatch: expected {}, got {}",
                info.nar_size,
                nar_hasher.len()
            )
            .into());
        }
        let got = nar_hasher.finish();
        if got != info.nar_hash {
            return Err(format!("NarHash mismatch: expected {}, got {got}", info.nar_hash).into());
        }
        if let Some(size) = info.file_size {
            if file_hasher.len() != size {
                return Err(format!(
                    "FileSize mismatch: expected {size}, got {}",
                    file_hasher.len()
                )
                .into());
            }
        }
        if let Some(expected) = info.file_hash {
            let got: Sha256 = file_hasher.finish();
            if got != expected {
                return Err(format!("FileHash mismatch: expected {expected}, got {got}").into());
            }
        }
        Ok(tree)
    })
}

/// Counts and hashes what passes through, and refuses to pass more than `limit` bytes:
/// the NarSize bound that stops decompression bombs and over-long archives.
struct Checked<R> {
    inner: R,
    hasher: Hasher,
    limit: u64,
    what: &'static str,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.hasher.len() + n as u64 > self.limit {
            return Err(io::Error::other(format!(
                "{} is longer than the {} bytes its narinfo states",
                self.what, self.limit
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::store_path::StorePath;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn sample_nar() -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("p")).unwrap();
        std::fs::write(d.path().join("p/f"), "hello ".repeat(1000)).unwrap();
        nar::Writer::new(Vec::new())
            .dump_path(&d.path().join("p"))
            .unwrap()
    }

    fn compress(c: &Compression, data: &[u8]) -> Vec<u8> {
        crate::fetch::decompress::compressed(c, data)
    }

    fn info_for(c: Compression, nar: &[u8], file: &[u8]) -> NarInfo {
        NarInfo {
            store_path: StorePath::from_basename("00000000000000000000000000000000-p").unwrap(),
            url: "nar/x".into(),
            compression: c,
            file_hash: Some(Sha256::digest(file)),
            file_size: Some(file.len() as u64),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            index: None,
            profile: None,
        }
    }

    fn attempt(info: &NarInfo, file: &[u8]) -> Result<Entry, String> {
        let d = tempfile::tempdir().unwrap();
        unpack_verified(file, info, &d.path().join("out")).map_err(|e| e.to_string())
    }

    #[test]
    fn every_compression_round_trips() {
        let nar = sample_nar();
        for c in crate::fetch::decompress::ALL {
            let file = compress(&c, &nar);
            let info = info_for(c.clone(), &nar, &file);
            assert!(attempt(&info, &file).is_ok(), "{c:?}");
        }
    }

    #[test]
    fn each_check_catches_its_fault() {
        let nar = sample_nar();
        let file = compress(&Compression::Xz, &nar);
        let good = info_for(Compression::Xz, &nar, &file);

        let mut i = good.clone();
        i.nar_size -= 1;
        let e = attempt(&i, &file).unwrap_err();
        assert!(e.contains("longer than"), "short NarSize: {e}");
        let mut i = good.clone();
        i.nar_size += 1;
        assert!(attempt(&i, &file).unwrap_err().contains("NarSize mismatch"));
        let mut i = good.clone();
        i.nar_hash = Sha256::digest(b"x");
        assert!(attempt(&i, &file).unwrap_err().contains("NarHash mismatch"));
        let mut i = good.clone();
        i.file_hash = Some(Sha256::digest(b"x"));
        assert!(attempt(&i, &file)
            .unwrap_err()
            .contains("FileHash mismatch"));
        let mut i = good.clone();
        i.compression = Compression::Unknown("lz4".into());
        assert!(attempt(&i, &file)
            .unwrap_err()
            .contains("unsupported compression 'lz4'"));
        let mut i = good.clone();
        i.compression = Compression::Zstd;
        assert!(attempt(&i, &file).is_err(), "wrong decompressor");
        // truncated compressed stream
        assert!(attempt(&good, &file[..file.len() / 2]).is_err());
        // extra bytes after the compressed stream change FileSize
        let mut longer = file.clone();
        longer.extend_from_slice(b"junk");
        assert!(attempt(&good, &longer).is_err());
        // one content byte flipped, FileHash and FileSize fixed up
        let mut bad = nar.clone();
        let at = bad.windows(5).position(|w| w == b"hello").unwrap();
        bad[at] ^= 1;
        let bad_file = compress(&Compression::Xz, &bad);
        let mut i = good.clone();
        i.file_hash = Some(Sha256::digest(&bad_file));
        i.file_size = Some(bad_file.len() as u64);
        assert!(attempt(&i, &bad_file)
            .unwrap_err()
            .contains("NarHash mismatch"));
    }

    #[test]
    fn decompression_bomb_stops_at_nar_size() {
        // a NAR header claiming a 1 GiB file, then 1 GiB of zeros: ~150 KiB of xz;
        // the narinfo claims a 1 KiB NAR
        let mut w = liblzma::write::XzEncoder::new(Vec::new(), 1);
        let mut head = nar::Writer::new(Vec::new());
        for s in ["nix-archive-1", "(", "type", "regular", "contents"] {
            head.raw_string(s.as_bytes()).unwrap();
        }
        let mut head = head.into_inner();
        head.extend_from_slice(&(1u64 << 30).to_le_bytes());
        w.write_all(&head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            w.write_all(&zeros).unwrap();
        }
        let file = w.finish().unwrap();
        let mut info = info_for(Compression::Xz, b"", &file);
        info.nar_size = 1024;
        let t = Instant::now();
        let e = attempt(&info, &file).unwrap_err();
        assert!(e.contains("longer than the 1024 bytes"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
