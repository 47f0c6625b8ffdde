//! What tools see of the mount besides contents, each against the real store path or
//! what a disk answers: `df` and `statfs`, extended attributes, the mount table, `du`
//! and inode numbers.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Source and type of the mount at `mnt` in /proc/self/mounts.
fn mount_entry(mnt: &Path) -> (String, String) {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap();
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[1] == mnt.to_str().unwrap()).then(|| (f[0].to_owned(), f[2].to_owned()))
        })
        .unwrap_or_else(|| panic!("{} not in /proc/self/mounts:\n{text}", mnt.display()))
}

/// The fixture mounted from the S3 server, every path read whole (compared with the
/// real store) so the cache holds something, as it does once tools ran.
fn mounted_and_read(extra: &[&str]) -> (Env, Mounted) {
    let f = fixture();
    let e = env();
    let m = Mounted::start(&e.url, &[&f.public_key], None, extra);
    m.wait_root(f.paths.len());
    for (name, base) in &f.paths {
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(m.p(base))
            .arg(f.real(name)));
    }
    (e, m)
}

#[test]
fn df_shows_the_cache_quota_and_what_it_holds() {
    let (_e, m) = mounted_and_read(&["--cache-size", "1G"]);
    let df = run(Command::new("df")
        .args(["-B1", "--output=fstype,size,used,avail,itotal"])
        .arg(&m.mnt));
    let row: Vec<&str> = df.lines().nth(1).unwrap().split_whitespace().collect();
    let n = |i: usize| row[i].parse::<u64>().unwrap();
    assert_eq!(row[0], "fuse.narfs", "{df}");
    // the quota (the disk holding the cache directory has more), what the cache
    // holds, and the rest
    assert_eq!(n(1), 1 << 30, "{df}");
    assert!(n(2) > 0 && n(2) + n(3) == n(1), "{df}");
    assert!(n(4) > 0, "{df}");
    // CPython's test_shutil.test_disk_usage, on the mount
    let py = r#"
import os, shutil, sys
u = shutil.disk_usage(sys.argv[1])
assert u.total > 0 and u.used > 0 and u.free >= 0, u
assert u.total >= u.used and u.total > u.free, u
s = os.statvfs(sys.argv[1])
assert (s.f_bsize, s.f_frsize, s.f_namemax) == (4096, 4096, 255), s
assert s.f_files > 0, s
print(u.total, u.used, u.free)
"#;
    let (code, text, err) = out(Command::new("python3").args(["-c", py]).arg(&m.mnt));
    assert_eq!(code, 0, "{err}");
    let used: u64 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(used, n(2), "{text}");
}

/// For every entry below `root` (sorted, relative; symlinks not followed): what
/// `listxattr` (with `list`) and `getxattr` of each of `names` answer.
fn xattr_answers(root: &Path, names: &[&str], list: bool) -> String {
    let py = r#"
import errno, os, sys
root, list_too, attrs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
names = [root] + [os.path.join(d, x) for d, ds, fs in os.walk(root) for x in ds + fs]
out = []
for n in names:
    r = [os.path.relpath(n, root)]
    if list_too:
        r.append(repr(os.listxattr(n, follow_symlinks=False)))
    for a in attrs:
        try:
            os.getxattr(n, a, follow_symlinks=False)
            r.append(a + "=found")
        except OSError as e:
            r.append(a + "=" + errno.errorcode[e.errno])
    out.append(" ".join(r))
print("\n".join(sorted(set(out))))
"#;
    run(Command::new("python3")
        .args(["-c", py])
        .arg(root)
        .arg(if list { "1" } else { "0" })
        .args(names))
}

fn xattrs(root: &Path) -> String {
    xattr_answers(
        root,
        &[
            "user.narfs",
            "security.capability",
            "trusted.overlay.opaque",
        ],
        true,
    )
}

#[test]
fn no_extended_attributes_as_on_a_disk() {
    let f = fixture();
    let (_e, m) = mounted_and_read(&[]);
    for (name, base) in &f.paths {
        let seen = xattrs(&m.p(base));
        assert_eq!(seen, xattrs(&f.real(name)), "{name}");
        assert!(seen.lines().all(|l| l.contains(" [] ")), "{seen}");
        assert!(
            !seen.contains("EOPNOTSUPP") && !seen.contains("found"),
            "{seen}"
        );
        assert!(seen.contains("user.narfs=ENODATA"), "{seen}");
    }
    let root = xattrs(&m.mnt);
    assert!(root.starts_with(". [] user.narfs=ENODATA"), "{root}");
}

fn acls(root: &Path) -> String {
    xattr_answers(
        root,
        &["system.posix_acl_access", "system.posix_acl_default"],
        false,
    )
}

/// No file has an ACL and none can be set: the ACL names answer EOPNOTSUPP, as on a
/// disk mounted without ACLs, and another user reads by the mode bits, with no ACL
/// request for the kernel's permission checks.
#[test]
fn acls_are_not_supported_and_permissions_are_the_mode_bits() {
    let f = fixture();
    let (_e, m) = mounted_and_read(&["--allow-other"]);
    for base in f.paths.values() {
        let seen = acls(&m.p(base));
        assert!(
            seen.lines().all(|l| l.matches("=ENOTSUP").count() == 2),
            "{seen}"
        );
    }
    // no ACL can be set; another user reads by the mode bits, as before
    let file = m.p(f.path("narfs-test-app")).join("bin/app");
    let py = "import os, sys; os.setxattr(sys.argv[1], 'system.posix_acl_access', b'')";
    let (code, _, err) = out(Command::new("python3").args(["-c", py]).arg(&file));
    assert!(code != 0 && err.contains("Read-only file system"), "{err}");
    std::fs::set_permissions(
        m.mnt.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let before = m.stat("xattr_requests_total");
    let (code, text, err) = out(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg("test -r \"$1\" && test -x \"$1\" && ! test -w \"$1\" && cat \"$1\" | wc -c")
        .args(["sh"])
        .arg(&file));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        text.trim().parse::<u64>().unwrap(),
        std::fs::metadata(f.real("narfs-test-app").join("bin/app"))
            .unwrap()
            .len()
    );
    assert_eq!(m.stat("xattr_requests_total"), before, "ACLs asked for");
}

/// `ls -l` asks for each entry's SELinux label and ACLs (coreutils' `getfilecon` and
/// `file_has_acl`) until a file system says it supports neither: three round trips
/// per directory on each run otherwise, two per file.
#[test]
fn ls_asks_for_labels_and_acls_once_per_run() {
    let f = fixture();
    let (_e, m) = mounted_and_read(&[]);
    let ls = || run(Command::new("ls").arg("-lR").arg(&m.mnt));
    ls();
    let before = m.stat("xattr_requests_total");
    ls();
    let asked = m.stat("xattr_requests_total") - before;
    let entries = run(Command::new("find").arg(&m.mnt)).lines().count();
    assert!(entries > 2 * f.paths.len(), "{entries} entries");
    assert!(asked <= 2, "{asked} getxattr requests for one ls -lR");
    let py = "import os, sys; os.getxattr(sys.argv[1], 'security.selinux')";
    let (code, _, err) = out(Command::new("python3").args(["-c", py]).arg(&m.mnt));
    assert!(
        code != 0 && err.contains("Operation not supported"),
        "{err}"
    );
}

#[test]
fn the_mount_table_shows_fuse_narfs_and_the_cache_without_secrets() {
    let f = fixture();
    let e = env();
    let url = format!("{}&token=hunter2", e.url);
    let m = Mounted::start(&url, &[&f.public_key], None, &[]);
    let (code, text, err) = out(Command::new("findmnt")
        .args(["-n", "-t", "fuse.narfs", "-o", "SOURCE,FSTYPE"])
        .arg(&m.mnt));
    assert_eq!(code, 0, "{err}{:?}", mount_entry(&m.mnt));
    let shown = url.replace("hunter2", "***");
    assert_eq!(
        text.split_whitespace().collect::<Vec<_>>(),
        [shown.as_str(), "fuse.narfs"]
    );
    drop(m);

    // an http cache with credentials in its URL: they never show
    let http = HttpServer::start(&f.cache);
    let url = format!("http://alice:hunter2@127.0.0.1:{}/?token=s3cr3t", http.port);
    let m = Mounted::start(&url, &[&f.public_key], None, &[]);
    let (source, fstype) = mount_entry(&m.mnt);
    assert_eq!(fstype, "fuse.narfs");
    assert_eq!(
        source,
        format!("http://***@127.0.0.1:{}/?token=***", http.port)
    );
    let tables = ["/proc/self/mounts", "/proc/self/mountinfo"]
        .map(|p| std::fs::read_to_string(p).unwrap())
        .join("");
    assert!(
        !tables.contains("hunter2") && !tables.contains("s3cr3t") && !tables.contains("alice"),
        "{tables}"
    );
    assert!(m.p(f.path("narfs-test-single.txt")).exists());
    // and umount -t finds it by its type
    run(Command::new("umount")
        .args(["-t", "fuse.narfs"])
        .arg(&m.mnt));
    assert!(!is_mounted(&m.mnt));
}

/// `du` of `p` in bytes, of disk usage or (`apparent`) sizes, each entry (sorted).
fn du(p: &Path, apparent: bool) -> String {
    let mut c = Command::new("du");
    c.args(["-a", "-B1"]);
    if apparent {
        c.arg("--apparent-size");
    }
    let mut lines: Vec<String> = run(c
        .arg(p.file_name().unwrap())
        .current_dir(p.parent().unwrap()))
    .lines()
    .map(str::to_owned)
    .collect();
    lines.sort();
    lines.join("\n")
}

#[test]
fn du_and_inode_numbers_are_those_of_a_disk() {
    let f = fixture();
    let (_e, m) = mounted_and_read(&[]);
    for (name, base) in &f.paths {
        for apparent in [false, true] {
            assert_eq!(
                du(&m.p(base), apparent),
                du(&f.real(name), apparent),
                "{name} (apparent: {apparent})"
            );
        }
    }
    // 32-bit programs get EOVERFLOW from stat for inode numbers of 2^32 and more
    let inos = run(Command::new("find").arg(&m.mnt).args(["-printf", "%i\n"]));
    let inos: Vec<u64> = inos.lines().map(|l| l.parse().unwrap()).collect();
    assert!(inos.len() > 20, "{inos:?}");
    assert!(inos.iter().all(|&i| i < 1 << 32), "{inos:?}");
    let distinct: std::collections::HashSet<_> = inos.iter().collect();
    assert_eq!(distinct.len(), inos.len(), "{inos:?}");
    let py = "import os, sys; assert all(os.stat(os.path.join(sys.argv[1], n), follow_symlinks=False).st_ino < 2**32 for n in os.listdir(sys.argv[1]))";
    run(Command::new("python3").args(["-c", py]).arg(&m.mnt));
}
