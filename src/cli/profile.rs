//! `narfs profile record` and `narfs profile push`: start-up profiles
//! (docs/profiles.md).

use super::{fail, init_logging, runtime, secret_key, writable_cache, Keys};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Run COMMAND and write the chunks of indexed paths it read, in the order it first
    /// read them, as seen by the mount at MOUNTPOINT. COMMAND runs in a process group
    /// of its own: other programs reading the mount meanwhile are not recorded.
    Record(RecordArgs),
    /// Write a recorded profile to a cache: the chunks as one pack in read order and a
    /// signed manifest, named in the narinfo of the profile's store path. Mounts then
    /// fetch the pack when a program first looks into that path.
    Push(PushArgs),
}

#[derive(clap::Args)]
struct RecordArgs {
    /// Where narfs is mounted
    #[arg(long, value_name = "MOUNTPOINT")]
    mount: PathBuf,
    /// The record file to write
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The program and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct PushArgs {
    /// Sign the manifest with this secret key (mounts must trust its public key).
    #[arg(long, value_name = "SECRET_FILE")]
    key_file: PathBuf,
    #[command(flatten)]
    keys: Keys,
    /// The store path whose first use replays the profile [default: the first path
    /// the record read]
    #[arg(long = "for", value_name = "STORE_PATH")]
    root: Option<String>,
    /// s3://BUCKET[/PREFIX]?endpoint=...&region=... or file:///DIR
    cache_url: String,
    /// A record file of `narfs profile record`
    file: PathBuf,
}

pub fn run(a: Args) -> ExitCode {
    match a.cmd {
        Sub::Record(r) => match record(&r) {
            Ok(code) => code,
            Err(e) => fail(e),
        },
        Sub::Push(p) => {
            init_logging(p.keys.verbose, None);
            match push(&p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

/// Puts this process (and so COMMAND) in a process group of its own and, on a
/// terminal, makes it the foreground group; gives the terminal back when dropped.
struct OwnGroup {
    pgid: i32,
    terminal_from: Option<i32>,
}

impl OwnGroup {
    fn new() -> Result<Self, String> {
        let (me, was) = unsafe { (libc::getpid(), libc::getpgrp()) };
        if was != me && unsafe { libc::setpgid(0, 0) } != 0 {
            return Err(format!(
                "cannot start a process group: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut terminal_from = None;
        if unsafe { libc::isatty(0) } == 1 && unsafe { libc::tcgetpgrp(0) } == was && was != me {
            // as a shell does: SIGTTOU would stop a background group taking the terminal
            unsafe {
                let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                if libc::tcsetpgrp(0, me) == 0 {
                    terminal_from = Some(was);
                }
                libc::signal(libc::SIGTTOU, old);
            }
        }
        Ok(OwnGroup {
            pgid: me,
            terminal_from,
        })
    }
}

impl Drop for OwnGroup {
    fn drop(&mut self) {
        if let Some(was) = self.terminal_from {
            unsafe {
                let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, was);
                libc::signal(libc::SIGTTOU, old);
            }
        }
    }
}

fn record(a: &RecordArgs) -> Result<ExitCode, String> {
    let group = OwnGroup::new()?;
    let mut conn = crate::mount::control::request(&a.mount, &format!("record {}", group.pgid))?;
    let mut line = String::new();
    conn.read_line(&mut line)
        .map_err(|e| format!("{}: {e}", a.mount.display()))?;
    match line.trim_end() {
        "recording" => {}
        "" => return Err(format!("the mount at {} did not answer", a.mount.display())),
        other => {
            return Err(format!(
                "the mount at {} refused: {}",
                a.mount.display(),
                other.strip_prefix("error ").unwrap_or(other)
            ))
        }
    }
    let status = std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .status()
        .map_err(|e| format!("{}: {e}", a.command[0].to_string_lossy()))?;
    conn.get_mut()
        .write_all(b"end\n")
        .map_err(|e| format!("{}: {e}", a.mount.display()))?;
    // the answer is in memory at the mount: a mount that does not send it is stuck
    let _ = conn
        .get_ref()
        .set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let mut text = format!("{}\n", crate::formats::profile::RECORD_MAGIC);
    let mut ended = None;
    for l in crate::mount::control::lines(conn) {
        if let Some(n) = l.strip_prefix("end ") {
            ended = n.parse::<usize>().ok();
            break;
        }
        text += &l;
        text.push('\n');
    }
    let n = ended.ok_or_else(|| {
        format!(
            "the mount at {} ended the recording without its chunks",
            a.mount.display()
        )
    })?;
    let chunks = crate::formats::profile::parse_record(&text)
        .map_err(|e| format!("the mount sent a bad record: {e}"))?;
    if chunks.len() != n {
        return Err(format!("the mount sent {} of {n} chunks", chunks.len()));
    }
    // whole or not at all
    let tmp = a.out.with_extension("narfs-tmp");
    std::fs::write(&tmp, &text)
        .and_then(|()| std::fs::rename(&tmp, &a.out))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", a.out.display())
        })?;
    let paths: std::collections::HashSet<_> = chunks.iter().map(|c| &c.path).collect();
    let bytes: u64 = chunks.iter().map(|c| c.len).sum();
    eprintln!(
        "narfs: recorded {} chunks ({bytes} bytes) of {} indexed paths to {}",
        chunks.len(),
        paths.len(),
        a.out.display()
    );
    drop(group);
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c.clamp(1, 255) as u8),
        None => ExitCode::FAILURE,
    })
}

fn push(a: &PushArgs) -> Result<(), String> {
    let url = writable_cache(&a.cache_url, "push profiles to")?;
    let key = secret_key(&a.key_file)?;
    let mut trusted = a.keys.trusted()?;
    trusted.add(key.public());
    let text =
        std::fs::read_to_string(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let record = crate::formats::profile::parse_record(&text)
        .map_err(|e| format!("{}: {e}", a.file.display()))?;
    let root = match &a.root {
        Some(p) => {
            let (sp, sub) = crate::cli::inspect::split_path(p)?;
            if !sub.is_empty() {
                return Err(format!(
                    "--for '{p}': name a store path, not a file inside one"
                ));
            }
            Some(sp)
        }
        None => None,
    };
    // the chunks are fetched and verified as a mount does, into a scratch cache
    let (_scratch, disk) = crate::disk_cache::DiskCache::scratch()?;
    let disk = std::sync::Arc::new(disk);
    runtime().block_on(async {
        let storage = crate::storage::open(&url.url, None, a.keys.ssl_cert_file.as_deref()).await?;
        let fetcher = std::sync::Arc::new(crate::fetch::Fetcher::new(
            storage,
            trusted.clone(),
            disk,
            std::time::Duration::ZERO,
        ));
        let p = crate::publish::profile::push(&fetcher, &record, root, &key, &trusted).await?;
        for w in &p.warnings {
            eprintln!("narfs: warning: {w}");
        }
        eprintln!(
            "narfs: pushed {} ({} chunks, {} bytes packed into {}) and {} ({} bytes)",
            p.pack_key, p.chunks, p.raw_bytes, p.pack_bytes, p.manifest_key, p.manifest_bytes
        );
        Ok(())
    })
}
