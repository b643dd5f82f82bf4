#!/usr/bin/env bash
# The main job on the embedded default store (a local directory), no S3
# account needed: build shale, keep all state under ./shale-data, create a
# volume and show it. Safe to re-run: it starts from a clean ./shale-data.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
work="${SHALE_DEMO_DIR:-$PWD/shale-data}"

echo "== building shale (release)"
(cd "$repo" && cargo build --release --bin shale)
shale="$target_dir/release/shale"

echo "== fresh state in $work"
rm -rf "$work"
mkdir -p "$work"
# data_dir "." is relative to the config file: everything stays in $work,
# and the object store defaults to $work/store.
printf 'data_dir: .\n' > "$work/shale.yaml"
export SHALE_CONFIG="$work/shale.yaml"

echo "== effective configuration"
"$shale" config show

echo "== create a 256 MiB thin volume"
"$shale" volume create demo --size 256MiB
"$shale" volume list
"$shale" volume info demo

echo "== done: state is in $work (config $SHALE_CONFIG)"
