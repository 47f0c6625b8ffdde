//! nixos-module.nix parses and, evaluated with a stand-in for the module system
//! (tests/nixos/eval.nix), declares the unit and mount point a user expects.

use std::process::Command;

fn eval(attr: &str) -> serde_json::Value {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nixos/eval.nix"))
        .args(["-A", attr])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn module_parses() {
    let st = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/nixos-module.nix"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn unit_runs_narfs_with_the_options_given() {
    let unit = eval("full.systemd.services.narfs");
    let sc = &unit["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert_eq!(sc["Restart"], "on-failure");
    assert_eq!(
        sc["EnvironmentFile"],
        serde_json::json!(["/run/secrets/narfs"])
    );
    assert_eq!(sc["DeviceAllow"], serde_json::json!(["/dev/fuse rw"]));
    let exec = sc["ExecStart"].as_str().unwrap();
    assert_eq!(
        exec,
        "'/nix/store/11111111111111111111111111111111-narfs/bin/narfs' 'mount' '--cache-dir' \
         '/var/cache/narfs' '--cache-size' '10G' '--netrc-file' '/run/secrets/netrc' \
         '--ssl-cert-file' '/etc/ssl/company-ca.pem' '--allow-other' '--jobs' '8' \
         's3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com' '/mnt/cache'"
    );
    assert_eq!(unit["after"], serde_json::json!(["network-online.target"]));
    assert_eq!(unit["wants"], serde_json::json!(["network-online.target"]));
    assert_eq!(
        unit["environment"]["NARFS_TRUSTED_PUBLIC_KEYS"],
        "demo-store:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc= k2:AAAA"
    );
    let tmpfiles = eval("full.systemd.tmpfiles.rules");
    assert!(tmpfiles
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == "d /mnt/cache 0755 root root -"));
}

#[test]
fn defaults_are_sane() {
    let sc = eval("minimal.systemd.services.narfs.serviceConfig");
    assert_eq!(sc["EnvironmentFile"], serde_json::json!([]));
    let exec = sc["ExecStart"].as_str().unwrap();
    // the control socket's directory, /run/narfs, stays visible and root's alone
    assert!(exec.ends_with("'file:///srv/cache' '/mnt/narfs'"), "{exec}");
    assert!(
        !exec.contains("--cache-size")
            && !exec.contains("--netrc-file")
            && !exec.contains("--ssl-cert-file")
    );
    assert_eq!(sc["RuntimeDirectory"], "narfs");
    assert_eq!(sc["RuntimeDirectoryMode"], "0700");
}

#[test]
fn nix_store_mode_runs_narfs_nix_store_before_the_nix_daemon() {
    let unit = eval("nixStore.systemd.services.narfs");
    let exec = unit["serviceConfig"]["ExecStart"].as_str().unwrap();
    assert_eq!(
        exec,
        "'/nix/store/11111111111111111111111111111111-narfs/bin/narfs' 'nix-store' '--cache-dir' \
         '/var/cache/narfs' '--allow-other' '--store-dir' '/nix/store' '--closure' \
         '/nix/store/33333333333333333333333333333333-toolchain' '--upper' 'tmpfs' \
         's3://ci-cache?region=eu-west-1'"
    );
    assert_eq!(unit["before"], serde_json::json!(["nix-daemon.service"]));
    assert_eq!(unit["serviceConfig"]["ExecStopPost"], serde_json::json!([]));
    assert_eq!(
        unit["serviceConfig"]["ReadWritePaths"],
        serde_json::json!(["/var/cache/narfs", "/nix", "/nix/var/nix"])
    );
    // the plain mount is as before
    let plain = eval("minimal.systemd.services.narfs");
    assert_eq!(plain["before"], serde_json::json!([]));
    assert!(plain["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap()
        .contains("'mount'"));
}
