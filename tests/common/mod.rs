//! Real parts for the end-to-end tests: the real nix builds and signs a closure into a
//! chroot store and writes a `file://` cache; a real `s3s-fs` serves it on 127.0.0.1
//! behind a counting proxy; the real `narfs` binary mounts it over FUSE.
#![allow(dead_code)]

pub mod proxy;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "narfs-test-access";
pub const SECRET_KEY: &str = "narfs-test-secret-0123456789";
pub const BUCKET: &str = "narfs-bucket";

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Exit status, stdout and stderr of a command that may fail.
pub fn out(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn nix(args: &[&str]) -> Command {
    let mut c = Command::new("nix");
    c.args(["--experimental-features", "nix-command"])
        .args(args)
        .env("PATH", "/usr/bin:/bin")
        .env_remove("NIX_REMOTE");
    c
}

/// A closure built and pushed to a `file://` cache by the real nix.
pub struct Fixture {
    pub dir: PathBuf,
    /// `local?root=...` store URL of the chroot store that holds the closure.
    pub store: String,
    /// Where the chroot store's `/nix/store` really is.
    pub real_store: PathBuf,
    /// The `file://` cache nix wrote (xz, with `.ls` listings).
    pub cache: PathBuf,
    pub public_key: String,
    pub secret_key_file: PathBuf,
    /// Basenames by name (`narfs-test-app` → `<hash>-narfs-test-app`).
    pub paths: BTreeMap<String, String>,
}

impl Fixture {
    pub fn path(&self, name: &str) -> &str {
        &self.paths[name]
    }
    pub fn hash(&self, name: &str) -> &str {
        &self.paths[name][..32]
    }
    pub fn real(&self, name: &str) -> PathBuf {
        self.real_store.join(self.path(name))
    }
    pub fn narinfo(&self, name: &str) -> String {
        std::fs::read_to_string(self.cache.join(format!("{}.narinfo", self.hash(name)))).unwrap()
    }
    pub fn narinfo_field(&self, name: &str, field: &str) -> String {
        narinfo_field_in(&self.cache, self.hash(name), field)
    }
}

/// The value of `field` in the narinfo of `basename` (or its hash part) in the cache
/// directory `dir`.
pub fn narinfo_field_in(dir: &Path, basename: &str, field: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{}.narinfo", &basename[..32])))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: ")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {field} in the narinfo of {basename}"))
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build_fixture)
}

/// The fixture is built once and shared by every test binary and run, under the
/// target directory: keyed by the closure's source, built in a temp dir and renamed into
/// place under a lock, so parallel test binaries never see half of it.
fn build_fixture() -> Fixture {
    let nix_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    // (the derivation helper it imports is part of what it builds)
    let src = [&nix_file, &nix_file.with_file_name("mk.nix")]
        .map(|p| std::fs::read(p).unwrap())
        .concat();
    let key = &narfs::formats::hash::Sha256::digest(&src).to_nix_string()[7..19];
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    let dir = base.join(format!("fixture-{key}"));
    let lock = std::fs::File::create(base.join("fixture.lock")).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if !dir.join("done").exists() {
        let tmp = base.join(format!("fixture-{key}.tmp"));
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&tmp)
            .status();
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        build_fixture_in(&tmp, &nix_file);
        std::fs::write(tmp.join("done"), b"").unwrap();
        std::fs::rename(&tmp, &dir).unwrap();
    }
    load_fixture(&dir)
}

fn build_fixture_in(dir: &Path, nix_file: &Path) {
    let root = dir.join("root");
    let store = format!("local?root={}", root.display());
    let out = run(Command::new("nix-build")
        .args(["--store", &store, "--no-out-link"])
        .args(["--option", "sandbox", "true"])
        .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64"])
        .args(["--option", "substituters", ""])
        .arg(nix_file)
        .env("PATH", "/usr/bin:/bin")
        .env_remove("NIX_REMOTE"));
    let top = out.trim().to_owned();
    let (sk, pk) = (dir.join("secret-key"), dir.join("public-key"));
    run(Command::new("nix-store")
        .args(["--generate-binary-cache-key", "narfs-test-1"])
        .args([&sk, &pk]));
    run(
        nix(&["store", "sign", "--store", &store, "-r", "--key-file"])
            .arg(&sk)
            .arg(&top),
    );
    let cache = dir.join("cache");
    run(
        nix(&["copy", "--store", &store, "--option", "substituters", ""])
            .arg("--to")
            .arg(format!(
                "file://{}?compression=xz&write-nar-listing=1",
                cache.display()
            ))
            .arg(&top),
    );
    let closure = run(nix(&["path-info", "--store", &store, "-r"]).arg(&top));
    std::fs::write(dir.join("closure"), closure).unwrap();
}

fn load_fixture(dir: &Path) -> Fixture {
    let root = dir.join("root");
    let store = format!("local?root={}", root.display());
    let (sk, pk) = (dir.join("secret-key"), dir.join("public-key"));
    let mut paths = BTreeMap::new();
    for p in std::fs::read_to_string(dir.join("closure"))
        .unwrap()
        .lines()
    {
        let base = p.strip_prefix("/nix/store/").unwrap().to_owned();
        paths.insert(base[33..].to_owned(), base);
    }
    Fixture {
        store,
        real_store: root.join("nix/store"),
        cache: dir.join("cache"),
        public_key: std::fs::read_to_string(&pk).unwrap().trim().to_owned(),
        secret_key_file: sk,
        paths,
        dir: dir.to_owned(),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port on 127.0.0.1, and its `HOST:PORT` (for `--metrics-addr`).
pub fn free_addr() -> (u16, String) {
    let port = free_port();
    (port, format!("127.0.0.1:{port}"))
}

fn wait_port(port: u16) {
    wait_for(&format!("port {port}"), Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A real s3s-fs server on 127.0.0.1; objects are files under `root/<bucket>/`.
pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    child: Child,
}

impl S3Server {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        // A free port can be taken by a parallel test before s3s-fs binds it: then
        // s3s-fs exits, and we try another.
        for _ in 0..10 {
            let port = free_port();
            let mut child = spawn_s3s(port, &root);
            let t = Instant::now();
            loop {
                if let Some(_st) = child.try_wait().unwrap() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // ours, not another test's, if it is still alive a moment later
                    std::thread::sleep(Duration::from_millis(50));
                    if child.try_wait().unwrap().is_none() {
                        return S3Server { root, port, child };
                    }
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "s3s-fs never listened"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start s3s-fs on a free port");
    }

    /// Puts a whole `file://` cache under `prefix` in the bucket.
    pub fn upload_cache(&self, cache: &Path, prefix: &str) -> PathBuf {
        let dest = self.root.join(BUCKET).join(prefix);
        std::fs::create_dir_all(&dest).unwrap();
        run(Command::new("cp")
            .arg("-r")
            .arg(format!("{}/.", cache.display()))
            .arg(&dest));
        dest
    }

    pub fn url(&self, port: u16, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}?endpoint=127.0.0.1:{port}&scheme=http&region=us-east-1")
    }
}

impl S3Server {
    /// Kills the server (the mount stays up and must cope).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and root.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_s3s(self.port, &self.root);
        wait_port(self.port);
    }
}

fn spawn_s3s(port: u16, root: &Path) -> Child {
    Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs must be installed (see README)")
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The fixture's cache in a real S3 server, behind a counting, fault-injecting proxy.
pub struct Env {
    pub s3: S3Server,
    pub proxy: proxy::Proxy,
    /// The cache URL through the proxy.
    pub url: String,
}

pub fn env() -> Env {
    let f = fixture();
    let s3 = S3Server::start();
    s3.upload_cache(&f.cache, "cache");
    let proxy = proxy::Proxy::start(s3.port);
    let url = s3.url(proxy.port, "cache");
    Env { s3, proxy, url }
}

impl Env {
    /// Where object `key` of the cache lives on the server's disk.
    pub fn object(&self, key: &str) -> PathBuf {
        self.s3.root.join(BUCKET).join("cache").join(key)
    }

    /// The object `HASH.EXT` of the fixture's path `name` (`ls`, `narinfo`).
    pub fn object_of(&self, name: &str, ext: &str) -> PathBuf {
        self.object(&format!("{}.{ext}", fixture().hash(name)))
    }

    /// Rewrites that object with what `edit` makes of its text.
    pub fn edit_object_of(&self, name: &str, ext: &str, edit: impl FnOnce(&str) -> String) {
        let path = self.object_of(name, ext);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(&text)).unwrap();
    }
}

/// Polls `done` every 20 ms until it holds; fails the test, naming `what`, once
/// `limit` passed (no test may hang).
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the mount at `mnt` serves the fixture's single file, unmounts it from
/// outside, and waits (10 s at most) for the narfs that served it to exit.
pub fn serve_then_unmount(mnt: &Path, narfs: &mut Child) -> ExitStatus {
    let p = mnt.join(fixture().path("narfs-test-single.txt"));
    wait_for("the mount", Duration::from_secs(20), || {
        std::fs::read(&p).ok().as_deref() == Some(b"asdf")
    });
    run(Command::new("fusermount3").arg("-u").arg(mnt));
    wait_timeout(narfs, Duration::from_secs(10))
}

/// An empty directory to mount on (`mnt`), in a temporary directory of its own.
pub fn mountpoint() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    (base, mnt)
}

/// A running `narfs mount`.
pub struct Mounted {
    base: PathBuf,
    pub mnt: PathBuf,
    pub cache_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub fn narfs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_narfs"));
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("NARFS_TRUSTED_PUBLIC_KEYS")
        .env_remove("AWS_PROFILE")
        .env("RUST_LOG", "narfs=debug");
    c
}

pub fn is_mounted(mnt: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let m = mnt.to_str().unwrap();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(m))
}

impl Mounted {
    pub fn start(url: &str, keys: &[&str], cache_dir: Option<&Path>, extra: &[&str]) -> Self {
        Self::try_start(url, keys, cache_dir, extra)
            .unwrap_or_else(|(st, log)| panic!("narfs exited {st:?}:\n{log}"))
    }

    /// Like `start`, with narfs logging at `level` (e.g. "trace" for each FUSE op).
    pub fn start_logging(url: &str, keys: &[&str], level: &str) -> Self {
        Self::try_start_env(
            url,
            keys,
            None,
            &[],
            &[("RUST_LOG", &format!("narfs={level}"))],
        )
        .unwrap_or_else(|(st, log)| panic!("narfs exited {st:?}:\n{log}"))
    }

    pub fn try_start(
        url: &str,
        keys: &[&str],
        cache_dir: Option<&Path>,
        extra: &[&str],
    ) -> Result<Self, (ExitStatus, String)> {
        Self::try_start_env(url, keys, cache_dir, extra, &[])
    }

    fn try_start_env(
        url: &str,
        keys: &[&str],
        cache_dir: Option<&Path>,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self, (ExitStatus, String)> {
        Self::try_start_umask(url, keys, cache_dir, extra, envs, None)
    }

    /// Like `try_start`, with narfs started under `umask`.
    pub fn try_start_umask(
        url: &str,
        keys: &[&str],
        cache_dir: Option<&Path>,
        extra: &[&str],
        envs: &[(&str, &str)],
        umask: Option<u32>,
    ) -> Result<Self, (ExitStatus, String)> {
        let base = tempfile::tempdir().unwrap().keep();
        let mnt = base.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let cache_dir = cache_dir
            .map(Path::to_owned)
            .unwrap_or_else(|| base.join("cache"));
        let log = base.join("narfs.log");
        let mut cmd = narfs();
        cmd.arg("mount").arg("--cache-dir").arg(&cache_dir);
        for k in keys {
            cmd.args(["--trusted-public-key", k]);
        }
        cmd.args(extra)
            .arg(url)
            .arg(&mnt)
            .envs(envs.iter().copied());
        if let Some(mask) = umask {
            use std::os::unix::process::CommandExt;
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mounted {
            base: base.clone(),
            mnt,
            cache_dir,
            log,
            child: Some(child),
        };
        let t = Instant::now();
        loop {
            if is_mounted(&m.mnt) {
                return Ok(m);
            }
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                return Err((st, m.log_text()));
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "narfs did not mount:\n{}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One figure of `narfs stats` (e.g. `nar_requests_total{result="fetched"}`).
    pub fn stat(&self, name: &str) -> u64 {
        let (code, text, err) = out(narfs().arg("stats").arg(&self.mnt));
        assert_eq!(code, 0, "{err}");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Runs the fixture's program from the mount, which prints what its library (another
    /// store path) says.
    pub fn runs_the_app(&self) {
        let app = self.p(fixture().path("narfs-test-app")).join("bin/app");
        assert_eq!(run(&mut Command::new(app)), "hello from lib\n");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Waits until narfs logs `needle`.
    pub fn wait_log(&self, needle: &str) {
        let t = Instant::now();
        while !self.log_text().contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no '{needle}' in log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the root lists `n` entries (the listing runs in the background).
    pub fn wait_root(&self, n: usize) -> Vec<String> {
        let t = Instant::now();
        loop {
            let mut names: Vec<String> = std::fs::read_dir(&self.mnt)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            if names.len() >= n || t.elapsed() > Duration::from_secs(20) {
                return names;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `kill -9`, as a crash would; the dead mount is detached.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .status();
    }

    /// Waits at most `d` for narfs to exit (after its mount went away), with its log
    /// if it does not.
    pub fn exited_within(&mut self, d: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if t.elapsed() > d {
                panic!(
                    "narfs still runs {d:?} after its mount went away:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = wait_timeout(&mut child, Duration::from_secs(10));
        assert!(!is_mounted(&self.mnt), "still mounted after SIGTERM");
        st
    }
}

pub fn wait_timeout(child: &mut Child, d: Duration) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > d {
            let _ = child.kill();
            panic!("process did not exit within {d:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// `find -printf` of a tree: type, mode, size, link target and path of every entry.
pub fn shape(root: &Path) -> String {
    run(Command::new("find")
        .arg(root)
        .args(["-printf", "%y %m %s %l %P\n"])
        .env("LC_ALL", "C"))
    .lines()
    .map(str::to_owned)
    .collect::<std::collections::BTreeSet<_>>()
    .into_iter()
    .collect::<Vec<_>>()
    .join("\n")
}

pub fn read_err(p: &Path) -> Option<i32> {
    let mut s = Vec::new();
    match std::fs::File::open(p).and_then(|mut f| f.read_to_end(&mut s)) {
        Ok(_) => None,
        Err(e) => e.raw_os_error(),
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A cache of `n` generated store paths, signed with a test key: narinfos only (and a
/// `.ls` for every `ls_every`-th), enough to measure listing and lookups at scale.
/// Returns the public key.
pub fn generate_cache(dir: &Path, n: usize, ls_every: usize) -> String {
    use narfs::formats::hash::Sha256;
    use narfs::formats::keys::SecretKey;
    use narfs::formats::narinfo::{Compression, NarInfo};
    use narfs::formats::store_path::StorePath;
    let sk = SecretKey::from_seed("narfs-gen-1", [42; 32]);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();
    let paths: Vec<StorePath> = (0..n)
        .map(|i| {
            let h = Sha256::digest(format!("gen-{i}").as_bytes());
            let hash = narfs::formats::nixbase32::encode(&h.0[..20]);
            StorePath::from_basename(&format!("{hash}-generated-path-{i}")).unwrap()
        })
        .collect();
    for (i, p) in paths.iter().enumerate() {
        let nar_hash = Sha256::digest(p.basename().as_bytes());
        let mut info = NarInfo {
            store_path: p.clone(),
            url: format!("nar/{}.nar.xz", &nar_hash.to_nix_string()[7..]),
            compression: Compression::Xz,
            file_hash: Some(nar_hash),
            file_size: Some(1000 + i as u64),
            nar_hash,
            nar_size: 4096 + i as u64,
            references: (1..4).map(|k| paths[(i + k * 7919) % n].clone()).collect(),
            deriver: Some(format!("{}.drv", p.basename())),
            sigs: vec![],
            ca: None,
            index: None,
            profile: None,
        };
        info.references.sort();
        info.references.dedup();
        info.sigs.push(sk.sign(info.fingerprint().as_bytes()));
        std::fs::write(
            dir.join(format!("{}.narinfo", p.hash_part())),
            info.to_text(),
        )
        .unwrap();
        if ls_every > 0 && i % ls_every == 0 {
            std::fs::write(
                dir.join(format!("{}.ls", p.hash_part())),
                r#"{"version":1,"root":{"type":"directory","entries":{"bin":{"type":"directory","entries":{"tool":{"type":"regular","size":100,"executable":true,"narOffset":400}}}}}}"#,
            )
            .unwrap();
        }
    }
    sk.public().to_nix_string()
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// A cache of `n` generated store paths with real, uncompressed NARs of about `bytes`
/// each (four files of pseudo-random data). Returns the public key and the basenames.
pub fn generate_nar_cache(dir: &Path, n: usize, bytes: usize) -> (String, Vec<String>) {
    generate_nar_cache_refs(dir, n, bytes, 0)
}

/// `generate_nar_cache` where path `i` references the `refs` paths after it (a chain,
/// as a closure is read: opening one prefetches its references).
pub fn generate_nar_cache_refs(
    dir: &Path,
    n: usize,
    bytes: usize,
    refs: usize,
) -> (String, Vec<String>) {
    use narfs::formats::hash::Sha256;
    use narfs::formats::keys::SecretKey;
    use narfs::formats::narinfo::{Compression, NarInfo};
    use narfs::formats::store_path::StorePath;
    let sk = SecretKey::from_seed("narfs-gen-2", [7; 32]);
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let work = tempfile::tempdir().unwrap();
    let paths: Vec<StorePath> = (0..n)
        .map(|i| {
            let h = Sha256::digest(format!("quota-{i}").as_bytes());
            StorePath::from_basename(&format!(
                "{}-gen-{i}",
                narfs::formats::nixbase32::encode(&h.0[..20])
            ))
            .unwrap()
        })
        .collect();
    for (i, sp) in paths.iter().enumerate() {
        let tree = work.path().join(format!("t{i}"));
        std::fs::create_dir(&tree).unwrap();
        for f in 0..4 {
            let data = noise(bytes / 4, (i * 4 + f) as u64 + 1);
            std::fs::write(tree.join(format!("f{f}")), data).unwrap();
        }
        let nar = narfs::formats::nar::Writer::new(Vec::new())
            .dump_path(&tree)
            .unwrap();
        let nar_hash = Sha256::digest(&nar);
        let url = format!("nar/{}.nar", &nar_hash.to_nix_string()[7..]);
        std::fs::write(dir.join(&url), &nar).unwrap();
        let mut references: Vec<StorePath> =
            (1..=refs).map(|k| paths[(i + k) % n].clone()).collect();
        references.sort();
        references.dedup();
        let mut info = NarInfo {
            store_path: sp.clone(),
            url,
            compression: Compression::None,
            file_hash: Some(nar_hash),
            file_size: Some(nar.len() as u64),
            nar_hash,
            nar_size: nar.len() as u64,
            references,
            deriver: None,
            sigs: vec![],
            ca: None,
            index: None,
            profile: None,
        };
        info.sigs.push(sk.sign(info.fingerprint().as_bytes()));
        std::fs::write(
            dir.join(format!("{}.narinfo", sp.hash_part())),
            info.to_text(),
        )
        .unwrap();
    }
    (
        sk.public().to_nix_string(),
        paths.iter().map(|p| p.basename().to_owned()).collect(),
    )
}

/// A server holding under `prefix` a cache `generate_nar_cache_refs` made: the server,
/// the cache's directory, its key and its paths' basenames.
pub fn generated(
    prefix: &str,
    n: usize,
    bytes: usize,
    refs: usize,
) -> (S3Server, PathBuf, String, Vec<String>) {
    let s3 = S3Server::start();
    let dir = s3.root.join(BUCKET).join(prefix);
    let (key, names) = generate_nar_cache_refs(&dir, n, bytes, refs);
    (s3, dir, key, names)
}

/// `n` pseudo-random bytes (xorshift from `seed`): contents that do not compress.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs `f` on a thread of its own and waits at most `d` for it: a test of a hang
/// fails instead of hanging CI (the thread is left behind).
pub fn within<T: Send + 'static>(d: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(d).ok()
}

/// NAR strings (length, bytes, padding), for hand-made archives.
pub fn strings(parts: &[&[u8]]) -> Vec<u8> {
    let mut w = narfs::formats::nar::Writer::new(Vec::new());
    for p in parts {
        w.raw_string(p).unwrap();
    }
    w.into_inner()
}

/// The NAR of a single regular file.
pub fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut v = strings(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    let mut w = narfs::formats::nar::Writer::new(std::mem::take(&mut v));
    w.raw_string(contents).unwrap();
    w.raw_string(b")").unwrap();
    w.into_inner()
}

/// An empty cache under prefix `h` of the server, and the key that signs for it.
pub struct SignedCache {
    pub dir: std::path::PathBuf,
    pub sk: narfs::formats::keys::SecretKey,
}

impl SignedCache {
    pub fn new(s3: &S3Server) -> Self {
        Self::at(&s3.root.join(BUCKET).join("h"))
    }

    /// An empty cache in `dir`.
    pub fn at(dir: &Path) -> Self {
        let dir = dir.to_owned();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        SignedCache {
            dir,
            sk: narfs::formats::keys::SecretKey::from_seed("hostile-test", [9; 32]),
        }
    }

    /// Puts `file` (the bytes at URL) and a narinfo signed by the trusted key, with
    /// `edit` applied to the narinfo before signing; returns the basename.
    pub fn put(
        &self,
        name: &str,
        nar: &[u8],
        compression: narfs::formats::narinfo::Compression,
        file: &[u8],
        edit: impl Fn(&mut narfs::formats::narinfo::NarInfo),
    ) -> String {
        let h = narfs::formats::hash::Sha256::digest(name.as_bytes());
        let sp = narfs::formats::store_path::StorePath::from_basename(&format!(
            "{}-{name}",
            narfs::formats::nixbase32::encode(&h.0[..20])
        ))
        .unwrap();
        let file_hash = narfs::formats::hash::Sha256::digest(file);
        let url = format!("nar/{}.nar", &file_hash.to_nix_string()[7..]);
        std::fs::create_dir_all(self.dir.join("nar")).unwrap();
        std::fs::write(self.dir.join(&url), file).unwrap();
        let mut info = narinfo_of(&sp, &url, compression, nar, Some(file));
        edit(&mut info);
        info.sigs.push(self.sk.sign(info.fingerprint().as_bytes()));
        std::fs::write(
            self.dir.join(format!("{}.narinfo", sp.hash_part())),
            info.to_text(),
        )
        .unwrap();
        sp.basename().to_owned()
    }

    /// The value of `field` in the narinfo of `basename`.
    pub fn field(&self, basename: &str, field: &str) -> String {
        narinfo_field_in(&self.dir, basename, field)
    }

    pub fn put_good(&self, name: &str) -> String {
        self.put_nar(name, &file_nar(b"good content\n"))
    }

    /// Puts `nar` (uncompressed) with a signed narinfo; returns the basename.
    pub fn put_nar(&self, name: &str, nar: &[u8]) -> String {
        self.put(
            name,
            nar,
            narfs::formats::narinfo::Compression::None,
            nar,
            |_| {},
        )
    }
}

/// An unsigned narinfo of `nar` for `sp`, with no references, kept at `url` as `file`
/// compressed with `compression` (without `file`: no FileHash or FileSize).
pub fn narinfo_of(
    sp: &narfs::formats::store_path::StorePath,
    url: &str,
    compression: narfs::formats::narinfo::Compression,
    nar: &[u8],
    file: Option<&[u8]>,
) -> narfs::formats::narinfo::NarInfo {
    use narfs::formats::hash::Sha256;
    narfs::formats::narinfo::NarInfo {
        store_path: sp.clone(),
        url: url.to_owned(),
        compression,
        file_hash: file.map(Sha256::digest),
        file_size: file.map(|f| f.len() as u64),
        nar_hash: Sha256::digest(nar),
        nar_size: nar.len() as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
        index: None,
        profile: None,
    }
}

/// `text` without its lines that start with `prefix` (a narinfo without a field).
pub fn without_lines(text: &str, prefix: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with(prefix))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The NAR of `dir` (a tree made for a test).
pub fn nar_of(dir: &Path) -> Vec<u8> {
    narfs::formats::nar::Writer::new(Vec::new())
        .dump_path(dir)
        .unwrap()
}

impl SignedCache {
    /// Puts `tree` as the `.ls` listing of `basename` (true or forged).
    pub fn put_listing(&self, basename: &str, tree: &narfs::formats::listing::Entry) {
        let json = narfs::formats::listing::to_ls_json(tree).unwrap();
        std::fs::write(self.dir.join(format!("{}.ls", &basename[..32])), json).unwrap();
    }

    /// Puts the NAR of `dir` (uncompressed) with a signed narinfo; returns the basename.
    pub fn put_tree(&self, name: &str, dir: &Path) -> String {
        self.put_nar(name, &nar_of(dir))
    }

    pub fn public_key(&self) -> String {
        self.sk.public().to_nix_string()
    }

    /// Mounts the cache `new` made on `s3`, trusting its key, with `extra` options.
    pub fn mount(&self, s3: &S3Server, extra: &[&str]) -> Mounted {
        Mounted::start(&s3.url(s3.port, "h"), &[&self.public_key()], None, extra)
    }
}

/// `python3 -m http.server` over a directory, as a stand-in for nix-serve or a CDN.
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

impl HttpServer {
    pub fn start(dir: &std::path::Path) -> Self {
        let (child, port) = spawn_listening("python3 -m http.server", |port| {
            let mut c = Command::new("python3");
            c.args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(dir);
            c
        });
        HttpServer { child, port }
    }
}

/// Starts the server `cmd` makes for a free port on 127.0.0.1 and waits until it
/// listens; another port if the one picked was taken meanwhile.
pub fn spawn_listening(what: &str, cmd: impl Fn(u16) -> Command) -> (Child, u16) {
    for _ in 0..10 {
        let port = free_port();
        let mut child = cmd(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start {what}");
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs of its own (0700), unmounted when dropped: a cache directory whose use
/// `fs_used` reads exactly and at once (a walk races with renames).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap().keep();
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir));
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes in use on the file system holding `p`.
pub fn fs_used(p: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_blocks - st.f_bfree) as u64 * st.f_frsize as u64
}

/// The NarHash (`sha256:...`) of `basename` in the cache directory `cache` (its
/// narinfo file).
pub fn narinfo_nar_hash(cache: &Path, basename: &str) -> String {
    std::fs::read_to_string(cache.join(format!("{}.narinfo", &basename[..32])))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("NarHash: "))
        .unwrap()
        .to_owned()
}

/// Whether a narfs cache directory holds the tree of the NAR with `nar_hash` and the
/// contents of `files` in it (paths relative to the store path, "" for a single-file
/// path; none: of every file).
pub fn cache_holds(cache_dir: &Path, nar_hash: &str, files: &[&str]) -> bool {
    use narfs::formats::listing::Entry;
    let h = narfs::formats::hash::Sha256::parse(nar_hash)
        .unwrap()
        .to_nix_string();
    let Ok(bytes) = std::fs::read(cache_dir.join("trees").join(&h[7..])) else {
        return false;
    };
    let Ok((tree, _, _)) = narfs::formats::file_index::decode_tree(&bytes) else {
        return false;
    };
    fn each<'a>(e: &'a Entry, at: String, out: &mut Vec<(String, &'a Entry)>) {
        if let Entry::Directory { entries } = e {
            for (n, c) in entries {
                let name = String::from_utf8_lossy(n);
                let p = if at.is_empty() {
                    name.into_owned()
                } else {
                    format!("{at}/{name}")
                };
                each(c, p, out);
            }
        } else {
            out.push((at, e));
        }
    }
    let mut all = Vec::new();
    each(&tree, String::new(), &mut all);
    all.iter()
        .filter(|(p, _)| files.is_empty() || files.contains(&p.as_str()))
        .all(|(_, e)| match e {
            Entry::Regular { chunks, .. } => chunks
                .as_deref()
                .unwrap_or_default()
                .iter()
                .all(|c| cache_dir.join(narfs::disk_cache::blob_rel_path(c)).exists()),
            _ => true,
        })
}

/// Blob files in a narfs cache directory.
pub fn blob_files(cache_dir: &Path) -> usize {
    std::fs::read_dir(cache_dir.join("blobs"))
        .map(|shards| {
            shards
                .flatten()
                .map(|s| std::fs::read_dir(s.path()).map_or(0, |d| d.count()))
                .sum()
        })
        .unwrap_or(0)
}

/// Whether a narfs cache directory keeps a tree for the NAR with `nar_hash`.
pub fn tree_kept(cache_dir: &Path, nar_hash: &str) -> bool {
    let h = narfs::formats::hash::Sha256::parse(nar_hash)
        .unwrap()
        .to_nix_string();
    cache_dir.join("trees").join(&h[7..]).exists()
}

/// NarHash of every path of a closure, as a store registered it.
pub fn nar_hashes(store: &str, top: &str) -> Vec<(String, String)> {
    let json = run(nix(&["path-info", "--json", "-r", "--store", store]).arg(top));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_owned(),
                p["narHash"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The fixture's closure pushed by `narfs push` (seekable NARs, file indexes) under
/// prefix `ix`; returns the public key.
pub fn push_closure(s3: &S3Server, dir: &Path) -> String {
    push_closure_with(s3, dir, "xz")
}

pub fn push_closure_with(s3: &S3Server, dir: &Path, compression: &str) -> String {
    let f = fixture();
    let (sk, pk) = keygen(dir, "ix-1");
    let (code, _, err) = out(narfs()
        .args([
            "push",
            "--store",
            &f.store,
            "--compression",
            compression,
            "--key-file",
        ])
        .arg(&sk)
        .arg(s3.url(s3.port, "ix"))
        .arg(format!("/nix/store/{}", f.path("narfs-test-app"))));
    assert_eq!(code, 0, "{err}");
    pk
}

/// The fixture's closure pushed with `compression` as `push_closure_with` does, and
/// mounted through a counting proxy with `extra` options.
pub fn indexed_mount(compression: &str, extra: &[&str]) -> (S3Server, proxy::Proxy, Mounted) {
    let s3 = S3Server::start();
    let keys = tempfile::tempdir().unwrap();
    let pk = push_closure_with(&s3, keys.path(), compression);
    let proxy = proxy::Proxy::start(s3.port);
    let m = Mounted::start(&s3.url(proxy.port, "ix"), &[&pk], None, extra);
    (s3, proxy, m)
}

/// A signing key pair made by `narfs keygen NAME` in `dir`: the secret key's file and
/// the public key.
pub fn keygen(dir: &Path, name: &str) -> (String, String) {
    let (sk, pk) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    run(narfs().arg("keygen").arg(name).arg(&sk).arg(&pk));
    (
        sk.display().to_string(),
        std::fs::read_to_string(pk).unwrap().trim().to_owned(),
    )
}
