# Shared pieces of the VM harnesses (run.sh, power-loss.sh): prerequisites,
# the guest's initramfs and the qemu command line. POSIX sh; source it with
# HERE set to tools/vm.

vm_need() {
    command -v "$1" >/dev/null 2>&1 || { echo "vm: missing $1 ($2)" >&2; exit 2; }
}

# Check the host tools every harness needs.
vm_check_tools() {
    vm_need qemu-system-x86_64 "apt-get install qemu-system-x86"
    vm_need cpio "apt-get install cpio"
    vm_need xz "apt-get install xz-utils"
    [ -x /bin/busybox ] || { echo "vm: missing /bin/busybox (apt-get install busybox-static)" >&2; exit 2; }
}

# vm_root_init ROOT: the directory tree of the guest with busybox in it.
vm_root_init() {
    mkdir -p "$1/bin" "$1/sbin" "$1/lib" "$1/lib64" "$1/usr/bin" "$1/etc" "$1/proc" "$1/sys" \
        "$1/dev" "$1/run" "$1/tmp" "$1/mnt" "$1/data"
    cp /bin/busybox "$1/bin/busybox"
}

# vm_add_bin ROOT SRC [NAME]: copy a binary into ROOT/usr/bin (as NAME,
# default its own name) with the shared libraries it needs (same paths as
# on the host).
vm_add_bin() {
    _root=$1
    _src=$2
    _dst=$_root/usr/bin/${3:-$(basename "$_src")}
    cp -L "$_src" "$_dst"
    ldd "$_src" 2>/dev/null | awk '/=>/ {print $3} /^[[:space:]]*\// {print $1}' | while read -r lib; do
        [ -n "$lib" ] && [ -f "$lib" ] || continue
        mkdir -p "$_root$(dirname "$lib")"
        [ -f "$_root$lib" ] || cp -L "$lib" "$_root$lib"
    done
}

# vm_add_shale ROOT SRC [NAME]: vm_add_bin without the debug info (most of
# a build's size; the guest does not need it).
vm_add_shale() {
    vm_add_bin "$@"
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$1/usr/bin/${3:-$(basename "$2")}"
    fi
}

# vm_pack ROOT OUT: an uncompressed newc cpio of ROOT.
vm_pack() {
    (cd "$1" && find . | cpio -o -H newc --quiet > "$2")
}
