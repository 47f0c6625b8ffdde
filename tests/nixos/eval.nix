# Evaluates nixos-module.nix without NixOS: a minimal stand-in for the module system's
# lib (mkOption, mkEnableOption, mkIf, types, ...) and for pkgs, enough to read back
# the generated unit. Used by tests/nixos_module.rs.
let
  lib = rec {
    mkOption = attrs: attrs;
    mkEnableOption = desc: { default = false; description = desc; };
    mkIf = cond: content: { _if = cond; inherit content; };
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    concatStringsSep = builtins.concatStringsSep;
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    escapeShellArgs = xs: builtins.concatStringsSep " " (map escapeShellArg xs);
    types = {
      package = "package"; str = "str"; bool = "bool";
      listOf = t: "listOf ${t}"; nullOr = t: "nullOr ${t}";
    };
  };
  pkgs = { fuse3 = "/nix/store/00000000000000000000000000000000-fuse3"; };
  # an option has a type; a set of options (services.narfs.nixStore) does not
  defaults = opts: builtins.mapAttrs (_: o: if o ? type || o ? default then o.default or null else defaults o) opts;
  evalWith = settings:
    let
      module = import ../../nixos-module.nix;
      # fixed point: options' defaults overlaid with the settings under test
      result = module {
        inherit lib pkgs;
        config.services.narfs = cfg;
        config.nix.package = "/nix/store/22222222222222222222222222222222-nix";
      };
      base = defaults result.options.services.narfs;
      cfg = base // settings // { nixStore = base.nixStore // (settings.nixStore or { }); };
    in
    assert result.config._if == cfg.enable;
    result.config.content;
in
{
  full = evalWith {
    enable = true;
    package = "/nix/store/11111111111111111111111111111111-narfs";
    cacheUrl = "s3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com";
    mountPoint = "/mnt/cache";
    trustedPublicKeys = [ "demo-store:Y0WaH1THk0KGJ1fKhNry+2UA2Y8ZRWVgN6aFARhAJAc=" "k2:AAAA" ];
    cacheSize = "10G";
    environmentFile = "/run/secrets/narfs";
    netrcFile = "/run/secrets/netrc";
    sslCertFile = "/etc/ssl/company-ca.pem";
    extraArgs = [ "--jobs" "8" ];
  };
  nixStore = evalWith {
    enable = true;
    package = "/nix/store/11111111111111111111111111111111-narfs";
    cacheUrl = "s3://ci-cache?region=eu-west-1";
    trustedPublicKeys = [ "ci:AAAA" ];
    nixStore = {
      enable = true;
      closures = [ "/nix/store/33333333333333333333333333333333-toolchain" ];
      upper = "tmpfs";
    };
  };
  minimal = evalWith {
    enable = true;
    package = "/nix/store/11111111111111111111111111111111-narfs";
    cacheUrl = "file:///srv/cache";
    trustedPublicKeys = [ "k:AAAA" ];
  };
}
