#!/usr/bin/env bash
# bench/run.sh -- the whole benchmark in one command (as root, on loopback):
# installs what the machine lacks (sshfs, rclone, openssh-server, fuse3, gcc,
# make, python3, a font for the plot) through apt, builds afsd, venus and the
# bench harness in release mode, then runs every workload on local disk, afs,
# sshfs and rclone and writes BENCHMARKS.md and bench/benchmarks.png.
#
# Sizes and choices: BENCH_QUICK=1 (small and fast), BENCH_RUNS, BENCH_ANDREW_RUNS,
# BENCH_PEER_RUNS, BENCH_PEER_ANDREW_RUNS, BENCH_PEER_CREATE_RUNS,
# BENCH_BIG_MIB, BENCH_SMALL_FILES, BENCH_CREATE_FILES, BENCH_ANDREW_JOBS,
# BENCH_SCALE_CLIENTS, BENCH_SCALE_SECS, BENCH_SYSTEMS (local,afs,sshfs,rclone),
# BENCH_WORKLOADS (1..8), BENCH_DIR, BENCH_OUT, BENCH_PLOT, BENCH_KEEP=1.
# See the "Benchmarks" section of README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "$(id -u)" = 0 ] || { echo "bench/run.sh: run as root (FUSE mounts, drop_caches, apt)" >&2; exit 1; }

missing=()
need() {  # need COMMAND-OR-FILE PACKAGE
  if [ "${1#/}" != "$1" ]; then [ -e "$1" ] && return 0; else command -v "$1" >/dev/null 2>&1 && return 0; fi
  missing+=("$2")
}
need sshfs sshfs
need rclone rclone
need /usr/sbin/sshd openssh-server
need ssh openssh-client
need ssh-keygen openssh-client
need fusermount3 fuse3
need gcc gcc
need make make
need python3 python3
need mountpoint util-linux
need ss iproute2
need /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf fonts-dejavu-core
apt_install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -o DPkg::Lock::Timeout=300 -y -qq --no-install-recommends "$@" >/dev/null
}
# The build needs only gcc (the linker); the rest installs while cargo
# builds: apt waits on the network and the disk, cargo on the CPU.
apt_pid= apt_log=
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/run.sh: installing ${missing[*]}" >&2
  if ! command -v gcc >/dev/null 2>&1; then
    apt_install "${missing[@]}"
  else
    apt_log=$(mktemp)
    apt_install "${missing[@]}" >"$apt_log" 2>&1 &
    apt_pid=$!
  fi
fi

t0=$(date +%s)
cargo build --release -p afsd -p venus -p bench
echo "bench/run.sh: build took $(( $(date +%s) - t0 )) s" >&2
if [ -n "$apt_pid" ]; then
  if ! wait "$apt_pid"; then
    echo "bench/run.sh: installing ${missing[*]} failed:" >&2
    cat "$apt_log" >&2
    exit 1
  fi
  echo "bench/run.sh: installs done $(( $(date +%s) - t0 )) s after the build began" >&2
  rm -f "$apt_log"
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

# A VM with virtio-balloon free page reporting hands the memory the guest
# frees back to its host; a page the guest then reuses faults in the host
# first, which makes writing into it up to 10x slower. Every cold run begins
# with drop_caches, which frees gigabytes, so each run's speed came to
# depend on how much of it had been handed back yet (a 1 GiB fetch took 0.7
# or 1.5 s on the same code). For the run, reporting is held back (a page
# order no free block has; where the module has it, a long delay) and
# restored after, even on Ctrl-C. BENCH_PAGE_REPORTING=keep leaves it alone.
pr=/sys/module/page_reporting/parameters
saved_order= saved_delay=
hold_reporting() {
  [ "${BENCH_PAGE_REPORTING:-hold}" = keep ] && return 0
  [ -w "$pr/page_reporting_order" ] || return 0
  saved_order=$(cat "$pr/page_reporting_order")
  echo 11 > "$pr/page_reporting_order" 2>/dev/null || echo 10 > "$pr/page_reporting_order" 2>/dev/null || true
  if [ -w "$pr/min_free_ms" ]; then
    saved_delay=$(cat "$pr/min_free_ms")
    echo 60000 > "$pr/min_free_ms" 2>/dev/null || true
  fi
  export BENCH_MEMORY_NOTE="free page reporting held back for the run (page_reporting_order $saved_order → $(cat "$pr/page_reporting_order")${saved_delay:+, min_free_ms $saved_delay → $(cat "$pr/min_free_ms")})"
}
restore_reporting() {
  [ -n "$saved_order" ] && echo "$saved_order" > "$pr/page_reporting_order" 2>/dev/null
  [ -n "$saved_delay" ] && echo "$saved_delay" > "$pr/min_free_ms" 2>/dev/null
  saved_order= saved_delay=
}

# On Ctrl-C, take down the peers' mounts and sshds (venus unmounts itself).
dir=${BENCH_DIR:-/var/tmp/afs-bench}
cleanup() {
  for p in sshfs rclone; do
    PEER_STATE_ROOT="$dir/peers" bash bench/scripts/peer-$p.sh stop "$dir/plain" "$dir/mnt-$p" >/dev/null 2>&1 || true
  done
  restore_reporting
}
trap 'cleanup; exit 130' INT TERM
trap restore_reporting EXIT
hold_reporting
target/release/bench "$@"
echo "bench/run.sh: done in $(( $(date +%s) - t0 )) s (build included)" >&2
