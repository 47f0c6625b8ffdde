//! NAR archives: a strict streaming reader that unpacks into a directory, and a writer
//! (`writer`).
//!
//! The reader never trusts its input: every tag is checked, names and targets are
//! validated, directory entries must be strictly sorted, padding must be zero, nesting
//! is bounded, and nothing is written outside the destination (names cannot contain
//! `/` or be `..`, and each directory is freshly created by us). The caller bounds the
//! total size by wrapping the input (see `fetch`).

use super::hash::Sha256;
use super::listing::{invalid_name, invalid_target, Entry, MAX_DEPTH};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

mod writer;
pub use writer::Writer;

const MAGIC: &[u8] = b"nix-archive-1";

/// 1 MiB chunks: the unit a file's contents are hashed and stored in, and read in
/// by a mount (the file index records the shift it was written with).
pub const DEFAULT_CHUNK_SHIFT: u8 = 20;

/// Chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, shift: u8) -> u64 {
    size.div_ceil(1u64 << shift)
}

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Writing the unpacked tree failed (disk full, permissions): a local fault,
    /// not a fault of the archive.
    #[error("writing the unpacked path: {0}")]
    Write(io::Error),
    #[error("not a NAR (bad magic)")]
    Magic,
    #[error("at NAR offset {offset}: expected {expected}, found {found}")]
    Tag {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("at NAR offset {offset}: {what}")]
    Invalid { offset: u64, what: String },
    #[error("NAR nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

struct Reader<'a, R> {
    r: &'a mut R,
    pos: u64,
    buf: Vec<u8>,
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(64)]);
    format!("{s:?}")
}

/// A failure to read the archive: where it ends too early (`truncated` says how), or
/// the reader's own error.
fn read_error(e: io::Error, offset: u64, truncated: &str) -> NarError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        NarError::Invalid {
            offset,
            what: truncated.into(),
        }
    } else {
        NarError::Io(e)
    }
}

impl<R: Read> Reader<'_, R> {
    fn exact(&mut self, n: usize) -> Result<(), NarError> {
        self.buf.resize(n, 0);
        self.r
            .read_exact(&mut self.buf)
            .map_err(|e| read_error(e, self.pos, "archive is truncated"))?;
        self.pos += n as u64;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        self.exact(8)?;
        Ok(u64::from_le_bytes(self.buf[..8].try_into().unwrap()))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        if pad > 0 {
            let at = self.pos;
            self.exact(pad)?;
            if self.buf.iter().any(|&b| b != 0) {
                return Err(NarError::Invalid {
                    offset: at,
                    what: "non-zero padding".into(),
                });
            }
        }
        Ok(())
    }

    /// The `len` bytes of a string, left in `self.buf`, and its padding.
    fn contents_of(&mut self, len: u64) -> Result<(), NarError> {
        self.exact(len as usize)?;
        let s = std::mem::take(&mut self.buf);
        self.padding(len)?;
        self.buf = s;
        Ok(())
    }

    /// A string of at most `max` bytes, left in `self.buf`.
    fn string(&mut self, max: usize, what: &'static str) -> Result<(), NarError> {
        let at = self.pos;
        let len = self.u64()?;
        if len > max as u64 {
            return Err(NarError::Invalid {
                offset: at,
                what: format!("{what} of {len} bytes is longer than {max}"),
            });
        }
        self.contents_of(len)
    }

    /// A tag string (at most 32 bytes), left in `self.buf`.
    fn tag_string(&mut self, expected: &'static str) -> Result<(), NarError> {
        let at = self.pos;
        let len = self.u64()?;
        if len > 32 {
            return Err(NarError::Tag {
                offset: at,
                expected,
                found: format!("a string of {len} bytes"),
            });
        }
        self.contents_of(len)
    }

    fn tag(&mut self, expected: &'static str) -> Result<(), NarError> {
        self.choice(&[expected], expected).map(|_| ())
    }

    /// Reads the next tag, which must be one of `choices`.
    fn choice(
        &mut self,
        choices: &[&'static str],
        expected: &'static str,
    ) -> Result<&'static str, NarError> {
        let at = self.pos;
        self.tag_string(expected)?;
        choices
            .iter()
            .find(|c| c.as_bytes() == self.buf.as_slice())
            .copied()
            .ok_or_else(|| NarError::Tag {
                offset: at,
                expected,
                found: show(&self.buf),
            })
    }
}

/// A failure to write the unpacked tree: local, unless the archive's own names made
/// a path too long for the file system.
fn write_error(e: io::Error) -> NarError {
    if e.raw_os_error() == Some(libc::ENAMETOOLONG) {
        NarError::Io(e)
    } else {
        NarError::Write(e)
    }
}

/// Where the nodes of a NAR go as the parser meets them, in NAR order. `path` is
/// relative to the archive's root (empty for the root itself). A file's contents come
/// in pieces that never straddle a chunk boundary; each chunk ends with its hash.
/// An error from the sink is a local fault (`NarError::Write`) that stops the parse.
pub trait Sink {
    fn dir(&mut self, path: &Path) -> io::Result<()>;
    fn entry(&mut self, _name: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, path: &Path, target: &[u8]) -> io::Result<()>;
    fn file_start(&mut self, path: &Path, size: u64, executable: bool) -> io::Result<()>;
    fn file_data(&mut self, data: &[u8]) -> io::Result<()>;
    fn chunk_end(&mut self, _hash: &Sha256) -> io::Result<()> {
        Ok(())
    }
    fn file_end(&mut self) -> io::Result<()>;
}

/// Parses a NAR, strictly, into `sink`, and returns its tree with every file's NAR
/// offset and the SHA-256 of each of its chunks (`2^chunk_shift` bytes).
pub fn parse<R: Read>(r: &mut R, sink: &mut dyn Sink, chunk_shift: u8) -> Result<Entry, NarError> {
    let mut rd = Reader {
        r,
        pos: 0,
        buf: Vec::with_capacity(64),
    };
    // the reader's own failure (a decoder's, say) is not the archive's
    rd.string(MAGIC.len(), "magic").map_err(|e| match e {
        NarError::Io(e) => NarError::Io(e),
        _ => NarError::Magic,
    })?;
    if rd.buf != MAGIC {
        return Err(NarError::Magic);
    }
    let mut p = Parse {
        sink,
        copy_buf: vec![0u8; 256 * 1024],
        chunk: 1u64 << chunk_shift,
        path: PathBuf::new(),
    };
    let entry = p.node(&mut rd, 0)?;
    // Nothing may follow the root node.
    let mut probe = [0u8; 1];
    loop {
        match rd.r.read(&mut probe) {
            Ok(0) => break,
            Ok(_) => {
                return Err(NarError::Invalid {
                    offset: rd.pos,
                    what: "trailing data after the archive".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(entry)
}

/// Unpacks a NAR read from `r` into `dest` (which must not exist) and returns its tree.
/// Regular files get mode 0444 (0555 if executable), directories 0755 so the disk cache
/// can remove them. On error, `dest` may hold a partial tree: the caller owns cleanup
/// (it unpacks into a temporary directory).
pub fn unpack<R: Read>(r: &mut R, dest: &Path) -> Result<Entry, NarError> {
    parse(r, &mut DiskSink::new(dest), DEFAULT_CHUNK_SHIFT)
}

/// Writes the tree under `dest`, never outside it: names cannot contain `/` or be
/// `..`, and every directory is freshly created here.
pub struct DiskSink<'a> {
    dest: &'a Path,
    file: Option<fs::File>,
}

impl<'a> DiskSink<'a> {
    pub fn new(dest: &'a Path) -> Self {
        DiskSink { dest, file: None }
    }

    /// The root itself when `path` is empty (`Path::join("")` would add a slash).
    fn at(&self, path: &Path) -> PathBuf {
        if path.as_os_str().is_empty() {
            self.dest.to_owned()
        } else {
            self.dest.join(path)
        }
    }
}

impl Sink for DiskSink<'_> {
    fn dir(&mut self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o755).create(self.at(path))
    }

    fn symlink(&mut self, path: &Path, target: &[u8]) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        symlink(std::ffi::OsStr::from_bytes(target), self.at(path))
    }

    fn file_start(&mut self, path: &Path, _size: u64, executable: bool) -> io::Result<()> {
        self.file = Some(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if executable { 0o555 } else { 0o444 })
                .custom_flags(libc::O_NOFOLLOW)
                .open(self.at(path))?,
        );
        Ok(())
    }

    fn file_data(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(data),
            None => Err(io::Error::other("file data outside a file")),
        }
    }

    fn file_end(&mut self) -> io::Result<()> {
        self.file = None;
        Ok(())
    }
}

/// A sink that writes nothing: the parse alone, for the tree and its chunk hashes.
pub struct TreeOnly;

impl Sink for TreeOnly {
    fn dir(&mut self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _: &Path, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn file_start(&mut self, _: &Path, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn file_data(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn file_end(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Parse<'s> {
    sink: &'s mut dyn Sink,
    copy_buf: Vec<u8>,
    chunk: u64,
    path: PathBuf,
}

impl Parse<'_> {
    fn node<R: Read>(&mut self, rd: &mut Reader<'_, R>, depth: usize) -> Result<Entry, NarError> {
        if depth > MAX_DEPTH {
            return Err(NarError::TooDeep);
        }
        rd.tag("(")?;
        rd.tag("type")?;
        match rd.choice(&["regular", "symlink", "directory"], "a node type")? {
            "regular" => {
                let mut executable = false;
                if rd.choice(&["executable", "contents"], "'executable' or 'contents'")?
                    == "executable"
                {
                    rd.tag("")?;
                    rd.tag("contents")?;
                    executable = true;
                }
                let size = rd.u64()?;
                let nar_offset = rd.pos;
                self.sink
                    .file_start(&self.path, size, executable)
                    .map_err(write_error)?;
                let chunks = self.contents(rd, size)?;
                self.sink.file_end().map_err(write_error)?;
                rd.padding(size)?;
                rd.tag(")")?;
                Ok(Entry::Regular {
                    size,
                    executable,
                    nar_offset: Some(nar_offset),
                    chunks: Some(chunks),
                })
            }
            "symlink" => {
                rd.tag("target")?;
                let at = rd.pos;
                rd.string(super::listing::MAX_TARGET_LEN, "symlink target")?;
                if let Some(what) = invalid_target(&rd.buf) {
                    return Err(NarError::Invalid {
                        offset: at,
                        what: what.into(),
                    });
                }
                let target: Box<[u8]> = rd.buf.as_slice().into();
                self.sink
                    .symlink(&self.path, &target)
                    .map_err(write_error)?;
                rd.tag(")")?;
                Ok(Entry::Symlink { target })
            }
            _ => {
                self.sink.dir(&self.path).map_err(write_error)?;
                let mut entries: Vec<(Box<[u8]>, Entry)> = Vec::new();
                loop {
                    if rd.choice(&["entry", ")"], "'entry' or ')'")? == ")" {
                        break;
                    }
                    rd.tag("(")?;
                    rd.tag("name")?;
                    let at = rd.pos;
                    rd.string(super::listing::MAX_NAME_LEN, "entry name")?;
                    if let Some(what) = invalid_name(&rd.buf) {
                        return Err(NarError::Invalid {
                            offset: at,
                            what: format!("{what}: {}", show(&rd.buf)),
                        });
                    }
                    let name: Box<[u8]> = rd.buf.as_slice().into();
                    if let Some((prev, _)) = entries.last() {
                        if **prev >= *name {
                            return Err(NarError::Invalid {
                                offset: at,
                                what: format!(
                                    "entry {} is not after {} (unsorted or duplicate)",
                                    show(&name),
                                    show(prev)
                                ),
                            });
                        }
                    }
                    rd.tag("node")?;
                    self.sink.entry(&name).map_err(write_error)?;
                    use std::os::unix::ffi::OsStrExt;
                    self.path.push(std::ffi::OsStr::from_bytes(&name));
                    let e = self.node(rd, depth + 1);
                    self.path.pop();
                    let e = e?;
                    rd.tag(")")?;
                    entries.push((name, e));
                }
                Ok(Entry::Directory { entries })
            }
        }
    }

    /// Passes `size` bytes of contents to the sink, hashing each chunk.
    fn contents<R: Read>(
        &mut self,
        rd: &mut Reader<'_, R>,
        size: u64,
    ) -> Result<Box<[Sha256]>, NarError> {
        use sha2::Digest;
        // (the size is the archive's word: no allocation is sized by it)
        let mut chunks = Vec::new();
        let mut left = size;
        while left > 0 {
            let mut hasher = sha2::Sha256::default();
            let mut in_chunk = left.min(self.chunk);
            left -= in_chunk;
            while in_chunk > 0 {
                let n = in_chunk.min(self.copy_buf.len() as u64) as usize;
                let buf = &mut self.copy_buf[..n];
                rd.r.read_exact(buf)
                    .map_err(|e| read_error(e, rd.pos, "archive is truncated inside a file"))?;
                hasher.update(&*buf);
                self.sink.file_data(buf).map_err(write_error)?;
                rd.pos += n as u64;
                in_chunk -= n as u64;
            }
            let hash = Sha256(hasher.finalize().into());
            self.sink.chunk_end(&hash).map_err(write_error)?;
            chunks.push(hash);
        }
        Ok(chunks.into())
    }
}

/// Bytes a NAR string of `len` bytes takes: its length, itself, zero padding to 8.
fn str_len(len: u64) -> u64 {
    8 + len.div_ceil(8) * 8
}

/// Lays `e` out as `nix-archive-1` does: sets every regular file's `nar_offset` (where
/// its contents start) and returns the size of the NAR. The framing of a NAR is a
/// function of its tree alone, which is why a file index stores no offsets.
pub fn lay_out(e: &mut Entry) -> u64 {
    fn node(e: &mut Entry, pos: &mut u64) {
        *pos += str_len(1) + str_len(4); // "(" "type"
        match e {
            Entry::Regular {
                size,
                executable,
                nar_offset,
                ..
            } => {
                *pos += str_len(7); // "regular"
                if *executable {
                    *pos += str_len(10) + str_len(0); // "executable" ""
                }
                *pos += str_len(8); // "contents"
                *nar_offset = Some(*pos + 8);
                *pos += str_len(*size);
            }
            Entry::Symlink { target } => {
                *pos += str_len(7) + str_len(6) + str_len(target.len() as u64);
            }
            Entry::Directory { entries } => {
                *pos += str_len(9); // "directory"
                for (name, child) in entries {
                    // "entry" "(" "name" <name> "node"
                    *pos += str_len(5) + str_len(1) + str_len(4);
                    *pos += str_len(name.len() as u64) + str_len(4);
                    node(child, pos);
                    *pos += str_len(1); // ")"
                }
            }
        }
        *pos += str_len(1); // ")"
    }
    let mut pos = str_len(MAGIC.len() as u64);
    node(e, &mut pos);
    pos
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn s(out: &mut Vec<u8>, b: &[u8]) {
        let mut w = Writer::new(std::mem::take(out));
        w.raw_string(b).unwrap();
        *out = w.into_inner();
    }

    fn nar(parts: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            s(&mut v, p);
        }
        v
    }

    struct FailingReader;

    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("corrupt xz data"))
        }
    }

    fn try_unpack(data: &[u8]) -> Result<Entry, NarError> {
        let d = tempfile::tempdir().unwrap();
        unpack(&mut &data[..], &d.path().join("out"))
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("share/empty-dir")).unwrap();
        fs::write(root.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("share/empty"), b"").unwrap();
        fs::write(root.join("share/ünï cödé.txt"), vec![7u8; 3000]).unwrap();
        symlink("app", root.join("bin/link")).unwrap();
        symlink("/nonexistent", root.join("dangling")).unwrap();
    }

    fn dump(path: &Path) -> Vec<u8> {
        Writer::new(Vec::new()).dump_path(path).unwrap()
    }

    /// The NAR of `sample_tree` (made in `dir/src`).
    fn sample_nar(dir: &Path) -> Vec<u8> {
        sample_tree(&dir.join("src"));
        dump(&dir.join("src"))
    }

    #[test]
    fn round_trip_through_writer_and_reader() {
        let d = tempfile::tempdir().unwrap();
        let bytes = sample_nar(d.path());
        let tree = unpack(&mut &bytes[..], &d.path().join("dst")).unwrap();
        let again = dump(&d.path().join("dst"));
        assert_eq!(bytes, again);
        assert_eq!(tree.count(), 9);
        // read-only, executable or not (what the umask leaves of 0555 and 0444)
        let meta = fs::metadata(d.path().join("dst/bin/app")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o722, 0o500);
        let meta = fs::metadata(d.path().join("dst/share/empty")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o722, 0o400);
    }

    #[test]
    fn lay_out_matches_the_archive() {
        let d = tempfile::tempdir().unwrap();
        let bytes = sample_nar(d.path());
        let tree = unpack(&mut &bytes[..], &d.path().join("dst")).unwrap();
        let mut laid = tree.clone();
        fn forget(e: &mut Entry) {
            match e {
                Entry::Regular { nar_offset, .. } => *nar_offset = None,
                Entry::Directory { entries } => entries.iter_mut().for_each(|(_, c)| forget(c)),
                Entry::Symlink { .. } => {}
            }
        }
        forget(&mut laid);
        assert_eq!(lay_out(&mut laid), bytes.len() as u64);
        assert_eq!(laid, tree, "offsets as the reader found them");
    }

    #[test]
    fn top_level_file_and_symlink() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"asdf").unwrap();
        let bytes = dump(&d.path().join("f"));
        let t = unpack(&mut &bytes[..], &d.path().join("g")).unwrap();
        assert!(matches!(
            t,
            Entry::Regular {
                size: 4,
                executable: false,
                nar_offset: Some(96),
                ..
            }
        ));
        assert_eq!(fs::read(d.path().join("g")).unwrap(), b"asdf");
        symlink("x", d.path().join("l")).unwrap();
        let bytes = dump(&d.path().join("l"));
        assert!(matches!(try_unpack(&bytes).unwrap(), Entry::Symlink { .. }));
    }

    /// A directory of files holding "x", named `names` in that order (the writer
    /// checks neither names nor order).
    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        let file = Entry::Regular {
            size: 1,
            executable: false,
            chunks: None,
            nar_offset: None,
        };
        let entries = names.iter().map(|n| ((*n).into(), file.clone())).collect();
        Writer::new(Vec::new())
            .dump_entry(&Entry::Directory { entries }, &mut |_| Ok(b"x".to_vec()))
            .unwrap()
    }

    #[test]
    fn rejects_hostile_archives() {
        assert!(try_unpack(&dir_with(&[b"a", b"b"])).is_ok());
        let bad_names: &[&[u8]] = &[b"", b".", b"..", b"a/b", b"a\0b", &[b'n'; 256]];
        for name in bad_names {
            let e = try_unpack(&dir_with(&[name])).unwrap_err();
            assert!(matches!(e, NarError::Invalid { .. }), "{name:?}: {e}");
        }
        for order in [&[&b"b"[..], b"a"][..], &[b"a", b"a"]] {
            let e = try_unpack(&dir_with(order)).unwrap_err();
            assert!(e.to_string().contains("unsorted or duplicate"), "{e}");
        }
        // magic
        assert!(matches!(
            try_unpack(&nar(&[b"nix-archive-2"])),
            Err(NarError::Magic)
        ));
        assert!(matches!(try_unpack(b""), Err(NarError::Magic)));
        // the reader's own error, before the magic, is reported as it is
        let d = tempfile::tempdir().unwrap();
        let mut failing = (&[1u8; 4][..]).chain(FailingReader);
        let e = unpack(&mut failing, &d.path().join("out")).unwrap_err();
        assert_eq!(e.to_string(), "corrupt xz data");
        // unknown tags and types
        let e = try_unpack(&nar(&[b"nix-archive-1", b"(", b"type", b"fifo"])).unwrap_err();
        assert!(matches!(e, NarError::Tag { .. }), "{e}");
        let e = try_unpack(&nar(&[b"nix-archive-1", b"(", b"kind"])).unwrap_err();
        assert!(matches!(e, NarError::Tag { .. }), "{e}");
        // symlink targets
        for t in [&b""[..], b"a\0b", &[b'a'; 4096]] {
            let e = try_unpack(&nar(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"symlink",
                b"target",
                t,
                b")",
            ]))
            .unwrap_err();
            assert!(matches!(e, NarError::Invalid { .. }), "{e}");
        }
        // truncated everywhere
        let good = dir_with(&[b"a", b"b"]);
        for cut in 0..good.len() {
            assert!(try_unpack(&good[..cut]).is_err(), "cut at {cut}");
        }
        // trailing garbage
        let mut t = good.clone();
        t.extend_from_slice(b"junk");
        assert!(try_unpack(&t).unwrap_err().to_string().contains("trailing"));
        // non-zero padding
        let mut p = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(b"x\x01\0\0\0\0\0\0");
        s(&mut p, b")");
        assert!(try_unpack(&p).unwrap_err().to_string().contains("padding"));
        // a huge length prefix must not allocate
        let mut h = nar(&[b"nix-archive-1", b"("]);
        h.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(try_unpack(&h).is_err());
    }

    #[test]
    fn bounded_nesting() {
        let mut v = nar(&[b"nix-archive-1"]);
        let depth = MAX_DEPTH + 5;
        for _ in 0..depth {
            v.extend(nar(&[b"(", b"type", b"directory"]));
            v.extend(nar(&[b"entry", b"(", b"name", b"d", b"node"]));
        }
        assert!(matches!(try_unpack(&v), Err(NarError::TooDeep)));
    }

    #[test]
    fn never_panics_or_escapes_on_mutations() {
        let d = tempfile::tempdir().unwrap();
        let bytes = sample_nar(d.path());
        let out = tempfile::tempdir().unwrap();
        let mut n = 0;
        for i in (0..bytes.len()).step_by(7) {
            for b in [0u8, 1, b'.', b'/', 0xff] {
                let mut m = bytes.clone();
                m[i] = b;
                n += 1;
                let dest = out.path().join(format!("t{n}"));
                let _ = unpack(&mut &m[..], &dest);
            }
        }
        // nothing was created next to the destinations
        for e in fs::read_dir(out.path()).unwrap() {
            assert!(e.unwrap().file_name().to_string_lossy().starts_with('t'));
        }
    }
}
