# Shared by scripts/bench and scripts/bench-index (sourced, not run): settings, a work
# directory removed at exit, timing helpers, and the servers both sides read from.
#
# RUNS (default 3) runs per row, medians reported. Every cold row is measured on
# loopback and behind a modelled link: scripts/linkproxy.py in front of both servers
# adds RTT_MS of round trip (default 20) and caps both directions at LINK_MBIT Mbit/s
# (default 100), shared by all the connections of both servers. LINK=0 skips it.
set -Eeuo pipefail
# -E: functions inherit the trap, so it names the failing line inside them; the
# BASHPID test keeps command substitutions (subshells) from reporting it twice
trap '[ "$BASHPID" = $$ ] && echo "$0: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
RTT_MS=${RTT_MS:-20}
LINK_MBIT=${LINK_MBIT:-100}
LINK=${LINK:-1}
./scripts/setup >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
narfs="$PWD/target/release/narfs"
work=$(mktemp -d /tmp/narfs-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for m in "$work"/mnt*; do
    if mountpoint -q "$m" 2>/dev/null; then fusermount3 -u "$m" || true; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
nixc() { PATH=/usr/bin:/bin NIX_REMOTE= nix --experimental-features nix-command "$@"; }
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
med() { printf '%s\n' "$@" | median; }
ratio() { echo "scale=3; $1 / $2" | bc -l; }
row() { printf '%-62s %8.3f s\n' "$1" "$2"; }
timeit() {
  local t0; t0=$(now)
  "$@" >/dev/null 2>"$work/timeit.err" || { echo "$0: failed: $*" >&2; cat "$work/timeit.err" >&2; return 1; }
  echo "$(now) - $t0" | bc -l
}

# build_corpus NIX_FILE [nix-build args...]: builds it with nix in a chroot store (the
# sandbox sees /bin /usr /lib /lib64 and $sandbox_extra)
# ($store, under $work/root), signs the closure with a new key ($work/sk, $work/pk) and
# sets $top and $closure
build_corpus() {
  local file=$1; shift
  echo "== building the corpus with nix ($file)" >&2
  store="local?root=$work/root"
  top=$(PATH=/usr/bin:/bin NIX_REMOTE= nix-build --store "$store" --no-out-link --option sandbox true \
    --option sandbox-paths "/bin /usr /lib /lib64 ${sandbox_extra:-}" --option substituters '' "$@" "$file" 2>"$work/build.log") \
    || { tail -20 "$work/build.log" >&2; return 1; }
  nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
  nixc store sign --store "$store" -r --key-file "$work/sk" "$top"
  mapfile -t closure < <(nixc path-info --store "$store" -r "$top")
  key=$(cat "$work/pk")
}

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_EC2_METADATA_DISABLED=true
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.02; done
  echo "$0: nothing listens on port $1" >&2; return 1
}

# start_servers HTTP_DIR: s3s-fs on $work/s3 ($s3port; bucket "bucket") for narfs, an
# HTTP server on HTTP_DIR ($httpport) for nix, and with LINK=1 the link in front of
# both ($s3link, $httplink)
start_servers() {
  s3port=$(port); httpport=$(port)
  mkdir -p "$work/s3/bucket"
  # both servers with TCP_NODELAY, as production servers run (see scripts/nodelay.c)
  cc -shared -fPIC -O2 -o "$work/nodelay.so" scripts/nodelay.c -ldl
  export LD_PRELOAD="$work/nodelay.so"
  s3s-fs --host 127.0.0.1 --port "$s3port" --access-key bench --secret-key bench-secret "$work/s3" >/dev/null 2>&1 &
  pids+=($!)
  # HTTP/1.1: keep-alive, as every real binary cache has (with HTTP/1.0 each of nix's
  # requests would pay a new connection, one more round trip behind the link)
  (cd "$1" && exec python3 -m http.server --protocol HTTP/1.1 --bind 127.0.0.1 "$httpport" >/dev/null 2>&1) &
  pids+=($!)
  unset LD_PRELOAD
  wait_port "$s3port"; wait_port "$httpport"
  if [ "$LINK" = 1 ]; then
    python3 scripts/linkproxy.py --rtt-ms "$RTT_MS" --mbit "$LINK_MBIT" --ready-file "$work/link.ready" \
      "0:$s3port" "0:$httpport" 2>"$work/link.log" &
    pids+=($!)
    for _ in $(seq 500); do [ -e "$work/link.ready" ] || ! kill -0 "${pids[-1]}" 2>/dev/null && break; sleep 0.02; done
    [ -e "$work/link.ready" ] || { cat "$work/link.log" >&2; false; }
    { read -r s3link _; read -r httplink _; } <"$work/link.ready"
  fi
}

# s3_put_dir DIR PREFIX: uploads every file under DIR to bucket/PREFIX/ with S3 PUTs
# (as any real upload is made: s3s-fs then keeps each object's ETag, where for files
# copied into its root it would compute an MD5 of the whole object on every GET,
# Range GETs included, which no real S3 does)
s3_put_dir() {
  (cd "$1" && find . -type f -printf '%P\n') | xargs -P 8 -I{} curl -sSf -o /dev/null \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user bench:bench-secret -T "$1/{}" "http://127.0.0.1:$s3port/bucket/$2/{}"
}

# the proxy logs only what went wrong (a refused upstream, an unexpected error)
link_report() {
  [ "$LINK" != 1 ] || [ ! -s "$work/link.log" ] || { echo "scripts/linkproxy.py said:" >&2; cat "$work/link.log" >&2; }
}

# Fresh directories, never deleted until the end: on ext4 without a journal (as on
# these VMs) creating files where many were just deleted is several times slower
# (the inode allocator skips recently deleted inodes), which would punish whichever
# side runs after a deletion.
fresh=0
# mount_fresh URL [narfs mount options...]: a new mount of URL at $work/mnt with a new
# cache dir ($nc); $narfs_pid
mount_fresh() {
  local url=$1; shift
  fresh=$((fresh + 1)); nc="$work/nc.$fresh"; mkdir -p "$work/mnt"
  sync   # earlier runs' dirty pages must not throttle this one's writes
  "$narfs" mount --trusted-public-key "$key" --cache-dir "$nc" --refresh-interval 0 "$@" "$url" "$work/mnt" 2>"$work/narfs.log" &
  narfs_pid=$!
  for _ in $(seq 1000); do mountpoint -q "$work/mnt" && return; sleep 0.01; done
  cat "$work/narfs.log" >&2; false
}
umount_narfs() { kill "$narfs_pid"; wait "$narfs_pid" 2>/dev/null || true; }
# nix with a fresh narinfo cache (~/.cache/nix/binary-cache-v6.sqlite), as a cold
# narfs has a fresh cache dir; call `fresh=$((fresh + 1))` first (in this shell: it
# runs in a command substitution)
nix_cold() {
  PATH=/usr/bin:/bin NIX_REMOTE= XDG_CACHE_HOME="$work/xdg.$fresh" \
    nix --experimental-features nix-command "$@" --option trusted-public-keys "$key"
}
