#!/bin/sh
# Fetch the Debian bookworm-backports cloud kernel (it ships ublk_drv as a module)
# into a cache directory, without touching the system's apt sources.
# Usage: tools/vm/fetch-kernel.sh [CACHE_DIR]
# Prints the directory holding `vmlinuz`, `ublk_drv.ko` and `virtio_blk.ko`
# (the power-loss lane's guest disk) on its last line.
# SHALE_VM_KERNEL_PKG / SHALE_VM_KERNEL_VERSION override the pinned package and
# version (default: linux-image-6.12.95+deb12-cloud-amd64 6.12.95-1~bpo12+1).
set -eu

DEFAULT_CACHE=/var/cache/shale-vm
if ! mkdir -p "$DEFAULT_CACHE" 2>/dev/null || [ ! -w "$DEFAULT_CACHE" ]; then
    DEFAULT_CACHE=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}/shale-vm
fi
CACHE=${1:-${SHALE_VM_CACHE:-$DEFAULT_CACHE}}
MIRROR=${SHALE_VM_MIRROR:-http://deb.debian.org/debian}
PKG=${SHALE_VM_KERNEL_PKG:-linux-image-6.12.95+deb12-cloud-amd64}

mkdir -p "$CACHE"
KDIR="$CACHE/kernel"
if [ -f "$KDIR/vmlinuz" ] && [ -f "$KDIR/ublk_drv.ko" ] && [ -f "$KDIR/virtio_blk.ko" ]; then
    echo "$KDIR"
    exit 0
fi

APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc/preferences.d" "$APT/etc/apt.conf.d"
echo "deb $MIRROR bookworm-backports main" > "$APT/etc/sources.list"
set -- -o Dir::Etc::sourcelist="$APT/etc/sources.list" \
    -o Dir::Etc::sourceparts=- \
    -o Dir::Etc::preferencesparts="$APT/etc/preferences.d" \
    -o Dir::State::Lists="$APT/lists" \
    -o Dir::Cache="$APT/cache" \
    -o APT::Get::List-Cleanup=0 \
    -o APT::Sandbox::User=root
apt-get "$@" update >&2

if [ -n "${SHALE_VM_KERNEL_VERSION:-}" ]; then
    VER=$SHALE_VM_KERNEL_VERSION
elif [ -f "$CACHE/kernel-version" ]; then
    VER=$(cat "$CACHE/kernel-version")
elif [ "$PKG" = "linux-image-6.12.95+deb12-cloud-amd64" ]; then
    VER=6.12.95-1~bpo12+1
else
    VER=$(apt-cache "$@" policy "$PKG" | awk '/Candidate:/ {print $2}')
fi
if [ -z "$VER" ] || [ "$VER" = "(none)" ]; then
    echo "fetch-kernel: package $PKG not found in $MIRROR bookworm-backports" >&2
    exit 1
fi
echo "$VER" > "$CACHE/kernel-version"

DL="$CACHE/download"
mkdir -p "$DL"
(cd "$DL" && apt-get "$@" download "$PKG=$VER" >&2)
DEB=$(ls "$DL"/*.deb | head -n 1)
rm -rf "$CACHE/unpack"
dpkg-deb -x "$DEB" "$CACHE/unpack"

mkdir -p "$KDIR.tmp"
cp "$CACHE"/unpack/boot/vmlinuz-* "$KDIR.tmp/vmlinuz"
# Modules the guests load with insmod (the kernel has no modules.dep in the
# initramfs; neither module needs another one).
for name in ublk_drv virtio_blk; do
    MOD=$(find "$CACHE/unpack/lib/modules" -name "$name.ko*" | head -n 1)
    [ -n "$MOD" ] || { echo "fetch-kernel: $name.ko not in $PKG" >&2; exit 1; }
    case "$MOD" in
        *.xz) xz -dc "$MOD" > "$KDIR.tmp/$name.ko" ;;
        *) cp "$MOD" "$KDIR.tmp/$name.ko" ;;
    esac
done
echo "$PKG=$VER" > "$KDIR.tmp/package"
rm -rf "$CACHE/unpack" "$KDIR"
mv "$KDIR.tmp" "$KDIR"
echo "$KDIR"
