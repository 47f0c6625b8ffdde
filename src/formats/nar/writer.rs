//! Writing NARs, as `nix-store --dump` does: from a directory, or from a tree whose
//! contents come chunk by chunk.

use super::MAGIC;
use crate::formats::hash::Sha256;
use crate::formats::listing::Entry;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

/// Writes NARs; used to build test caches and by `narfs push`.
pub struct Writer<W: Write> {
    w: W,
}

impl<W: Write> Writer<W> {
    pub fn new(w: W) -> Self {
        Writer { w }
    }

    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(&(b.len() as u64).to_le_bytes())?;
        self.w.write_all(b)?;
        self.w.write_all(&[0u8; 8][..(8 - b.len() % 8) % 8])
    }

    /// Serializes a tree whose file contents come from `contents`, given each file's
    /// chunk hashes: how a NAR is rebuilt from a file index and its chunks.
    pub fn dump_entry(
        mut self,
        e: &Entry,
        contents: &mut dyn FnMut(&[Sha256]) -> io::Result<Vec<u8>>,
    ) -> io::Result<W> {
        self.bytes(MAGIC)?;
        self.entry_node(e, contents)?;
        Ok(self.w)
    }

    fn entry_node(
        &mut self,
        e: &Entry,
        contents: &mut dyn FnMut(&[Sha256]) -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        self.bytes(b"(")?;
        self.bytes(b"type")?;
        match e {
            Entry::Regular {
                size,
                executable,
                chunks,
                ..
            } => {
                self.bytes(b"regular")?;
                if *executable {
                    self.bytes(b"executable")?;
                    self.bytes(b"")?;
                }
                self.bytes(b"contents")?;
                let data = contents(chunks.as_deref().unwrap_or_default())?;
                if data.len() as u64 != *size {
                    return Err(io::Error::other(format!(
                        "contents of {} bytes for a file of {size}",
                        data.len()
                    )));
                }
                self.bytes(&data)?;
            }
            Entry::Symlink { target } => {
                self.bytes(b"symlink")?;
                self.bytes(b"target")?;
                self.bytes(target)?;
            }
            Entry::Directory { entries } => {
                self.bytes(b"directory")?;
                for (name, child) in entries {
                    self.bytes(b"entry")?;
                    self.bytes(b"(")?;
                    self.bytes(b"name")?;
                    self.bytes(name)?;
                    self.bytes(b"node")?;
                    self.entry_node(child, contents)?;
                    self.bytes(b")")?;
                }
            }
        }
        self.bytes(b")")
    }

    /// Serializes a filesystem tree the way `nix-store --dump` does.
    pub fn dump_path(mut self, path: &Path) -> io::Result<W> {
        self.bytes(MAGIC)?;
        self.dump_node(path)?;
        Ok(self.w)
    }

    fn dump_node(&mut self, path: &Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::symlink_metadata(path)?;
        self.bytes(b"(")?;
        self.bytes(b"type")?;
        if meta.file_type().is_symlink() {
            self.bytes(b"symlink")?;
            self.bytes(b"target")?;
            self.bytes(fs::read_link(path)?.as_os_str().as_bytes())?;
        } else if meta.is_dir() {
            self.bytes(b"directory")?;
            let mut names: Vec<_> = fs::read_dir(path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for n in names {
                self.bytes(b"entry")?;
                self.bytes(b"(")?;
                self.bytes(b"name")?;
                self.bytes(n.as_bytes())?;
                self.bytes(b"node")?;
                self.dump_node(&path.join(&n))?;
                self.bytes(b")")?;
            }
        } else if meta.is_file() {
            self.bytes(b"regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.bytes(b"executable")?;
                self.bytes(b"")?;
            }
            self.bytes(b"contents")?;
            let len = meta.len();
            self.w.write_all(&len.to_le_bytes())?;
            let copied = io::copy(&mut fs::File::open(path)?.take(len), &mut self.w)?;
            if copied != len {
                return Err(io::Error::other(format!(
                    "{} changed while being archived",
                    path.display()
                )));
            }
            self.w
                .write_all(&[0u8; 8][..((8 - len % 8) % 8) as usize])?;
        } else {
            return Err(io::Error::other(format!(
                "{} is not a regular file, directory or symlink",
                path.display()
            )));
        }
        self.bytes(b")")
    }

    /// Low-level pieces, so tests can build hostile archives.
    pub fn raw_string(&mut self, b: &[u8]) -> io::Result<()> {
        self.bytes(b)
    }
    pub fn into_inner(self) -> W {
        self.w
    }
}
