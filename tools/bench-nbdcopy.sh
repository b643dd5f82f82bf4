#!/usr/bin/env bash
# Time `nbdcopy` of a sparse volume to a local file, for two shale binaries
# in the same run (for example main's build against this checkout's), to
# show what NBD block status (base:allocation) saves.
#
# One volume of $SIZE (default 16G) gets $DATA_MIB MiB (default 1024) of
# random data in 1 MiB pieces at scattered offsets (written once, with
# nbdcopy from a sparse file, through the first binary). Then, for each of
# $ROUNDS rounds (default 3), each binary in turn serves the volume (a
# fresh server, so a cold read cache), nbdcopy copies it to a file, the
# copy is compared with the source image, and the wall time is recorded.
# Prints every time and each binary's median.
#
# Usage: tools/bench-nbdcopy.sh OLD_BIN NEW_BIN
# Environment: SIZE, DATA_MIB, ROUNDS, BENCH_DIR (default /var/tmp).
set -euo pipefail

old=${1:?usage: bench-nbdcopy.sh OLD_BIN NEW_BIN}
new=${2:?usage: bench-nbdcopy.sh OLD_BIN NEW_BIN}
SIZE=${SIZE:-16G}
DATA_MIB=${DATA_MIB:-1024}
ROUNDS=${ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}

for tool in nbdcopy python3 cmp; do
    command -v "$tool" >/dev/null || { echo "bench-nbdcopy: $tool is required" >&2; exit 1; }
done

work=$(mktemp -d "$BENCH_DIR/shale-bench-nbdcopy.XXXXXX")
pid=
cleanup() {
    if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/data"
printf 'data_dir: %s\n' "$work/data" >"$work/shale.yaml"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

serve() {
    RUST_LOG=warn "$1" --config "$work/shale.yaml" nbd serve --listen "127.0.0.1:$port" bench \
        >>"$work/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench-nbdcopy: server did not start" >&2
    cat "$work/serve.log" >&2
    return 1
}

stop() {
    kill -TERM "$pid"
    wait "$pid" || true
    pid=
}

# The source image: sparse, DATA_MIB random 1 MiB pieces at scattered offsets.
python3 - "$work/src.raw" "$SIZE" "$DATA_MIB" <<'EOF'
import os, random, sys
path, size, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
size = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
rng = random.Random(7)
slots = rng.sample(range(size >> 20), n)
with open(path, "wb") as f:
    f.truncate(size)
    for s in sorted(slots):
        f.seek(s << 20)
        f.write(os.urandom(1 << 20))
EOF

"$old" --config "$work/shale.yaml" volume create bench --size "$SIZE" >&2
serve "$old"
nbdcopy "$work/src.raw" "nbd://127.0.0.1:$port/bench"
stop

declare -A times
for round in $(seq 1 "$ROUNDS"); do
    for which in old new; do
        bin=$old
        [[ $which == new ]] && bin=$new
        serve "$bin"
        rm -f "$work/out.raw"
        start=$(date +%s.%N)
        nbdcopy "nbd://127.0.0.1:$port/bench" "$work/out.raw"
        end=$(date +%s.%N)
        stop
        cmp "$work/src.raw" "$work/out.raw"
        t=$(python3 -c "print(f'{$end - $start:.2f}')")
        echo "round $round $which: ${t}s"
        times[$which]="${times[$which]:-} $t"
    done
done
rm -f "$work/out.raw"
python3 - "${times[old]}" "${times[new]}" <<'EOF'
import statistics, sys
old = [float(x) for x in sys.argv[1].split()]
new = [float(x) for x in sys.argv[2].split()]
mo, mn = statistics.median(old), statistics.median(new)
print(f"median old {mo:.2f}s  new {mn:.2f}s  old/new {mo / mn:.1f}x")
EOF
