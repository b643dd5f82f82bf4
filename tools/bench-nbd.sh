#!/usr/bin/env bash
# Benchmark `shale nbd serve` against qemu-nbd with fio's nbd engine.
#
# Both servers run on this machine, on the same disk (a temporary directory
# under $BENCH_DIR, default /var/tmp): shale serves a real volume (WAL +
# chunk objects on the default local-directory store) and qemu-nbd serves a
# raw file. shale's volume is created in the catalog and served with
# `shale nbd serve bench` (default engine settings). Each target is
# pre-filled with a sequential write so reads hit real data, then every job
# runs for $RUNTIME seconds:
#   4K randwrite QD32, 4K randread QD32, 1M seq write QD8, 1M seq read QD8,
#   4K randwrite QD1 with fsync=1 (a FLUSH after every write).
# Prints one table: job, shale IOPS and MB/s, qemu-nbd IOPS and MB/s, and
# the shale/qemu-nbd IOPS ratio; then each server's peak RSS (VmHWM).
#
# With METRICS_OVERHEAD=1, a second shale server serves a second volume
# without counting its block requests (the hidden benchmark flag
# --no-request-metrics), every job also runs against it, and the table
# gains the column `metrics on/off`: shale IOPS with request metrics over
# IOPS without them, in the same run.
#
# Environment: SHALE_BIN (default: build --release from this checkout),
# SIZE (default 1G), RUNTIME (seconds, default 10), BENCH_DIR,
# METRICS_OVERHEAD (default 0), JOBS (names of the jobs to run; default
# all), ROUNDS (default 1: each job's median over
# this many interleaved rounds), S3 (default 0; 1 adds the S3 mode after the
# table: destage to a local moto server against its raw PUT bandwidth in the
# same run, tools/bench-s3-destage.sh).
set -euo pipefail

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
METRICS_OVERHEAD=${METRICS_OVERHEAD:-0}
ROUNDS=${ROUNDS:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
repo=$(cd "$(dirname "$0")/.." && pwd)

for tool in fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "bench-nbd: $tool is required" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench-nbd: fio lacks the nbd engine" >&2; exit 1; }

work=$(mktemp -d "$BENCH_DIR/shale-bench-nbd.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

if [[ -z "${SHALE_BIN:-}" ]]; then
    echo "building shale (release)..." >&2
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target}
    # The target directory may be shared with other checkouts: make sure
    # this checkout's sources are newer than any artifact, then keep a copy.
    touch "$repo/src/lib.rs" "$repo/src/main.rs"
    (cd "$repo" && cargo build --release --bin shale >&2)
    cp "$CARGO_TARGET_DIR/release/shale" "$work/shale"
    SHALE_BIN=$work/shale
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 1 100); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench-nbd: nothing listening on port $1" >&2
    return 1
}

# --- shale ---------------------------------------------------------------
mkdir -p "$work/shale-data"
printf 'data_dir: %s\n' "$work/shale-data" > "$work/shale.yaml"
shale_port=$(free_port)
"$SHALE_BIN" --config "$work/shale.yaml" volume create bench --size "$SIZE" >&2
RUST_LOG=warn "$SHALE_BIN" --config "$work/shale.yaml" nbd serve \
    --listen "127.0.0.1:$shale_port" bench >"$work/shale.log" 2>&1 &
shale_pid=$!
pids+=("$shale_pid")
wait_port "$shale_port"
targets=(shale)
if [[ $METRICS_OVERHEAD == 1 ]]; then
    "$SHALE_BIN" --config "$work/shale.yaml" volume create bench-off --size "$SIZE" >&2
    off_port=$(free_port)
    RUST_LOG=warn "$SHALE_BIN" --config "$work/shale.yaml" nbd serve --no-request-metrics \
        --listen "127.0.0.1:$off_port" bench-off >"$work/shale-off.log" 2>&1 &
    pids+=($!)
    wait_port "$off_port"
    targets+=(shale-off)
fi
targets+=(qemu)

# --- qemu-nbd ------------------------------------------------------------
truncate -s "$SIZE" "$work/qemu.raw"
qemu_port=$(free_port)
qemu_opts=(-f raw -t -b 127.0.0.1 -p "$qemu_port" -x bench -e 16 --cache=none --aio=native)
qemu-nbd "${qemu_opts[@]}" "$work/qemu.raw" >"$work/qemu.log" 2>&1 &
qpid=$!
if ! wait_port "$qemu_port"; then
    # O_DIRECT + native AIO unsupported here: fall back to the closest sane setting.
    kill "$qpid" 2>/dev/null || true
    qemu_opts=(-f raw -t -b 127.0.0.1 -p "$qemu_port" -x bench -e 16 --cache=writeback --aio=threads)
    qemu-nbd "${qemu_opts[@]}" "$work/qemu.raw" >"$work/qemu.log" 2>&1 &
    qpid=$!
    wait_port "$qemu_port"
fi
pids+=("$qpid")
qemu_pid=$qpid
echo "qemu-nbd ${qemu_opts[*]}" >&2

# --- jobs ----------------------------------------------------------------
jobs=(
    "4k-randwrite-qd32 --rw=randwrite --bs=4k --iodepth=32"
    "4k-randread-qd32 --rw=randread --bs=4k --iodepth=32"
    "1m-write-qd8 --rw=write --bs=1m --iodepth=8"
    "1m-read-qd8 --rw=read --bs=1m --iodepth=8"
    "4k-randwrite-qd1-fsync --rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)
# JOBS="name ..." keeps only the named jobs (for a focused comparison).
if [[ -n "${JOBS:-}" ]]; then
    kept=()
    for job in "${jobs[@]}"; do
        [[ " $JOBS " == *" ${job%% *} "* ]] && kept+=("$job")
    done
    (( ${#kept[@]} )) || { echo "bench-nbd: JOBS matches no job" >&2; exit 1; }
    jobs=("${kept[@]}")
fi

run_fio() { # uri name args... -> json file
    local uri=$1 out=$2
    shift 2
    fio --name=bench --ioengine=nbd --uri="$uri" --size="$SIZE" \
        --output-format=json --output="$out" "$@" >/dev/null
}

uri_of() { # target -> NBD URI
    case $1 in
        shale) echo "nbd://127.0.0.1:$shale_port/bench" ;;
        shale-off) echo "nbd://127.0.0.1:$off_port/bench-off" ;;
        *) echo "nbd://127.0.0.1:$qemu_port/bench" ;;
    esac
}

for target in "${targets[@]}"; do
    echo "prefilling $target ($SIZE)..." >&2
    run_fio "$(uri_of "$target")" "$work/$target-fill.json" --rw=write --bs=1m --iodepth=8 --fsync_on_close=1
done
# Each job runs on every target back to back, ROUNDS times, so load that
# drifts during the run (shared machines) hits every target alike; the
# table shows each target's median over the rounds. Even rounds take the
# targets in reverse order, so neither goes first every time (a job's
# leftovers, such as dirty pages still being written back, fall on the
# target after it; in one A/B of two variants of shale at QD1 the server
# that ran first was ahead in 7 of 7 pairs, in both orders).
for round in $(seq 1 "$ROUNDS"); do
    order=("${targets[@]}")
    if (( round % 2 == 0 )); then
        order=()
        for (( i = ${#targets[@]} - 1; i >= 0; i-- )); do order+=("${targets[i]}"); done
    fi
    for job in "${jobs[@]}"; do
        read -r name args <<<"$job"
        for target in "${order[@]}"; do
            echo "round $round: running $name on $target..." >&2
            # shellcheck disable=SC2086
            run_fio "$(uri_of "$target")" "$work/$target-$name-$round.json" $args \
                --time_based --runtime="$RUNTIME" --ramp_time=1
        done
    done
done

python3 - "$work" "$METRICS_OVERHEAD" "$ROUNDS" "${jobs[@]}" <<'EOF'
import json, sys
import statistics
work, overhead, rounds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
jobs = [j.split()[0] for j in sys.argv[4:]]
def one(target, name, r):
    j = json.load(open(f"{work}/{target}-{name}-{r}.json"))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    return side["iops"], side["bw_bytes"] / 1e6
def result(target, name):
    runs = [one(target, name, r) for r in range(1, rounds + 1)]
    return statistics.median(i for i, _ in runs), statistics.median(b for _, b in runs)
head = f"{'job':<26}{'shale IOPS':>12}{'shale MB/s':>12}{'qemu IOPS':>12}{'qemu MB/s':>12}{'ratio':>8}"
if overhead:
    head += f"{'off IOPS':>12}{'metrics on/off':>16}"
print(head)
for name in jobs:
    si, sb = result("shale", name)
    qi, qb = result("qemu", name)
    ratio = si / qi if qi else float("nan")
    line = f"{name:<26}{si:>12.0f}{sb:>12.1f}{qi:>12.0f}{qb:>12.1f}{ratio:>8.2f}"
    if overhead:
        oi, _ = result("shale-off", name)
        line += f"{oi:>12.0f}{(si / oi if oi else float('nan')):>16.3f}"
    print(line)
EOF

# Peak resident memory of each server over the whole run (VmHWM).
peak_mib() { awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"; }
echo "peak RSS: shale $(peak_mib "$shale_pid") MiB, qemu-nbd $(peak_mib "$qemu_pid") MiB"

# S3 mode: destage to a local S3 server against its raw PUT bandwidth, same
# binary, same run (tools/bench-s3-destage.sh; SIZE_MIB, QD, CHUNK there).
if [[ "${S3:-0}" == 1 ]]; then
    echo
    "$repo/tools/bench-s3-destage.sh" "$SHALE_BIN"
fi
