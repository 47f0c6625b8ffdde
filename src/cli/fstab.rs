//! The mount(8) form. An fstab line `CACHE_URL DIR fuse.narfs OPTIONS 0 0` (or
//! `mount -t fuse.narfs CACHE_URL DIR -o OPTIONS`) makes mount.fuse3 run
//! `narfs CACHE_URL DIR -o OPTIONS` and wait for it to return once mounted. This
//! module turns that form into `narfs mount --daemon ...` arguments; `daemon` starts
//! the mount in the background and returns when it is serving.

use crate::mount::session::READY_ENV;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

/// Options that take a value, as `name=value`, and the `narfs mount` flag for each.
const VALUED: &[(&str, &str)] = &[
    ("trusted-public-key", "--trusted-public-key"),
    ("cache-dir", "--cache-dir"),
    ("cache-size", "--cache-size"),
    ("negative-ttl", "--negative-ttl"),
    ("refresh-interval", "--refresh-interval"),
    ("jobs", "--jobs"),
    ("prefetch-references", "--prefetch-references"),
    ("timeout", "--timeout"),
    ("metrics-addr", "--metrics-addr"),
    ("log", "--log-file"),
    ("netrc-file", "--netrc-file"),
    ("ssl-cert-file", "--ssl-cert-file"),
];

/// Flags without a value.
const FLAGS: &[(&str, &str)] = &[
    ("allow_other", "--allow-other"),
    ("allow-other", "--allow-other"),
    ("passthrough", "--passthrough"),
    ("no-open", "--no-open"),
    ("page-cache", "--page-cache"),
];

/// Generic mount options that mean nothing to narfs (a narfs mount is always
/// read-only, nodev and nosuid).
fn ignored(opt: &str) -> bool {
    matches!(
        opt,
        "" | "ro"
            | "rw"
            | "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "_netdev"
            | "user"
            | "users"
            | "nouser"
            | "dev"
            | "nodev"
            | "suid"
            | "nosuid"
            | "atime"
            | "noatime"
            | "relatime"
            | "strictatime"
            | "lazytime"
            | "diratime"
            | "nodiratime"
            | "async"
            | "sync"
            | "owner"
            | "group"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
}

/// Whether `args` (the whole argv) is the mount(8) form rather than a subcommand.
pub fn is_helper_form(args: &[OsString], subcommands: &[&str]) -> bool {
    match args.get(1).and_then(|a| a.to_str()) {
        Some(first) => args.len() >= 3 && !first.starts_with('-') && !subcommands.contains(&first),
        None => false,
    }
}

/// `narfs SOURCE DIR [-o OPTS]... [-f] [-n] [-v]` → `narfs mount [--daemon] FLAGS SOURCE DIR`.
pub fn translate(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = vec![args[0].clone(), "mount".to_owned()];
    let mut positional = Vec::new();
    let mut opts = Vec::new();
    let mut foreground = false;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => opts.push(it.next().ok_or("-o needs a value")?.clone()),
            "-f" => foreground = true,
            // no /etc/mtab to write; verbose or fake runs of mount(8)
            "-n" | "-v" | "-s" => {}
            s if s.starts_with("-o") => opts.push(s[2..].to_owned()),
            s if s.starts_with('-') => return Err(format!("unknown argument '{s}'")),
            s => positional.push(s.to_owned()),
        }
    }
    let [source, dir] = <[String; 2]>::try_from(positional)
        .map_err(|_| "expected CACHE_URL MOUNTPOINT [-o OPTIONS]".to_owned())?;
    if !foreground {
        out.push("--daemon".into());
    }
    let mut noexec = false;
    for opt in opts.iter().flat_map(|o| o.split(',')) {
        if ignored(opt) {
            continue;
        }
        if opt == "noexec" || opt == "exec" {
            // the last one wins, as in mount(8)
            noexec = opt == "noexec";
            continue;
        }
        if let Some(&(_, flag)) = FLAGS.iter().find(|(name, _)| *name == opt) {
            out.push(flag.into());
            continue;
        }
        let (name, value) = opt.split_once('=').unwrap_or((opt, ""));
        match VALUED.iter().find(|(n, _)| *n == name) {
            Some(&(_, flag)) if !value.is_empty() => {
                out.push(flag.into());
                out.push(value.into());
            }
            Some(_) => return Err(format!("mount option '{name}' needs a value ({name}=...)")),
            None => return Err(format!("unknown mount option '{opt}'")),
        }
    }
    if noexec {
        out.push("--noexec".into());
    }
    out.push(source);
    out.push(dir);
    Ok(out)
}

/// Runs this program again as a background mount (its own session, output to
/// `log`) and returns once it is serving: `Ok` then, or the child's failure.
pub fn daemon(log: &Path) -> Result<(), (u8, String)> {
    use std::os::unix::process::CommandExt;
    let fail = |m: String| (1, m);
    let dir = tempfile::tempdir().map_err(|e| fail(format!("temp dir: {e}")))?;
    let ready = dir.path().join("ready");
    let sock = std::os::unix::net::UnixDatagram::bind(&ready)
        .map_err(|e| fail(format!("{}: {e}", ready.display())))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| fail(e.to_string()))?;
    if let Some(d) = log.parent().filter(|d| !d.exists()) {
        // often the cache directory, which must be the user's alone
        let _ = crate::disk_cache::create_private_dir(d);
    }
    let log_file = crate::disk_cache::open_private_file(log)
        .map_err(|e| fail(format!("log file {}: {e}", log.display())))?;
    let start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_ENV, &ready)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    // its own session: the mount outlives the shell or mount(8) that started it
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    let mut buf = [0u8; 64];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "the mount did not come up within 120 s (see {})",
                log.display()
            )));
        }
        if let Ok(n) = sock.recv(&mut buf) {
            if &buf[..n] == b"READY=1" {
                return Ok(());
            }
        }
        if let Some(st) = child.try_wait().map_err(|e| fail(e.to_string()))? {
            // what this run wrote, at most its last 10 lines
            let text = std::fs::read(log).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
            let lines: Vec<&str> = text.lines().collect();
            return Err((
                st.code().unwrap_or(1).clamp(1, 255) as u8,
                format!(
                    "the mount failed ({}):\n{}",
                    log.display(),
                    lines[lines.len().saturating_sub(10)..].join("\n")
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn translates_mount_options() {
        let got = translate(&s(&[
            "narfs",
            "s3://b?endpoint=h:1&region=r",
            "/mnt",
            "-o",
            "rw,nodev,nosuid,async,noatime,_netdev,x-systemd.automount,trusted-public-key=k-1:abc=,cache-dir=/var/cache/narfs,allow_other",
            "-o",
            "cache-size=5G,log=/var/log/narfs.log,ssl-cert-file=/etc/ca.pem",
        ]))
        .unwrap();
        assert_eq!(
            got,
            s(&[
                "narfs",
                "mount",
                "--daemon",
                "--trusted-public-key",
                "k-1:abc=",
                "--cache-dir",
                "/var/cache/narfs",
                "--allow-other",
                "--cache-size",
                "5G",
                "--log-file",
                "/var/log/narfs.log",
                "--ssl-cert-file",
                "/etc/ca.pem",
                "s3://b?endpoint=h:1&region=r",
                "/mnt",
            ])
        );
        let noexec = translate(&s(&["narfs", "u", "/m", "-o", "exec,user,noexec"])).unwrap();
        assert_eq!(
            noexec,
            s(&["narfs", "mount", "--daemon", "--noexec", "u", "/m"])
        );
        let exec = translate(&s(&["narfs", "u", "/m", "-o", "noexec,exec"])).unwrap();
        assert!(!exec.contains(&"--noexec".to_owned()), "{exec:?}");
        let fg = translate(&s(&["narfs", "file:///c", "/mnt", "-f", "-ojobs=2"])).unwrap();
        assert_eq!(
            fg,
            s(&["narfs", "mount", "--jobs", "2", "file:///c", "/mnt"])
        );
        for (bad, why) in [
            (
                &["narfs", "u", "/m", "-o", "colour=red"][..],
                "unknown mount option 'colour=red'",
            ),
            (
                &["narfs", "u", "/m", "-o", "cache-dir"][..],
                "needs a value",
            ),
            (
                &["narfs", "u", "/m", "/x"][..],
                "expected CACHE_URL MOUNTPOINT",
            ),
            (&["narfs", "u", "/m", "-o"][..], "-o needs a value"),
            (&["narfs", "u", "/m", "--bogus"][..], "unknown argument"),
        ] {
            let e = translate(&s(bad)).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn tells_the_forms_apart() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let subs = ["mount", "ls"];
        assert!(is_helper_form(&a(&["narfs", "s3://b", "/mnt"]), &subs));
        assert!(!is_helper_form(
            &a(&["narfs", "mount", "s3://b", "/mnt"]),
            &subs
        ));
        assert!(!is_helper_form(&a(&["narfs", "--help", "x"]), &subs));
        assert!(!is_helper_form(&a(&["narfs", "s3://b"]), &subs));
    }
}
