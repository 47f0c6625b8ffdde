//! overlayfs over the narfs mount: one writable store directory for nix, whose lower
//! layer is the verified, lazy mount (and what the directory held before), and whose
//! upper layer takes every write. The kernel refuses an unfit upper directory with a
//! bare EINVAL (only its log says why), so the checks here name the cause first.

use std::io;
use std::path::{Path, PathBuf};

/// The layers of one overlay mount.
pub struct Layers {
    /// Where nix sees the store (the mount point).
    pub store_dir: PathBuf,
    /// Lower layers, the first on top.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Whether the kernel has overlayfs (built in, or a module it can load: mounting one
/// loads it, so a missing entry is tried with modprobe first).
pub fn check_available() -> Result<(), String> {
    let listed = |t: &str| {
        t.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    };
    let has = || std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| listed(&t));
    if has() {
        return Ok(());
    }
    let _ = std::process::Command::new("modprobe")
        .arg("overlay")
        .stderr(std::process::Stdio::null())
        .status();
    if has() {
        return Ok(());
    }
    Err(
        "this kernel has no overlayfs (no 'overlay' in /proc/filesystems, and `modprobe \
         overlay` did not add it): load the overlay module, or run on a kernel built with \
         CONFIG_OVERLAY_FS"
            .into(),
    )
}

/// File systems overlayfs refuses as an upper layer (by `statfs` magic), with a name.
const REFUSED_UPPER: &[(i64, &str)] = &[
    (0x6573_5546, "a FUSE file system"),
    (0x794c_7630, "an overlay file system"),
    (0x6969, "NFS"),
    (0x517b, "SMB"),
    (0xff53_4d42u32 as i64, "CIFS"),
    (0xfe53_4d42u32 as i64, "SMB2"),
    (0x7366_7673, "sysfs"),
    (0x9fa0, "procfs"),
];

/// Whether `dir` can hold an upper layer: a writable local file system overlayfs
/// takes (ext4, xfs, btrfs, tmpfs, ...).
pub fn check_upper(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", dir.display()))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("{}: {}", dir.display(), io::Error::last_os_error()));
    }
    let fix = "choose --upper on a local file system (ext4, xfs, btrfs) or --upper tmpfs";
    if let Some((_, what)) = REFUSED_UPPER.iter().find(|(m, _)| *m == st.f_type as i64) {
        return Err(format!(
            "{} is on {what}, which overlayfs refuses as an upper layer: {fix}",
            dir.display()
        ));
    }
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut vfs) } == 0 && vfs.f_flag & libc::ST_RDONLY != 0 {
        return Err(format!(
            "{} is on a read-only file system, which cannot hold an upper layer: {fix}",
            dir.display()
        ));
    }
    Ok(())
}

/// Mounts the overlay. Paths are passed in the mount options, which give `,` and `:`
/// a meaning: such paths are refused rather than escaped.
pub fn mount(l: &Layers) -> Result<(), String> {
    let mut all = l.lowers.iter().chain([&l.upper, &l.work]);
    if let Some(p) = all.find(|p| {
        let s = p.to_string_lossy();
        s.contains([',', ':', '\\']) || s.is_empty()
    }) {
        return Err(format!(
            "{}: overlayfs cannot take a path with ',', ':' or '\\'",
            p.display()
        ));
    }
    let lowers: Vec<String> = l
        .lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        l.upper.display(),
        l.work.display()
    );
    let cs = |s: &str| std::ffi::CString::new(s).expect("no NUL: checked above");
    let target = cs(&l.store_dir.to_string_lossy());
    let (src, fstype, data) = (cs("overlay"), cs("overlay"), cs(&opts));
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => " (mounting overlayfs needs root, or a user namespace of one's own)",
        Some(libc::EINVAL) => {
            " (overlayfs refused the layers; the kernel log, `dmesg | tail`, says why: \
             most often an upper directory on a file system it cannot write whiteouts to)"
        }
        _ => "",
    };
    Err(format!(
        "mounting overlayfs at {} ({opts}): {e}{hint}",
        l.store_dir.display()
    ))
}

/// Unmounts `at`, lazily if it is busy (nix processes may still hold files): what they
/// hold stays readable while the narfs mount below lives.
pub fn unmount(at: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(at.as_os_str().as_bytes())?;
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the whiteouts (0/0 character devices) of `names` at the top of an upper
/// layer: a garbage collection of an earlier session hid those paths, and nix is about
/// to be told they are valid. Nothing else is touched. Returns how many went.
pub fn clear_whiteouts<'a>(
    upper: &Path,
    names: impl IntoIterator<Item = &'a str>,
) -> io::Result<usize> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut n = 0;
    for name in names {
        let p = upper.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => {
                std::fs::remove_file(&p)?;
                n += 1;
            }
            _ => {}
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_of_the_named_paths_go_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let c = std::ffi::CString::new(d.path().join(name).to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) }, 0);
        };
        mk("aaa-one");
        mk("bbb-two");
        std::fs::write(d.path().join("ccc-file"), b"x").unwrap();
        assert_eq!(
            clear_whiteouts(d.path(), ["aaa-one", "ccc-file", "ddd-none"]).unwrap(),
            1
        );
        assert!(!d.path().join("aaa-one").exists());
        assert!(std::fs::symlink_metadata(d.path().join("bbb-two")).is_ok());
        assert!(d.path().join("ccc-file").exists());
    }

    #[test]
    fn paths_overlayfs_cannot_take_are_refused() {
        let l = Layers {
            store_dir: "/nix/store".into(),
            lowers: vec!["/a:b".into()],
            upper: "/u".into(),
            work: "/w".into(),
        };
        assert!(mount(&l).unwrap_err().contains("/a:b"));
    }
}
