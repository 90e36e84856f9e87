#!/usr/bin/env bash
# Starts the system: afsd serving ./demo/export on 127.0.0.1:7000 (state in
# ./demo/state) and venus mounting it on ./demo/mnt (cache in ./demo/cache).
# Ctrl-C stops both. Run `cargo build --workspace` first.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${BIN:-target/debug}
DEMO=${DEMO:-demo}
LISTEN=${LISTEN:-127.0.0.1:7000}
mkdir -p "$DEMO/export" "$DEMO/state" "$DEMO/mnt" "$DEMO/cache"

"$BIN/afsd" serve --export "$DEMO/export" --state "$DEMO/state" --listen "$LISTEN" &
AFSD=$!
for _ in $(seq 100); do [ -f "$DEMO/state/afsd.addr" ] && [ -f "$DEMO/state/afs.key" ] && break; sleep 0.1; done
"$BIN/venus" mount "$DEMO/mnt" --server "$LISTEN" --key "$DEMO/state/afs.key" --cache "$DEMO/cache" &
VENUS=$!
stop() {
    kill -TERM "$VENUS" 2>/dev/null || true
    wait "$VENUS" 2>/dev/null || true
    kill -TERM "$AFSD" 2>/dev/null || true
    wait "$AFSD" 2>/dev/null || true
}
trap stop INT TERM EXIT
echo "afs: $DEMO/export served on $LISTEN, mounted on $DEMO/mnt (Ctrl-C to stop)"
echo "     try: ls $DEMO/mnt; target/debug/venus status --cache $DEMO/cache"
wait "$VENUS"
