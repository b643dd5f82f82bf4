#!/bin/sh
# Runs inside the test VM (see run.sh). One PASS/FAIL line per step; the last
# line is ALL-STEPS-DONE only if every step ran. A failed step whose
# successors cannot run ends the script early (the host sees no final line).
export PATH=/usr/bin:/bin:/sbin
export RUST_LOG=${RUST_LOG:-info,libublk=warn}
VOL=vol1
# Catalog volumes on the embedded default store (a directory in guest tmpfs).
mkdir -p /data/shale
cat > /data/shale.yaml <<'YAML'
data_dir: /data/shale
engine:
  max_unstored_bytes: 64MiB
  cache_size: 32MiB
YAML
export SHALE_CONFIG=/data/shale.yaml
ADD_BACKING=""

pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; }
die() {
    fail "$*"
    echo "--- server log ---"; cat /run/shale/$VOL.log 2>/dev/null | tail -n 40
    echo "--- dmesg ---"; dmesg | tail -n 30
    exit 1
}
# step NAME CMD...: run CMD, PASS or FAIL by its status.
step() {
    name=$1; shift
    if "$@" >/tmp/step.out 2>&1; then pass "$name"; else cat /tmp/step.out; fail "$name"; return 1; fi
}
server_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/shale/$VOL.json; }
same_bytes() { [ "$(sha256sum < "$1" | cut -d' ' -f1)" = "$(sha256sum < "$2" | cut -d' ' -f1)" ]; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

echo "guest: kernel $(uname -r), $(nproc) cpus"
step insmod-ublk_drv insmod /ublk_drv.ko || die insmod
[ -c /dev/ublk-control ] && pass ublk-control-present || die ublk-control-present

step volume-create shale volume create $VOL --size 256MiB || die volume-create
DEV=$(shale add $VOL $ADD_BACKING) || die "shale-add"
[ "$DEV" = /dev/ublkb0 ] && [ -b "$DEV" ] && pass "shale-add ($DEV)" || die "shale-add printed '$DEV'"
[ "$(readlink /dev/shale/$VOL)" = "$DEV" ] && pass dev-shale-link || fail dev-shale-link
shale list | grep -q "^$VOL .*/dev/ublkb0 .* live" && pass shale-list-live || { shale list; fail shale-list-live; }
if shale add $VOL $ADD_BACKING >/tmp/dup.out 2>&1; then fail add-twice-refused; else
    grep -q "already attached" /tmp/dup.out && pass add-twice-refused || { cat /tmp/dup.out; fail add-twice-refused; }
fi
if shale recover $VOL >/tmp/rec.out 2>&1; then fail recover-live-refused; else pass recover-live-refused; fi
[ "$(cat /sys/block/ublkb0/queue/logical_block_size)" = 512 ] && pass logical-block-512 || fail logical-block-512
[ "$(cat /sys/block/ublkb0/queue/physical_block_size)" = 4096 ] && pass physical-block-4096 || fail physical-block-4096
grep -q "write back" /sys/block/ublkb0/queue/write_cache && pass volatile-write-cache || fail volatile-write-cache
[ "$(cat /sys/block/ublkb0/queue/fua)" = 1 ] && pass fua-attribute || fail fua-attribute
[ "$(cat /sys/block/ublkb0/queue/discard_granularity)" = 4096 ] && pass discard-granularity || fail discard-granularity

step mkfs.ext4 mkfs.ext4 -F -q "$DEV" || die mkfs.ext4
mkdir -p /mnt/v
step mount mount -t ext4 "$DEV" /mnt/v || die mount

# Seed 001 file API on the filesystem: create directories and files, read
# byte ranges, list directories, delete a file and an empty directory, and
# see a non-empty directory refused.
head -c 8388608 /dev/urandom > /data/big.src
head -c 1048576 /dev/urandom > /data/small.src
step create-directory mkdir /mnt/v/docs /mnt/v/docs/sub /mnt/v/empty
step create-files sh -c 'echo "hello shale" > /mnt/v/docs/a.txt && cp /data/big.src /mnt/v/docs/big.bin && cp /data/small.src /mnt/v/docs/sub/c.bin && cp /data/small.src /mnt/v/docs/gone.bin && sync'
drop_caches
range_ok=1
for r in "0 1" "17 3" "1000 24" "2047 1"; do
    set -- $r
    dd if=/mnt/v/docs/big.bin bs=4096 skip=$1 count=$2 2>/dev/null > /tmp/r1
    dd if=/data/big.src bs=4096 skip=$1 count=$2 2>/dev/null > /tmp/r2
    cmp -s /tmp/r1 /tmp/r2 && [ -s /tmp/r1 ] || range_ok=0
done
dd if=/mnt/v/docs/a.txt bs=1 skip=6 count=5 2>/dev/null > /tmp/r1
[ "$(cat /tmp/r1)" = shale ] || range_ok=0
[ $range_ok = 1 ] && pass read-byte-ranges || fail read-byte-ranges
[ "$(ls /mnt/v/docs | tr '\n' ' ')" = "a.txt big.bin gone.bin sub " ] && pass list-directory || { ls -la /mnt/v/docs; fail list-directory; }
[ "$(ls /mnt/v/docs/sub)" = c.bin ] && pass list-subdirectory || fail list-subdirectory
step delete-file rm /mnt/v/docs/gone.bin
[ ! -e /mnt/v/docs/gone.bin ] && pass deleted-file-gone || fail deleted-file-gone
step delete-empty-directory rmdir /mnt/v/empty
if rmdir /mnt/v/docs/sub 2>/dev/null; then fail non-empty-directory-refused; else
    [ -f /mnt/v/docs/sub/c.bin ] && pass non-empty-directory-refused || fail non-empty-directory-refused
fi
(cd /mnt/v && sha256sum docs/a.txt docs/big.bin docs/sub/c.bin > /data/sums)
step umount umount /mnt/v || die umount
step e2fsck-clean e2fsck -fn "$DEV"
step remount mount -t ext4 "$DEV" /mnt/v || die remount
step verify-checksums sh -c 'cd /mnt/v && sha256sum -c /data/sums'
[ "$(ls /mnt/v/docs | tr '\n' ' ')" = "a.txt big.bin sub " ] && pass list-after-remount || fail list-after-remount

# Snapshot of the attached, mounted volume (through the server's control
# socket): crash-consistent at a flush point. A clone of it, attached as a
# second device, mounts (ext4 replays its journal) and holds every file
# synced before the snapshot and nothing written after it.
step live-snap-write sh -c 'cp /data/small.src /mnt/v/docs/before.bin && sync'
step live-snapshot-create shale snapshot create $VOL@live1
step live-snap-write-after sh -c 'cp /data/small.src /mnt/v/docs/after-snap.bin && sync'
step live-snapshot-create-2 shale snapshot create $VOL@live2
if shale diff $VOL@live1 $VOL@live2 > /tmp/diff.out 2>&1 && [ -s /tmp/diff.out ]; then
    pass live-snapshot-diff-nonempty
else
    cat /tmp/diff.out; fail live-snapshot-diff-nonempty
fi
if shale snapshot rollback $VOL@live1 >/tmp/rb.out 2>&1; then fail rollback-while-attached-refused; else
    pass rollback-while-attached-refused
fi
step live-clone shale clone $VOL@live1 snapclone
if DEVC=$(shale add snapclone); then
    pass "live-clone-attached ($DEVC)"
    mkdir -p /mnt/c
    step live-clone-mount mount -t ext4 "$DEVC" /mnt/c
    step live-clone-has-synced-files sh -c 'cd /mnt/c && sha256sum -c /data/sums && cmp docs/before.bin /data/small.src'
    [ ! -e /mnt/c/docs/after-snap.bin ] && pass live-clone-lacks-later-file || fail live-clone-lacks-later-file
    step live-clone-umount umount /mnt/c
    step live-clone-e2fsck e2fsck -fn "$DEVC"
    step live-clone-del shale del snapclone --timeout 60
else
    fail live-clone-attached
fi
[ -f /mnt/v/docs/after-snap.bin ] && cmp -s /mnt/v/docs/before.bin /data/small.src && pass volume-unchanged-by-clone || fail volume-unchanged-by-clone

if command -v fio >/dev/null 2>&1; then
    step fio-randrw-verify fio --name=verify --filename=/mnt/v/fio.dat --size=32m --rw=randrw \
        --bs=4k --direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0
    step fio-mixed-sizes-verify fio --name=mixed --filename=/mnt/v/fio2.dat --size=16m --rw=randwrite \
        --bsrange=512-256k --direct=1 --ioengine=libaio --iodepth=8 --verify=md5 --verify_fatal=1
    rm -f /mnt/v/fio.dat /mnt/v/fio2.dat
else
    echo "guest: fio not in the image; dd-based verify instead"
    step dd-verify sh -c 'dd if=/data/big.src of=/mnt/v/dd.bin bs=64k oflag=direct 2>/dev/null && sync && echo 3 > /proc/sys/vm/drop_caches && cmp /data/big.src /mnt/v/dd.bin && rm /mnt/v/dd.bin'
fi
# A second, RAM-backed device with 2 queues alongside the first: raw-device
# verify from two jobs (both queues), then removal by device number.
if DEVM=$(shale add mem1 --memory 64M --queues 2 --depth 32); then
    pass "add-second-device ($DEVM, 2 queues)"
    [ "$(ls /sys/block/${DEVM#/dev/}/mq | wc -l)" = 2 ] && pass two-hw-queues || fail two-hw-queues
    if command -v fio >/dev/null 2>&1; then
        step fio-raw-device-verify fio --name=raw --filename="$DEVM" --size=32m --rw=randrw --bs=4k \
            --direct=1 --ioengine=libaio --iodepth=16 --numjobs=2 --offset_increment=32m \
            --verify=crc32c --verify_fatal=1 --group_reporting
    else
        step dd-raw-device-verify sh -c "dd if=/data/small.src of=$DEVM bs=64k oflag=direct 2>/dev/null && dd if=$DEVM bs=64k count=16 iflag=direct 2>/dev/null | cmp - /data/small.src"
    fi
    step discard-raw-device sh -c "blkdiscard -o 0 -l 1048576 $DEVM 2>/dev/null || dd if=/dev/zero of=$DEVM bs=64k count=16 oflag=direct 2>/dev/null"
    head -c 1048576 /dev/zero > /data/zero.1m
    step read-zeroes-after-discard sh -c "dd if=$DEVM bs=64k count=16 iflag=direct 2>/dev/null | cmp - /data/zero.1m"
    step del-by-number shale del -n "${DEVM#/dev/ublkb}" --timeout 60
    [ ! -e "$DEVM" ] && pass second-device-removed || fail second-device-removed
else
    fail add-second-device
fi
# A real volume served by 2 queues: one fio job pinned to each CPU (blk-mq
# maps CPU n to queue n here), each verifying its own 32 MiB; then the volume
# is re-attached with a single queue and the same data verified again.
# hctx_cpus DEV N: the CPUs blk-mq maps to hardware queue N of DEV (a fio job
# pinned to one of them submits through that queue).
hctx_cpus() { cat /sys/block/$1/mq/$2/cpu_list 2>/dev/null; }
MQFIO="--filename=%DEV% --size=32m --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=16 --numjobs=2 --offset_increment=32m --cpus_allowed=0,1 --cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 --group_reporting"
if ! command -v fio >/dev/null 2>&1; then
    echo "guest: fio not in the image; multi-queue volume verify needs it (SKIP)"
elif step mq-volume-create shale volume create mq1 --size 128MiB && DEVQ=$(shale add mq1 --queues 2 --depth 32); then
    pass "mq-volume-attached ($DEVQ, 2 queues)"
    C0=$(hctx_cpus "${DEVQ#/dev/}" 0); C1=$(hctx_cpus "${DEVQ#/dev/}" 1)
    [ "$C0" = 0 ] && [ "$C1" = 1 ] && pass "mq-queue-per-cpu (queue 0: cpu $C0, queue 1: cpu $C1)" \
        || fail "mq-queue-per-cpu (queue 0: cpu '$C0', queue 1: cpu '$C1')"
    step mq-volume-fio-verify fio --name=mq $(echo "$MQFIO" | sed "s|%DEV%|$DEVQ|")
    step mq-volume-del shale del mq1 --timeout 60
    if DEVQ=$(shale add mq1 --queues 1); then
        step mq-volume-verify-one-queue fio --name=mq --verify_only $(echo "$MQFIO" | sed "s|%DEV%|$DEVQ|")
        # The same verify must fail once a block it wrote is overwritten.
        dd if=/dev/zero of="$DEVQ" bs=4096 count=1 seek=100 oflag=direct 2>/dev/null
        if fio --name=mq --verify_only $(echo "$MQFIO" | sed "s|%DEV%|$DEVQ|") >/tmp/mqbad.out 2>&1; then
            fail mq-verify-detects-damage
        else pass mq-verify-detects-damage; fi
        step mq-volume-del-again shale del mq1 --timeout 60
    else
        fail mq-volume-reattach
    fi
else
    fail mq-volume-attached
fi
if shale del $VOL >/tmp/del.out 2>&1; then fail del-while-mounted-refused; else
    grep -q "is mounted at /mnt/v" /tmp/del.out && [ -b "$DEV" ] && pass del-while-mounted-refused || { cat /tmp/del.out; fail del-while-mounted-refused; }
fi
step fstrim sh -c 'sync && fstrim -v /mnt/v || true'

# Foreground server (as systemd runs it): prints the device once live; SIGTERM
# flushes, removes the device and exits 0.
shale add fg1 --memory 16M --foreground > /tmp/fg.out 2>/tmp/fg.err &
FG=$!
i=0; while [ ! -L /dev/shale/fg1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
FGDEV=$(readlink /dev/shale/fg1)
[ -b "$FGDEV" ] && [ "$(cat /tmp/fg.out)" = "$FGDEV" ] && pass "foreground-add ($FGDEV)" || { cat /tmp/fg.out /tmp/fg.err; fail foreground-add; }
step foreground-io sh -c "dd if=/data/small.src of=$FGDEV bs=64k oflag=direct 2>/dev/null && dd if=$FGDEV bs=64k count=16 iflag=direct 2>/dev/null | cmp - /data/small.src"
kill -TERM $FG
wait $FG; FGRC=$?
[ $FGRC = 0 ] && [ ! -e "$FGDEV" ] && [ ! -e /dev/shale/fg1 ] && pass foreground-sigterm-exit-0 || { cat /tmp/fg.err; fail "foreground-sigterm-exit-0 (rc $FGRC)"; }

# Crash 1: kill -9 the server while mounted and writing; `shale add` recovers.
head -c 16777216 /dev/urandom > /data/after.src
PID=$(server_pid)
dd if=/data/after.src of=/mnt/v/after.bin bs=64k conv=fsync 2>/dev/null &
WRITER=$!
sleep 1
kill -9 "$PID" && pass "kill-9-server (pid $PID)" || fail kill-9-server
sleep 1
shale list | grep -q "quiesced, server dead" && pass list-shows-dead-server || { shale list; fail list-shows-dead-server; }
# Output into a pipe whose reader is gone: the process ends quietly (as
# other Unix tools do), it does not panic.
{ sleep 0.5; shale list 2>/tmp/list.err; } | true
! grep -q panicked /tmp/list.err && pass list-into-closed-pipe-quiet || { cat /tmp/list.err; fail list-into-closed-pipe-quiet; }
DEV2=$(shale add $VOL) || die recover-by-add
[ "$DEV2" = "$DEV" ] && pass "recover-by-add-same-device ($DEV2)" || die "recover-by-add gave '$DEV2'"
wait $WRITER && pass writer-survived-crash || fail writer-survived-crash
drop_caches
same_bytes /mnt/v/after.bin /data/after.src && pass verify-after-crash-1 || fail verify-after-crash-1
step verify-checksums-after-crash-1 sh -c 'cd /mnt/v && sha256sum -c /data/sums'

# Crash 2: same again, recovered with `shale recover`.
PID=$(server_pid)
cp /data/small.src /mnt/v/docs/late.bin &
COPIER=$!
kill -9 "$PID" && pass "kill-9-server-again (pid $PID)" || fail kill-9-server-again
sleep 1
DEV3=$(shale recover $VOL) || die shale-recover
[ "$DEV3" = "$DEV" ] && pass "shale-recover-same-device ($DEV3)" || die "shale recover gave '$DEV3'"
wait $COPIER
sync
drop_caches
same_bytes /mnt/v/docs/late.bin /data/small.src && pass verify-after-crash-2 || fail verify-after-crash-2
step umount-after-crashes umount /mnt/v
step e2fsck-after-crashes e2fsck -fn "$DEV"

# Orderly removal.
step shale-del shale del $VOL --timeout 60 || { tail -n 30 /run/shale/$VOL.log; ps; }
[ ! -e /dev/ublkb0 ] && [ ! -e /sys/block/ublkb0 ] && pass device-removed || fail device-removed
[ ! -e /dev/shale/$VOL ] && pass link-removed || fail link-removed
! shale list | grep -q "^$VOL " && pass list-empty-after-del || fail list-empty-after-del
if shale del $VOL >/dev/null 2>&1; then fail del-unknown-refused; else pass del-unknown-refused; fi

# Data written through the device is in the volume: attach it again.
DEV4=$(shale add $VOL $ADD_BACKING) || die re-add
mkdir -p /mnt/w
step mount-again mount -t ext4 -o ro "$DEV4" /mnt/w
step verify-after-readd sh -c 'cd /mnt/w && sha256sum -c /data/sums'
umount /mnt/w
step del-all shale del --all --timeout 60
[ -z "$(ls /sys/class/ublk-char 2>/dev/null)" ] && pass no-devices-left || fail no-devices-left
echo ALL-STEPS-DONE
