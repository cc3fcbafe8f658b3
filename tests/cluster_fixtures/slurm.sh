#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (Debian, as root), for tests/test_slurm.py and for trying
# `python -m detox.train -m hydra/launcher=slurm ...` by hand (docs/cluster.md, "Slurm with submitit"):
#
#   sudo tests/cluster_fixtures/slurm.sh start [STATE_DIR]   # prints SLURM_CONF=STATE_DIR/slurm.conf when ready
#   export SLURM_CONF=STATE_DIR/slurm.conf                    # sbatch/sinfo/squeue/scontrol use this cluster
#   sudo tests/cluster_fixtures/slurm.sh stop [STATE_DIR]    # kills what start started, removes STATE_DIR
#
# STATE_DIR defaults to /tmp/detox-slurm. start installs Debian's slurm-wlm and munge when missing, then runs a
# private munged (its own key and socket in /tmp/detox-munge.*, linked as STATE_DIR/munge: the munge user must
# reach it, and STATE_DIR may sit in a folder only root can enter), slurmctld and slurmd, all configured by
# STATE_DIR's slurm.conf through SLURM_CONF: nothing under /etc is written, and a system munged/Slurm, if any,
# is left alone.
# No systemd is needed (daemons are started directly, as in a container). No slurmdbd: accounting_storage/none,
# so `sacct` does not work; finished jobs stay visible to `scontrol show job` for MinJobAge (1 h) and are
# appended to STATE_DIR/jobcomp.log (jobcomp/filetxt) with their final state.
# Ports: DETOX_SLURMCTLD_PORT (6817) and DETOX_SLURMD_PORT (6818).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2; }
die() { echo "slurm.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] && [ $# -le 2 ] || usage
action=$1
dir=${2:-/tmp/detox-slurm}
case $dir in /*) ;; *) dir="$PWD/$dir" ;; esac
conf="$dir/slurm.conf"

[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their user; munged runs as the munge user)"

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  # the package lists are usually fresh enough; update only when that is not so
  apt-get install -y -q slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

# the pid in FILE, if that process is alive
live_pid() { local p; p=$(cat "$1" 2>/dev/null) || return 1; [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"; }

stop_pidfile() {  # SIGTERM, then SIGKILL after 10 s, the daemon named by a pid file
  local p i
  p=$(live_pid "$1") || return 0
  kill "$p" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
}

start() {
  install_packages
  if [ -e "$conf" ] && live_pid "$dir/slurmctld.pid" >/dev/null; then
    die "a cluster is already running from $dir (stop it first: $0 stop $dir)"
  fi
  rm -rf "$dir"
  mkdir -p "$dir"/state "$dir"/spool
  chmod 755 "$dir"

  # munge: a private key and socket, owned by the munge user (munged refuses keys and folders others can write)
  local m
  m=$(mktemp -d /tmp/detox-munge.XXXXXX)
  ln -s "$m" "$dir/munge"
  dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$m"
  chmod 711 "$m"  # munged wants its socket's folder searchable by every user (job steps run as the job's user)
  chmod 400 "$m/munge.key"
  runuser -u munge -- munged --socket="$m/munge.socket" --key-file="$m/munge.key" --pid-file="$m/munged.pid" \
    --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || die "munged did not start (see $m/munged.log)"

  # the node as slurmd sees it: CPUs, sockets, cores, threads, RealMemory of this machine
  local host node
  host=$(hostname -s)
  node=$(slurmd -C | head -1)
  case $node in NodeName=*) ;; *) die "slurmd -C did not describe this node: $node" ;; esac
  node=${node#NodeName=* }
  cat > "$conf" <<EOF
# written by tests/cluster_fixtures/slurm.sh: one node, this machine
ClusterName=detox
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${DETOX_SLURMCTLD_PORT:-6817}
SlurmdPort=${DETOX_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again cred_expire + 1 s later (default 120 s; 10 keeps tests short)
AuthInfo=socket=$m/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# no cgroups (a container has no cgroup delegation): processes tracked by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/linux
# no slurmdbd: no sacct; finished jobs are kept in slurmctld for MinJobAge s and logged by jobcomp/filetxt
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
MinJobAge=3600
ReturnToService=2
# scancel / scontrol requeue send SIGTERM (which a submitit job ignores), then SIGKILL after KillWait (default 30 s)
KillWait=5
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$conf"
  slurmctld -c || die "slurmctld did not start (see $dir/slurmctld.log)"
  slurmd -N "$host" || die "slurmd did not start (see $dir/slurmd.log)"

  local i state=""
  for i in $(seq 120); do
    state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    die "node $host is '${state:-not reported}' after 60 s, not idle (logs above; stop with: $0 stop $dir)"
  fi
  echo "SLURM_CONF=$conf"
}

stop() {
  if [ -e "$conf" ]; then
    export SLURM_CONF="$conf"
    local jobs=""
    if live_pid "$dir/slurmctld.pid" >/dev/null; then jobs=$(squeue -h -o %i 2>/dev/null || true); fi
    # shellcheck disable=SC2086 # one word per job id
    if [ -n "$jobs" ]; then scancel $jobs 2>/dev/null || true; sleep 1; fi
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  local m
  if m=$(readlink "$dir/munge"); then
    stop_pidfile "$m/munged.pid"
    case $m in /tmp/detox-munge.*) rm -rf "$m" ;; esac
  fi
  # job steps of this cluster (slurmstepd inherits SLURM_CONF from our slurmd), if any outlived slurmd
  local p
  for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
    if grep -qsF "SLURM_CONF=$conf" "/proc/$p/environ"; then kill -9 "$p" 2>/dev/null || true; fi
  done
  rm -rf "$dir"
}

case $action in
  start) start ;;
  stop) stop ;;
  status) export SLURM_CONF="$conf"; sinfo; squeue ;;
  *) usage ;;
esac
