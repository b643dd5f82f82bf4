#!/bin/sh
# Runs inside the power-loss VM (see power-loss.sh), once per boot. The host
# cuts the power (SIGKILL of qemu) while this script writes, so nothing
# here may rely on running to its end except the final boot.
#
# Kernel arguments (set by the host for each boot):
#   shale.boot=N      1 on the first boot (creates the volume)
#   shale.cycle=TYPE  what to do after checking: ublk-random, ublk-crash,
#                     ublk-crash-random, nbd-crash, or final (check only)
#   shale.prev=TYPE   the frontend that wrote last (ublk or nbd): the check
#                     reads through it
#   shale.seed=S shale.blocks=B   the verifying writer's run
#   shale.gen0=G shale.budget=C   generations G.. G+C-1 may be written
#   shale.killafter=SEC           ublk-crash-random: kill -9 the server then
#
# Lines for the host: "CC ..." ledger lines from shale-crashcheck (the
# record of flushed generations lives only on the host), "POWER <marker>"
# progress markers, "FAIL <why>" when the harness itself cannot go on.
export PATH=/usr/bin:/bin:/sbin
export RUST_LOG=${RUST_LOG:-info,libublk=warn}
VOL=pl
DISK=/disk
SOCK=/run/nbd.sock
NBD_URI="nbd+unix:///$VOL?socket=$SOCK"

for w in $(cat /proc/cmdline); do
    case $w in
        shale.*=*) k=${w#shale.}; k=${k%%=*}; eval "ARG_$k=\${w#*=}" ;;
    esac
done
BOOT=$ARG_boot CYCLE=$ARG_cycle PREV=${ARG_prev:-none}
SEED=$ARG_seed BLOCKS=$ARG_blocks GEN0=${ARG_gen0:-0} BUDGET=${ARG_budget:-0}

marker() { echo "POWER $*"; }
note() { shale-crashcheck line NOTE "boot $BOOT: $*"; }
die() {
    echo "FAIL boot $BOOT ($CYCLE): $*"
    for f in /run/shale/$VOL.log /run/nbd.log; do
        [ -f "$f" ] && { echo "--- $f ---"; tail -n 30 "$f"; }
    done
    echo "--- dmesg ---"; dmesg | tail -n 20
    poweroff -f
    sleep 60
}
# Show the server's WAL and recovery messages on the console.
show_log() {
    grep -iE "wal|replay|recover|segment" "$1" 2>/dev/null | tail -n 12 | sed 's/^/guest-log: /'
}

insmod /virtio_blk.ko || die "insmod virtio_blk"
insmod /ublk_drv.ko || die "insmod ublk_drv"
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || die "no /dev/vda"
# Keep what nobody synced in the page cache until the power goes.
echo 60000 > /proc/sys/vm/dirty_expire_centisecs
echo 60000 > /proc/sys/vm/dirty_writeback_centisecs
mkdir -p $DISK
mount -t ext4 -o commit=600 /dev/vda $DISK || die "mount /dev/vda"

# Crash cycles keep everything in the WAL (no destage): the replayed,
# inherited segments are then the only copy of the unflushed writes.
case $CYCLE in
    *crash*) DESTAGE="destage_interval_ms: 3600000
  max_unstored_seconds: 86400" ;;
    *) DESTAGE="destage_interval_ms: 2000" ;;
esac
cat > /run/shale.yaml <<YAML
data_dir: $DISK/shale
engine:
  cache_size: 32MiB
  $DESTAGE
YAML
export SHALE_CONFIG=/run/shale.yaml

ublk_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/shale/$VOL.json; }
ublk_attach() {
    DEV=$(shale add $VOL) || die "shale add $VOL"
    [ -b "$DEV" ] || die "shale add printed '$DEV'"
    TARGET=$DEV
    show_log /run/shale/$VOL.log
}
nbd_start() {
    rm -f /run/nbd.out
    shale nbd serve $VOL --socket $SOCK > /run/nbd.out 2>> /run/nbd.log &
    NBD_PID=$!
    i=0; while ! grep -q listening /run/nbd.out 2>/dev/null && [ $i -lt 600 ]; do
        kill -0 $NBD_PID 2>/dev/null || die "shale nbd serve exited"
        sleep 0.1; i=$((i+1))
    done
    grep -q listening /run/nbd.out || die "shale nbd serve did not listen"
    TARGET=$NBD_URI
    show_log /run/nbd.log
}
nbd_stop() { kill -TERM $NBD_PID; wait $NBD_PID || die "shale nbd serve did not stop cleanly"; }
# A crashed server leaves a live lease; take it over at once instead of
# waiting up to 30 s for it to expire.
unlock() { RUST_LOG=warn shale volume unlock $VOL --force >/dev/null || die "volume unlock --force"; }
writer() { shale-crashcheck write --target "$TARGET" --seed $SEED --blocks $BLOCKS "$@"; }

if [ "$BOOT" = 1 ]; then
    shale volume create $VOL --size $((BLOCKS * 4096 + 4 * 1048576)) >/dev/null || die "volume create"
else
    unlock
fi

# Check what the previous cycle left, through the frontend it used; then
# flush, so what was read is the floor for the next cycle.
if [ "$BOOT" != 1 ]; then
    case $PREV in
        nbd) nbd_start ;;
        *) ublk_attach ;;
    esac
    note "check after the power cut"
    shale-crashcheck scan --target "$TARGET" --seed $SEED --blocks $BLOCKS --flush ||
        die "scan failed"
    # Detach unless the next cycle writes through the same frontend.
    case $PREV:$CYCLE in
        ublk:ublk-*|nbd:nbd-*) ATTACHED=$PREV ;;
        nbd:*) nbd_stop ;;
        *) shale del $VOL --timeout 120 >/dev/null || die "shale del" ;;
    esac
fi
if [ "$CYCLE" = final ]; then
    marker FINAL-DONE
    umount $DISK
    poweroff -f
    sleep 60
fi
attach() {
    case $CYCLE:${ATTACHED:-} in
        ublk-*:ublk|nbd-*:nbd) ;;
        ublk-*) ublk_attach ;;
        *) nbd_start ;;
    esac
}

G=$GEN0
case $CYCLE in
    ublk-crash|nbd-crash)
        # The scenario of issue 10: writes without a flush, kill -9 of the
        # server, recovery, writes each followed by a flush, power cut.
        note "$CYCLE: 100 writes without flush, kill -9, recover, 10 flushed writes, power cut"
        attach
        writer --from $G --count 100 --flush-prob 0 || die "writer (no flush)"
        case $CYCLE in
            ublk-*)
                kill -9 "$(ublk_pid)" || die "kill -9 the ublk server"
                sleep 1
                unlock
                DEV2=$(shale recover $VOL) || die "shale recover"
                [ "$DEV2" = "$DEV" ] || die "recover gave '$DEV2', not $DEV"
                show_log /run/shale/$VOL.log
                ;;
            *)
                kill -9 $NBD_PID; wait $NBD_PID 2>/dev/null
                unlock
                nbd_start
                ;;
        esac
        writer --from $((G + 100)) --count 10 --flush-prob 1 || die "writer (flushed)"
        marker CUT-NOW
        ;;
    ublk-random)
        note "$CYCLE: random writes and flushes, power cut at a random moment"
        attach
        marker CUT-WINDOW
        writer --from $G --count $BUDGET --flush-prob 0.1 || die "writer"
        marker CUT-NOW
        ;;
    ublk-crash-random)
        note "$CYCLE: writer running, kill -9 of the server after ${ARG_killafter}s, recover, power cut at a random moment"
        attach
        writer --from $G --count $BUDGET --flush-prob 0.1 &
        W=$!
        sleep "$ARG_killafter"
        kill -9 "$(ublk_pid)" || die "kill -9 the ublk server"
        unlock
        DEV2=$(shale recover $VOL) || die "shale recover"
        show_log /run/shale/$VOL.log
        marker CUT-WINDOW
        wait $W || die "writer"
        marker CUT-NOW
        ;;
    *) die "unknown cycle type '$CYCLE'" ;;
esac
# Wait for the host to cut the power.
while :; do sleep 1000; done
