//! Registration: what nix needs to hold cache paths as valid, from narinfos verified
//! exactly as the mount verifies them, handed to nix through its own interfaces
//! (`nix-store --load-db` for the paths, `nix store copy-sigs` for their signatures):
//! narfs never writes nix's database itself (docs/nix-store.md).

use crate::fetch::Fetcher;
use crate::formats::narinfo::NarInfo;
use crate::formats::store_path::StorePath;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The only schema of nix's database narfs knows (nix ≥ 2.0 uses it).
pub const SCHEMA: &str = "10";

/// Narinfos looked up at once.
const LOOKUPS: usize = 64;

/// The verified narinfos (signatures included) of the closures of `roots`: a path
/// that is missing or does not verify refuses the whole set, named.
pub async fn closure(fetcher: &Arc<Fetcher>, roots: &[StorePath]) -> Result<Vec<NarInfo>, String> {
    let mut found: BTreeMap<String, NarInfo> = BTreeMap::new();
    let mut level: Vec<StorePath> = roots.to_vec();
    while !level.is_empty() {
        let names: Vec<StorePath> = level
            .drain(..)
            .filter(|p| !found.contains_key(p.hash_part()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let got: Vec<(StorePath, Result<Option<NarInfo>, String>)> = futures::stream::iter(names)
            .map(|sp| async move {
                let r = fetcher.narinfo_whole(sp.hash_part()).await;
                (sp, r)
            })
            .buffer_unordered(LOOKUPS)
            .collect()
            .await;
        for (sp, r) in got {
            let info = match r {
                Ok(Some(info)) if info.store_path == sp => info,
                Ok(Some(info)) => {
                    return Err(format!(
                        "{sp}: the cache has {} under that hash",
                        info.store_path
                    ))
                }
                Ok(None) => {
                    return Err(format!(
                        "{sp}: the cache has no narinfo for it that verifies with the trusted keys (see the log): nothing registered"
                    ))
                }
                Err(e) => return Err(format!("{sp}: {e}: nothing registered")),
            };
            level.extend(info.references.iter().cloned());
            found.insert(sp.hash_part().to_owned(), info);
        }
    }
    Ok(found.into_values().collect())
}

/// Every path of the cache whose whole closure verifies; the others are named in
/// warnings and left out.
pub async fn everything(fetcher: &Arc<Fetcher>) -> Result<Vec<NarInfo>, String> {
    let hashes = crate::storage::narinfo_hashes(&**fetcher.storage()).await?;
    let got: Vec<(String, Result<Option<NarInfo>, String>)> = futures::stream::iter(hashes)
        .map(|h| async move {
            let r = fetcher.narinfo_whole(&h).await;
            (h, r)
        })
        .buffer_unordered(LOOKUPS)
        .collect()
        .await;
    let mut ok: BTreeMap<String, NarInfo> = BTreeMap::new();
    for (h, r) in got {
        match r {
            Ok(Some(info)) => {
                ok.insert(h, info);
            }
            Ok(None) => tracing::warn!("{h}.narinfo: missing or not verified: not registered"),
            Err(e) => tracing::warn!("{h}.narinfo: {e}: not registered"),
        }
    }
    // a path is registered only with its whole closure
    loop {
        let broken: Vec<(String, StorePath)> = ok
            .iter()
            .filter_map(|(h, i)| {
                i.references
                    .iter()
                    .find(|r| !ok.contains_key(r.hash_part()))
                    .map(|r| (h.clone(), r.clone()))
            })
            .collect();
        if broken.is_empty() {
            break;
        }
        for (h, missing) in broken {
            if let Some(i) = ok.remove(&h) {
                tracing::warn!(
                    "{}: not registered: its reference {missing} is missing or does not verify",
                    i.store_path
                );
            }
        }
    }
    Ok(ok.into_values().collect())
}

/// What `nix-store --load-db` reads (the format `nix-store --dump-db` prints): per
/// path its path, NarHash, NarSize, deriver (or an empty line), the number of its
/// references and the references.
pub fn load_db_text(infos: &[NarInfo]) -> String {
    let mut out = String::new();
    for i in infos {
        out += &format!("{}\n{}\n{}\n", i.store_path, i.nar_hash, i.nar_size);
        match &i.deriver {
            // a narinfo names the deriver by its basename
            Some(d) if d.starts_with('/') => out += &format!("{d}\n"),
            Some(d) if StorePath::from_basename(d).is_ok() => out += &format!("/nix/store/{d}\n"),
            _ => out.push('\n'),
        }
        let mut refs: Vec<String> = i.references.iter().map(|r| r.absolute()).collect();
        refs.sort();
        out += &format!("{}\n", refs.len());
        for r in refs {
            out += &format!("{r}\n");
        }
    }
    out
}

/// A `file://` cache of just these narinfos, for `nix store copy-sigs` to take their
/// signatures from.
pub fn write_sigs_dir(dir: &Path, infos: &[NarInfo]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n")?;
    for i in infos {
        std::fs::write(
            dir.join(format!("{}.narinfo", i.store_path.hash_part())),
            i.to_text(),
        )?;
    }
    Ok(())
}

/// How narfs runs nix.
#[derive(Clone, Debug, Default)]
pub struct Nix {
    /// The directory holding `nix` and `nix-store` (default: `PATH`).
    pub bin: Option<PathBuf>,
    /// `--store` for both (a chroot store: `local?root=DIR`); default: nix's own.
    pub store: Option<String>,
    /// Its state directory (where `db/schema` is).
    pub state_dir: PathBuf,
}

impl Nix {
    fn command(&self, name: &str) -> std::process::Command {
        let prog = match &self.bin {
            Some(b) => b.join(name),
            None => PathBuf::from(name),
        };
        let mut c = std::process::Command::new(prog);
        if let Some(s) = &self.store {
            c.args(["--store", s]);
        }
        c
    }

    /// Refuses a database of a schema narfs does not know (a nix that registers
    /// differently). A state directory without one is new: nix makes it.
    pub fn check_schema(&self) -> Result<(), String> {
        let p = self.state_dir.join("db/schema");
        match std::fs::read_to_string(&p) {
            Ok(v) if v.trim() == SCHEMA => Ok(()),
            Ok(v) => Err(format!(
                "{}: nix's database has schema {:?}; narfs registers paths only in schema {SCHEMA} (nix 2.0 and later): refusing to touch it",
                p.display(),
                v.trim().chars().take(20).collect::<String>()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    /// Registers `infos` with nix: their paths (one transaction), then their
    /// signatures. `work` is a directory for the narinfos copy-sigs reads.
    pub fn register(&self, infos: &[NarInfo], work: &Path) -> Result<(), String> {
        use std::io::Write;
        self.check_schema()?;
        let mut child = self
            .command("nix-store")
            .arg("--load-db")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("running nix-store --load-db: {e} (is nix installed? --nix-bin DIR)")
            })?;
        let text = load_db_text(infos);
        let written = child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes());
        let out = child
            .wait_with_output()
            .map_err(|e| format!("nix-store --load-db: {e}"))?;
        if !out.status.success() || written.is_err() {
            return Err(format!(
                "nix-store --load-db failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let sigs = work.join("sigs");
        write_sigs_dir(&sigs, infos).map_err(|e| format!("{}: {e}", sigs.display()))?;
        let url = format!("file://{}", sigs.display());
        let paths: Vec<String> = infos
            .iter()
            .filter(|i| !i.sigs.is_empty())
            .map(|i| i.store_path.to_string())
            .collect();
        for chunk in paths.chunks(500) {
            let out = self
                .command("nix")
                .args([
                    "--experimental-features",
                    "nix-command",
                    "store",
                    "copy-sigs",
                ])
                .args(["--option", "substituters", ""])
                .args(["-s", &url])
                .args(chunk)
                .stdout(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("running nix store copy-sigs: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "nix store copy-sigs failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::hash::Sha256;

    #[test]
    fn load_db_records_are_what_dump_db_prints() {
        let sp = |s: &str| StorePath::from_basename(s).unwrap();
        let info = NarInfo {
            store_path: sp("00000000000000000000000000000000-a"),
            url: "nar/x".into(),
            compression: crate::formats::narinfo::Compression::Xz,
            file_hash: None,
            file_size: None,
            nar_hash: Sha256::digest(b"a"),
            nar_size: 120,
            references: vec![
                sp("11111111111111111111111111111111-b"),
                sp("00000000000000000000000000000000-a"),
            ],
            deriver: Some("22222222222222222222222222222222-a.drv".into()),
            sigs: vec![],
            ca: None,
            index: None,
            profile: None,
        };
        let mut no_deriver = info.clone();
        no_deriver.deriver = None;
        no_deriver.references.clear();
        assert_eq!(
            load_db_text(&[info.clone(), no_deriver]),
            format!(
                "/nix/store/00000000000000000000000000000000-a\n{h}\n120\n\
                 /nix/store/22222222222222222222222222222222-a.drv\n2\n\
                 /nix/store/00000000000000000000000000000000-a\n\
                 /nix/store/11111111111111111111111111111111-b\n\
                 /nix/store/00000000000000000000000000000000-a\n{h}\n120\n\n0\n",
                h = info.nar_hash
            )
        );
    }
}
