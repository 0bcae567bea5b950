#!/bin/bash
# HTCondor job wrapper: serve on free ports, publish the address once ready, unpublish at exit.
# Arguments: MODEL_REPOSITORY SERVER_LIST [more `arrowinfer serve` flags]
set -euo pipefail
models="$1" list="$2"
shift 2

# HTCondor may run several jobs per machine: port 0 lets each server pick free ports, and
# the "serving ... on grpc://0.0.0.0:PORT" line (printed once the models are loaded) says which.
# Only the Flight address is published: KServe gRPC and HTTP are off (their default ports would
# collide between jobs).
out="$(mktemp)"
arrowinfer serve "$models" --host 0.0.0.0 --port 0 --kserve-port -1 --http-port -1 \
    --metrics-port 0 "$@" >"$out" &
pid=$!
url=""
unpublish() {
    [ -n "$url" ] && (flock 9; sed -i "\|^${url}\$|d" "$list") 9>>"${list}.lock"
    return 0
}
trap 'unpublish; kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT

for _ in $(seq 600); do
    port="$(sed -n 's|^arrowinfer serving .* on grpc://[^ ]*:\([0-9]*\)$|\1|p' "$out")"
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || { echo "arrowinfer exited before it was ready" >&2; exit 1; }
    sleep 1
done
[ -n "$port" ] || { echo "arrowinfer not ready after 600 s" >&2; kill -TERM "$pid"; exit 1; }

url="grpc://$(hostname -f):${port}"
(flock 9; echo "$url" >>"$list") 9>>"${list}.lock"
echo "arrowinfer ready at $url (listed in $list)"
wait "$pid" || true
unpublish
