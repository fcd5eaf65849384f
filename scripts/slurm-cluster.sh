#!/usr/bin/env bash
# slurm-cluster.sh: a private SLURM "cluster" of N nodes on this one machine, for tests.
#
#   scripts/slurm-cluster.sh start  [--nodes N] [--dir DIR]   start it (no-op when running)
#   scripts/slurm-cluster.sh stop   [--dir DIR]                stop what start started
#   scripts/slurm-cluster.sh status [--dir DIR]                exit 0 when up, 1 when down
#   scripts/slurm-cluster.sh env    [--dir DIR]                `export SLURM_CONF=...` to eval
#
# Debian's munge, slurmctld and slurmd (22.05) run without systemd, everything they write under
# DIR (default build/slurm): a private munged (own key; its socket in /run/tl-slurm-NNNNN,
# since munged wants every directory above it searchable), one slurmctld and N slurmd.
# Each slurmd runs in its own network namespace, joined to a bridge by a veth pair, so every
# node has its own address (10.X.Y.11, .12, ...; the controller is 10.X.Y.1) and traffic
# between nodes really crosses addresses. Each slurmd also gets a private mount namespace in
# which DIR/hosts is bind-mounted over /etc/hosts, so that it and every job step it starts
# resolve the node names (nothing under /etc is written; `ip netns exec` is not used because
# it remounts /sys, hiding the cgroup mounts slurmd needs). The nodes are called tl-n01,
# tl-n02, ... (a dash and zero padding, which host-list parsers get wrong).
#
# Names, ports and the subnet are derived from DIR's absolute path, so two checkouts (or a test
# cluster next to a manual one) never collide: netns tlNNNNN-nK, bridge tlbNNNNN, ports
# 12000-19999, subnet 10.214-10.245.*.0/24; a subnet already routed here is refused.
# Nothing reads the system's /etc/slurm: clients need SLURM_CONF=DIR/slurm.conf (see `env`).
#
# Daemons are stopped by their pid files (checked against /proc/PID/exe first), job steps by
# the process list of our namespaces; nothing is killed by name. Needs root (namespaces,
# daemons that switch users).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
[ $# -gt 0 ] && shift
nodes=4
dir=$here/build/slurm
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=${2:?--nodes takes a number}; shift 2 ;;
    --nodes=*) nodes=${1#*=}; shift ;;
    --dir) dir=${2:?--dir takes a directory}; shift 2 ;;
    --dir=*) dir=${1#*=}; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "slurm-cluster: unknown argument \"$1\" (--nodes N, --dir DIR; --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'slurm-cluster: %s\n' "$*" >&2; }
die() { printf 'slurm-cluster: error: %s\n' "$*" >&2; exit 1; }
# Exit status 3: this machine cannot run the cluster (not root, packages or namespaces missing);
# tests skip on it, and fail on any other error.
cannot() { printf 'slurm-cluster: cannot run here: %s\n' "$*" >&2; exit 3; }

case $cmd in start|stop|status|env) ;; *)
  echo "usage: scripts/slurm-cluster.sh start|stop|status|env [--nodes N] [--dir DIR] (--help)" >&2
  exit 2 ;;
esac
case $nodes in ''|*[!0-9]*) die "--nodes takes a number from 1 to 9, not \"$nodes\"" ;; esac
[ "$nodes" -ge 1 ] && [ "$nodes" -le 9 ] || die "--nodes takes a number from 1 to 9, not $nodes"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf

# Everything that must not collide between clusters, from one hash of DIR.
h=$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
tag=$(printf '%05d' $((h % 100000)))
bridge=tlb$tag
netns_prefix=tl$tag-n
port_base=$((12000 + (h / 100000 % 800) * 10))   # controller; slurmd K listens on base+K
net=10.$((214 + h / 80000000 % 32)).$((h / 100 % 250 + 1))
ctl_addr=$net.1
ctl_host=$(hostname -s)
# munged wants every directory above its socket searchable by all: not DIR's, which may sit
# in a private home or tmp directory.
sock_dir=/run/tl-slurm-$tag

node_name() { printf 'tl-n%02d' "$1"; }
node_ns() { printf '%s%d' "$netns_prefix" "$1"; }
node_addr() { printf '%s.%d' "$net" $((10 + $1)); }

export SLURM_CONF=$conf

# ---------------------------------------------------------------------------------------------
# Processes we started: pid files, checked against the executable before a signal is sent
# ---------------------------------------------------------------------------------------------

# pid_of FILE EXE: prints the pid in FILE when that process is alive and runs EXE.
pid_of() {
  local f=$1 exe=$2 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' < "$f")
  [ -n "$pid" ] && [ -e "/proc/$pid" ] || return 1
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$exe")" ] || return 1
  printf '%s' "$pid"
}

# stop_pids (FILE EXE NAME)...: SIGTERM to each live one at once, SIGKILL to those still alive
# after 5 s; removes the pid files.
stop_pids() {
  local pids=() names=() pid i k
  while [ $# -ge 3 ]; do
    if pid=$(pid_of "$1" "$2"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$3")
    fi
    rm -f "$1"
    shift 3
  done
  for i in $(seq 50); do
    for k in "${!pids[@]}"; do [ -e "/proc/${pids[$k]}" ] || unset "pids[$k]"; done
    [ ${#pids[@]} -eq 0 ] && return 0
    sleep 0.1
  done
  for k in "${!pids[@]}"; do
    say "${names[$k]} (pid ${pids[$k]}) ignored SIGTERM for 5 s: SIGKILL"
    kill -KILL "${pids[$k]}" 2>/dev/null || true
  done
}

munged_bin=/usr/sbin/munged
slurmctld_bin=/usr/sbin/slurmctld
slurmd_bin=/usr/sbin/slurmd

running_nodes() { [ -s "$dir/nodes" ] && cat "$dir/nodes" || echo 0; }

# all_up: munged, slurmctld and every slurmd of the recorded node count are alive.
all_up() {
  local n k
  n=$(running_nodes)
  [ "$n" -ge 1 ] || return 1
  pid_of "$dir/munge/munged.pid" "$munged_bin" >/dev/null || return 1
  pid_of "$dir/run/slurmctld.pid" "$slurmctld_bin" >/dev/null || return 1
  for k in $(seq "$n"); do
    pid_of "$dir/run/slurmd-$(node_name "$k").pid" "$slurmd_bin" >/dev/null || return 1
  done
}

do_stop() {
  local n k ns pid
  n=$(running_nodes)
  [ "$n" -ge 1 ] || n=9   # no record: look for every namespace this DIR could have made
  if pid_of "$dir/run/slurmctld.pid" "$slurmctld_bin" >/dev/null && [ -f "$conf" ]; then
    # Cancel the jobs first, so that slurmd tears their steps down while it still can.
    local ids
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$ids" ] || timeout 10 scancel $ids 2>/dev/null || true
  fi
  local args=()
  for k in $(seq "$n"); do
    args+=("$dir/run/slurmd-$(node_name "$k").pid" "$slurmd_bin" "slurmd $(node_name "$k")")
  done
  stop_pids "${args[@]}"
  stop_pids "$dir/run/slurmctld.pid" "$slurmctld_bin" slurmctld
  stop_pids "$dir/munge/munged.pid" "$munged_bin" munged
  rm -rf "$sock_dir"
  # What is left in our namespaces is ours (job steps whose slurmd is gone).
  for k in $(seq "$n"); do
    ns=$(node_ns "$k")
    ip link del "tlv$tag-$k" 2>/dev/null || true
    ip netns list 2>/dev/null | awk "{print \$1}" | grep -qx "$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  rm -f "$dir/nodes"
}

# ---------------------------------------------------------------------------------------------
# Start
# ---------------------------------------------------------------------------------------------

preflight() {
  [ "$(id -u)" = 0 ] || cannot "needs root (network namespaces, slurmd); run as root or with sudo"
  local missing=() p
  for p in munge slurmctld slurmd slurm-client; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] || cannot "packages missing: ${missing[*]}; install them with:
  apt-get install -y --no-install-recommends ${missing[*]}   (or run scripts/bootstrap.sh)"
  command -v ip >/dev/null || cannot "the ip command is missing: apt-get install -y iproute2"
}

check_subnet() {
  if ip -4 route show | grep -q "^$net\.0/24"; then
    die "the subnet $net.0/24 derived from $dir is already routed on this machine (another cluster
  with the same hash, or a real network): use another --dir"
  fi
}

write_config() {
  mkdir -p "$dir/state" "$dir/run" "$dir/log" "$dir/spool" "$dir/jobs"
  {
    echo "# written by scripts/slurm-cluster.sh; private to $dir"
    echo "ClusterName=tl$tag"
    echo "SlurmctldHost=$ctl_host($ctl_addr)"
    echo "SlurmctldPort=$port_base"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire (default 120 s) is also how long SLURM holds a requeued job before it may
    # start again (EligibleTime = requeue + cred_expire + 1); 10 s keeps the requeue test short
    # and still leaves a loaded machine time to launch a step on its credential.
    echo "AuthInfo=socket=$sock_dir/munge.socket,cred_expire=10"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmdSpoolDir=$dir/spool/%n"
    echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
    echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    # No cgroups or systemd here: track processes by parentage, bind nothing.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    # Nodes share this machine's cores: take the node definitions below as they are.
    echo "SlurmdParameters=config_overrides"
    # Quick teardown: 2 s between SIGTERM and SIGKILL.
    echo "KillWait=2"
    # A job that becomes eligible by time (a requeued one) starts at the next scheduling pass:
    # every second here instead of every 30 s (backfill) / 60 s (main loop).
    echo "SchedulerParameters=bf_interval=1,sched_interval=1"
    echo "MinJobAge=600"
    local k
    for k in $(seq "$nodes"); do
      echo "NodeName=$(node_name "$k") NodeHostName=$(node_name "$k") NodeAddr=$(node_addr "$k") Port=$((port_base + k)) CPUs=$(nproc) State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$conf"
}

start_munge() {
  mkdir -p "$dir/munge/key" "$sock_dir"
  chmod 700 "$dir/munge/key"
  chmod 755 "$sock_dir"
  if [ ! -s "$dir/munge/key/munge.key" ]; then
    head -c 1024 /dev/urandom > "$dir/munge/key/munge.key"
    chmod 400 "$dir/munge/key/munge.key"
  fi
  "$munged_bin" --socket="$sock_dir/munge.socket" --key-file="$dir/munge/key/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/key/munged.log" \
    --seed-file="$dir/munge/key/munged.seed" \
    || die "munged did not start; see $dir/munge/key/munged.log"
  munge -S "$sock_dir/munge.socket" -n | unmunge -S "$sock_dir/munge.socket" >/dev/null \
    || die "munged started but a credential does not round-trip; see $dir/munge/key/munged.log"
}

start_network() {
  ip link add "$bridge" type bridge || cannot "could not create the bridge $bridge (ip link add;
  a container without CAP_NET_ADMIN or the bridge module cannot)"
  ip addr add "$ctl_addr/24" dev "$bridge"
  ip link set "$bridge" up
  local k ns j
  {
    echo "127.0.0.1 localhost"
    echo "$ctl_addr $ctl_host"
    for j in $(seq "$nodes"); do echo "$(node_addr "$j") $(node_name "$j")"; done
  } > "$dir/hosts"
  for k in $(seq "$nodes"); do
    ns=$(node_ns "$k")
    ip netns add "$ns" || cannot "could not create the network namespace $ns (ip netns add;
  a container without CAP_SYS_ADMIN cannot)"
    ip link add "tlv$tag-$k" type veth peer name eth0 netns "$ns"
    ip link set "tlv$tag-$k" master "$bridge"
    ip link set "tlv$tag-$k" up
    ip netns exec "$ns" ip addr add "$(node_addr "$k")/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
  done
}

# wait_idle SECONDS: until sinfo shows every node idle.
wait_idle() {
  local i states
  for i in $(seq $(($1 * 5))); do
    states=$(sinfo -h -N -o '%t' 2>/dev/null | sort | uniq -c | tr -s ' ' || true)
    if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" = "$nodes" ]; then
      return 0
    fi
    sleep 0.2
  done
  die "the nodes are not idle after $1 s (sinfo states:${states:- none}); logs in $dir/log"
}

do_start() {
  preflight
  if all_up; then
    [ "$(running_nodes)" = "$nodes" ] || die "a cluster of $(running_nodes) nodes is running in $dir; stop it first"
    say "already running: $nodes nodes, SLURM_CONF=$conf"
    return 0
  fi
  do_stop   # whatever a killed run left behind
  check_subnet
  # A start that fails half-way leaves nothing running (the logs stay).
  trap 'say "start failed: stopping what was started"; do_stop' EXIT
  write_config
  start_munge
  echo "$nodes" > "$dir/nodes"
  start_network
  "$slurmctld_bin" -c -f "$conf" || die "slurmctld did not start; see $dir/log/slurmctld.log"
  local k
  for k in $(seq "$nodes"); do
    mkdir -p "$dir/spool/$(node_name "$k")"
    unshare --mount --propagation private -- sh -c \
      'mount --bind "$1" /etc/hosts && exec nsenter --net="/run/netns/$2" "$3" -f "$4" -N "$5"' \
      sh "$dir/hosts" "$(node_ns "$k")" "$slurmd_bin" "$conf" "$(node_name "$k")" \
      || die "slurmd $(node_name "$k") did not start; see $dir/log/slurmd-$(node_name "$k").log"
  done
  wait_idle 30
  trap - EXIT
  say "running: $nodes nodes ($(node_name 1)..$(node_name "$nodes") at $(node_addr 1)..), SLURM_CONF=$conf"
}

case $cmd in
  start) do_start ;;
  stop) do_stop; say "stopped ($dir)" ;;
  status)
    if all_up; then
      sinfo -N -o '%N %t %o' 2>/dev/null || true
      exit 0
    fi
    echo "not running ($dir)"; exit 1 ;;
  env) echo "export SLURM_CONF=$conf" ;;
esac
