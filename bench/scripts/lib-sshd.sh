# Shared helper (sourced) for peer-sshfs.sh / peer-rclone.sh.
# Runs a PRIVATE sshd on 127.0.0.1:<high port> with host + client keys under
# a state dir. Never touches the system sshd config or service.
#   sshd_start STATE   -> sets SSHD_PORT, SSHD_KEY (client private key), SSHD_USER
#   sshd_stop  STATE   -> kills only the sshd whose pid is in STATE/sshd.pid

need_pkg() {  # need_pkg BINARY PKG...
  command -v "$1" >/dev/null 2>&1 && return 0
  local b=$1; shift
  if [ ! -f /tmp/.bench-apt-updated ]; then apt-get update -qq && touch /tmp/.bench-apt-updated; fi
  # wait for the dpkg lock instead of failing at once if another apt/dpkg runs
  DEBIAN_FRONTEND=noninteractive apt-get install -o DPkg::Lock::Timeout=300 -y -qq "$@" >/dev/null
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || { echo "cannot install $b" >&2; return 1; }
}

free_port() {
  # Below the kernel's ephemeral range (usually 32768-60999), so that no
  # outgoing connection holds the port, and not used by any TCP socket.
  local p lo hi
  read -r lo hi < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || lo=32768
  [ "$lo" -gt 21000 ] || lo=32768
  for _ in $(seq 1 50); do
    p=$(( 20000 + RANDOM % (lo - 20000) ))
    if ! ss -Htan 2>/dev/null | awk '{print $4}' | grep -qE "[:.]$p\$"; then echo "$p"; return 0; fi
  done
  return 1
}

sshd_start() {
  local st=$1
  need_pkg sshd openssh-server || return 1
  need_pkg ssh openssh-client || return 1
  mkdir -p "$st" && chmod 700 "$st"
  if [ -f "$st/sshd.pid" ] && kill -0 "$(cat "$st/sshd.pid")" 2>/dev/null; then
    SSHD_PORT=$(cat "$st/sshd.port"); SSHD_KEY=$st/client_key; SSHD_USER=$(id -un); return 0
  fi
  [ -f "$st/host_key" ]   || ssh-keygen -q -t ed25519 -N '' -f "$st/host_key"
  [ -f "$st/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$st/client_key"
  cp "$st/client_key.pub" "$st/authorized_keys"; chmod 600 "$st/authorized_keys"
  mkdir -p /run/sshd; chmod 755 /run/sshd     # privsep dir sshd insists on
  # A few attempts: a random port may be taken between the check and the
  # bind (other programs on this machine open loopback ports all the time).
  local attempt
  for attempt in 1 2 3; do
    SSHD_PORT=$(free_port) || { echo "no free port" >&2; return 1; }
    sshd_config_write "$st"
    if /usr/sbin/sshd -f "$st/sshd_config" -E "$st/sshd.log"; then
      echo "$SSHD_PORT" > "$st/sshd.port"
      for _ in $(seq 1 50); do [ -s "$st/sshd.pid" ] && break; sleep 0.1; done
      SSHD_KEY=$st/client_key; SSHD_USER=$(id -un)
      # wait (up to 30 s: the machine may be busy) until it answers
      for _ in $(seq 1 150); do
        ssh -q -p "$SSHD_PORT" -i "$SSHD_KEY" -o BatchMode=yes -o StrictHostKeyChecking=no \
            -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 "$SSHD_USER@127.0.0.1" true 2>/dev/null && return 0
        sleep 0.2
      done
      sshd_stop "$st"
    fi
    echo "private sshd on port $SSHD_PORT not answering (attempt $attempt); log:" >&2
    tail -n 5 "$st/sshd.log" >&2 2>/dev/null || true
  done
  return 1
}

sshd_config_write() {
  local st=$1
  cat > "$st/sshd_config" <<CFG
Port $SSHD_PORT
ListenAddress 127.0.0.1
HostKey $st/host_key
PidFile $st/sshd.pid
AuthorizedKeysFile $st/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
UseDNS no
Subsystem sftp internal-sftp
LogLevel ERROR
CFG
}

sshd_stop() {
  local st=$1 pid
  [ -f "$st/sshd.pid" ] || return 0
  pid=$(cat "$st/sshd.pid")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$st/sshd.pid"
}

# state dir keyed by peer name + absolute mountpoint, so stop finds it
peer_state_dir() {  # peer_state_dir NAME MOUNTPOINT
  local mp; mp=$(readlink -m "$2")
  echo "${PEER_STATE_ROOT:-/tmp/bench-peers}/$1-$(printf %s "$mp" | md5sum | cut -c1-10)"
}

is_mounted() { mountpoint -q "$1" 2>/dev/null; }

do_umount() {
  local mp=$1
  is_mounted "$mp" || return 0
  fusermount3 -u "$mp" 2>/dev/null || umount "$mp" 2>/dev/null || { sleep 1; fusermount3 -u "$mp" 2>/dev/null || umount -l "$mp"; }
}
