#!/usr/bin/env bash
# Start or stop a local S3 server (moto) for manual use with shale.
#
#   tools/s3-server.sh start [PORT] [BUCKET]   # default: a free port, bucket "shale"
#   tools/s3-server.sh status
#   tools/s3-server.sh stop
#
# The server keeps objects in memory and accepts any credentials. State (pid,
# port, log) lives in $SHALE_S3_STATE (default /tmp/shale-s3-server).
set -euo pipefail

state="${SHALE_S3_STATE:-/tmp/shale-s3-server}"
mkdir -p "$state"

die() { echo "s3-server: $*" >&2; exit 1; }

running() { [[ -f "$state/pid" ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

http_code() { # METHOD URL
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[2], method=sys.argv[1])
try:
    print(urllib.request.urlopen(req, timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
PY
}

start() {
  local port="${1:-}" bucket="${2:-shale}"
  running && die "already running (pid $(cat "$state/pid"), $(cat "$state/endpoint"))"
  command -v moto_server >/dev/null || die "moto_server not on PATH; pip install 'moto[server]'"
  [[ -n "$port" ]] || port="$(free_port)"
  local endpoint="http://127.0.0.1:$port"
  py="$(dirname "$(command -v moto_server)")/python3"; [ -x "$py" ] || py=python3
  # Serialized requests: moto alone races on conditional writes (see the script).
  nohup "$py" "$(dirname "$0")/moto-serial.py" 127.0.0.1 "$port" >"$state/log" 2>&1 &
  echo $! >"$state/pid"
  echo "$endpoint" >"$state/endpoint"
  for _ in $(seq 1 300); do
    if [[ "$(http_code PUT "$endpoint/$bucket")" == 200 ]]; then
      cat <<MSG
S3 server running: $endpoint (pid $(cat "$state/pid"), log $state/log)
bucket: $bucket
environment: export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
shale config:
  store:
    type: s3
    bucket: $bucket
    endpoint: $endpoint
    force_path_style: true
MSG
      return 0
    fi
    running || die "moto_server exited; see $state/log"
    sleep 0.1
  done
  die "moto_server did not answer on $endpoint; see $state/log"
}

stop() {
  if running; then
    kill "$(cat "$state/pid")"
    echo "stopped $(cat "$state/endpoint")"
  else
    echo "not running"
  fi
  rm -f "$state/pid" "$state/endpoint"
}

status() {
  if running; then echo "running: $(cat "$state/endpoint") (pid $(cat "$state/pid"))"; else echo "not running"; exit 1; fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start [PORT] [BUCKET] | status | stop" ;;
esac
