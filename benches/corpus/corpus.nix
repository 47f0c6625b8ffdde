# The benchmark corpus: real software trees from this machine copied into store paths
# (tens of MB, thousands of files, symlinks), with references between them.
let
  mk = import ../../tests/fixtures/mk.nix;
  copy = name: src: mk name ''
    set -e
    mkdir -p $out
    cp -r --no-preserve=ownership ${src}/. $out/
    chmod -R u+w $out
  '';
  python = copy "bench-python3.11" "/usr/lib/python3.11";
  perl = copy "bench-perl" "/usr/share/perl";
  perlarch = copy "bench-perl-arch" "/usr/lib/x86_64-linux-gnu/perl";
in
mk "bench-env" ''
  set -e
  mkdir -p $out/lib $out/bin
  ln -s ${python} $out/lib/python3.11
  ln -s ${perl} $out/lib/perl
  ln -s ${perlarch} $out/lib/perl-arch
  printf '#!/bin/sh\necho ${python} ${perl} ${perlarch}\n' > $out/bin/paths
  chmod +x $out/bin/paths
''
