#!/usr/bin/env bash
# The main job on the embedded default store (a local directory), no S3
# account needed: build shale, keep all state under ./shale-data, create a
# volume, write data into it through the volume engine (WAL, then chunk
# objects in the store), and read it back, including from the store alone
# after the local WAL and cache are deleted. Safe to re-run: it starts from a
# clean ./shale-data (or $SHALE_DEMO_DIR).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
work="${SHALE_DEMO_DIR:-$PWD/shale-data}"

step() { printf '\n== %s\n' "$*"; }

step "building shale (release)"
(cd "$repo" && cargo build --release --bin shale)
shale="$target_dir/release/shale"

step "fresh state in $work"
rm -rf "$work"
mkdir -p "$work"
# data_dir "." is relative to the config file: everything stays in $work,
# and the object store defaults to $work/store.
printf 'data_dir: .\n' > "$work/shale.yaml"
export SHALE_CONFIG="$work/shale.yaml"
"$shale" config show

step "create a 256 MiB thin volume"
"$shale" volume create demo --size 256MiB
"$shale" volume list

step "write 32 MiB of random data into it through the engine"
head -c $((32 << 20)) /dev/urandom > "$work/input.raw"
"$shale" volume import demo "$work/input.raw"
"$shale" volume info demo

step "read it back and compare"
"$shale" volume export demo "$work/output.raw"
cmp -n $((32 << 20)) "$work/input.raw" "$work/output.raw"
echo "first 32 MiB identical"

step "delete the local WAL and cache; read again from the object store alone"
rm -rf "$work/volumes"
"$shale" volume export demo "$work/output2.raw"
cmp -n $((32 << 20)) "$work/input.raw" "$work/output2.raw"
echo "first 32 MiB identical (from the store)"
rm -f "$work/output.raw" "$work/output2.raw"

step "done: state is in $work (config $SHALE_CONFIG)"
echo "try: SHALE_CONFIG=$SHALE_CONFIG $shale volume list"
