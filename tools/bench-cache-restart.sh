#!/usr/bin/env bash
# Boot-like read workload across a server restart: a 200 MiB volume (random
# data, imported with `shale volume import`) is read whole with nbdcopy
# through `shale nbd serve`, the server is stopped (SIGTERM) and started
# again, and the volume is read whole again. Prints, per pass, the store
# GETs the server made and its read cache hit ratio (from `shale status
# --json`), and checks the data.
#
# Usage: tools/bench-cache-restart.sh [SHALE_BINARY]   (default: the release build)
# Run it with another build's binary for a before/after comparison.
# MOVE=1 removes the volume's local read cache before pass 2 (as if the
# volume moved to another host), so pass 2 is served by warm start alone;
# WARM_SECONDS sets warm_start.seconds (0 disables warm start) and WAIT the
# seconds pass 2 waits after the attach before it reads (playback time).
# Each pass also prints the wall time of its nbdcopy.
# RAND_SECONDS=N (needs fio with the nbd engine) adds the warm-restart
# figure: 4 KiB random reads QD32 over the volume for N seconds, once
# after pass 1's copy (the hot figure) and once in pass 2 right after the
# restart, before its copy (the warm-restart figure), and their ratio.
# CACHE_SIZE sets engine.cache_size (default 1GiB; the local-directory
# store has no cache unless it is set).
# Needs nbdcopy (libnbd-bin) and python3. Works in a temporary directory
# under $BENCH_DIR (default /var/tmp), removed at the end.
set -euo pipefail
BIN=$(realpath "${1:-target/release/shale}")
SIZE_MIB=${SIZE_MIB:-200}
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/shale-cache-bench.XXXXXX")
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
cd "$DIR"
# The read cache is off by default on the local-directory store (its chunk
# files are already local): this benchmark is about the cache, so it is set.
printf 'data_dir: data\nengine:\n  cache_size: %s\n' "${CACHE_SIZE:-1GiB}" > shale.yaml
[ -n "${WARM_SECONDS:-}" ] && printf 'warm_start:\n  seconds: %s\n' "$WARM_SECONDS" >> shale.yaml
head -c $((SIZE_MIB << 20)) /dev/urandom > image.raw
"$BIN" --config shale.yaml volume create v --size "${SIZE_MIB}MiB" > /dev/null
"$BIN" --config shale.yaml volume import v image.raw > /dev/null 2>&1
randread() { # label -> 4 KiB random read IOPS into iops.<label>
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/nbd.sock" \
        --rw=randread --bs=4k --iodepth=32 --size="${SIZE_MIB}M" --time_based \
        --runtime="$RAND_SECONDS" --output-format=json --output="fio.$1.json" > /dev/null
    python3 -c 'import json,sys; print("%.0f" % json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' \
        "fio.$1.json" > "iops.$1"
    echo "4K random read QD32, $1: $(cat "iops.$1") IOPS"
}
for pass in 1 2; do
    "$BIN" --config shale.yaml nbd serve v --socket "$DIR/nbd.sock" > "serve.$pass" 2> "serve.$pass.log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "serve.$pass" && break; sleep 0.1; done
    [ "$pass" = 2 ] && sleep "${WAIT:-0}"
    [ "$pass" = 2 ] && [ -n "${RAND_SECONDS:-}" ] && randread warm
    t0=$(date +%s.%N)
    nbdcopy "nbd+unix:///v?socket=$DIR/nbd.sock" copy.raw
    echo "pass $pass: nbdcopy $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)") s"
    cmp -s copy.raw image.raw || { echo "pass $pass: data differs" >&2; exit 1; }
    [ "$pass" = 1 ] && [ -n "${RAND_SECONDS:-}" ] && randread hot
    "$BIN" --config shale.yaml status v --json --sample-ms 0 > "status.$pass"
    python3 - "status.$pass" "$pass" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["volumes"][0]
print(f"pass {sys.argv[2]}: store GETs {s['cost']['store_requests']['GET']}, "
      f"cache hit ratio {s['cache_hit_ratio']}")
PY
    kill -TERM "$PID"
    wait "$PID"
    PID=
    if [ "$pass" = 1 ] && [ "${MOVE:-0}" = 1 ]; then
        rm -rf data/volumes/*/cache
        echo "local read cache removed (MOVE=1)"
    fi
done
if [ -n "${RAND_SECONDS:-}" ]; then
    python3 -c 'import sys; print(f"warm restart / hot: {int(sys.argv[2]) / int(sys.argv[1]):.2f}x")' \
        "$(cat iops.hot)" "$(cat iops.warm)"
fi
