# The corpus of scripts/bench-index (file-granular reads): real software trees from this
# machine copied into store paths by nix.
#   bench-rustc:      rustc's shared library (about 150 MB in one file) and a few small files
#   bench-stdlibs:    Python's and Perl's standard libraries (about 75 MB, ~5,000 files)
#   bench-stdlibs-p1: the same with one file patched, as a rebuild that changed one file:
#                     everything else is byte for byte the same
#   bench-py:         bin/py10 runs Python importing ten packages of bench-stdlibs
#   bench-app:        bin/run reads the header of the big library (as a dlopen would) and
#                     three modules of bench-stdlibs; bin/py runs Python on bench-stdlibs
{ rustlib }:
let
  mk = import ../../tests/fixtures/mk.nix;
  stdlibs = patch: mk "bench-stdlibs${patch}" ''
    set -e
    mkdir -p $out/lib
    cp -r --no-preserve=ownership /usr/lib/python3.11 $out/lib/python3.11
    cp -r --no-preserve=ownership /usr/share/perl $out/lib/perl
    cp -r --no-preserve=ownership /usr/lib/x86_64-linux-gnu/perl $out/lib/perl-arch
    chmod -R u+w $out
    ${if patch == "" then "" else "echo '# patched' >> $out/lib/python3.11/string.py"}
  '';
  a = stdlibs "";
  b = stdlibs "-p1";
  rustc = mk "bench-rustc" ''
    set -e
    mkdir -p $out/lib $out/share/rustlib
    cp ${rustlib}/librustc_driver-*.so $out/lib/
    cp ${rustlib}/rustlib/components ${rustlib}/rustlib/multirust-channel-manifest.toml $out/share/rustlib/
    ln -s $(cd $out/lib && ls librustc_driver-*.so) $out/lib/librustc_driver.so
  '';
  # a program of its own path, so that its start-up profile is its alone: Python
  # importing ten packages of bench-stdlibs (its start-up opens ~200 files)
  py = mk "bench-py" ''
    set -e
    mkdir -p $out/bin
    cat > $out/bin/py10 <<EOS
  #!/bin/sh
  PYTHONHOME=${a} PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 -c 'import json, email.parser, http.client, argparse, asyncio, decimal, logging, xml.dom.minidom, unittest, sqlite3; print("ok")'
  EOS
    chmod +x $out/bin/py10
  '';
in
mk "bench-app" ''
  set -e
  mkdir -p $out/bin
  # a program that opens a few files of its closure: the ELF header of the big library
  # (as a dlopen starts) and three modules of the standard library
  cat > $out/bin/run <<EOS
  #!/bin/sh
  # ${b} is a rebuild of ${a}; ${py}/bin/py10 starts Python
  set -e
  head -c 4096 ${rustc}/lib/librustc_driver.so | od -An -c -N4
  cat ${a}/lib/python3.11/json/__init__.py ${a}/lib/python3.11/email/parser.py ${a}/lib/python3.11/http/client.py | wc -l
  EOS
  # the real thing: Python importing four modules (its start-up opens about a hundred
  # files of the standard library)
  cat > $out/bin/py <<EOS
  #!/bin/sh
  PYTHONHOME=${a} PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 -c 'import json, email.parser, http.client, argparse; print(json.dumps({"ok": True}))'
  EOS
  chmod +x $out/bin/run $out/bin/py
''
