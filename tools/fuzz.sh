#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each and fail
# on the first crash, leak or timeout. The committed seeds in
# fuzz/corpus/<target>/ are read, never modified; new inputs go to a scratch
# directory. A crashing input is kept in fuzz/artifacts/<target>/.
#
#   tools/fuzz.sh            # 30 s per target (.ci/run passes 20)
#   tools/fuzz.sh 600        # the long run: 10 minutes per target
#   tools/fuzz.sh 60 nbd_session wal_replay
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes
# -Z flags (sanitizer, coverage), so the default toolchain runs with
# RUSTC_BOOTSTRAP=1: no nightly is needed, and CI and a developer build
# the same way. SHALE_FUZZ_TOOLCHAIN=nightly uses a nightly instead.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${1:-30}"
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 1
fi
toolchain=()
if [[ -n "${SHALE_FUZZ_TOOLCHAIN:-}" ]]; then
    toolchain=("+$SHALE_FUZZ_TOOLCHAIN")
else
    export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi

echo "=== building ${#targets[@]} fuzz targets"
cargo "${toolchain[@]}" fuzz build -O

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
summary=()
for t in "${targets[@]}"; do
    echo "=== fuzzing $t for ${seconds}s"
    mkdir -p "$scratch/$t" "fuzz/corpus/$t"
    log="$scratch/$t.log"
    if ! cargo "${toolchain[@]}" fuzz run -O "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAIL: fuzz target $t found a problem (input kept under fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    summary+=("$t: $runs executions, ${cov:-cov: ?}, no crash")
done
echo "=== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
