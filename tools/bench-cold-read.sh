#!/usr/bin/env bash
# Cold reads from S3 (issue 13 item 5): how fast a volume is read right after
# attach with an empty read cache, against the raw GET bandwidth of the same
# S3 server measured in the same run with the same object size.
#
# Steps, in a temporary directory under $BENCH_DIR (default /var/tmp):
#  1. start a local S3 server (moto, via tools/s3-server.sh);
#  2. create a volume of $SIZE_MIB MiB on it and fill it with random data
#     (`shale volume import`, which closes the volume: everything is
#     destaged to chunk objects, the WAL is empty), and check that the
#     bucket holds at least the volume's size in chunk objects;
#  3. with an empty cache directory, start `shale nbd serve` and read the
#     whole volume sequentially with fio (nbd engine, $BS requests, QD $QD);
#  4. stop the server, empty the cache again, start it again and read
#     $RAND_MIB MiB at random offsets (same request size and depth);
#  5. GET the volume's chunk objects whole from the same server with $QD
#     threads (python boto3): the raw GET bandwidth for that object size.
# Prints MB/s of each pass, the raw GET MB/s and the ratios, and the
# server's CPU seconds per GiB read in each pass (from /proc, less noisy
# than MB/s on a shared machine).
#
# Usage: tools/bench-cold-read.sh [SHALE_BINARY]   (default: target/release/shale)
# Environment: SIZE_MIB (default 1024, the size issue 13 measured), RAND_MIB (default SIZE_MIB / 2),
# BS (default 1M), QD (default 8), READAHEAD (engine.readahead_max; unset:
# the binary's default), PREFETCH_MAX (engine.prefetch_max_in_flight; a
# stream's window is capped at half of it), BENCH_DIR, PERF (a file: `perf record` of the
# server during the sequential pass, or the random one with PERF_PASS=rand;
# PERF_CG is perf's --call-graph mode, default fp: `dwarf,16384` names the
# callers in a release build without frame pointers), KEEP (keep the work
# directory), NICE (run the whole benchmark, moto and the raw GET client
# included, at that niceness, e.g. -10 as root: on a machine shared with
# builds, their load otherwise moves every figure by 2x between runs; both
# sides of the ratio run at the same priority). Needs moto_server, fio
# with the nbd engine, python3 with boto3.
# When a pass fails (the server not listening within 30 s, fio failing or
# taking over $FIO_TIMEOUT s (default 900), or `shale status` not answering
# within 30 s) the script says how the server
# ended if it is gone (killed by which signal, or its exit status), else
# writes its thread stacks to stacks.PASS in the work directory (needs
# gdb; with KEEP set they stay there). The server logs at warn, and the
# signal that stops it at info ("SIGTERM: shutting down"), unless RUST_LOG
# says otherwise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "${1:-$repo/target/release/shale}")
SIZE_MIB=${SIZE_MIB:-1024}
RAND_MIB=${RAND_MIB:-$((SIZE_MIB / 2))}
BS=${BS:-1M}
QD=${QD:-8}
if [ -n "${NICE:-}" ]; then
    renice -n "$NICE" -p $$ >/dev/null || { echo "bench-cold-read: cannot renice to $NICE" >&2; exit 1; }
fi
for tool in fio python3 moto_server; do
    command -v "$tool" >/dev/null || { echo "bench-cold-read: $tool is required" >&2; exit 1; }
done
python3 -c 'import boto3' 2>/dev/null || { echo "bench-cold-read: python3 boto3 is required" >&2; exit 1; }
. "$repo/tools/bench-s3-common.sh"
PID= SAMPLER=
bench_s3_start cold-read
{
    s3_store_yaml
    printf 'engine:\n  cache_dir: %s/cache\n' "$DIR"
    [ -n "${READAHEAD:-}" ] && printf '  readahead_max: %s\n' "$READAHEAD"
    [ -n "${PREFETCH_MAX:-}" ] && printf '  prefetch_max_in_flight: %s\n' "$PREFETCH_MAX"
    true
} > shale.yaml
head -c $((SIZE_MIB << 20)) /dev/urandom > image.raw
"$BIN" --config shale.yaml volume create v --size "${SIZE_MIB}MiB" > /dev/null
"$BIN" --config shale.yaml volume import v image.raw > /dev/null 2>&1
rm -f image.raw

raw_get() { # -> MB/s of whole-object GETs of the chunk objects, QD threads
    python3 - "$ENDPOINT" "$QD" "$SIZE_MIB" <<'PY'
import sys, time, boto3, botocore
from concurrent.futures import ThreadPoolExecutor
endpoint, qd, size_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=endpoint,
                  config=botocore.config.Config(max_pool_connections=qd * 2))
keys = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="shale"):
    keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
# Chunk objects are the large ones; take as many bytes as the volume holds.
chunks = sorted((k for k in keys if k[1] >= 1 << 20), key=lambda k: k[0])
total = sum(s for _, s in chunks)
if total < size_mib << 20:
    sys.exit(f"only {total} bytes of chunk objects in the bucket; the volume is not destaged")
def get(k):
    return len(s3.get_object(Bucket="shale", Key=k[0])["Body"].read())
t = time.monotonic()
with ThreadPoolExecutor(qd) as ex:
    got = sum(ex.map(get, chunks))
dt = time.monotonic() - t
sizes = sorted(s for _, s in chunks)
print(f"{got / dt / 1e6:.1f} {len(chunks)} {sizes[len(sizes) // 2]}")
PY
}

server_alive() { # -> whether $PID runs (a zombie does not)
    local st
    st=$(ps -o stat= -p "$PID" 2>/dev/null) && [ "${st:0:1}" != Z ]
}
stalled() { # pass -> why the server does not serve: how it ended if it is
    # gone (killed by a signal, or exited), else its thread stacks in
    # stacks.PASS (with gdb installed), and then it is killed
    [ -n "${PID:-}" ] || return 0
    if ! server_alive; then
        local st=0 why
        wait "$PID" || st=$?
        if [ "$st" -gt 128 ]; then why="killed by SIG$(kill -l $((st - 128)))"; else why="exited with status $st"; fi
        echo "bench-cold-read: $1 pass: the server is gone ($why); see serve.$1.log" >&2
        PID=
        return 0
    fi
    if ! command -v gdb >/dev/null; then
        echo "bench-cold-read: $1 pass stalled (no gdb for its stacks)" >&2
    else
        echo "bench-cold-read: $1 pass stalled; server thread stacks in $DIR/stacks.$1" >&2
        timeout 120 gdb -p "$PID" -batch -ex 'thread apply all bt' > "stacks.$1" 2>&1 || true
    fi
    # A stalled server may never finish the orderly shutdown.
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
}
serve() { # pass -> starts the server on a fresh socket, empty cache
    rm -rf "$DIR/cache"
    RUST_LOG=${RUST_LOG:-warn,shale::cli::nbd=info} "$BIN" --config shale.yaml nbd serve v --socket "$DIR/nbd.sock" > "serve.$1" 2> "serve.$1.log" &
    PID=$!
    for _ in $(seq 300); do grep -qs listening "serve.$1" && return 0; sleep 0.1; done
    stalled "$1"
    echo "server did not start; see serve.$1.log" >&2; cat "serve.$1.log" >&2; exit 1
}
stop() { # pass -> prints the server's store GETs and cache hit ratio
    timeout 30 "$BIN" --config shale.yaml status v --json --sample-ms 0 > "status.$1" ||
        { stalled "$1"; echo "bench-cold-read: status did not answer" >&2; exit 1; }
    python3 - "status.$1" "$1" <<'PY' >&2
import json, sys
s = json.load(open(sys.argv[1]))["volumes"][0]
print(f"  {sys.argv[2]}: store GETs {s['cost']['store_requests']['GET']}, "
      f"cache hit ratio {s['cache_hit_ratio']}")
PY
    # Server CPU (user + system) over the whole pass: less noisy than
    # MB/s on a shared machine.
    awk -v t="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15) / t}' "/proc/$PID/stat" > "cpu.$1"
    kill -TERM "$PID"; wait "$PID" || true; PID=
}
fio_mbs() { # pass rw size -> MBS (MB/s); in this shell, so that a gone server can be waited for
    fio_run "$2" "$3" || { stalled "$1"; echo "bench-cold-read: fio $2 failed" >&2; exit 1; }
    MBS=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["read"]; print("%.1f" % (j["bw_bytes"] / 1e6))' "fio.$2.json")
}
fio_run() { # rw size (a stalled server would hold fio forever: at most FIO_TIMEOUT s)
    timeout -k 10 "${FIO_TIMEOUT:-900}" fio --name=cold --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/nbd.sock" \
        --rw="$1" --bs="$BS" --iodepth="$QD" --size="${SIZE_MIB}M" --io_size="$2M" \
        --randrepeat=0 --output-format=json --output="fio.$1.json" >/dev/null
}

read -r RAW1 NOBJ OBJSIZE < <(raw_get)
perf_start() { # pass: profile the server during that pass if PERF is set and PERF_PASS names it
    [ -n "${PERF:-}" ] && [ "${PERF_PASS:-seq}" = "$1" ] || return 0
    if [ -n "${PERF_ALL:-}" ]; then target=(-a); else target=(-p "$PID"); fi
    perf record --call-graph "${PERF_CG:-fp}" -o "$PERF" "${target[@]}" 2>/dev/null & PERF_PID=$!
    sleep 0.5
}
perf_stop() {
    [ -n "${PERF_PID:-}" ] || return 0
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true; PERF_PID=
}
serve seq; perf_start seq; fio_mbs seq read "$SIZE_MIB"; SEQ=$MBS; perf_stop; stop seq
serve rand; perf_start rand; fio_mbs rand randread "$RAND_MIB"; RAND=$MBS; perf_stop; stop rand
read -r RAW2 _ _ < <(raw_get)
RAW=$(python3 -c "print(max($RAW1, $RAW2))")
python3 - "$SEQ" "$RAND" "$RAW1" "$RAW2" "$RAW" "$NOBJ" "$OBJSIZE" "$SIZE_MIB" "$BS" "$QD" "$(cat cpu.seq)" "$(cat cpu.rand)" "$RAND_MIB" <<'PY'
import sys
seq, rand, raw1, raw2, raw = map(float, sys.argv[1:6])
nobj, objsize, size, bs, qd = sys.argv[6:11]
cpu_seq, cpu_rand, rand_mib = float(sys.argv[11]), float(sys.argv[12]), int(sys.argv[13])
print(f"volume {size} MiB on moto, cold cache, {bs} reads QD{qd}")
print(f"raw GET: {raw:.1f} MB/s ({qd} threads, {nobj} objects, median {int(objsize) >> 10} KiB; "
      f"before/after {raw1:.1f}/{raw2:.1f})")
print(f"sequential read: {seq:.1f} MB/s = {seq / raw:.2f}x raw GET")
print(f"random read:     {rand:.1f} MB/s = {rand / raw:.2f}x raw GET")
print(f"server CPU per GiB read: sequential {cpu_seq / (int(size) / 1024):.2f} s, "
      f"random {cpu_rand / (rand_mib / 1024):.2f} s")
PY
