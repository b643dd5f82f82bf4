# Sourced by the S3 benchmarks (tools/bench-cold-read.sh,
# tools/bench-s3-destage.sh): a work directory with a moto server in it.
#
# `bench_s3_start NAME` makes $DIR (under $BENCH_DIR, default /var/tmp),
# starts moto there, cds into $DIR, sets $ENDPOINT and the AWS variables
# boto3 and shale need. At exit the server processes named by $PID and
# $SAMPLER (if set) are stopped, then moto, then $DIR is removed unless
# KEEP is set. `s3_store_yaml` prints the data_dir and store part of a
# shale config for that server.

bench_s3_cleanup() {
    [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null || true
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    "$repo/tools/s3-server.sh" stop >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] && { echo "kept $DIR" >&2; return; }
    rm -rf "$DIR"
}

bench_s3_start() {
    DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/shale-$1.XXXXXX")
    export SHALE_S3_STATE=$DIR/s3
    trap bench_s3_cleanup EXIT
    cd "$DIR"
    "$repo/tools/s3-server.sh" start >/dev/null
    ENDPOINT=$(cat "$SHALE_S3_STATE/endpoint")
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true AWS_DEFAULT_REGION=us-east-1
}

s3_store_yaml() {
    printf 'data_dir: data\nstore:\n  type: s3\n  bucket: shale\n  endpoint: %s\n  force_path_style: true\n' "$ENDPOINT"
}
