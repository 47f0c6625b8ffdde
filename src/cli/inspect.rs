//! `narfs ls`, `cat` and `verify`: a cache inspected without mounting, verified exactly
//! as the mount verifies it (same fetcher, a throwaway cache directory).

use super::{fail, init_logging_at, runtime, Keys};
use crate::disk_cache::DiskCache;
use crate::fetch::{Fetcher, Lookup};
use crate::formats::listing::Entry;
use crate::formats::narinfo::NarInfo;
use crate::formats::store_path::{StorePath, STORE_DIR};
use crate::storage::cache_url;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    keys: Keys,
    /// Long listing: type, mode, size and link targets
    #[arg(short, long)]
    long: bool,
    /// Recurse into directories
    #[arg(short = 'R', long)]
    recursive: bool,
    cache_url: String,
    /// /nix/store/<hash>-<name>[/SUBPATH]
    path: String,
}

#[derive(clap::Args)]
pub struct CatArgs {
    #[command(flatten)]
    keys: Keys,
    cache_url: String,
    /// /nix/store/<hash>-<name>/FILE
    path: String,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    keys: Keys,
    cache_url: String,
    paths: Vec<String>,
}

pub fn ls(a: LsArgs) -> ExitCode {
    inspecting(a.keys.verbose, async move {
        let (s, info, sub) = open_path(&a.cache_url, &a.keys, &a.path).await?;
        let tree = s.tree(&info, a.long).await?;
        let e =
            find(&tree, &sub).ok_or_else(|| format!("{}: no such file or directory", a.path))?;
        let shown = if sub.is_empty() {
            ".".to_owned()
        } else {
            format!("./{}", sub.join("/"))
        };
        let mut out = std::io::stdout().lock();
        print_ls(&mut out, e, &shown, a.long, a.recursive, true).map_err(|e| e.to_string())?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cat(a: CatArgs) -> ExitCode {
    inspecting(a.keys.verbose, async move {
        let path = &a.path;
        let (s, info, sub) = open_path(&a.cache_url, &a.keys, path).await?;
        let tree = s.file(&info, &sub).await?;
        // names inside the path only; a symlink in it points at the host's
        // /nix/store, not at the cache, and is not followed
        for i in 0..sub.len() {
            if let Some(Entry::Symlink { .. }) = find(&tree, &sub[..i]) {
                return Err(format!("{path}: {} is a symbolic link", sub[i - 1]));
            }
        }
        match find(&tree, &sub) {
            Some(e @ Entry::Regular { .. }) => {
                let mut out = std::io::stdout().lock();
                s.write_file(e, &mut out)
                    .map_err(|e| format!("{path}: {e}"))?;
                Ok(ExitCode::SUCCESS)
            }
            Some(Entry::Symlink { .. }) => Err(format!("{path}: a symbolic link")),
            Some(_) => Err(format!("{path}: not a regular file")),
            None => Err(format!("{path}: no such file")),
        }
    })
}

pub fn verify(a: VerifyArgs) -> ExitCode {
    inspecting(a.keys.verbose, async move {
        let s = session(&a.cache_url, &a.keys).await?;
        let mut targets: Vec<Target> = a
            .paths
            .iter()
            .map(|p| match split_path(p) {
                Ok((sp, _)) => Target::Path(sp),
                Err(e) => Target::Bad(e),
            })
            .collect();
        if a.paths.is_empty() {
            targets.extend(all_hashes(s.fetcher()).await?.into_iter().map(Target::Hash));
        }
        let mut failed = 0usize;
        let mut ok = 0usize;
        for t in targets {
            let r = match t {
                Target::Path(sp) => verify_one(&s, &sp).await,
                Target::Hash(h) => verify_hash(&s, &h).await,
                Target::Bad(e) => Err(e),
            };
            match r {
                Ok(sp) => {
                    ok += 1;
                    println!("ok {sp}");
                }
                Err(e) => {
                    failed += 1;
                    println!("FAILED {e}");
                }
            }
        }
        eprintln!("{ok} verified, {failed} failed");
        Ok(if failed > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// Runs one inspecting command; an `Err` is its message to the user.
fn inspecting(
    verbose: u8,
    command: impl std::future::Future<Output = Result<ExitCode, String>>,
) -> ExitCode {
    // like nix store cat: only what was asked for, unless -v
    init_logging_at(verbose, None);
    runtime().block_on(async { command.await.unwrap_or_else(fail) })
}

pub struct Session {
    pub fetcher: Arc<Fetcher>,
    _dir: tempfile::TempDir,
}

/// Sets up storage and verification for one command; `Err` is a message for the user.
pub async fn session(url: &str, keys: &Keys) -> Result<Session, String> {
    let parsed = cache_url::parse(url).map_err(|e| e.to_string())?;
    for w in &parsed.warnings {
        tracing::warn!("{w}");
    }
    let trusted = keys.trusted()?;
    if trusted.is_empty() {
        return Err("no trusted public key given: pass --trusted-public-key NAME:BASE64 (or set NARFS_TRUSTED_PUBLIC_KEYS)".into());
    }
    let (dir, disk) = DiskCache::scratch()?;
    let disk = Arc::new(disk);
    let netrc =
        crate::storage::load_netrc(keys.netrc_file.as_deref()).map_err(|e| e.to_string())?;
    let storage =
        crate::storage::open(&parsed.url, netrc.as_ref(), keys.ssl_cert_file.as_deref()).await?;
    crate::storage::cache_info::check_cache(&*storage, &parsed.url).await?;
    let fetcher = Arc::new(Fetcher::new(
        storage,
        trusted,
        disk,
        std::time::Duration::ZERO,
    ));
    Ok(Session { fetcher, _dir: dir })
}

/// A session plus the verified narinfo of the store path `arg` names, and the rest of
/// `arg` as path components.
pub async fn open_path(
    url: &str,
    keys: &Keys,
    arg: &str,
) -> Result<(Session, Arc<NarInfo>, Vec<String>), String> {
    let (sp, sub) = split_path(arg)?;
    let s = session(url, keys).await?;
    let info = s.info(&sp).await?;
    Ok((s, info, sub))
}

/// Splits `/nix/store/<hash>-<name>[/sub/path]` (the store dir prefix is optional).
pub fn split_path(arg: &str) -> Result<(StorePath, Vec<String>), String> {
    let rest = arg
        .strip_prefix(STORE_DIR)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(arg);
    let mut parts = rest.split('/').filter(|p| !p.is_empty());
    let base = parts
        .next()
        .ok_or_else(|| format!("'{arg}' names no store path"))?;
    let sp = StorePath::from_basename(base).map_err(|e| e.to_string())?;
    let sub: Vec<String> = parts.map(str::to_owned).collect();
    // names inside the path only: `..` would lead out of it (to the host's files)
    if sub.iter().any(|p| p == "." || p == "..") {
        return Err(format!(
            "'{arg}': '.' and '..' are not names inside a store path"
        ));
    }
    Ok((sp, sub))
}

impl Session {
    pub async fn info(&self, sp: &StorePath) -> Result<Arc<NarInfo>, String> {
        match self.fetcher.narinfo(sp.hash_part()).await {
            Ok(Lookup::Found(i)) if i.store_path == *sp => Ok(i),
            Ok(Lookup::Found(i)) => Err(format!(
                "{sp}: the cache has {} under that hash",
                i.store_path
            )),
            Ok(Lookup::Missing) => Err(format!("{sp}: not in the cache")),
            Ok(Lookup::Rejected) => Err(format!(
                "{sp}: its narinfo was rejected (see the warning above)"
            )),
            Err(e) => Err(format!("{sp}: {e}")),
        }
    }

    /// The tree of a path: from its signed file index if it has one (targets
    /// included, no NAR), else from its `.ls`, else from its verified NAR.
    /// With `targets`, link targets are wanted: they are content, so a listing that
    /// holds symlinks is not enough (its targets are unsigned) and the NAR is used,
    /// as the mount does.
    pub async fn tree(&self, info: &Arc<NarInfo>, targets: bool) -> Result<Arc<Entry>, String> {
        if let Ok(Some(ix)) = self.fetcher.file_index(info.clone()).await {
            return Ok(Arc::new(ix.root.clone()));
        }
        if let Ok(Some(t)) = self.fetcher.listing(info.clone()).await {
            if !(targets && has_symlinks(&t)) {
                return Ok(t);
            }
        }
        self.fetcher
            .content(info.clone(), crate::fetch::pace::Priority::Demand)
            .await
            .map(|c| c.tree.clone())
            .map_err(|e| e.to_string())
    }

    /// The path's verified tree with the contents of the regular file at `sub` (if
    /// one is there, reached without following links) in the disk cache: only that
    /// file's chunks when the path has a file index, else the whole NAR.
    pub async fn file(&self, info: &Arc<NarInfo>, sub: &[String]) -> Result<Arc<Entry>, String> {
        let Ok(Some(ix)) = self.fetcher.file_index(info.clone()).await else {
            return self.content(info).await;
        };
        let tree = Arc::new(ix.root.clone());
        if let Some(Entry::Regular {
            size,
            nar_offset: Some(off),
            chunks: Some(hashes),
            ..
        }) = find_no_links(&tree, sub)
        {
            let blocks = Arc::new(crate::fetch::blocks::Blocks::new(&ix));
            let chunk = ix.chunk_size();
            let reader = self.fetcher.blocks();
            let wanted = hashes.iter().enumerate().map(|(i, h)| {
                let at = i as u64 * chunk;
                crate::fetch::blocks::ChunkAt {
                    nar_offset: off + at,
                    len: (size - at).min(chunk),
                    hash: *h,
                }
            });
            use futures::StreamExt;
            let mut runs = futures::stream::iter(wanted)
                .map(|c| reader.chunk(&blocks, c, crate::fetch::pace::Priority::Demand))
                .buffered(4);
            while let Some(r) = runs.next().await {
                r?;
            }
        }
        Ok(tree)
    }

    /// The path's verified tree, its contents in the disk cache.
    pub async fn content(&self, info: &Arc<NarInfo>) -> Result<Arc<Entry>, String> {
        self.fetcher
            .content(info.clone(), crate::fetch::pace::Priority::Demand)
            .await
            .map(|c| c.tree.clone())
            .map_err(|e| e.to_string())
    }

    /// Writes the contents of regular file `e` (of a verified tree) to `out`.
    pub fn write_file(&self, e: &Entry, out: &mut impl Write) -> Result<(), String> {
        let Entry::Regular {
            chunks: Some(chunks),
            ..
        } = e
        else {
            return Err("not a regular file".into());
        };
        for h in chunks.iter() {
            let mut f = self
                .fetcher
                .disk()
                .open_blob(h)
                .map_err(|e| format!("blob {}: {e}", h.to_nix_string()))?;
            std::io::copy(&mut f, out).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }
}

/// The entry at `sub`, if no symlink lies on the way to it.
fn find_no_links<'a>(tree: &'a Entry, sub: &[String]) -> Option<&'a Entry> {
    (0..sub.len())
        .all(|i| !matches!(find(tree, &sub[..i]), Some(Entry::Symlink { .. })))
        .then(|| find(tree, sub))
        .flatten()
}

fn has_symlinks(e: &Entry) -> bool {
    match e {
        Entry::Symlink { .. } => true,
        Entry::Directory { entries } => entries.iter().any(|(_, c)| has_symlinks(c)),
        Entry::Regular { .. } => false,
    }
}

/// A name or link target for a terminal, as `ls -b` prints it: backslash escapes
/// for control characters, backslashes and bytes that are not UTF-8, so a hostile
/// name can neither move the cursor nor pass for another line.
pub fn escaped(b: &[u8]) -> String {
    let mut out = String::new();
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for byte in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\{byte:03o}"));
                    }
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\{byte:03o}"));
        }
    }
    out
}

pub fn find<'a>(tree: &'a Entry, sub: &[String]) -> Option<&'a Entry> {
    let mut cur = tree;
    for s in sub {
        let Entry::Directory { entries } = cur else {
            return None;
        };
        cur = &entries.iter().find(|(n, _)| **n == *s.as_bytes())?.1;
    }
    Some(cur)
}

/// Prints like `nix store ls`: names, or with `long` type, mode, size and targets.
pub fn print_ls(
    out: &mut impl Write,
    e: &Entry,
    path: &str,
    long: bool,
    recursive: bool,
    top: bool,
) -> std::io::Result<()> {
    let line = |out: &mut dyn Write, e: &Entry, p: &str| -> std::io::Result<()> {
        if !long {
            return writeln!(out, "{p}");
        }
        match e {
            Entry::Regular {
                size, executable, ..
            } => {
                writeln!(
                    out,
                    "{} {size:>20} {p}",
                    if *executable {
                        "-r-xr-xr-x"
                    } else {
                        "-r--r--r--"
                    }
                )
            }
            Entry::Symlink { target } => {
                writeln!(out, "lrwxrwxrwx {:>20} {p} -> {}", 0, escaped(target))
            }
            Entry::Directory { .. } => writeln!(out, "dr-xr-xr-x {:>20} {p}", 0),
        }
    };
    match e {
        Entry::Directory { entries } if top || recursive => {
            if !top {
                line(out, e, path)?;
            }
            for (n, c) in entries {
                let p = format!("{path}/{}", escaped(n));
                if recursive {
                    print_ls(out, c, &p, long, recursive, false)?;
                } else {
                    line(out, c, &p)?;
                }
            }
            Ok(())
        }
        _ => line(out, e, path),
    }
}

/// What `narfs verify` checks: a named path, a hash the listing found, or an argument
/// that names no store path.
pub enum Target {
    Path(StorePath),
    Hash(String),
    Bad(String),
}

/// Every store path hash the cache lists (`<hash>.narinfo` keys at its root).
pub async fn all_hashes(fetcher: &Fetcher) -> Result<Vec<String>, String> {
    crate::storage::narinfo_hashes(&**fetcher.storage()).await
}

/// Checks a path's narinfo (signature, StorePath), its NAR (every hash and size,
/// the archive itself) and its file index if it has one (signature, and that it
/// describes the NAR). `Err` names the path and the fault.
pub async fn verify_one(s: &Session, sp: &StorePath) -> Result<StorePath, String> {
    let info = s.info(sp).await?;
    let index = s
        .fetcher
        .check_file_index(&info)
        .await
        .map_err(|e| format!("{sp}: {e}"))?;
    let content = s
        .fetcher
        .content(info, crate::fetch::pace::Priority::Demand)
        .await
        .map_err(|e| e.to_string())?;
    // what a mount would read through the index must be what the NAR holds
    if let Some(ix) = index {
        if ix.root != *content.tree {
            return Err(format!(
                "{sp}: its file index does not describe its NAR (names, modes, sizes, targets or chunk hashes differ)"
            ));
        }
    }
    Ok(sp.clone())
}

pub async fn verify_hash(s: &Session, hash: &str) -> Result<StorePath, String> {
    match s.fetcher.narinfo_from_cache(hash).await {
        Ok(Lookup::Found(i)) => verify_one(s, &i.store_path).await,
        Ok(_) => Err(format!(
            "{hash}.narinfo: missing or rejected (see the warning above)"
        )),
        Err(e) => Err(format!("{hash}.narinfo: {e}")),
    }
}
