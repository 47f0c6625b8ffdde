//! The control socket of a running mount: how `narfs prefetch MOUNTPOINT` and
//! `narfs stats MOUNTPOINT` talk to it. It lives at a path derived from the mount
//! point, so a client needs only the mount point. A line-based protocol:
//!
//! - `metrics` → the Prometheus text, then the connection closes;
//! - `prefetch BASENAME...` → `closure N BYTES`, then `ok BASENAME` or
//!   `failed BASENAME WHY` per path, then `end FAILED`;
//! - `record PGID` → `recording`; after the client's `end`, the chunks the group read
//!   first (the record file's lines), then `end N`.

use crate::mount::fs::Fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// `/run/narfs/` for root, else `$XDG_RUNTIME_DIR/narfs/` (or `/tmp/narfs-UID/`),
/// plus a hash of the canonical mount point and the mount's device number: mounts at
/// the same path in different mount namespaces (containers, `narfs nix-store`) each
/// get their own socket.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.into());
    let digest = crate::formats::hash::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let dev = std::fs::metadata(&canonical).map_or(0, |m| m.dev());
    let name = format!(
        "{}-{}-{}.sock",
        &crate::formats::nixbase32::encode(&digest.0)[..20],
        libc::major(dev),
        libc::minor(dev)
    );
    let uid = unsafe { libc::getuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/narfs")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(d).join("narfs")
    } else {
        PathBuf::from(format!("/tmp/narfs-{uid}"))
    };
    dir.join(name)
}

/// Removes the socket file when the mount ends.
pub struct Listening {
    path: PathBuf,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why the socket directory `dir` cannot be trusted by user `uid`: it must be a real
/// directory owned by that user (or root) that no one else may write to.
fn untrusted_dir(dir: &Path, uid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        // nothing there: connecting fails and says so
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    if !m.is_dir() {
        Some(format!("{} is not a directory", dir.display()))
    } else if m.uid() != uid && m.uid() != 0 {
        Some(format!(
            "{} belongs to uid {}, not to you",
            dir.display(),
            m.uid()
        ))
    } else if m.mode() & 0o022 != 0 {
        Some(format!(
            "{} may be written by group or others (mode {:04o})",
            dir.display(),
            m.mode() & 0o7777
        ))
    } else {
        None
    }
}

/// Binds the socket (replacing one a dead mount left) and serves it on the runtime.
/// The socket is 0600 in a directory that is the user's alone (0700), and a client
/// that is neither the mounting user nor root is turned away (SO_PEERCRED).
pub fn listen(fs: Arc<Fs>, mountpoint: &Path, jobs: usize) -> std::io::Result<Listening> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(mountpoint);
    let uid = unsafe { libc::getuid() };
    if let Some(dir) = path.parent() {
        crate::disk_cache::create_private_dir(dir)?;
        // ours (not a symlink someone put there first), and then ours alone
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(dir)?;
        if !m.is_dir() || m.uid() != uid {
            return Err(std::io::Error::other(format!(
                "{} is not a directory owned by this user",
                dir.display()
            )));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(std::io::Error::other(format!(
            "{} already answers for this mount point",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                // out of descriptors, say: do not spin
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            match sock.peer_cred() {
                Ok(c) if c.uid() == uid || c.uid() == 0 => {}
                Ok(c) => {
                    tracing::warn!(
                        uid = c.uid(),
                        "control socket: refused a client of another user"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!("control socket: cannot tell who connected: {e}");
                    continue;
                }
            }
            let fs = fs.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut line = String::new();
                let mut r = tokio::io::BufReader::new(r);
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("metrics") => {
                        let _ = w.write_all(fs.metrics_text().as_bytes()).await;
                    }
                    Some("prefetch") => {
                        let roots: Vec<String> = words.map(str::to_owned).collect();
                        prefetch(&fs, roots, jobs, &mut w).await;
                    }
                    Some("record") => {
                        let pgid = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        record(fs, pgid, r, &mut w).await;
                    }
                    _ => {
                        let _ = w.write_all(b"error unknown request\n").await;
                    }
                }
            });
        }
    });
    Ok(Listening { path })
}

async fn prefetch(
    fs: &Fs,
    roots: Vec<String>,
    jobs: usize,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) {
    // lines go out through a channel: the callbacks are synchronous
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let tx2 = tx.clone();
    let work = fs.prefetch_closure(
        roots,
        jobs,
        move |n, bytes| {
            let _ = tx.send(format!("closure {n} {bytes}\n"));
        },
        move |sp, r| {
            let _ = tx2.send(match r {
                Ok(()) => format!("ok {}\n", sp.basename()),
                Err(why) => format!("failed {} {why}\n", sp.basename()),
            });
        },
    );
    let mut work = std::pin::pin!(work);
    let failed = loop {
        tokio::select! {
            failed = &mut work => break failed,
            Some(line) = rx.recv() => {
                if w.write_all(line.as_bytes()).await.is_err() {
                    return; // the client went away; fetches already done stay done
                }
            }
        }
    };
    while let Ok(line) = rx.try_recv() {
        let _ = w.write_all(line.as_bytes()).await;
    }
    let _ = w.write_all(format!("end {failed}\n").as_bytes()).await;
}

/// `record PGID`: `recording` once the mount records the process group's reads, then,
/// when the client says `end`, one line per chunk (the record file's lines) and
/// `end N`. A client that goes away ends the recording.
async fn record(
    fs: Arc<Fs>,
    pgid: i32,
    mut r: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) {
    let f = fs.clone();
    let started = tokio::task::spawn_blocking(move || f.record_start(pgid)).await;
    match started {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            let _ = w.write_all(format!("error {why}\n").as_bytes()).await;
            return;
        }
        Err(_) => return,
    }
    let _ = w.write_all(b"recording\n").await;
    let mut line = String::new();
    let asked = matches!(r.read_line(&mut line).await, Ok(n) if n > 0 && line.trim() == "end");
    let chunks = fs.record_end(pgid);
    if !asked {
        return;
    }
    let text = crate::formats::profile::record_to_text(&chunks);
    // the record file's lines, without its first
    let body = text.split_once('\n').map_or("", |(_, b)| b);
    let _ = w.write_all(body.as_bytes()).await;
    let _ = w
        .write_all(format!("end {}\n", chunks.len()).as_bytes())
        .await;
}

/// Sends one request to the mount at `mountpoint`; the answer is read line by line.
pub fn request(
    mountpoint: &Path,
    req: &str,
) -> Result<BufReader<std::os::unix::net::UnixStream>, String> {
    let path = socket_path(mountpoint);
    // only a socket in a directory of this user's (or root's) can be the mount's
    if let Some(why) = path
        .parent()
        .and_then(|d| untrusted_dir(d, unsafe { libc::getuid() }))
    {
        return Err(format!("refusing to talk to {}: {why}", path.display()));
    }
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        format!(
            "no narfs mount answers for {} ({}: {e}); is it mounted by narfs, by this user?",
            mountpoint.display(),
            path.display()
        )
    })?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(BufReader::new(s))
}

/// Reads every line of an answer.
pub fn lines(r: BufReader<std::os::unix::net::UnixStream>) -> impl Iterator<Item = String> {
    r.lines().map_while(Result::ok)
}
