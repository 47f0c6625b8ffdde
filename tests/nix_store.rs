//! Nix itself on the lazy store (docs/nix-store.md): `narfs nix-store` in a private
//! mount namespace with its own `/nix` (a tmpfs: the host's nix is never touched), the
//! real nix 2.8 run in it with `nsenter`, the cache nix wrote served from s3s-fs behind
//! the counting proxy.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// nix's settings in the namespace: no substituter (nothing but the mount may supply
/// paths), no sandbox (builds read only what their builders read).
const NIX_CONFIG: &str = "substituters =\nsandbox = false\nrequire-sigs = true\n";

/// A private mount namespace with a tmpfs at /nix, where `narfs nix-store` runs.
struct Ns {
    holder: Child,
    pub log: PathBuf,
    pub cache_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ns {
    /// Starts `narfs nix-store ARGS` in a new namespace and waits until nix can use
    /// the store (or narfs exits: then the error).
    fn start(args: &[&str]) -> Result<Ns, (ExitStatus, String)> {
        Self::start_with("", None, args)
    }

    /// The same, after `setup` (shell commands run in the namespace first), with the
    /// cache directory (and so the upper layer) of an earlier run if given.
    fn start_with(
        setup: &str,
        cache_dir: Option<&Path>,
        args: &[&str],
    ) -> Result<Ns, (ExitStatus, String)> {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("narfs.log");
        let cache_dir = cache_dir.map_or_else(|| dir.path().join("cache"), Path::to_owned);
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let script = format!(
            "set -e\nmount -t tmpfs -o mode=0755 tmpfs /nix\nmkdir -p /nix/store /nix/var/nix\n{setup}\n\
             exec {} nix-store --cache-dir {} {}",
            env!("CARGO_BIN_EXE_narfs"),
            shell_quote(cache_dir.to_str().unwrap()),
            quoted.join(" ")
        );
        let holder = narfs_env(Command::new("unshare"))
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut ns = Ns {
            holder,
            log,
            cache_dir,
            _dir: dir,
        };
        let t = Instant::now();
        loop {
            if ns.log_text().contains("nix can use the store") {
                return Ok(ns);
            }
            if let Some(st) = ns.holder.try_wait().unwrap() {
                return Err((st, ns.log_text()));
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "narfs nix-store never got ready:\n{}",
                ns.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `sh -c script` in the namespace, as nix's user: (status, stdout, stderr).
    fn sh(&self, script: &str) -> (i32, String, String) {
        out(Command::new("nsenter")
            .args([
                "-t",
                &self.holder.id().to_string(),
                "-m",
                "sh",
                "-c",
                script,
            ])
            .env("PATH", "/usr/bin:/bin")
            .env("NIX_CONFIG", NIX_CONFIG)
            .env_remove("NIX_REMOTE"))
    }

    /// `sh`, which must succeed: its stdout.
    fn ok(&self, script: &str) -> String {
        let (code, o, e) = self.sh(script);
        assert_eq!(code, 0, "{script}:\n{o}\n{e}\nnarfs:\n{}", self.log_text());
        o
    }

    /// SIGTERM, then the exit status (within 10 s).
    fn stop(mut self) -> ExitStatus {
        unsafe { libc::kill(self.holder.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut self.holder, Duration::from_secs(10))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The environment narfs runs in for the tests (credentials of the S3 server).
fn narfs_env(mut c: Command) -> Command {
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "narfs=debug");
    c
}

/// NAR GETs (whole or Range) of the fixture's paths so far, by name.
fn nars_fetched(e: &Env) -> Vec<&'static str> {
    let f = fixture();
    let mut got: Vec<&'static str> = f
        .paths
        .keys()
        .filter(|n| e.proxy.gets(&f.narinfo_field(n, "URL")) > 0)
        .map(|n| -> &'static str { Box::leak(n.clone().into_boxed_str()) })
        .collect();
    got.sort();
    got
}

#[test]
fn nix_uses_registered_paths_lazily_builds_copies_and_collects_garbage() {
    let f = fixture();
    let e = env();
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let keep = tempfile::tempdir().unwrap();
    let kept = keep.path().join("cache");
    let ns = start_kept(&kept, &app, &e.url);

    // nix knows the closure, references and signatures, and no NAR was fetched
    let refs = ns.ok(&format!("nix-store -q --references {app}"));
    let want_refs = run(nix(&["path-info", "--store", &f.store, "--json"]).arg(&app));
    for name in ["narfs-test-lib", "narfs-test-big", "narfs-test-single.txt"] {
        assert!(refs.contains(f.path(name)), "{refs}");
        assert!(want_refs.contains(f.path(name)));
    }
    let reqs = ns.ok(&format!("nix-store -q --requisites {app}"));
    assert_eq!(reqs.lines().count(), f.paths.len(), "{reqs}");
    let sigs = ns.ok(&format!(
        "nix --experimental-features nix-command path-info -r --sigs {app}"
    ));
    assert_eq!(
        sigs.lines().filter(|l| l.contains("narfs-test-1:")).count(),
        f.paths.len(),
        "{sigs}"
    );
    assert!(nars_fetched(&e).is_empty(), "{:?}", nars_fetched(&e));

    // a build that reads two files of the closure fetches just those two paths
    let lib = format!("/nix/store/{}", f.path("narfs-test-lib"));
    let expr = format!(
        r#"derivation {{
          name = "reads-two"; system = builtins.currentSystem; builder = "/bin/sh";
          PATH = "/usr/bin:/bin";
          app = builtins.storePath "{app}"; lib = builtins.storePath "{lib}";
          args = [ "-c" "cat $app/bin/app $lib/lib/greet.sh > $out" ];
        }}"#
    );
    let built = ns.ok(&format!(
        "nix-build --no-out-link -E {}",
        shell_quote(&expr)
    ));
    let out_path = built.trim().to_owned();
    assert!(ns.ok(&format!("cat {out_path}")).contains("hello from lib"));
    assert_eq!(nars_fetched(&e), vec!["narfs-test-app", "narfs-test-lib"]);
    // the output is in the upper layer, nowhere else
    let upper = ns.cache_dir.join("overlay/upper");
    assert!(upper
        .join(out_path.trim_start_matches("/nix/store/"))
        .exists());

    // nix reads every registered path through narfs and finds them as registered
    let (code, o, err) = ns.sh("nix-store --verify --check-contents");
    assert_eq!(code, 0, "{o}{err}");
    assert!(
        !err.contains("disappeared") && !err.contains("mismatch"),
        "{err}"
    );

    // the output with its closure goes to another nix that trusts the cache's key and
    // the key the output is signed with
    let (bsk, bpk) = (ns._dir.path().join("b.sec"), ns._dir.path().join("b.pub"));
    run(Command::new("nix-store")
        .args(["--generate-binary-cache-key", "build-1"])
        .args([&bsk, &bpk]));
    let copy = ns._dir.path().join("copy");
    ns.ok(&format!(
        "nix --experimental-features nix-command store sign --key-file {} {out_path} && \
         nix --experimental-features nix-command copy --to file://{} {out_path}",
        bsk.display(),
        copy.display()
    ));
    let other = ns._dir.path().join("other");
    run(nix(&["copy", "--from"])
        .arg(format!("file://{}", copy.display()))
        .arg("--to")
        .arg(format!("local?root={}", other.display()))
        .args(["--option", "require-sigs", "true"])
        .arg("--option")
        .arg("trusted-public-keys")
        .arg(format!(
            "{} {}",
            f.public_key,
            std::fs::read_to_string(&bpk).unwrap().trim()
        ))
        .args(["--option", "substituters", ""])
        .arg(&out_path));
    assert!(other.join(out_path.trim_start_matches('/')).exists());

    // garbage collection: paths leave nix's view, the lower layer and narfs's cache
    // stay whole, the next mount starts clean
    ns.ok(&format!(
        "nix-store --delete {out_path}; nix-collect-garbage"
    ));
    let (code, _, _) = ns.sh(&format!("nix-store -q --references {app}"));
    assert_ne!(code, 0, "collected paths are not valid any more");
    assert!(ns
        .ok(&format!(
            "cat /nix/.narfs-lower/{}/bin/app",
            f.path("narfs-test-app")
        ))
        .contains("greet"));
    assert!(ns.stop().success());
    let ns = start_kept(&kept, &app, &e.url);
    assert_eq!(
        ns.ok(&format!("nix-store -q --requisites {app}"))
            .lines()
            .count(),
        f.paths.len()
    );
    assert!(ns.ok(&format!("{app}/bin/app")).contains("hello from lib"));
    assert!(
        ns.log_text()
            .contains("paths an earlier garbage collection hid are shown again"),
        "{}",
        ns.log_text()
    );
    assert!(
        ns.log_text()
            .contains("paths an earlier garbage collection hid are shown again"),
        "{}",
        ns.log_text()
    );
    assert!(ns.stop().success());
}

/// Runs `narfs nix-store ARGS` in a namespace after `setup`, to its end: its exit
/// status, its log, and the mounts it left at the store or the lower directory.
fn attempt(setup: &str, args: &[&str]) -> (i32, String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    let script = format!(
        "mount -t tmpfs -o mode=0755 tmpfs /nix && mkdir -p /nix/store /nix/var/nix || exit 99\n\
         {setup}\n\
         timeout 60 {} nix-store --cache-dir {}/cache {} 2>&1\n\
         echo \"rc=$?\"\n\
         grep -cE ' /nix/store | /nix/.narfs-lower ' /proc/self/mountinfo",
        env!("CARGO_BIN_EXE_narfs"),
        dir.path().display(),
        quoted.join(" ")
    );
    let (_, text, err) = out(narfs_env(Command::new("unshare")).args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    let rc = text
        .lines()
        .find_map(|l| l.strip_prefix("rc="))
        .unwrap_or_else(|| panic!("{text}\n{err}"))
        .parse()
        .unwrap();
    let left = text.lines().last().unwrap().trim().parse().unwrap();
    (rc, text, left)
}

#[test]
fn bad_input_fails_naming_the_cause_and_leaves_nothing_mounted() {
    let f = fixture();
    let e = env();
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let other_key = "other-1:".to_owned()
        + &narfs::formats::keys::SecretKey::from_seed("other-1", [3; 32])
            .public()
            .to_nix_string()["other-1:".len()..];
    let work = tempfile::tempdir().unwrap();
    let w = work.path().display();
    let cases: Vec<(&str, String, Vec<String>, &str)> = vec![
        (
            "an untrusted key",
            String::new(),
            vec!["--trusted-public-key".into(), other_key, "--closure".into(), app.clone()],
            "nothing registered",
        ),
        (
            "a closure member the cache does not have",
            String::new(),
            vec![
                "--trusted-public-key".into(),
                f.public_key.clone(),
                "--closure".into(),
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-absent".into(),
            ],
            "0123456789abcdfghijklmnpqrsvwxyz-absent",
        ),
        (
            "an upper directory on an overlay",
            format!(
                "mkdir -p {w}/l {w}/u {w}/w {w}/o && mount -t overlay overlay -o lowerdir={w}/l,upperdir={w}/u,workdir={w}/w {w}/o"
            ),
            vec![
                "--trusted-public-key".into(),
                f.public_key.clone(),
                "--upper".into(),
                format!("{w}/o/up"),
            ],
            "overlayfs refuses as an upper layer",
        ),
        (
            "an upper directory on a read-only file system",
            format!("mkdir -p {w}/ro && mount -t tmpfs -o ro tmpfs {w}/ro"),
            vec![
                "--trusted-public-key".into(),
                f.public_key.clone(),
                "--upper".into(),
                format!("{w}/ro"),
            ],
            "read-only file system",
        ),
        (
            "no overlayfs",
            format!(
                "grep -v overlay /proc/filesystems > {w}/fs && mount --bind {w}/fs /proc/filesystems"
            ),
            vec!["--trusted-public-key".into(), f.public_key.clone()],
            "no overlayfs",
        ),
        (
            "no FUSE",
            "mount --bind /dev/null /dev/fuse".into(),
            vec!["--trusted-public-key".into(), f.public_key.clone()],
            "no FUSE",
        ),
        (
            "a nix database of an unknown schema",
            "mkdir -p /nix/var/nix/db && printf 11 > /nix/var/nix/db/schema".into(),
            vec!["--trusted-public-key".into(), f.public_key.clone()],
            "schema \"11\"",
        ),
    ];
    for (what, setup, mut args, says) in cases {
        args.push(e.url.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (rc, text, left) = attempt(&setup, &args);
        assert_ne!(rc, 0, "{what}: {text}");
        assert!(text.contains(says), "{what}: expected '{says}' in:\n{text}");
        assert_eq!(left, 0, "{what}: left mounted:\n{text}");
    }
}

/// A path of the cache that is not registered stays unknown to nix; a registered one
/// whose narinfo changes afterwards (pushed again with other contents) is never
/// served with other bytes.
#[test]
fn unregistered_paths_stay_invalid_and_registered_contents_are_pinned() {
    use narfs::formats::narinfo::{Compression, NarInfo};
    let f = fixture();
    let e = env();
    let lib = format!("/nix/store/{}", f.path("narfs-test-lib"));
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let ns = Ns::start(&[
        "--trusted-public-key",
        &f.public_key,
        "--closure",
        &lib,
        &e.url,
    ])
    .unwrap_or_else(|(st, log)| panic!("{st:?}\n{log}"));
    assert_eq!(
        ns.ok(&format!("nix-store -q --requisites {lib}")).trim(),
        lib
    );
    let (code, _, err) = ns.sh(&format!("nix-store -q --references {app}"));
    assert_ne!(code, 0);
    assert!(err.contains("not valid"), "{err}");
    // its files are there (the overlay shows the whole mount), nix just does not own it
    assert!(ns.ok(&format!("cat {app}/bin/app")).contains("greet"));
    drop(ns);

    // register app's closure, then push narfs-test-single.txt again with other bytes
    let ns = Ns::start(&[
        "--trusted-public-key",
        &f.public_key,
        "--closure",
        &app,
        &e.url,
    ])
    .unwrap_or_else(|(st, log)| panic!("{st:?}\n{log}"));
    let single = f.path("narfs-test-single.txt");
    let old_nar = f.narinfo_field("narfs-test-single.txt", "URL");
    let nar = file_nar(b"other contents\n");
    let sk = narfs::formats::keys::SecretKey::parse(
        std::fs::read_to_string(&f.secret_key_file).unwrap().trim(),
    )
    .unwrap();
    let mut info = NarInfo::parse(&f.narinfo("narfs-test-single.txt")).unwrap();
    info.url = "nar/pushed-again.nar".into();
    info.compression = Compression::None;
    info.file_hash = None;
    info.file_size = None;
    info.nar_hash = narfs::formats::hash::Sha256::digest(&nar);
    info.nar_size = nar.len() as u64;
    info.sigs = vec![sk.sign(info.fingerprint().as_bytes())];
    std::fs::write(e.object("nar/pushed-again.nar"), &nar).unwrap();
    std::fs::write(
        e.object(&format!("{}.narinfo", &single[..32])),
        info.to_text(),
    )
    .unwrap();
    std::fs::remove_file(e.object(&old_nar)).unwrap();
    for _ in 0..3 {
        let (code, text, err) = ns.sh(&format!("cat /nix/store/{single}"));
        assert_ne!(code, 0, "served {text:?}");
        assert!(!text.contains("other contents"));
        assert!(err.contains("Input/output error"), "{err}");
    }
    assert!(
        ns.log_text().contains("but nix registered it with"),
        "{}",
        ns.log_text()
    );
}

/// `narfs register` prints what `nix-store --dump-db` prints for the closure (nix's
/// own format), and `--sigs` carries the signatures `nix store copy-sigs` takes: a
/// store loaded from them holds the paths exactly as the store that built them.
#[test]
fn narfs_register_output_is_what_nix_dump_db_prints() {
    let f = fixture();
    let e = env();
    let app = format!("/nix/store/{}", f.path("narfs-test-app"));
    let dir = tempfile::tempdir().unwrap();
    let sigs = dir.path().join("sigs");
    let text = run(narfs()
        .args([
            "register",
            "--trusted-public-key",
            &f.public_key,
            "--closure",
            &app,
        ])
        .arg("--sigs")
        .arg(&sigs)
        .arg(&e.url));
    let root = dir.path().join("root");
    let store = format!("local?root={}", root.display());
    let mut load = Command::new("nix-store")
        .args(["--store", &store, "--load-db"])
        .env("PATH", "/usr/bin:/bin")
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    load.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(load.wait().unwrap().success());
    let closure: Vec<String> = f
        .paths
        .values()
        .map(|b| format!("/nix/store/{b}"))
        .collect();
    for p in &closure {
        let one = |store: &str| {
            run(Command::new("nix-store")
                .args(["--store", store, "--dump-db", p])
                .env("PATH", "/usr/bin:/bin")
                .env_remove("NIX_REMOTE"))
        };
        assert_eq!(one(&store), one(&f.store), "{p}");
    }
    run(nix(&[
        "store",
        "copy-sigs",
        "--store",
        &store,
        "--option",
        "substituters",
        "",
    ])
    .arg("-s")
    .arg(format!("file://{}", sigs.display()))
    .args(&closure));
    let shown = run(nix(&["path-info", "--store", &store, "--sigs", "-r"]).arg(&app));
    assert_eq!(
        shown
            .lines()
            .filter(|l| l.contains("narfs-test-1:"))
            .count(),
        closure.len(),
        "{shown}"
    );
}

/// `narfs nix-store` of the closure of `app`, its cache directory at `kept`.
fn start_kept(kept: &Path, app: &str, url: &str) -> Ns {
    Ns::start_with(
        "",
        Some(kept),
        &[
            "--trusted-public-key",
            &fixture().public_key,
            "--closure",
            app,
            url,
        ],
    )
    .unwrap_or_else(|(st, log)| panic!("{st:?}\n{log}"))
}
