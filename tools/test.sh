#!/usr/bin/env bash
# Run every test lane of shale: one release build of all targets, then all
# tests (unit, store conformance against a real S3 server started by the
# tests themselves, NBD with real clients, crash tests including 50 kill -9
# cycles of `shale nbd serve`, S3 and local disk faults), then a short soak
# (tools/soak.sh), then the VM harness for the real kernel ublk
# path if it is present, then the power-loss lane (power cuts of a VM).
#
# Installs nothing (.ci/run does that). Uses CARGO_TARGET_DIR if set.
# With CI=true, tests treat a missing prerequisite as a failure, not a skip.
# Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

step() { printf '\n=== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step "cargo build --release --all-targets"
cargo build --release --all-targets

# A hung test must fail this lane with its name, not eat CI's whole budget:
# the harness names a test running for over 60 s, and the lane is stopped
# after SHALE_TEST_TIMEOUT seconds (default 1800; a run takes ~10 minutes).
test_timeout="${SHALE_TEST_TIMEOUT:-1800}"
step "cargo test --release --no-fail-fast (stopped after ${test_timeout} s)"
if timeout --kill-after=30 "$test_timeout" cargo test --release --no-fail-fast; then
    :
else
    status=$?
    if [[ $status == 124 || $status == 137 ]]; then
        echo "cargo test did not finish in ${test_timeout} s: a test hangs (see 'has been running for over 60 seconds' above)" >&2
    fi
    exit "$status"
fi

# The soak in its short form (tools/soak.sh: SOAK_SECS, default 240 s):
# fio verify on two volumes over NBD, live snapshots, deletes, clone +
# flatten, a kill -9 about every minute, S3 faults through shale-faultproxy.
step "tools/soak.sh $target_dir/release (${SOAK_SECS:-240} s)"
tools/soak.sh "$target_dir/release"

vm_runner=tools/vm/run.sh
if [[ -x "$vm_runner" ]]; then
    step "$vm_runner $target_dir/release/shale"
    "$vm_runner" "$target_dir/release/shale"
else
    step "skipping the VM (kernel ublk) lane: $vm_runner is not present"
fi

# Power cuts in the VM (docs/crash-testing.md); SHALE_POWER_CYCLES=N for a
# long run. The host kill -9 lane (tests/crash_kill_nbd.rs) ran above.
power_runner=tools/vm/power-loss.sh
step "$power_runner $target_dir/release/shale (${SHALE_POWER_CYCLES:-6} power cuts)"
"$power_runner" "$target_dir/release/shale"

step "all test lanes passed"
