//! `narfs index`: seekable NARs and signed file indexes for paths already in a cache.

use super::{fail, init_logging, jobs_or_cpus, runtime, secret_key, writable_cache, Keys};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Sign the indexes with this secret key (its public key must be trusted by
    /// the mounts that are to use them).
    #[arg(long, value_name = "SECRET_FILE")]
    key_file: PathBuf,
    #[command(flatten)]
    keys: Keys,
    /// How the blocks are compressed [default: xz; zstd for zstd NARs].
    #[arg(long, value_name = "xz|zstd|none")]
    compression: Option<String>,
    /// Paths indexed in parallel [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Only say what would be indexed.
    #[arg(long)]
    dry_run: bool,
    /// s3://BUCKET[/PREFIX]?endpoint=...&region=... or file:///DIR
    cache_url: String,
    /// Store paths to index [default: every path in the cache]
    paths: Vec<String>,
}

pub fn run(a: Args) -> ExitCode {
    init_logging(a.keys.verbose, None);
    match index(
        &a.key_file,
        &a.keys,
        a.compression.as_deref(),
        a.jobs,
        a.dry_run,
        &a.cache_url,
        &a.paths,
    ) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => fail(format!("{n} paths could not be indexed")),
        Err(e) => fail(e),
    }
}

/// `narfs index`; `Ok` has how many paths failed.
fn index(
    key_file: &std::path::Path,
    keys: &Keys,
    compression: Option<&str>,
    jobs: Option<usize>,
    dry_run: bool,
    cache_url: &str,
    paths: &[String],
) -> Result<usize, String> {
    use crate::formats::file_index::BlockCompression;
    use crate::publish::index::Done;
    let url = writable_cache(cache_url, "index")?;
    let key = secret_key(key_file)?;
    let trusted = keys.trusted()?;
    let compression = match compression {
        None => None,
        Some("xz") => Some(BlockCompression::Xz),
        Some("zstd") => Some(BlockCompression::Zstd),
        Some("none") => Some(BlockCompression::None),
        Some(other) => return Err(format!("unknown compression '{other}' (xz, zstd or none)")),
    };
    let mut hashes = Vec::new();
    for p in paths {
        let (sp, sub) = crate::cli::inspect::split_path(p)?;
        if !sub.is_empty() {
            return Err(format!("'{p}': name a store path, not a file inside one"));
        }
        hashes.push(sp.hash_part().to_owned());
    }
    let opts = crate::publish::index::IndexOptions {
        key,
        trusted,
        compression,
        jobs: jobs_or_cpus(jobs),
        dry_run,
    };
    let report = |hash: &str, r: &crate::publish::index::Outcome| match r {
        Ok((
            sp,
            Done::Indexed {
                old_size,
                new_size,
                blocks,
                ..
            },
        )) => eprintln!("indexed {sp}: {blocks} blocks, {old_size} -> {new_size} bytes"),
        Ok((sp, Done::Already)) => eprintln!("already indexed {sp}"),
        Ok((sp, Done::WouldIndex { url, size })) => {
            eprintln!("would index {sp} ({url}, {size} bytes)")
        }
        Err(e) if hash.is_empty() => eprintln!("narfs: warning: {e}"),
        Err(e) => eprintln!("FAILED {e}"),
    };
    runtime().block_on(async {
        let storage = crate::storage::open(&url.url, None, keys.ssl_cert_file.as_deref()).await?;
        if hashes.is_empty() {
            hashes = crate::storage::narinfo_hashes(&*storage).await?;
        }
        Ok(crate::publish::index::index(storage, hashes, &opts, &report).await)
    })
}
