#!/usr/bin/env bash
# Power-loss lane: shale in a qemu guest with its data directory (WAL and
# the local-directory store) on a virtio disk backed by a host file opened
# with cache=none, so whatever the guest did not flush is lost when the
# host kills qemu. Each boot checks what the previous cycle left (every
# block must hold its last flushed generation or a later written one),
# then runs the next cycle, and the host cuts the power (SIGKILL of the
# qemu process itself) at the cycle's marker or at a random moment.
#
# Usage: tools/vm/power-loss.sh [path/to/shale]   (shale-crashcheck beside it)
# Env:
#   SHALE_POWER_CYCLES  power cuts (cycles) in the run, default 6; a long
#                       run: SHALE_POWER_CYCLES=100 tools/vm/power-loss.sh ...
#   SHALE_POWER_SEED    seed of the run (cycle choice, cut moments, writer
#                       plan), default random; printed for replay
#   SHALE_POWER_BLOCKS  4 KiB blocks the writer uses, default 1024
#   SHALE_POWER_BOOT_TIMEOUT  seconds one boot may take, default 600
#   SHALE_POWER_TMP     where the work dir goes (not tmpfs), default /var/tmp
#   SHALE_VM_MEM (default 1024M), SHALE_VM_CACHE (kernel cache),
#   SHALE_VM_KEEP=1 (keep the work dir: disk image, console logs, ledger)
#
# Cycle types (the first is always ublk-crash, the scenario of issue 10;
# then a fixed rotation, so any 6 consecutive cycles hold 5 ublk cuts):
#   ublk-crash         100 writes to /dev/ublkb0 without flush, kill -9 of the
#                      server, `shale recover`, 10 writes each followed by a
#                      flush, then the power cut
#   nbd-crash          the same through `shale nbd serve` (restarted)
#   ublk-random        random writes and flushes, cut at a random moment
#   ublk-crash-random  writer running, kill -9 of the server at a random
#                      moment, recover, cut at a random moment
#
# The ledger (which generations each acknowledged FLUSH covered) is printed
# by the writer on the serial console and kept on the host only, together
# with the plan of each cycle, which the host records before the boot.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SHALE=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/shale}
CHECK=$(dirname "$SHALE")/shale-crashcheck
# Boots of one cycle at most when the emulated guest kernel panics before
# our init runs (see boot()).
MAX_BOOTS=4
CYCLES=${SHALE_POWER_CYCLES:-6}
SEED=${SHALE_POWER_SEED:-$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))}
BLOCKS=${SHALE_POWER_BLOCKS:-1024}
BOOT_TIMEOUT=${SHALE_POWER_BOOT_TIMEOUT:-600}
MEM=${SHALE_VM_MEM:-1024M}

. "$HERE/lib.sh"
vm_check_tools
vm_need mke2fs "apt-get install e2fsprogs"
[ -x "$SHALE" ] || { echo "power-loss: no shale binary at $SHALE (cargo build --release first)" >&2; exit 2; }
[ -x "$CHECK" ] || { echo "power-loss: no shale-crashcheck at $CHECK (cargo build --release first)" >&2; exit 2; }
[[ "$CYCLES" =~ ^[1-9][0-9]*$ ]] || { echo "power-loss: SHALE_POWER_CYCLES must be a positive number" >&2; exit 2; }
[[ "$SEED" =~ ^[0-9]+$ ]] || { echo "power-loss: SHALE_POWER_SEED must be a number" >&2; exit 2; }

KDIR=$("$HERE/fetch-kernel.sh" | tail -n 1)
echo "power-loss: kernel $(cat "$KDIR/package"), seed $SEED, $CYCLES cycles, $BLOCKS blocks"

# Not TMPDIR: cache=none needs O_DIRECT, which tmpfs refuses.
WORK=$(mktemp -d "${SHALE_POWER_TMP:-/var/tmp}/shale-power.XXXXXX")
QEMU_PID=
cleanup() {
    if [ -n "$QEMU_PID" ]; then kill -9 "$QEMU_PID" 2>/dev/null || true; fi
    if [ -n "${SHALE_VM_KEEP:-}" ]; then echo "power-loss: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

R=$WORK/root
vm_root_init "$R"
cp "$KDIR/ublk_drv.ko" "$KDIR/virtio_blk.ko" "$R/"
cp "$HERE/guest-power.sh" "$R/guest-power.sh"
vm_add_shale "$R" "$SHALE" shale
vm_add_shale "$R" "$CHECK" shale-crashcheck
cat > "$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
sh /guest-power.sh
echo "FAIL guest-power.sh ended ($?)"
poweroff -f
INIT
chmod +x "$R/init"
vm_pack "$R" "$WORK/initrd.cpio"
echo "power-loss: initramfs $(du -h "$WORK/initrd.cpio" | cut -f1)"

# The guest's disk: ext4 made here, used with cache=none (O_DIRECT on the
# host), so the guest's page cache is the only volatile cache.
DISK_IMG=$WORK/disk.img
truncate -s 1G "$DISK_IMG"
mke2fs -q -t ext4 -F "$DISK_IMG"

LEDGER=$WORK/ledger
"$CHECK" line RUN "$SEED" "$BLOCKS" 4096 > "$LEDGER"

# Host-side random numbers from the seed (bash's RANDOM, seeded once).
RANDOM=$((SEED % 32768))
# rnd LO HI: sets RND (no subshell, so the sequence follows the seed).
rnd() { RND=$(( $1 + RANDOM % ($2 - $1 + 1) )); }

ROTATION=(ublk-random nbd-crash ublk-crash-random ublk-random ublk-crash)
cycle_type() {
    if [ "$1" = 1 ]; then echo ublk-crash; else echo "${ROTATION[$(( ($1 - 2) % ${#ROTATION[@]} ))]}"; fi
}
frontend() { case $1 in nbd-*) echo nbd ;; *) echo ublk ;; esac; }

# boot N CYCLE PREV: run one boot; returns after the power cut (or the
# final boot's clean poweroff). Sets CUT_HOW.
boot() {
    local n=$1 cycle=$2 prev=$3 gen0=$(( $1 * 1000000 )) budget=0 killafter=0 log=$WORK/boot-$1.log
    case $cycle in
        *-crash) budget=110 ;;
        ublk-random|ublk-crash-random) budget=50000 ;;
    esac
    if [ "$cycle" = ublk-crash-random ]; then rnd 1 6; killafter=$RND; fi
    "$CHECK" line NOTE "boot $n checks the cut of boot $((n - 1)), then runs cycle $n: $cycle" >> "$LEDGER"
    if [ "$budget" -gt 0 ]; then
        "$CHECK" line PLAN "$gen0" $(( gen0 + budget - 1 )) >> "$LEDGER"
    fi
    local append="console=ttyS0 panic=-1 loglevel=4 shale.boot=$n shale.cycle=$cycle shale.prev=$prev"
    append+=" shale.seed=$SEED shale.blocks=$BLOCKS shale.gen0=$gen0 shale.budget=$budget shale.killafter=$killafter"
    local start=$SECONDS attempt
    for attempt in $(seq "$MAX_BOOTS"); do
    : > "$log"
    qemu-system-x86_64 \
        -accel tcg -cpu qemu64,-cx16 -smp 2 -m "$MEM" \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$KDIR/vmlinuz" -initrd "$WORK/initrd.cpio" \
        -drive "file=$DISK_IMG,if=virtio,format=raw,cache=none,aio=native" \
        -append "$append" </dev/null >"$log" 2>&1 &
    QEMU_PID=$!
    local cut_at= checked=
    CUT_HOW=
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if grep -q '^FAIL' "$log"; then
            CUT_HOW="guest failure"; break
        elif [ -z "$checked" ] && grep -aq 'CC SCANNED' "$log"; then
            # Verify the scan at once: on a failure, stop here.
            checked=1
            { cat "$LEDGER"; grep -a 'CC ' "$log"; } > "$WORK/ledger.now"
            if ! "$CHECK" verify --journal "$WORK/ledger.now" > "$WORK/verify.out" 2>&1; then
                CUT_HOW="failed check"; break
            fi
        elif grep -q '^POWER CUT-NOW' "$log"; then
            CUT_HOW="at CUT-NOW"; break
        elif [ -z "$cut_at" ] && grep -q '^POWER CUT-WINDOW' "$log"; then
            rnd 1 12
            cut_at=$(( SECONDS + RND ))
        elif [ -n "$cut_at" ] && [ "$SECONDS" -ge "$cut_at" ]; then
            CUT_HOW="at a random moment"; break
        elif [ $(( SECONDS - start )) -ge "$BOOT_TIMEOUT" ]; then
            CUT_HOW="timeout"; break
        fi
        sleep 0.2
    done
    # The power cut: SIGKILL of qemu itself (no flush of anything).
    kill -9 "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
    # The emulated guest kernel itself sometimes panics while booting
    # (seen: enqueue_timer, int3 in sched_clock_cpu, under TCG), before the guest ran anything
    # of ours and so before it touched the disk: boot it again, up to MAX_BOOTS boots.
    if [ "$attempt" -lt "$MAX_BOOTS" ] && [ -z "$CUT_HOW" ] && grep -aq 'Kernel panic' "$log" \
        && ! grep -aq '^CC \|^POWER\|^FAIL\|CC SCAN' "$log"; then
        echo "power-loss: boot $n: the guest kernel panicked before our init ran; booting again"
        cp "$log" "$log.panic"
        continue
    fi
    break
    done
    echo "power-loss: boot $n ($cycle) ended after $(( SECONDS - start )) s: ${CUT_HOW:-guest powered off}"
    grep -a 'CC ' "$log" >> "$LEDGER" || true
    "$CHECK" line NOTE "boot $n ended: ${CUT_HOW:-powered off}" >> "$LEDGER"
    "$CHECK" line CUT >> "$LEDGER"
}

show_boot() {
    echo "--- console of boot $1 (last 60 lines) ---"
    grep -av '^CC \|CC SCAN' "$WORK/boot-$1.log" | tail -n 60 || true
}

prev=none
for (( n = 1; n <= CYCLES + 1; n++ )); do
    if (( n > CYCLES )); then cycle=final; else cycle=$(cycle_type "$n"); fi
    boot "$n" "$cycle" "$prev"
    if [ "$CUT_HOW" != "failed check" ] && { grep -aq '^FAIL' "$WORK/boot-$n.log" || [ "$CUT_HOW" = timeout ]; }; then
        show_boot "$n"
        echo "power-loss: FAIL: boot $n ($cycle) did not complete its steps (${CUT_HOW:-no marker})"
        exit 1
    fi
    if (( n > 1 )); then
        if ! grep -aq 'CC SCANNED' "$WORK/boot-$n.log"; then
            show_boot "$n"
            echo "power-loss: FAIL: boot $n printed no complete scan"
            exit 1
        fi
        if ! "$CHECK" verify --journal "$LEDGER" > "$WORK/verify.out" 2>&1; then
            cat "$WORK/verify.out"
            show_boot "$n"
            echo "power-loss: FAIL: data check after the power cut of boot $((n - 1)) ($(cycle_type $((n - 1)))) (seed $SEED; replay with SHALE_POWER_SEED=$SEED)"
            exit 1
        fi
        echo "power-loss: boot $n: $(tail -n 1 "$WORK/verify.out")"
    fi
    if [ "$cycle" = final ] && ! grep -aq '^POWER FINAL-DONE' "$WORK/boot-$n.log"; then
        show_boot "$n"
        echo "power-loss: FAIL: the final boot did not finish"
        exit 1
    fi
    prev=$(frontend "$cycle")
done
echo "power-loss: OK: $CYCLES power cuts, every flushed write survived (seed $SEED, ${SECONDS} s)"
