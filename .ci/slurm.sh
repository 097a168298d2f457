#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests that submit real jobs
# (tests/test_slurm.py). Debian/Ubuntu, as root, no systemd needed (CI containers have none).
#
#   bash .ci/slurm.sh start     # install slurm-wlm + munge if missing, configure, start, wait
#   bash .ci/slurm.sh status    # the daemons and the node (exit 0 when the node takes jobs)
#   bash .ci/slurm.sh stop      # cancel the jobs, stop what `start` started, remove its files
#
# `start` writes /etc/slurm/slurm.conf for this machine (its hostname, CPUs and memory, from
# `slurmd -C`) with one partition, BLOCKBUSTER_SLURM_PARTITION (default "debug"), and starts
# munged (unless one already answers), slurmctld and slurmd as background daemons. Their state,
# logs and pid files live in BLOCKBUSTER_SLURM_DIR (default /var/tmp/blockbuster-slurm). It is
# idempotent: a second `start` with the node up does nothing. It exits non-zero, with the reason
# and the daemons' log tails, when SLURM cannot start here. `stop` leaves the packages installed
# (the next `start` takes seconds) and never touches a slurm.conf it did not write.
set -euo pipefail

STATE=${BLOCKBUSTER_SLURM_DIR:-/var/tmp/blockbuster-slurm}
PARTITION=${BLOCKBUSTER_SLURM_PARTITION:-debug}
TIMEOUT=${BLOCKBUSTER_SLURM_TIMEOUT:-60}   # seconds to wait for the node to come up
CONF=/etc/slurm/slurm.conf
MARK="# Written by blockbuster's .ci/slurm.sh"
PACKAGES=(slurm-wlm munge)
COMMANDS=(munged munge unmunge slurmctld slurmd sinfo sbatch squeue scancel scontrol)

t0=$(date +%s)
say() { echo "slurm.sh: $* ($(( $(date +%s) - t0 )) s)"; }
starting=0
action=error
die() {
  echo "slurm.sh: $action: $*" >&2
  # Do not leave half a cluster running (the logs stay in $STATE for a look).
  if [ "$starting" = 1 ]; then starting=0; stop_daemons; fi
  exit 1
}

need_root() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"
}

missing_commands() {
  local name
  for name in "${COMMANDS[@]}"; do
    command -v "$name" >/dev/null 2>&1 || echo "$name"
  done
}

install_packages() {
  [ -z "$(missing_commands)" ] && return 0
  command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get"
  say "installing ${PACKAGES[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be stale or absent on a fresh machine: update once if install fails.
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$STATE/apt.log" 2>&1 || {
    apt-get update -qq >>"$STATE/apt.log" 2>&1 &&
      apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$STATE/apt.log" 2>&1
  } || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed"; }
  [ -z "$(missing_commands)" ] || die "still missing after install: $(missing_commands | xargs)"
  say "installed"
}

# Whether a process runs (a zombie waiting for its reaper does not).
alive() {
  local state=""
  kill -0 "$1" 2>/dev/null || return 1
  read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || return 0
  [ "$state" != Z ]
}

# The pid in a pid file, if that process is alive.
live_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

munge_answers() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_answers; then
    say "munged already running (left to whoever started it)"
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge "$STATE/munge"
  # munged runs as its own user: its pid and log files live in a directory it owns.
  runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" \
    || die "munged did not start: $(tail -n 5 "$STATE/munge/munged.log" 2>/dev/null)"
  touch "$STATE/started-munged"
  for _ in $(seq 50); do munge_answers && return 0; sleep 0.1; done
  die "munged started but does not answer: $(tail -n 5 "$STATE/munge/munged.log" 2>/dev/null)"
}

write_conf() {
  local node
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: this machine has its own SLURM \
(use it, or move that file away)"
  fi
  # "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=..
  # RealMemory=..": the node exactly as slurmd will detect it (a larger value drains the node).
  node=$(slurmd -C | head -n 1)
  [[ $node == NodeName=* ]] || die "slurmd -C printed no node line: $node"
  mkdir -p "$(dirname "$CONF")"
  cat >"$CONF" <<EOF
$MARK for the blockbuster tests; \`.ci/slurm.sh stop\` removes it.
ClusterName=blockbuster
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups and no systemd in containers: track a job's processes through /proc, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# A cancelled job gets SIGTERM, then SIGKILL this many seconds later.
KillWait=5
MailProg=/bin/true
$node
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n 1; }

node_up() {
  # "idle*" (with the star) means slurmctld has not heard from slurmd yet
  case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

slurm_running() {
  live_pid "$STATE/slurmctld.pid" >/dev/null && live_pid "$STATE/slurmd.pid" >/dev/null
}

log_tails() {
  local log
  for log in "$STATE"/log/*.log "$STATE"/munge/*.log; do
    [ -f "$log" ] || continue
    echo "---- last lines of $log" >&2
    tail -n 15 "$log" >&2
  done
}

start() {
  action="cannot start SLURM"
  need_root
  if slurm_running && node_up; then
    say "already running: node $(node_state) in partition $PARTITION"
    return 0
  fi
  # Leftovers of a run that died: stop them, then start from nothing.
  [ -d "$STATE" ] && stop_daemons
  mkdir -p "$STATE/log" "$STATE/slurmctld" "$STATE/slurmd"
  starting=1
  install_packages
  start_munge
  write_conf
  slurmctld 2>>"$STATE/log/slurmctld.log" || { log_tails; die "slurmctld did not start"; }
  touch "$STATE/started-slurmctld"
  slurmd 2>>"$STATE/log/slurmd.log" || { log_tails; die "slurmd did not start"; }
  touch "$STATE/started-slurmd"
  local waited=0
  until node_up; do
    if [ "$waited" -ge "$((TIMEOUT * 10))" ]; then
      sinfo >&2 || true
      log_tails
      die "the node is not up after ${TIMEOUT} s (state: $(node_state || echo unknown))"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  starting=0
  say "node $(hostname -s) $(node_state) in partition $PARTITION"
}

pid_file() {
  if [ "$1" = munged ]; then echo "$STATE/munge/munged.pid"; else echo "$STATE/$1.pid"; fi
}

# Stop the daemons this script started, by their pid files: TERM, then KILL after 10 s.
stop_daemon() {
  local name pid pids=()
  for name in "$@"; do
    [ -f "$STATE/started-$name" ] || continue
    if pid=$(live_pid "$(pid_file "$name")"); then
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$STATE/started-$name"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
}

stop_daemons() {
  if [ -f "$STATE/started-slurmctld" ] && live_pid "$STATE/slurmctld.pid" >/dev/null; then
    # Jobs outlive slurmd (each runs under its own slurmstepd): cancel them and let them end.
    scancel --partition="$PARTITION" 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(squeue -h -p "$PARTITION" -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  stop_daemon slurmd slurmctld
  stop_daemon munged
}

stop() {
  action="cannot stop SLURM"
  if [ ! -d "$STATE" ]; then
    say "not running"
    return 0
  fi
  need_root
  stop_daemons
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
  rm -rf "$STATE"
  say "stopped"
}

status() {
  local name pid
  for name in munged slurmctld slurmd; do
    if pid=$(live_pid "$(pid_file "$name")"); then echo "$name: running (pid $pid)"
    else echo "$name: not running (from $STATE)"; fi
  done
  if command -v sinfo >/dev/null && sinfo 2>/dev/null; then node_up; else return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
