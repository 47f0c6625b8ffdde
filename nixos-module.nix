# services.narfs: mount a signed Nix binary cache (S3 or file://) as a verified,
# lazily fetched, read-only store directory.
#
#   services.narfs = {
#     enable = true;
#     cacheUrl = "s3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com";
#     mountPoint = "/mnt/cache";
#     trustedPublicKeys = [ "demo-store:..." ];
#     environmentFile = "/run/secrets/narfs-aws";  # AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#   };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.narfs;
  nixStore = cfg.nixStore;
  inherit (lib) mkEnableOption mkOption mkIf types optional optionals;
  # systemd splits ExecStart like a shell but expands % specifiers and $VARIABLES.
  escapeExec = args: lib.concatStringsSep " " (map (a:
    lib.escapeShellArg (builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] a)) args);
in
{
  options.services.narfs = {
    enable = mkEnableOption "narfs, a verified read-only FUSE mount of a Nix binary cache";

    package = mkOption {
      type = types.package;
      description = "The narfs package.";
    };

    cacheUrl = mkOption {
      type = types.str;
      example = "s3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com";
      description = "The binary cache, in the URL syntax nix uses (s3://... or file:///...).";
    };

    mountPoint = mkOption {
      type = types.str;
      # not /run/narfs: that holds the control socket, which a mount there would hide
      default = "/mnt/narfs";
      description = "Where the cache is mounted; created if missing.";
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      example = [ "demo-store:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=" ];
      description = "Keys (NAME:BASE64) whose signatures make a store path visible. At least one.";
    };

    cacheDir = mkOption {
      type = types.str;
      default = "/var/cache/narfs";
      description = "Verified, unpacked store paths, kept across restarts.";
    };

    cacheSize = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "10G";
      description = "Most space unpacked paths may take (default: 10% of the file system, at most 10G).";
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = ''
        A file with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (systemd EnvironmentFile
        syntax). Credentials set in a user's shell never reach a system service.
      '';
    };

    netrcFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/narfs-netrc";
      description = ''
        Credentials for an http(s) cache in netrc syntax (nix.conf's netrc-file), so
        they stay out of the cache URL, the unit file and the process list.
      '';
    };

    sslCertFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/ssl/certs/company-ca.pem";
      description = ''
        CA certificates (PEM) https trusts, as nix.conf's ssl-cert-file: for a cache or
        S3 endpoint whose certificate comes from a private CA. By default narfs trusts
        what Nix does: NIX_SSL_CERT_FILE, SSL_CERT_FILE, else the system's bundle.
      '';
    };

    allowOther = mkOption {
      type = types.bool;
      default = true;
      description = "Let every user read the mount (the cache is verified and read-only).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--jobs" "8" ];
      description = "More arguments for narfs mount (or narfs nix-store).";
    };

    nixStore = {
      enable = mkEnableOption ''
        nix itself on the lazy store: instead of a read-only mount at mountPoint,
        `narfs nix-store` mounts the cache below a writable overlayfs at storeDir and
        registers its paths with nix (their closures, or all), so builds use them and
        fetch only the files they read (docs/nix-store.md)'';

      closures = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "/nix/store/...-ci-toolchain" ];
        description = "Register the closures of these store paths (default: every path of the cache).";
      };

      storeDir = mkOption {
        type = types.str;
        default = "/nix/store";
        description = "Where nix sees the store: overlayfs is mounted here.";
      };

      upper = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "tmpfs";
        description = ''
          Where nix's writes go (DIR/upper and DIR/work), or "tmpfs" for writes that
          vanish with the service (default: overlay/ in cacheDir).
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.trustedPublicKeys != [ ];
        message = "services.narfs.trustedPublicKeys must name at least one key: narfs serves nothing unverified.";
      }
    ];

    systemd.tmpfiles.rules = [
      "d ${cfg.mountPoint} 0755 root root -"
      "d ${cfg.cacheDir} 0700 root root -"
    ];

    systemd.services.narfs = {
      description = "narfs: verified read-only mount of ${cfg.cacheUrl}";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # nix must see the registered store from its first build on
      before = optional nixStore.enable "nix-daemon.service";
      path = [ pkgs.fuse3 ] ++ optional nixStore.enable config.nix.package;
      environment.NARFS_TRUSTED_PUBLIC_KEYS = lib.concatStringsSep " " cfg.trustedPublicKeys;
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = escapeExec (
          [ "${cfg.package}/bin/narfs" (if nixStore.enable then "nix-store" else "mount") "--cache-dir" cfg.cacheDir ]
          ++ optionals (cfg.cacheSize != null) [ "--cache-size" cfg.cacheSize ]
          ++ optionals (cfg.netrcFile != null) [ "--netrc-file" cfg.netrcFile ]
          ++ optionals (cfg.sslCertFile != null) [ "--ssl-cert-file" cfg.sslCertFile ]
          ++ optional cfg.allowOther "--allow-other"
          ++ optionals nixStore.enable (
            [ "--store-dir" nixStore.storeDir ]
            ++ builtins.concatMap (p: [ "--closure" p ]) nixStore.closures
            ++ optionals (nixStore.upper != null) [ "--upper" nixStore.upper ]
          )
          ++ cfg.extraArgs
          ++ [ cfg.cacheUrl ]
          ++ optional (!nixStore.enable) cfg.mountPoint
        );
        # nix-store unmounts its overlay and mount itself on SIGTERM
        ExecStopPost = optional (!nixStore.enable) "-${pkgs.fuse3}/bin/fusermount3 -uz ${cfg.mountPoint}";
        EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
        Restart = "on-failure";
        RestartSec = 5;
        # /run/narfs: the control socket `narfs prefetch` and `narfs stats` talk to,
        # for root alone
        RuntimeDirectory = "narfs";
        RuntimeDirectoryMode = "0700";
        # Hardening that still allows /dev/fuse and the mount itself.
        DeviceAllow = [ "/dev/fuse rw" ];
        DevicePolicy = "closed";
        NoNewPrivileges = true;
        PrivateTmp = true;
        ProtectHome = true;
        ProtectSystem = "full";
        ReadWritePaths = [ cfg.cacheDir ]
          ++ (if nixStore.enable
              # the overlay at the store, narfs beside it, nix's database
              then [ (dirOf nixStore.storeDir) "/nix/var/nix" ]
              else [ cfg.mountPoint ]);
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        RestrictRealtime = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
      };
    };
  };
}
