//! `narfs push`: closures from the local store to a cache, as `nix copy --to` does,
//! with a progress bar on a terminal.

use super::{fail, init_logging, jobs_or_cpus, runtime, secret_key, writable_cache};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Sign with this secret key (as from `narfs keygen` or
    /// `nix-store --generate-binary-cache-key`); existing signatures are kept.
    /// Also taken from the URL's secret-key= parameter, as nix copy does.
    #[arg(long, value_name = "SECRET_FILE")]
    key_file: Option<PathBuf>,
    /// How NARs are compressed in the cache [default: the URL's compression=,
    /// else xz].
    #[arg(long, value_name = "xz|zstd|none")]
    compression: Option<String>,
    /// The local store to read, as nix's --store (e.g. local?root=/some/dir);
    /// default: nix's own.
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Paths packed and uploaded in parallel [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Do not write signed file indexes (by default each path gets one, with
    /// --key-file, so a narfs mount can read single files without the whole NAR;
    /// nix ignores them).
    #[arg(long)]
    no_index: bool,
    /// s3://BUCKET[/PREFIX]?endpoint=...&region=... or file:///DIR
    cache_url: String,
    /// Store paths (or symlinks to them, such as ./result)
    #[arg(required = true)]
    paths: Vec<String>,
}

pub fn run(a: Args) -> ExitCode {
    init_logging(0, None);
    match push(
        a.key_file,
        a.compression,
        a.store,
        a.jobs,
        a.no_index,
        &a.cache_url,
        &a.paths,
    ) {
        Ok(s) => {
            eprintln!(
                "{} paths pushed ({} MiB of NAR, {} MiB uploaded), {} already in the cache",
                s.pushed,
                s.nar_bytes >> 20,
                s.uploaded_bytes >> 20,
                s.skipped
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// A bar on a terminal; a line per path otherwise (logs, CI).
struct PushProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl crate::publish::push::Progress for PushProgress {
    fn start(&self, paths: usize, bytes: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(bytes);
                b.set_message(format!("{paths} paths"));
            }
            None => eprintln!("pushing {paths} paths ({} MiB of NAR)", bytes >> 20),
        }
    }
    fn done(&self, path: &crate::formats::store_path::StorePath, nar: u64, file: u64) {
        match &self.bar {
            Some(b) => {
                b.inc(nar);
                b.set_message(path.name().to_owned());
            }
            None => eprintln!("pushed {path} ({nar} bytes of NAR, {file} uploaded)"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A query parameter of a cache URL (`nix copy --to` takes `secret-key=` and
/// `compression=` there).
fn url_param(url: &str, name: &str) -> Option<String> {
    let (_, q) = url.split_once('?')?;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn push(
    key_file: Option<PathBuf>,
    compression: Option<String>,
    store: Option<String>,
    jobs: Option<usize>,
    no_index: bool,
    cache_url: &str,
    paths: &[String],
) -> Result<crate::publish::push::Summary, String> {
    use crate::formats::narinfo::Compression;
    let url = writable_cache(cache_url, "push to")?;
    let compression = compression
        .or_else(|| url_param(cache_url, "compression"))
        .unwrap_or_else(|| "xz".to_owned());
    let key_file = key_file.or_else(|| url_param(cache_url, "secret-key").map(PathBuf::from));
    let compression = match compression.as_str() {
        "xz" => Compression::Xz,
        "zstd" => Compression::Zstd,
        "none" => Compression::None,
        other => return Err(format!("unknown compression '{other}' (xz, zstd or none)")),
    };
    let key = key_file.as_deref().map(secret_key).transpose()?;
    let infos = crate::publish::push::query_closure(store.as_deref(), paths)?;
    let opts = crate::publish::push::PushOptions {
        store,
        key,
        compression,
        jobs: jobs_or_cpus(jobs),
        index: !no_index,
    };
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("progress template"),
        );
        b
    });
    let progress = PushProgress { bar };
    runtime().block_on(async {
        let storage = crate::storage::open(&url.url, None, None).await?;
        crate::publish::push::push(storage, infos, &opts, &progress).await
    })
}
