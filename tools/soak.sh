#!/usr/bin/env bash
# Soak (issue 16, item 4): two volumes served over NBD by one `shale nbd
# serve`, its store on a real S3 server (moto) behind the fault-injecting
# proxy (shale-faultproxy) running a repeating pattern of S3 trouble, for
# SOAK_SECS seconds. Each cycle (SOAK_CYCLE_SECS, default 60, from one kill
# to the next, or longer when its work takes longer):
#   - fio writes a fresh pattern over the first half of each volume and
#     verifies it (crc32c, verify_fatal),
#   - a live snapshot of each volume is taken (the server is running), with
#     a reference image read through NBD at the same quiet point,
#   - older snapshots are deleted (the newest SOAK_KEEP_SNAPSHOTS stay),
#   - every third cycle a snapshot is cloned, the clone flattened, exported,
#     compared with the snapshot's reference and deleted,
#   - a background fio writes to the second half of volume a, and the
#     server is killed with SIGKILL in the middle of it, then restarted
#     (taking its lease over at once) and fio verifies that the first halves
#     still hold what was verified before the kill.
# Compaction runs by itself (small chunks, frequent checkpoints, overwrites).
# At the end: faults off, every snapshot exported and compared with its
# reference, a last fio verify, server RSS samples and growth, and stored
# bytes against live bytes per volume.
#
#   tools/soak.sh [TARGET_DIR/release]      # CI form: SOAK_SECS=240 (default)
#   SOAK_SECS=14400 tools/soak.sh           # long form: hours
#
# Environment: SOAK_SECS (240), SOAK_CYCLE_SECS (60), SOAK_KEEP_SNAPSHOTS
# (2), SOAK_KILL_EVERY (1: the kill -9 comes every N cycles; a larger N lets
# one server live longer, to watch its memory), SOAK_SCHEDULE (the proxy's fault pattern, see tools/faultproxy/main.rs),
# SOAK_DIR (work directory; default a fresh temporary one, removed on
# success), SOAK_VOLUME_SIZE (32MiB). Needs moto_server (PyPI moto[server]),
# fio with its nbd engine, nbdcopy. With CI=true a missing prerequisite fails;
# otherwise the soak is skipped with the reason. Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
bin="${1:-${CARGO_TARGET_DIR:-$repo/target}/release}"
shale="$bin/shale"
faultproxy="$bin/shale-faultproxy"

soak_secs="${SOAK_SECS:-240}"
cycle_secs="${SOAK_CYCLE_SECS:-60}"
keep="${SOAK_KEEP_SNAPSHOTS:-2}"
kill_every="${SOAK_KILL_EVERY:-1}"
vsize="${SOAK_VOLUME_SIZE:-32MiB}"
schedule="${SOAK_SCHEDULE:-15:clean,20:mixed=0.1,8:down,15:latency=0.3,6:unavailable,10:mixed=0.2,6:blackhole}"

say() { printf '%s soak: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { say "FAIL: $*"; exit 1; }
skip() {
    if [[ "${CI:-}" == true ]]; then die "CI=true and the soak cannot run: $*"; fi
    say "SKIP: $*"; exit 0
}

[[ -x "$shale" && -x "$faultproxy" ]] || die "build first: $shale and $faultproxy are needed"
command -v moto_server >/dev/null || skip "moto_server not on PATH; pip install 'moto[server]'"
command -v fio >/dev/null || skip "fio not installed"
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || skip "fio lacks the nbd engine"
command -v nbdcopy >/dev/null || skip "nbdcopy not installed (libnbd-bin)"

work="${SOAK_DIR:-$(mktemp -d /tmp/shale-soak.XXXXXX)}"
mkdir -p "$work"
pids=()
server_pid=""
cleanup() {
    local rc=$?
    [[ -n "$server_pid" ]] && kill -9 "$server_pid" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $rc == 0 && -z "${SOAK_DIR:-}" ]]; then rm -rf "$work"; else say "work directory kept: $work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- moto and the proxy ------------------------------------------------------
moto_port=$(free_port)
py="$(dirname "$(command -v moto_server)")/python3"; [[ -x "$py" ]] || py=python3
"$py" tools/moto-serial.py 127.0.0.1 "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
    code=$(python3 -c "
import urllib.request,sys
try: print(urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:$moto_port/soak', method='PUT'), timeout=5).status)
except Exception as e: print(getattr(e,'code',0))" 2>/dev/null || echo 0)
    [[ "$code" == 200 ]] && break
    sleep 0.2
done
[[ "$code" == 200 ]] || die "moto did not start (log: $work/moto.log)"

"$faultproxy" --upstream "127.0.0.1:$moto_port" --seed 16 --schedule "$schedule" \
    --stall-ms 30000 --report-secs 30 >"$work/proxy.log" 2>&1 &
pids+=($!)
proxy_pid=$!
for _ in $(seq 1 100); do
    proxy_addr=$(sed -n 's/^listening on //p' "$work/proxy.log" | head -1)
    [[ -n "$proxy_addr" ]] && break
    sleep 0.1
done
[[ -n "$proxy_addr" ]] || die "the proxy did not start (log: $work/proxy.log)"
say "moto on 127.0.0.1:$moto_port, proxy on $proxy_addr, pattern $schedule"

export AWS_ACCESS_KEY_ID=shale-soak AWS_SECRET_ACCESS_KEY=shale-soak AWS_EC2_METADATA_DISABLED=true
cat >"$work/shale.yaml" <<YAML
data_dir: $work/data
store:
  type: s3
  bucket: soak
  endpoint: http://$proxy_addr
  force_path_style: true
engine:
  chunk_size: 1MiB
  destage_interval_ms: 500
  checkpoint_every_chunks: 8
  max_unstored_bytes: 32MiB
  cache_size: 16MiB
YAML
cli() { "$shale" --config "$work/shale.yaml" "$@"; }

cli volume create a --size "$vsize" >/dev/null
cli volume create b --size "$vsize" >/dev/null
size_bytes=$(cli volume info a --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["record"]["size"])')
half=$((size_bytes / 2))
sock="$work/nbd.sock"

# --- the server --------------------------------------------------------------
rss_log="$work/rss.log"
: >"$rss_log"
start_server() {
    RUST_LOG=warn "$shale" --config "$work/shale.yaml" nbd serve a b --socket "$sock" \
        >"$work/serve.out" 2>>"$work/serve.log" &
    server_pid=$!
    for _ in $(seq 1 600); do
        grep -q '^listening on' "$work/serve.out" 2>/dev/null && return 0
        kill -0 "$server_pid" 2>/dev/null || die "the server exited at start (log: $work/serve.log)"
        sleep 0.1
    done
    die "the server did not start listening (log: $work/serve.log)"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
sample_rss() { # every 5 s while the server lives: "<seconds since start> <pid> <KiB>"
    while kill -0 "$server_pid" 2>/dev/null; do
        echo "$(( $(date +%s) - soak_start )) $server_pid $(rss_kib "$server_pid")" >>"$rss_log"
        sleep 5
    done
}
uri() { echo "nbd+unix:///$1?socket=$sock"; }

# fio over the first half of volume $1 with seed $2; $3: write+verify or verify_only.
fio_verify() {
    local vol=$1 seed=$2 mode=$3 extra=()
    [[ $mode == verify_only ]] && extra=(--verify_only)
    fio --name="soak-$vol" --ioengine=nbd --uri="$(uri "$vol")" --rw=randwrite --bs=64k \
        --verify_state_save=0 \
        --offset=0 --size="$half" --iodepth=4 --verify=crc32c --verify_fatal=1 \
        --randseed="$seed" --output-format=json "${extra[@]}" >"$work/fio-$vol.json" 2>"$work/fio-$vol.err" \
        || { cat "$work/fio-$vol.err" >&2; die "fio $mode on $vol (seed $seed) failed"; }
    python3 - "$work/fio-$vol.json" "$vol" "$mode" <<'PY' >>"$work/fio.log"
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])  # fio's nbd engine prints a line first
job = j["jobs"][0]
def pct(side):
    d = job[side]
    c = d.get("clat_ns", {}).get("percentile", {})
    names = {"50.000000": "p50", "99.000000": "p99", "99.900000": "p99.9"}
    parts = [f"{names[k]}={v/1e6:.2f}ms" for k, v in c.items() if k in names]
    return f"{side} n={d['total_ios']} " + " ".join(parts) + f" max={d.get('clat_ns', {}).get('max', 0)/1e6:.2f}ms"
sides = ["read"] if sys.argv[3] == "verify_only" else ["write", "read"]
print(f"{sys.argv[2]} {sys.argv[3]}: errors={job['error']} " + " | ".join(pct(s) for s in sides))
PY
}

snap_ref() { echo "$work/ref-$1-$2.img"; }

soak_start=$(date +%s)
cycle=0
seed_a=0; seed_b=0
declare -A snaps=([a]="" [b]="")
kills=0; clones=0; deletes=0
last_kill=$soak_start
start_server
sample_rss & pids+=($!)

while (( $(date +%s) - soak_start < soak_secs )); do
    cycle=$((cycle + 1))
    seed_a=$((1000 + cycle)); seed_b=$((2000 + cycle))
    fio_verify a "$seed_a" write
    fio_verify b "$seed_b" write
    # A quiet point: reference images, then live snapshots of the served volumes.
    for v in a b; do
        s="c$cycle"
        nbdcopy "$(uri "$v")" "$(snap_ref "$v" "$s")" || die "reading $v for the reference of $v@$s"
        cli snapshot create "$v@$s" >/dev/null || die "snapshot create $v@$s"
        snaps[$v]="${snaps[$v]} $s"
    done
    # Clone + flatten + compare, every third cycle (the clone is detached).
    if (( cycle % 3 == 1 )); then
        s="c$cycle"
        cli clone "a@$s" "clone$cycle" >/dev/null || die "clone a@$s"
        cli flatten "clone$cycle" >/dev/null 2>&1 || die "flatten clone$cycle"
        cli volume export "clone$cycle" "$work/clone.img" >/dev/null 2>&1 || die "export clone$cycle"
        cmp "$work/clone.img" "$(snap_ref a "$s")" || die "flattened clone$cycle differs from a@$s"
        rm -f "$work/clone.img"
        cli volume delete "clone$cycle" --yes >/dev/null || die "delete clone$cycle"
        clones=$((clones + 1))
    fi
    # Delete all but the newest $keep snapshots of each volume.
    for v in a b; do
        read -r -a list <<<"${snaps[$v]}"
        while (( ${#list[@]} > keep )); do
            old=${list[0]}; list=("${list[@]:1}")
            cli snapshot delete "$v@$old" >/dev/null || die "snapshot delete $v@$old"
            rm -f "$(snap_ref "$v" "$old")"
            deletes=$((deletes + 1))
        done
        snaps[$v]="${list[*]}"
    done
    # Writes in flight on the second half of a, then kill -9 mid-stream.
    fio --name=victim --ioengine=nbd --uri="$(uri a)" --rw=randwrite --bs=16k --offset="$half" \
        --size="$half" --iodepth=8 --time_based --runtime=600 >/dev/null 2>&1 &
    victim=$!
    # The kill comes cycle_secs after the previous one (or 5 s into the
    # writes if the cycle's work took longer).
    left=$(( cycle_secs - ($(date +%s) - last_kill) ))
    sleep $(( left > 5 ? left : 5 ))
    if (( cycle % kill_every == 0 )); then
        kill -9 "$server_pid"
        last_kill=$(date +%s)
        wait "$server_pid" 2>/dev/null || true
        wait "$victim" 2>/dev/null || true
        kills=$((kills + 1))
        start_server
        sample_rss & pids+=($!)
    else
        kill "$victim" 2>/dev/null || true
        wait "$victim" 2>/dev/null || true
        last_kill=$(date +%s)
    fi
    # What was verified before the kill is still there.
    fio_verify a "$seed_a" verify_only
    fio_verify b "$seed_b" verify_only
    say "cycle $cycle done: $kills kill -9 so far, RSS $(( $(rss_kib "$server_pid") / 1024 )) MiB, snapshots a:[${snaps[a]} ] b:[${snaps[b]} ], $(tail -1 "$work/proxy.log")"
done

# --- the end: faults off, exports, last verify, numbers ----------------------
kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true
tail -2 "$work/proxy.log" | sed 's/^/proxy: /'
"$faultproxy" --upstream "127.0.0.1:$moto_port" --listen "$proxy_addr" >"$work/proxy-clean.log" 2>&1 &
pids+=($!)
sleep 0.5
fio_verify a "$seed_a" verify_only
fio_verify b "$seed_b" verify_only
kill -TERM "$server_pid"
wait "$server_pid" || die "the server did not stop cleanly"
server_pid=""
checked=0
for v in a b; do
    for s in ${snaps[$v]}; do
        cli export "$v@$s" "$work/export.img" --force >/dev/null 2>&1 || die "export $v@$s"
        cmp "$work/export.img" "$(snap_ref "$v" "$s")" || die "snapshot $v@$s differs from its reference"
        checked=$((checked + 1))
    done
done
rm -f "$work/export.img"

say "fio latency (client view, per run; completion latency):"
sed 's/^/  /' "$work/fio.log"
python3 - "$rss_log" <<'PY'
import sys, collections
lives = collections.OrderedDict()
for line in open(sys.argv[1]):
    fields = line.split()
    if len(fields) != 3:
        continue  # the process was exiting
    t, pid, kib = fields
    if int(kib) > 0:
        lives.setdefault(pid, []).append((int(t), int(kib)))
firsts = [v[0][1] for v in lives.values()]
lasts = [v[-1][1] for v in lives.values()]
peak = max(k for v in lives.values() for _, k in v)
print(f"server RSS: {len(lives)} server lives; at start {min(firsts)/1024:.0f}-{max(firsts)/1024:.0f} MiB, "
      f"at end of life {min(lasts)/1024:.0f}-{max(lasts)/1024:.0f} MiB, peak {peak/1024:.0f} MiB")
growth = [(v[-1][1] - v[0][1]) / 1024 for v in lives.values()]
print("server RSS growth per life (MiB): " + " ".join(f"{g:+.0f}" for g in growth))
PY
for v in a b; do
    cli volume info "$v" --json >"$work/info-$v.json" || die "volume info $v"
    python3 - "$work/info-$v.json" "$v" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
s = j["space"]
live, used, stored = s.get("live", 0), s.get("used", 0), j["stored_bytes"]
mib = 2**20
print(f"volume {sys.argv[2]}: stored {stored/mib:.1f} MiB in {j['stored_objects']} objects, "
      f"live {live/mib:.1f} MiB, used with snapshots {used/mib:.1f} MiB, "
      f"stored/live {stored/max(live, 1):.2f}, stored/used {stored/max(used, 1):.2f}")
PY
done
say "PASS: $cycle cycles in $(( $(date +%s) - soak_start ))s, $kills kill -9, $clones clone+flatten, $deletes snapshot deletes, $checked snapshots exported and equal to their references, fio verify clean"
