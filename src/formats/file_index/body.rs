//! The index body (see docs/file-index.md: `body`): the block table and the tree with
//! every file's chunk hashes, encoded and parsed strictly; and the disk cache's tree
//! records, which share the tree's encoding.

use super::{body_err, cut, Block, BlockCompression, FileIndex, IndexError, VerifiedHeader};
use super::{MAGIC, MAX_BLOCK_NAR, MAX_BODY_DECOMPRESSED, MAX_NODES};
use crate::formats::hash::Sha256;
use crate::formats::listing::{invalid_name, invalid_target, Entry, MAX_DEPTH};
use crate::formats::store_path::StorePath;

impl FileIndex {
    /// The body, uncompressed.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&(self.url.len() as u16).to_le_bytes());
        b.extend_from_slice(self.url.as_bytes());
        b.push(self.compression.code());
        b.extend_from_slice(&self.file_size.to_le_bytes());
        b.extend_from_slice(&self.file_hash.0);
        b.push(self.chunk_shift);
        b.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for bl in &self.blocks {
            b.extend_from_slice(&bl.comp_len.to_le_bytes());
            b.extend_from_slice(&bl.nar_len.to_le_bytes());
        }
        encode_node(&mut b, &self.root);
        b
    }

    /// The index whose header `h` was verified, from the body that followed it.
    pub fn from_verified_body(
        h: &VerifiedHeader<'_>,
        body: &[u8],
        nar_size: u64,
    ) -> Result<Self, IndexError> {
        if body.len() as u64 != h.body_size {
            return Err(body_err(format!(
                "{} bytes, the header says {}",
                body.len(),
                h.body_size
            )));
        }
        if Sha256::digest(body) != h.body_hash {
            return Err(body_err("does not match BodyHash"));
        }
        let limit = (nar_size + (1 << 20)).min(MAX_BODY_DECOMPRESSED);
        let mut plain = Vec::new();
        use std::io::Read;
        zstd::stream::read::Decoder::new(body)
            .and_then(|d| d.take(limit + 1).read_to_end(&mut plain))
            .map_err(|e| body_err(format!("cannot be decompressed: {e}")))?;
        if plain.len() as u64 > limit {
            return Err(body_err(format!("decompresses to more than {limit} bytes")));
        }
        Self::parse_body(&plain, h.store_path.clone(), h.nar_hash, nar_size)
    }

    fn parse_body(
        b: &[u8],
        store_path: StorePath,
        nar_hash: Sha256,
        nar_size: u64,
    ) -> Result<Self, IndexError> {
        let mut r = Cursor { b, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(body_err("unknown magic"));
        }
        let url_len = r.u16()? as usize;
        let url = std::str::from_utf8(r.take(url_len)?)
            .map_err(|_| body_err("url is not UTF-8"))?
            .to_owned();
        if let Some(why) = crate::formats::object_key::unsafe_key(&url) {
            return Err(body_err(format!("url {:?}: {why}", cut(&url))));
        }
        let compression = match r.u8()? {
            0 => BlockCompression::None,
            1 => BlockCompression::Xz,
            2 => BlockCompression::Zstd,
            c => return Err(body_err(format!("unknown compression {c}"))),
        };
        let file_size = r.u64()?;
        let file_hash = Sha256(r.take(32)?.try_into().expect("32 bytes"));
        let chunk_shift = r.u8()?;
        if !(12..=26).contains(&chunk_shift) {
            return Err(body_err(format!(
                "chunk_shift {chunk_shift} is not in 12..=26"
            )));
        }
        let count = r.u32()? as usize;
        if count > r.left() / 8 {
            return Err(body_err(format!("{count} blocks cannot fit in the body")));
        }
        let mut blocks = Vec::with_capacity(count);
        let (mut comp, mut nar) = (0u64, 0u64);
        for i in 0..count {
            let (comp_len, nar_len) = (r.u32()?, r.u32()?);
            if comp_len == 0 || nar_len == 0 || nar_len > MAX_BLOCK_NAR {
                return Err(body_err(format!(
                    "block {i}: {comp_len} bytes decoding to {nar_len} (each must be 1..={MAX_BLOCK_NAR})"
                )));
            }
            blocks.push(Block {
                comp_offset: comp,
                comp_len,
                nar_offset: nar,
                nar_len,
            });
            comp += comp_len as u64;
            nar += nar_len as u64;
        }
        if comp != file_size || nar != nar_size {
            return Err(body_err(format!(
                "blocks hold {comp} compressed bytes and {nar} NAR bytes, not {file_size} and {nar_size}"
            )));
        }
        let mut nodes = 0usize;
        let mut root = node(&mut r, 0, chunk_shift, nar_size, &mut nodes)?;
        if r.left() != 0 {
            return Err(body_err(format!("{} bytes after the tree", r.left())));
        }
        let laid = crate::formats::nar::lay_out(&mut root);
        if laid != nar_size {
            return Err(body_err(format!(
                "the tree lays out to a NAR of {laid} bytes, not {nar_size}"
            )));
        }
        Ok(FileIndex {
            store_path,
            nar_hash,
            nar_size,
            url,
            compression,
            file_size,
            file_hash,
            chunk_shift,
            blocks,
            root,
        })
    }
}

/// Appends the encoding of `e` (see docs/file-index.md: `node`).
fn encode_node(b: &mut Vec<u8>, e: &Entry) {
    match e {
        Entry::Regular {
            size,
            executable,
            chunks,
            ..
        } => {
            b.push(*executable as u8);
            b.extend_from_slice(&size.to_le_bytes());
            for c in chunks.as_deref().unwrap_or_default() {
                b.extend_from_slice(&c.0);
            }
        }
        Entry::Symlink { target } => {
            b.push(2);
            b.extend_from_slice(&(target.len() as u16).to_le_bytes());
            b.extend_from_slice(target);
        }
        Entry::Directory { entries } => {
            b.push(3);
            b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for (name, child) in entries {
                b.push(name.len() as u8);
                b.extend_from_slice(name);
                encode_node(b, child);
            }
        }
    }
}

fn node(
    r: &mut Cursor,
    depth: usize,
    shift: u8,
    nar_size: u64,
    nodes: &mut usize,
) -> Result<Entry, IndexError> {
    if depth > MAX_DEPTH {
        return Err(body_err(format!("nested deeper than {MAX_DEPTH}")));
    }
    *nodes += 1;
    if *nodes > MAX_NODES {
        return Err(body_err(format!("more than {MAX_NODES} nodes")));
    }
    match r.u8()? {
        t @ (0 | 1) => {
            let size = r.u64()?;
            if size > nar_size {
                return Err(body_err(format!(
                    "a file of {size} bytes in a NAR of {nar_size}"
                )));
            }
            let n = crate::formats::nar::chunk_count(size, shift) as usize;
            if n > r.left() / 32 {
                return Err(body_err("truncated in a file's chunk hashes"));
            }
            let chunks: Box<[Sha256]> = (0..n)
                .map(|_| Ok(Sha256(r.take(32)?.try_into().expect("32 bytes"))))
                .collect::<Result<_, IndexError>>()?;
            Ok(Entry::Regular {
                size,
                executable: t == 1,
                nar_offset: None,
                chunks: Some(chunks),
            })
        }
        2 => {
            let len = r.u16()? as usize;
            let target = r.take(len)?;
            if let Some(why) = invalid_target(target) {
                return Err(body_err(why));
            }
            Ok(Entry::Symlink {
                target: target.into(),
            })
        }
        3 => {
            let count = r.u32()? as usize;
            // every entry takes at least 3 bytes: no allocation beyond the body
            if count > r.left() / 3 {
                return Err(body_err(format!("{count} entries cannot fit in the body")));
            }
            let mut entries: Vec<(Box<[u8]>, Entry)> = Vec::with_capacity(count);
            for _ in 0..count {
                let len = r.u8()? as usize;
                let name = r.take(len)?;
                if let Some(why) = invalid_name(name) {
                    return Err(body_err(why));
                }
                if entries.last().is_some_and(|(prev, _)| **prev >= *name) {
                    return Err(body_err(format!(
                        "entry {:?} is not after the previous one (unsorted or duplicate)",
                        String::from_utf8_lossy(name)
                    )));
                }
                let name: Box<[u8]> = name.into();
                let child = node(r, depth + 1, shift, nar_size, nodes)?;
                entries.push((name, child));
            }
            Ok(Entry::Directory { entries })
        }
        t => Err(body_err(format!("unknown node type {t}"))),
    }
}

/// A verified tree kept by the disk cache (`trees/<NarHash>`): the same node encoding
/// as an index body, after a magic, the NAR's size and the chunk size. Unsigned: it
/// is the disk cache's own record of a tree it verified (from a NAR or an index).
pub fn encode_tree(root: &Entry, nar_size: u64, chunk_shift: u8) -> Vec<u8> {
    let mut b = b"NTR1".to_vec();
    b.extend_from_slice(&nar_size.to_le_bytes());
    b.push(chunk_shift);
    encode_node(&mut b, root);
    b
}

/// Reads a tree record back, strictly: the tree must lay out to its NAR size and
/// every regular file carry its chunk hashes.
pub fn decode_tree(b: &[u8]) -> Result<(Entry, u64, u8), IndexError> {
    let mut r = Cursor { b, pos: 0 };
    if r.take(4)? != b"NTR1" {
        return Err(body_err("not a tree record"));
    }
    let nar_size = r.u64()?;
    let shift = r.u8()?;
    if !(12..=26).contains(&shift) {
        return Err(body_err(format!("chunk_shift {shift} is not in 12..=26")));
    }
    let mut nodes = 0;
    let mut root = node(&mut r, 0, shift, nar_size, &mut nodes)?;
    if r.left() != 0 || crate::formats::nar::lay_out(&mut root) != nar_size {
        return Err(body_err("the tree does not lay out to its NAR size"));
    }
    Ok((root, nar_size, shift))
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        if n > self.left() {
            return Err(body_err(format!("truncated at byte {}", self.pos)));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, IndexError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, IndexError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, IndexError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, IndexError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}
