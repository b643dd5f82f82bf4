#!/usr/bin/env bash
# Check the systemd units offline: `systemd-analyze security` exposure must
# stay at or below the targets (NBD unit 3.0, ublk unit 5.0). Prints both
# figures; exits non-zero if a unit is above its target.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp systemd/shale-nbd.service "$work/"
cp systemd/shale@.service "$work/shale@data.service"
status=0
for pair in shale-nbd.service:3.0 shale@data.service:5.0; do
    unit=${pair%%:*}
    limit=${pair##*:}
    line=$(cd "$work" && systemd-analyze security --offline=true "./$unit" 2>&1 | tail -n 1)
    level=$(grep -o 'level for [^:]*: [0-9.]*' <<<"$line" | grep -o '[0-9.]*$')
    echo "$unit: exposure $level (target <= $limit)"
    if [[ -z "$level" ]] || awk -v a="$level" -v b="$limit" 'BEGIN { exit !(a > b) }'; then
        echo "FAIL: $unit: $line" >&2
        status=1
    fi
done
exit $status
