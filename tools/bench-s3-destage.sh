#!/usr/bin/env bash
# Destage to a local S3 server (moto) against that server's raw PUT bandwidth,
# measured in the same run with the same object size (issue 12 item 8).
#
# Steps, all on this machine:
#  1. start moto (tools/s3-server.sh) in a temporary directory;
#  2. raw PUT bandwidth: PUT objects of the chunk size with $QD threads
#     (python boto3), $SIZE_MIB in all;
#  3. `shale nbd serve` a volume on that server with `engine.durability:
#     store` (a FLUSH returns once every acknowledged byte is in the store),
#     fio writes it sequentially (1 MiB, QD8 by default) and ends with a
#     flush; destage MB/s = bytes / wall time of the whole fio run, flush
#     included. Meanwhile `shale status --json` is sampled: the largest
#     unstored figure seen is reported against engine.max_unstored_bytes;
#  4. raw PUT again (the larger of the two runs is the baseline).
# Prints both figures and their ratio, and the median size of the chunk
# objects shale wrote (to check that the raw PUTs used the same size).
#
# Usage: tools/bench-s3-destage.sh [SHALE_BINARY]  (default target/release/shale)
# Also run by `S3=1 tools/bench-nbd.sh`.
# Environment: SIZE_MIB (default 1024), BS (default 1M), QD (default 8),
# CHUNK (engine.chunk_size; unset: the default), MAX_UNSTORED
# (engine.max_unstored_bytes; unset: the default), BENCH_DIR (default
# /var/tmp), KEEP=1 keeps the work directory, PERF=1 records a perf profile
# of the server during the fio run and prints its top symbols (perf.txt in
# the work directory). Needs moto_server, fio with
# the nbd engine, python3 with boto3.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "${1:-$repo/target/release/shale}")
SIZE_MIB=${SIZE_MIB:-1024}
BS=${BS:-1M}
QD=${QD:-8}
for tool in fio python3 moto_server; do
    command -v "$tool" >/dev/null || { echo "bench-s3-destage: $tool is required" >&2; exit 1; }
done
python3 -c 'import boto3' 2>/dev/null || { echo "bench-s3-destage: python3 boto3 is required" >&2; exit 1; }
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench-s3-destage: fio lacks the nbd engine" >&2; exit 1; }
[ -x "$BIN" ] || { echo "bench-s3-destage: no shale binary at $BIN (cargo build --release)" >&2; exit 1; }

. "$repo/tools/bench-s3-common.sh"
PID= SAMPLER=
bench_s3_start s3-destage
{
    s3_store_yaml
    printf 'engine:\n  durability: store\n'
    [ -n "${CHUNK:-}" ] && printf '  chunk_size: %s\n' "$CHUNK"
    [ -n "${MAX_UNSTORED:-}" ] && printf '  max_unstored_bytes: %s\n' "$MAX_UNSTORED"
    true
} > shale.yaml
"$BIN" --config shale.yaml volume create v --size "${SIZE_MIB}MiB" > /dev/null
# The configured chunk size and unstored bound, as the server reports them.
CHUNK_BYTES=$("$BIN" --config shale.yaml config show 2>/dev/null |
    python3 -c 'import sys, re
units = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
for line in sys.stdin:
    m = re.match(r"\s*chunk_size:\s*(\d+)\s*([KMG]iB|B)?\s*$", line)
    if m: print(int(m.group(1)) * units[m.group(2) or ""]); break' || true)
CHUNK_BYTES=${CHUNK_BYTES:-$((4 << 20))}

raw_put() { # object_bytes -> MB/s of PUTs of that size, QD threads, SIZE_MIB in all
    python3 - "$ENDPOINT" "$QD" "$SIZE_MIB" "$1" <<'PY'
import os, sys, time, uuid, boto3, botocore
from concurrent.futures import ThreadPoolExecutor
endpoint, qd, size_mib, obj = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s3 = boto3.client("s3", endpoint_url=endpoint,
                  config=botocore.config.Config(max_pool_connections=qd * 2))
body = os.urandom(obj)
n = max(1, (size_mib << 20) // obj)
prefix = f"raw-put/{uuid.uuid4()}"
def put(i):
    s3.put_object(Bucket="shale", Key=f"{prefix}/{i}", Body=body)
    return obj
t = time.monotonic()
with ThreadPoolExecutor(qd) as ex:
    done = sum(ex.map(put, range(n)))
dt = time.monotonic() - t
# Free the server's memory before the next pass.
for i in range(n):
    s3.delete_object(Bucket="shale", Key=f"{prefix}/{i}")
print(f"{done / dt / 1e6:.1f}")
PY
}

sample_unstored() { # -> writes the largest unstored_bytes seen to unstored.max
    local max=0 now
    while sleep 0.5; do
        now=$("$BIN" --config shale.yaml status v --json --sample-ms 0 2>/dev/null |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["volumes"][0]["unstored_bytes"])' 2>/dev/null) || continue
        (( now > max )) && max=$now && echo "$max" > unstored.max
    done
}

RAW1=$(raw_put "$CHUNK_BYTES")
RUST_LOG=${RUST_LOG:-warn} "$BIN" --config shale.yaml nbd serve v --socket "$DIR/nbd.sock" > serve.out 2> serve.log &
PID=$!
for _ in $(seq 300); do grep -q listening serve.out && break; sleep 0.1; done
grep -q listening serve.out || { echo "server did not start; see below" >&2; cat serve.log >&2; exit 1; }
echo 0 > unstored.max
PERF_PID=
if [ -n "${PERF:-}" ]; then
    perf record -F 499 -g -p "$PID" -o perf.data > /dev/null 2>&1 & PERF_PID=$!
fi
sample_unstored & SAMPLER=$!
start=$(date +%s.%N)
fio --name=destage --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/nbd.sock" \
    --rw=write --bs="$BS" --iodepth="$QD" --size="${SIZE_MIB}M" --end_fsync=1 \
    --output-format=json --output=fio.json > /dev/null
end=$(date +%s.%N)
kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=
if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true
    perf report -i perf.data --no-children --percent-limit 1.5 --stdio -g none 2> /dev/null |
        grep -v '^#' | grep -v '^$' > perf.txt || true
    echo "perf profile of the server (top symbols; $DIR/perf.txt):"; head -n 25 perf.txt
fi
"$BIN" --config shale.yaml status v --json --sample-ms 0 > status.json
kill -TERM "$PID"; wait "$PID" || true; PID=
RAW2=$(raw_put "$CHUNK_BYTES")

python3 - "$ENDPOINT" "$SIZE_MIB" "$start" "$end" "$RAW1" "$RAW2" "$(cat unstored.max)" "$CHUNK_BYTES" "$BS" "$QD" <<'PY'
import json, sys, boto3
endpoint, size_mib = sys.argv[1], int(sys.argv[2])
start, end, raw1, raw2 = map(float, sys.argv[3:7])
unstored_max, chunk, bs, qd = int(sys.argv[7]), int(sys.argv[8]), sys.argv[9], sys.argv[10]
status = json.load(open("status.json"))["volumes"][0]
bound = status.get("max_unstored_bytes", 0)
s3 = boto3.client("s3", endpoint_url=endpoint)
sizes = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="shale"):
    sizes += [o["Size"] for o in page.get("Contents", []) if "/chunks/" in o["Key"]]
sizes.sort()
median = sizes[len(sizes) // 2] if sizes else 0
destage = (size_mib << 20) / (end - start) / 1e6
raw = max(raw1, raw2)
print(f"shale S3 destage, {size_mib} MiB written with {bs} writes QD{qd}, durability: store, final flush included")
print(f"chunk objects: {len(sizes)}, median {median >> 10} KiB (raw PUTs: {chunk >> 10} KiB)")
print(f"raw PUT:  {raw:.1f} MB/s ({qd} threads; before/after {raw1:.1f}/{raw2:.1f})")
print(f"destage:  {destage:.1f} MB/s = {destage / raw:.2f}x raw PUT")
print(f"unstored: at most {unstored_max >> 20} MiB seen against a bound of {bound >> 20} MiB"
      + ("" if unstored_max <= bound else "  ** ABOVE THE BOUND **"))
PY
