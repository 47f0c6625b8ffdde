//! `narfs nix-store` (a writable /nix/store over the mount, every path valid to nix)
//! and `narfs register` (what nix needs to hold cache paths as valid, for an overlay
//! of one's own). docs/nix-store.md has the design.

use super::mount::{serve, MountFlags};
use super::{fail, init_logging_at, runtime, Keys};
use crate::formats::store_path::StorePath;
use crate::mount::session::MountError;
use crate::nixstore::{register, Upper};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    flags: MountFlags,
    /// Register the closure of this store path (repeatable) [default: every path of
    /// the cache whose whole closure verifies]
    #[arg(long = "closure", value_name = "PATH")]
    closures: Vec<String>,
    /// Where nix sees the store: overlayfs is mounted here, narfs at the hidden
    /// .narfs-lower next to it.
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    store_dir: PathBuf,
    /// Where nix's writes go (build outputs, deletions): DIR/upper and DIR/work, kept
    /// across mounts; `tmpfs` for a tmpfs that goes with the mount
    /// [default: overlay/ in the cache directory]
    #[arg(long, value_name = "DIR|tmpfs")]
    upper: Option<String>,
    /// The directory holding nix and nix-store [default: PATH]
    #[arg(long, value_name = "DIR")]
    nix_bin: Option<PathBuf>,
    /// nix's state directory (its database is DIR/db) [default: NIX_STATE_DIR, else
    /// /nix/var/nix]
    #[arg(long, value_name = "DIR")]
    nix_state_dir: Option<PathBuf>,
    /// s3://BUCKET[/PREFIX]?endpoint=HOST&scheme=http|https&region=R&profile=P, or file:///DIR
    cache_url: String,
}

/// Store paths as given on the command line: absolute, or `<hash>-<name>`.
fn store_paths(args: &[String]) -> Result<Vec<StorePath>, String> {
    args.iter()
        .map(|a| {
            let base = a.trim_end_matches('/');
            let base = base.strip_prefix("/nix/store/").unwrap_or(base);
            StorePath::from_basename(base).map_err(|e| format!("{a}: not a store path: {e}"))
        })
        .collect()
}

fn state_dir(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("NIX_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/nix/var/nix"))
}

pub fn run(a: Args) -> ExitCode {
    let Args {
        flags,
        closures,
        store_dir,
        upper,
        nix_bin,
        nix_state_dir,
        cache_url,
    } = a;
    serve(flags, move |flags| {
        let closures = store_paths(&closures).map_err(MountError::Usage)?;
        let upper = match upper.as_deref() {
            Some("tmpfs") => Upper::Tmpfs,
            Some(d) => Upper::Dir(PathBuf::from(d)),
            None => Upper::Dir(
                flags
                    .cache_dir()
                    .map_err(MountError::Usage)?
                    .join("overlay"),
            ),
        };
        let mount = flags.options(cache_url, PathBuf::new(), false)?;
        crate::nixstore::run(crate::nixstore::Options {
            mount,
            store_dir,
            upper,
            closures,
            nix: register::Nix {
                bin: nix_bin,
                store: None,
                state_dir: state_dir(nix_state_dir),
            },
        })
    })
}

#[derive(clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    keys: Keys,
    /// Register the closure of this store path (repeatable) [default: every path of
    /// the cache whose whole closure verifies]
    #[arg(long = "closure", value_name = "PATH")]
    closures: Vec<String>,
    /// Also write the verified narinfos there, a file:// cache for
    /// `nix store copy-sigs -s file://DIR` to take the signatures from
    #[arg(long, value_name = "DIR")]
    sigs: Option<PathBuf>,
    cache_url: String,
}

/// Prints what `nix-store --load-db` reads for the paths.
pub fn register(a: RegisterArgs) -> ExitCode {
    init_logging_at(a.keys.verbose, None);
    let rt = runtime();
    let r = rt.block_on(async {
        let closures = store_paths(&a.closures)?;
        let s = super::inspect::session(&a.cache_url, &a.keys).await?;
        let infos = if closures.is_empty() {
            register::everything(&s.fetcher).await?
        } else {
            register::closure(&s.fetcher, &closures).await?
        };
        if let Some(dir) = &a.sigs {
            register::write_sigs_dir(dir, &infos).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        use std::io::Write;
        std::io::stdout()
            .lock()
            .write_all(register::load_db_text(&infos).as_bytes())
            .map_err(|e| e.to_string())
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
