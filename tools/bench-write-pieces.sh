#!/usr/bin/env bash
# Measures what `src/pieces.rs` is about: writing a 4 MiB object to a new
# file (then fdatasync) in one write() against the same in writes of
# 256 KiB, alternating, on the file system of BENCH_DIR. Prints the time
# per object of each way and their ratio (same run, same disk).
#   BENCH_DIR=/var/tmp OBJECTS=40 ROUNDS=3 tools/bench-write-pieces.sh
set -euo pipefail
BENCH_DIR=${BENCH_DIR:-/var/tmp}
work=$(mktemp -d "$BENCH_DIR/shale-bench-pieces.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 - "$work" "${OBJECTS:-40}" "${ROUNDS:-3}" <<'PY'
import os, sys, time, statistics
work, objects, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size, piece = 4 << 20, 256 << 10
data = os.urandom(size)
n = 0
def one_way(step):
    global n
    t = time.perf_counter()
    for _ in range(objects):
        n += 1
        fd = os.open(f"{work}/o{n}", os.O_CREAT | os.O_WRONLY, 0o600)
        for off in range(0, size, step):
            os.pwrite(fd, data[off:off + step], off)
        os.fdatasync(fd)
        os.close(fd)
    return (time.perf_counter() - t) / objects * 1e3
whole, pieces = [], []
for _ in range(rounds):
    whole.append(one_way(size))
    pieces.append(one_way(piece))
w, p = statistics.median(whole), statistics.median(pieces)
print(f"4 MiB object, one write:       {w:7.2f} ms  (rounds: {', '.join(f'{x:.2f}' for x in whole)})")
print(f"4 MiB object, 256 KiB writes:  {p:7.2f} ms  (rounds: {', '.join(f'{x:.2f}' for x in pieces)})")
print(f"one write / pieces: {w / p:.2f}x")
PY
