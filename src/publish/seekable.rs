//! Seekable compressed NARs: a NAR compressed as a sequence of independently
//! decodable blocks (each a whole xz stream or zstd frame), so that a reader holding
//! the block table (from a file index) can fetch and decode only the blocks a file
//! lies in. The object is still one ordinary `.nar.xz` / `.nar.zst`: xz and zstd
//! decoders read concatenated streams (frames) as one, and Nix does.
//!
//! Blocks end where reads want them to: at the start of a file's contents once the
//! block holds half the target size (and always before a file of the target size or
//! more), and at a chunk boundary of a large file once it holds the target size. Small files share blocks; a large file's chunks map to whole
//! blocks. Blocks are compressed on every core; their order is kept.

use crate::formats::file_index::{Block, BlockCompression, MAX_BLOCK_NAR};
use crate::formats::hash::{Hasher, Sha256};
use crate::formats::listing::Entry;
use crate::formats::nar::{self, NarError, Sink};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc;

/// Compressed bytes a block aims for. The uncompressed size follows from how well the
/// NAR compresses so far (text: about 4 MiB; incompressible data: 1 MiB), between
/// `MIN_BLOCK` and `MAX_BLOCK`: big enough to keep most of one stream's ratio, small
/// enough that a small file costs a fraction of a MiB to fetch and milliseconds to
/// decode.
pub const DEFAULT_BLOCK_TARGET: u64 = 1 << 20;
const MIN_BLOCK: u64 = 1 << 20;
const MAX_BLOCK: u64 = 8 << 20;
/// What the first blocks assume of the compression ratio, before any is known.
const FIRST_RATIO: f64 = 0.25;

/// What packing a NAR produced.
#[derive(Debug)]
pub struct Packed {
    /// With every file's NAR offset and chunk hashes.
    pub tree: Entry,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub blocks: Vec<Block>,
    pub file_hash: Sha256,
    pub file_size: u64,
}

/// Reads the NAR from `source`, parses it strictly (tree and chunk hashes) and writes
/// it to `out` compressed as blocks of about `target` bytes.
pub fn pack<R: Read, W: Write>(
    source: R,
    out: W,
    compression: BlockCompression,
    target: u64,
    level: Option<u32>,
) -> Result<(Packed, W), NarError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let writer = RefCell::new(BlockWriter::new(out, compression, level, threads));
    let target = target.clamp(4096, MAX_BLOCK_NAR as u64 / 8);
    let mut tee = Tee {
        inner: source,
        writer: &writer,
        nar: Hasher::default(),
    };
    let mut cutter = Cutter {
        writer: &writer,
        target,
    };
    let tree = nar::parse(
        &mut tee,
        &mut cutter,
        crate::formats::nar::DEFAULT_CHUNK_SHIFT,
    )?;
    let nar_size = tee.nar.len();
    let nar_hash = tee.nar.finish();
    let (out, blocks, file) = writer.into_inner().finish()?;
    Ok((
        Packed {
            tree,
            nar_hash,
            nar_size,
            blocks,
            file_hash: file.clone().finish(),
            file_size: file.len(),
        },
        out,
    ))
}

/// Packs the NAR of a path on disk (`nix-store --dump`), written on another thread.
pub fn pack_path<W: Write>(
    path: &Path,
    out: W,
    compression: BlockCompression,
    target: u64,
    level: Option<u32>,
) -> Result<(Packed, W), String> {
    let (reader, writer) = io::pipe().map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        let dumping = s.spawn(move || {
            nar::Writer::new(io::BufWriter::with_capacity(1 << 16, writer))
                .dump_path(path)
                .and_then(|mut w| w.flush())
        });
        let packed = pack(
            io::BufReader::with_capacity(1 << 16, reader),
            out,
            compression,
            target,
            level,
        );
        let dumped = dumping
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("panicked")));
        // the dumper's error (a file that vanished, say) explains the parser's
        dumped.map_err(|e| format!("{}: {e}", path.display()))?;
        packed.map_err(|e| format!("{}: {e}", path.display()))
    })
}

/// Passes what the parser reads into the block writer and hashes it (NarHash).
struct Tee<'a, R, W: Write> {
    inner: R,
    writer: &'a RefCell<BlockWriter<W>>,
    nar: Hasher,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.nar.update(&buf[..n]);
        self.writer.borrow_mut().push(&buf[..n])?;
        Ok(n)
    }
}

/// Decides where blocks end, from where the parser is in the tree.
struct Cutter<'a, W: Write> {
    writer: &'a RefCell<BlockWriter<W>>,
    target: u64,
}

impl<W: Write> Sink for Cutter<'_, W> {
    fn dir(&mut self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _: &Path, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn file_start(&mut self, _: &Path, size: u64, _: bool) -> io::Result<()> {
        // the parser has read up to this file's contents: the block may end here, and
        // does before a large file, whose chunks then start blocks of their own
        let mut w = self.writer.borrow_mut();
        let chunk = 1u64 << crate::formats::nar::DEFAULT_CHUNK_SHIFT;
        if w.current() >= w.block_size(self.target) || (size >= chunk && w.current() > 0) {
            w.cut()?;
        }
        Ok(())
    }
    fn file_data(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn chunk_end(&mut self, _: &Sha256) -> io::Result<()> {
        let mut w = self.writer.borrow_mut();
        if w.current() >= w.block_size(self.target) {
            w.cut()?;
        }
        Ok(())
    }
    fn file_end(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Collects NAR bytes into blocks, compresses each on a worker thread, and writes
/// them out in order, keeping the block table and the compressed file's hash.
struct BlockWriter<W: Write> {
    out: W,
    file: Hasher,
    cur: Vec<u8>,
    blocks: Vec<Block>,
    nar_pos: u64,
    comp_pos: u64,
    /// Block number and its NAR length, of blocks sent to the workers.
    pending: BTreeMap<u64, u32>,
    next_send: u64,
    next_write: u64,
    done: BTreeMap<u64, io::Result<Vec<u8>>>,
    jobs: Option<mpsc::SyncSender<(u64, Vec<u8>)>>,
    results: mpsc::Receiver<(u64, io::Result<Vec<u8>>)>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight_max: usize,
}

impl<W: Write> BlockWriter<W> {
    fn new(out: W, c: BlockCompression, level: Option<u32>, threads: usize) -> Self {
        let (jobs, jobs_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads);
        let jobs_rx = std::sync::Arc::new(std::sync::Mutex::new(jobs_rx));
        let (results_tx, results) = mpsc::channel();
        let workers = (0..threads)
            .map(|_| {
                let rx = jobs_rx.clone();
                let tx = results_tx.clone();
                std::thread::spawn(move || loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((n, data)) = job else { return };
                    if tx.send((n, compress(c, level, &data))).is_err() {
                        return;
                    }
                })
            })
            .collect();
        BlockWriter {
            out,
            file: Hasher::default(),
            cur: Vec::with_capacity(DEFAULT_BLOCK_TARGET as usize * 2),
            blocks: Vec::new(),
            nar_pos: 0,
            comp_pos: 0,
            pending: BTreeMap::new(),
            next_send: 0,
            next_write: 0,
            done: BTreeMap::new(),
            jobs: Some(jobs),
            results,
            workers,
            in_flight_max: threads * 2,
        }
    }

    fn current(&self) -> u64 {
        self.cur.len() as u64
    }

    /// Uncompressed bytes a block should hold to compress to about `target`.
    fn block_size(&self, target: u64) -> u64 {
        let ratio = if self.nar_pos == 0 {
            FIRST_RATIO
        } else {
            self.comp_pos as f64 / self.nar_pos as f64
        };
        ((target as f64 / ratio.max(1e-3)) as u64).clamp(target.min(MIN_BLOCK), MAX_BLOCK)
    }

    fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        // a hard bound whatever the cuts: no block decodes to more than MAX_BLOCK_NAR
        while self.cur.len() + data.len() > MAX_BLOCK_NAR as usize {
            let room = MAX_BLOCK_NAR as usize - self.cur.len();
            self.cur.extend_from_slice(&data[..room]);
            data = &data[room..];
            self.cut()?;
        }
        self.cur.extend_from_slice(data);
        Ok(())
    }

    /// Ends the current block (if it holds anything).
    fn cut(&mut self) -> io::Result<()> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(
            &mut self.cur,
            Vec::with_capacity(DEFAULT_BLOCK_TARGET as usize * 2),
        );
        let n = self.next_send;
        self.next_send += 1;
        self.pending.insert(n, data.len() as u32);
        let jobs = self.jobs.as_ref().expect("open until finish");
        jobs.send((n, data))
            .map_err(|_| io::Error::other("the compressing threads stopped"))?;
        // keep memory bounded: wait while too many blocks are under way
        while self.next_send - self.next_write > self.in_flight_max as u64 {
            self.receive_one()?;
        }
        Ok(())
    }

    fn receive_one(&mut self) -> io::Result<()> {
        let (n, r) = self
            .results
            .recv()
            .map_err(|_| io::Error::other("the compressing threads stopped"))?;
        self.done.insert(n, r);
        while let Some(r) = self.done.remove(&self.next_write) {
            let comp = r?;
            let nar_len = self.pending.remove(&self.next_write).expect("sent");
            self.out.write_all(&comp)?;
            self.file.update(&comp);
            self.blocks.push(Block {
                comp_offset: self.comp_pos,
                comp_len: comp.len() as u32,
                nar_offset: self.nar_pos,
                nar_len,
            });
            self.comp_pos += comp.len() as u64;
            self.nar_pos += nar_len as u64;
            self.next_write += 1;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<(W, Vec<Block>, Hasher)> {
        self.cut()?;
        self.jobs = None; // the workers end once the queue is empty
        while self.next_write < self.next_send {
            self.receive_one()?;
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.out.flush()?;
        Ok((self.out, self.blocks, self.file))
    }
}

fn compress(c: BlockCompression, level: Option<u32>, data: &[u8]) -> io::Result<Vec<u8>> {
    match c {
        BlockCompression::None => Ok(data.to_vec()),
        BlockCompression::Xz => {
            // Machine code compresses better after the x86 branch filter (part of the
            // xz format: every decoder has it), other data a little worse: a block
            // holding any is compressed both ways and the smaller kept.
            let plain = xz(level, data, false)?;
            if cfg!(target_arch = "x86_64") && data.contains(&0) {
                let bcj = xz(level, data, true)?;
                if bcj.len() < plain.len() {
                    return Ok(bcj);
                }
            }
            Ok(plain)
        }
        BlockCompression::Zstd => {
            zstd::bulk::compress(data, level.map_or(3, |l| l as i32)).map_err(io::Error::other)
        }
    }
}

/// One whole xz stream of `data` (LZMA2 at `level`, default 6 as Nix), with the x86
/// branch filter first if `x86`.
fn xz(level: Option<u32>, data: &[u8], x86: bool) -> io::Result<Vec<u8>> {
    use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
    let opts = LzmaOptions::new_preset(level.unwrap_or(6)).map_err(io::Error::other)?;
    let mut filters = Filters::new();
    if x86 {
        filters.x86();
    }
    filters.lzma2(&opts);
    let stream = Stream::new_stream_encoder(&filters, Check::Crc64).map_err(io::Error::other)?;
    let mut e = liblzma::write::XzEncoder::new_stream(Vec::with_capacity(data.len() / 3), stream);
    e.write_all(data)?;
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::decompress::decode_block;

    fn sample(dir: &Path) {
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        for i in 0..200 {
            std::fs::write(
                dir.join(format!("lib/small{i:03}")),
                format!("file {i}\n").repeat(i),
            )
            .unwrap();
        }
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let big: Vec<u8> = (0..5_000_000u32)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.join("big"), big).unwrap();
        std::os::unix::fs::symlink("big", dir.join("link")).unwrap();
    }

    #[test]
    fn blocks_decode_alone_and_the_whole_decodes_as_one() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("p");
        sample(&src);
        let nar = nar::Writer::new(Vec::new()).dump_path(&src).unwrap();
        for c in [
            BlockCompression::Xz,
            BlockCompression::Zstd,
            BlockCompression::None,
        ] {
            let (p, out) = pack_path(&src, Vec::new(), c, 1 << 20, None).unwrap();
            assert_eq!(p.nar_size, nar.len() as u64);
            assert_eq!(p.nar_hash, Sha256::digest(&nar));
            assert_eq!(p.file_hash, Sha256::digest(&out));
            assert_eq!(p.file_size, out.len() as u64);
            assert!(p.blocks.len() >= 3, "{c:?}: {} blocks", p.blocks.len());
            // every block alone decodes to its part of the NAR
            for b in &p.blocks {
                let comp = &out[b.comp_offset as usize..][..b.comp_len as usize];
                let plain = decode_block(c, comp, b.nar_len).unwrap();
                assert_eq!(plain, &nar[b.nar_offset as usize..][..b.nar_len as usize]);
            }
            // and the object as a whole is an ordinary compressed NAR
            let whole_c = match c {
                BlockCompression::Xz => crate::formats::narinfo::Compression::Xz,
                BlockCompression::Zstd => crate::formats::narinfo::Compression::Zstd,
                BlockCompression::None => crate::formats::narinfo::Compression::None,
            };
            let mut whole = Vec::new();
            crate::fetch::decompress::nar_reader(&whole_c, &out[..])
                .unwrap()
                .read_to_end(&mut whole)
                .unwrap();
            assert!(whole == nar, "{c:?}");
            // the big file starts a block, and blocks end inside it only between chunks
            let mut tree = p.tree.clone();
            crate::formats::nar::lay_out(&mut tree);
            let Entry::Directory { entries } = &tree else {
                panic!()
            };
            let Entry::Regular {
                nar_offset: Some(off),
                size,
                ..
            } = entries[0].1
            else {
                panic!()
            };
            assert_eq!(size, 5_000_000);
            assert!(p.blocks.iter().any(|b| b.nar_offset == off));
            for b in p
                .blocks
                .iter()
                .filter(|b| b.nar_offset > off && b.nar_offset < off + size)
            {
                assert_eq!((b.nar_offset - off) % (1 << 20), 0, "{c:?}: {b:?}");
            }
        }
    }
}
