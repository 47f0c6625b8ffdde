//! Keeping the cache directory the user's alone: how it and its subdirectories are
//! created, checked and cleaned, and how its files are written and read, never
//! through a symlink.

use super::DiskCacheError;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Creates directory `p` and its missing parents 0700, whatever the umask.
pub fn create_private_dir(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// Opens a log or lock file for appending: created 0600, never through a symlink.
pub fn open_private_file(p: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
}

/// Creates `root` (0700, parents too) if missing and checks that only this user can
/// change it: owned by the effective user, not writable by group or others.
pub(super) fn secure_root(root: &Path) -> Result<std::os::fd::OwnedFd, DiskCacheError> {
    if !root.exists() {
        create_private_dir(root).map_err(io_err(root))?;
    }
    let fd = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io_err(root)(e.into()))?;
    check_ours(&fd, root, "")?;
    Ok(fd)
}

/// Refuses a directory another user owns or that group or others may write to.
pub(super) fn check_ours(
    fd: &impl std::os::fd::AsFd,
    path: &Path,
    fix: &str,
) -> Result<(), DiskCacheError> {
    let st = rustix::fs::fstat(fd).map_err(|e| io_err(path)(e.into()))?;
    let me = unsafe { libc::geteuid() };
    let unsafe_dir = |why: String| DiskCacheError::Unsafe {
        path: path.to_owned(),
        why,
    };
    if st.st_uid != me {
        return Err(unsafe_dir(format!(
            "it belongs to uid {}, not to you (uid {me}); use a directory of your own (--cache-dir){fix}",
            st.st_uid
        )));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "group or others may write to it (mode {mode:04o}); run `chmod go-w {}` (narfs creates it 0700){fix}",
            path.display()
        )));
    }
    Ok(())
}

/// Opens (creating it 0700 if missing) subdirectory `name` of the cache directory
/// without following a symlink; a subdirectory of ours with loose modes is tightened.
pub(super) fn open_subdir(
    root_fd: &std::os::fd::OwnedFd,
    root: &Path,
    name: &str,
) -> Result<std::os::fd::OwnedFd, DiskCacheError> {
    use rustix::fs::{Mode, OFlags};
    let path = root.join(name);
    match rustix::fs::mkdirat(root_fd, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io_err(&path)(e.into())),
    }
    let fd = rustix::fs::openat(
        root_fd,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => DiskCacheError::Unsafe {
            path: path.clone(),
            why: "it is a symlink or not a directory; narfs never follows links in its cache directory: remove it".into(),
        },
        e => io_err(&path)(e.into()),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err(&path)(e.into()))?;
    if st.st_uid == unsafe { libc::geteuid() } && st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(|e| io_err(&path)(e.into()))?;
    }
    check_ours(&fd, &path, "")?;
    Ok(fd)
}

/// Removes everything inside the directory `dir` without following any symlink:
/// a link is removed, never what it points to. Calls `each` with every top name.
pub(super) fn empty_dir_at(
    dir: &impl std::os::fd::AsFd,
    mut each: impl FnMut(&str),
) -> io::Result<()> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    for name in names {
        each(&name.to_string_lossy());
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// Removes `name` in `dir`: a file or link by unlink, a directory by emptying it
/// through its own descriptor first.
pub(super) fn remove_at(dir: &impl std::os::fd::AsFd, name: &std::ffi::CStr) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // unpacked trees are read-only (0555 directories): make each writable to empty it
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    empty_dir_at(&sub, |_| {})?;
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskCacheError + '_ {
    move |source| DiskCacheError::Io {
        path: path.to_owned(),
        source,
    }
}
/// Creates directory `p` if missing; refuses anything but a real directory there.
pub(super) fn real_dir(p: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::symlink_metadata(p)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "{} is not a directory (a symlink is never followed)",
                    p.display()
                )))
            }
        }
        Err(e) => Err(e),
    }
}

/// Writes `text` to the fresh file `tmp` (never through a symlink) and renames it to
/// `dest` (which replaces whatever is there, a symlink included, without following).
pub(super) fn write_new(tmp: &Path, bytes: &[u8], dest: &Path) -> io::Result<()> {
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    io::Write::write_all(&mut f, bytes)?;
    drop(f);
    fs::rename(tmp, dest)
}

/// Reads a record, refusing a symlink in its place (and anything over 1 MiB).
pub(super) fn read_nofollow(p: &Path) -> io::Result<String> {
    let bytes = read_bytes_nofollow(p, crate::formats::narinfo::MAX_NARINFO_BYTES as u64)?;
    String::from_utf8(bytes).map_err(io::Error::other)
}

/// At most `max` bytes of the file at `p`, refusing a symlink in its place.
pub(super) fn read_bytes_nofollow(p: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)?;
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}
