#!/bin/bash
# peer-rclone.sh start|stop|wait SRC_DIR MOUNTPOINT
# (`wait` blocks until rclone's write-back uploads have reached SRC_DIR.)
# Benchmark peer: `rclone mount --vfs-cache-mode full` of an sftp remote that
# points at a private sshd (same mechanism as peer-sshfs.sh, own instance) on
# 127.0.0.1 serving SRC_DIR. Generated rclone.conf, cache dir, logs and keys
# live in the state dir /tmp/bench-peers/rclone-<hash>.
# Env: RCLONE_BACKEND=local forces the local-path fallback remote;
#      RCLONE_EXTRA_OPTS extra mount flags; PEER_STATE_ROOT.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib-sshd.sh"
[ $# -eq 3 ] || { echo "usage: $0 start|stop|wait SRC_DIR MOUNTPOINT" >&2; exit 2; }
cmd=$1; src=$(readlink -m "$2"); mp=$(readlink -m "$3")
st=$(peer_state_dir rclone "$mp")
backend=${RCLONE_BACKEND:-sftp}

# wait_uploads TRIES: polls rclone's rc every 0.1 s until no write-back upload
# is queued or in progress (at most TRIES polls).
wait_uploads() {
  [ -f "$st/rc.port" ] && is_mounted "$mp" || return 0
  local url n
  url="http://127.0.0.1:$(cat "$st/rc.port")/"
  for _ in $(seq 1 "$1"); do
    n=$(rclone rc --url "$url" vfs/stats 2>/dev/null | python3 -c 'import json,sys
d=json.load(sys.stdin).get("diskCache",{}); print(d.get("uploadsInProgress",0)+d.get("uploadsQueued",0))' 2>/dev/null || echo 0)
    [ "$n" = 0 ] && return 0; sleep 0.1
  done
  return 1
}

case $cmd in
start)
  need_pkg rclone rclone
  need_pkg fusermount3 fuse3
  mkdir -p "$src" "$mp" "$st/cache"
  is_mounted "$mp" && { echo "$mp already mounted" >&2; exit 1; }
  if [ "$backend" = sftp ] && sshd_start "$st"; then
    cat > "$st/rclone.conf" <<CFG
[peer]
type = sftp
host = 127.0.0.1
port = $SSHD_PORT
user = $SSHD_USER
key_file = $SSHD_KEY
shell_type = unix
md5sum_command = none
sha1sum_command = none
CFG
    remote="peer:$src"
  else
    echo "peer-rclone: WARNING: using local-path remote (no sftp)" >&2
    backend=local
    printf '[peer]\ntype = local\n' > "$st/rclone.conf"
    remote="peer:$src"
  fi
  # sanity check the remote before mounting
  rclone --config "$st/rclone.conf" lsd "$remote" >/dev/null 2>"$st/check.log" || {
    echo "rclone remote check failed:" >&2; cat "$st/check.log" >&2; sshd_stop "$st"; exit 1; }
  rcport=$(free_port); echo "$rcport" > "$st/rc.port"
  setsid rclone --config "$st/rclone.conf" mount "$remote" "$mp" \
      --vfs-cache-mode full --cache-dir "$st/cache" \
      --rc --rc-addr "127.0.0.1:$rcport" --rc-no-auth \
      --log-file "$st/rclone.log" --log-level NOTICE \
      ${RCLONE_EXTRA_OPTS:-} </dev/null >/dev/null 2>&1 &
  echo $! > "$st/rclone.pid"
  for _ in $(seq 1 100); do is_mounted "$mp" && break; sleep 0.1; done
  is_mounted "$mp" || { echo "rclone mount failed; log:" >&2; cat "$st/rclone.log" >&2;
                        kill "$(cat "$st/rclone.pid")" 2>/dev/null || true; sshd_stop "$st"; exit 1; }
  echo "$backend" > "$st/backend"
  echo "peer-rclone: $src mounted at $mp via $backend remote (rclone pid $(cat "$st/rclone.pid"), state $st)"
  ;;
stop)
  # wait (<=120 s) for write-back uploads to reach SRC_DIR before unmounting;
  # rclone 1.60 drops pending uploads on unmount (they resume on next start).
  wait_uploads 1200 || true
  do_umount "$mp"
  if [ -f "$st/rclone.pid" ]; then
    pid=$(cat "$st/rclone.pid")
    # rclone flushes pending write-back uploads before exiting after unmount
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill "$pid" 2>/dev/null || true
    rm -f "$st/rclone.pid"
    rm -rf "$st/cache"   # uploads were flushed above; next start gets a cold cache
  fi
  sshd_stop "$st"
  echo "peer-rclone: stopped $mp"
  ;;
wait)
  wait_uploads "${RCLONE_WAIT_TRIES:-6000}" || { echo "peer-rclone: uploads still pending" >&2; exit 1; }
  ;;
*) echo "usage: $0 start|stop|wait SRC_DIR MOUNTPOINT" >&2; exit 2;;
esac
