//! Opening names under a directory without ever following a symlink: how narfs reads
//! files whose names came from a cache (a NAR, a narinfo's URL), so that no name,
//! however it was made, leads out of the directory it belongs to.

use std::ffi::{CStr, CString};

/// Opens `rel` (empty: `dir` itself) for reading without following any symlink on the
/// way, so a name can never leave `dir`, whatever the caller believed about it: an
/// unpacked path in the disk cache, or a `file://` cache. `dir` itself is followed if
/// it is a symlink only when `follow_dir`. Returns the descriptor, or -1 with errno
/// set (ELOOP for a symlink).
pub fn open_beneath(dir: &CStr, rel: &CStr, follow_dir: bool) -> i32 {
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    let nofollow = if follow_dir { 0 } else { libc::O_NOFOLLOW };
    if rel.is_empty() {
        return unsafe { libc::open(dir.as_ptr(), flags & !libc::O_NOFOLLOW | nofollow) };
    }
    let dfd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | nofollow,
        )
    };
    if dfd < 0 {
        return -1;
    }
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    let mut fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dfd,
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    } as i32;
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // kernels before 5.6: one component at a time, none followed
        fd = walk_beneath(dfd, rel.to_bytes(), flags);
    }
    let e = std::io::Error::last_os_error();
    unsafe { libc::close(dfd) };
    if fd < 0 {
        unsafe { *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO) };
    }
    fd
}

fn walk_beneath(dfd: i32, rel: &[u8], flags: i32) -> i32 {
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let mut cur = unsafe { libc::dup(dfd) };
    for (i, part) in parts.iter().enumerate() {
        if cur < 0 {
            return -1;
        }
        let Ok(name) = CString::new(*part) else {
            unsafe { libc::close(cur) };
            unsafe { *libc::__errno_location() = libc::EINVAL };
            return -1;
        };
        if part.is_empty() || *part == b"." || *part == b".." {
            unsafe { libc::close(cur) };
            unsafe { *libc::__errno_location() = libc::EINVAL };
            return -1;
        }
        let last = i + 1 == parts.len();
        let f = if last {
            flags
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW
        };
        let next = unsafe { libc::openat(cur, name.as_ptr(), f) };
        let e = std::io::Error::last_os_error();
        unsafe { libc::close(cur) };
        if next < 0 {
            // a symlink in the middle reads as "not a directory"
            let code = match e.raw_os_error() {
                Some(libc::ENOTDIR) => libc::ELOOP,
                Some(c) => c,
                None => libc::EIO,
            };
            unsafe { *libc::__errno_location() = code };
            return -1;
        }
        cur = next;
    }
    cur
}
