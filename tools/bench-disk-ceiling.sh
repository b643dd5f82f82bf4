#!/usr/bin/env bash
# The local disk's ceiling for sequential writes (issue 12, the 1 MiB write
# job), measured with fio alone, no shale and no NBD:
#  1. "in place": 1 MiB O_DIRECT writes overwriting a file, no flush (what
#     qemu-nbd with cache=none does for the 1 MiB write job of
#     tools/bench-nbd.sh, whose file is prefilled);
#  2. "twice": the bytes of shale's default local-directory store, two
#     streams at once: the log (1 MiB O_DIRECT writes overwriting a
#     recycled file) and the chunk objects (a new 4 MiB file per chunk,
#     buffered), with no flush until the end;
#  3. "twice, synced": the same with shale's syncs: an fdatasync every
#     16 MiB of log (a segment roll) and an fsync of each chunk file.
# Both streams move the same bytes, so the slower one is the rate a client
# would see. Prints each pattern's MB/s and its ratio to pattern 1: what a
# design that writes every byte twice can reach against an in-place server
# on this disk, with and without the syncs. Run it next to
# tools/bench-nbd.sh (same disk, same time) to read shale's 1 MiB write
# ratio against it.
# Also the floor of the QD1 FLUSH job (4K write + FLUSH at queue depth 1):
#  4. 4 KiB random writes over a written file, each followed by an fsync,
#     one at a time, O_DIRECT and buffered: pairs per second with no
#     network and no server in the way, and whether the disk has a
#     volatile write cache and FUA (then a durable write needs no flush).
#
# Usage: tools/bench-disk-ceiling.sh
# Environment: BENCH_DIR (default /var/tmp: the file system measured),
# SIZE_MIB (default 1536), ROUNDS (default 2; the median is printed).
# Needs fio and python3.
set -euo pipefail
SIZE_MIB=${SIZE_MIB:-1536}
ROUNDS=${ROUNDS:-2}
command -v fio >/dev/null || { echo "bench-disk-ceiling: needs fio" >&2; exit 1; }
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/shale-disk-ceiling.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
chunks=$((SIZE_MIB / 4))

bw_mbs() { # fio json, job name -> write MB/s
    python3 -c 'import json, sys
for j in json.load(open(sys.argv[1]))["jobs"]:
    if j["jobname"] == sys.argv[2]:
        print(round(j["write"]["bw_bytes"] / 1e6))' "$1" "$2"
}

prefill() { # a written (not just allocated) file, as a recycled segment is
    rm -rf "$DIR/d" && mkdir "$DIR/d"
    fio --name=prefill --filename="$DIR/d/log" --size="${SIZE_MIB}m" --rw=write \
        --bs=1m --direct=1 --ioengine=psync >/dev/null
}

twice() { # name, log fio options, chunk fio options -> json
    local name=$1 log_opts=$2 chunk_opts=$3
    # shellcheck disable=SC2086
    fio --output-format=json --output="$DIR/$name.json" --directory="$DIR/d" \
        --name=log --filename=log --size="${SIZE_MIB}m" --rw=write --bs=1m \
        --direct=1 --ioengine=psync $log_opts \
        --name=chunks --size="${SIZE_MIB}m" --nrfiles="$chunks" --filesize=4m \
        --file_service_type=sequential --rw=write --bs=4m --ioengine=psync \
        --create_on_open=1 $chunk_opts >/dev/null
}
slower() { # json -> the slower stream's MB/s (both move the same bytes)
    local a b
    a=$(bw_mbs "$1" log) b=$(bw_mbs "$1" chunks)
    echo $((a < b ? a : b))
}

inplace=() nosync=() synced=() qd1=()
for round in $(seq 1 "$ROUNDS"); do
    prefill
    fio --output-format=json --output="$DIR/inplace.json" --name=inplace \
        --filename="$DIR/d/log" --size="${SIZE_MIB}m" --rw=write --bs=1m \
        --direct=1 --ioengine=psync >/dev/null
    inplace+=("$(bw_mbs "$DIR/inplace.json" inplace)")
    prefill
    twice nosync "" "--end_fsync=1"
    nosync+=("$(slower "$DIR/nosync.json")")
    prefill
    twice synced "--fdatasync=16" "--fsync=1"
    synced+=("$(slower "$DIR/synced.json")")
    echo "round $round: in place ${inplace[-1]}, twice ${nosync[-1]}, twice synced ${synced[-1]} MB/s" >&2
done

iops() { # fio json, job name -> write IOPS
    python3 -c 'import json, sys
for j in json.load(open(sys.argv[1]))["jobs"]:
    if j["jobname"] == sys.argv[2]:
        print(round(j["write"]["iops"]))' "$1" "$2"
}
prefill
for direct in 1 0; do
    fio --output-format=json --output="$DIR/qd1.json" --name=qd1 \
        --filename="$DIR/d/log" --size=256m --rw=randwrite --bs=4k --iodepth=1 \
        --fsync=1 --direct=$direct --ioengine=psync --time_based --runtime=5 >/dev/null
    qd1[direct]=$(iops "$DIR/qd1.json" qd1)
done
disk=$(df --output=source "$DIR" | tail -1)
dev=$(basename "$(realpath "$disk")")
cache=$(cat "/sys/class/block/$dev/queue/write_cache" 2>/dev/null || echo unknown)
fua=$(cat "/sys/class/block/$dev/queue/fua" 2>/dev/null || echo unknown)

python3 - "${inplace[*]}" "${nosync[*]}" "${synced[*]}" <<'EOF2'
import statistics, sys
i, n, t = (statistics.median(float(x) for x in a.split()) for a in sys.argv[1:4])
print(f"in place (1 MiB O_DIRECT, no flush):        {i:6.0f} MB/s")
print(f"twice, no flush:                            {n:6.0f} MB/s = {n / i:.2f}x in place")
print(f"twice, log synced per 16 MiB, each chunk:   {t:6.0f} MB/s = {t / i:.2f}x in place")
EOF2
echo "4K write + fsync, QD1, O_DIRECT:             ${qd1[1]} pairs/s"
echo "4K write + fsync, QD1, buffered:             ${qd1[0]} pairs/s"
echo "disk $dev: write cache: $cache, FUA: $fua"
