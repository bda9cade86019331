# tests/e2e/box/lib.sh - helpers shared by start.sh and stop.sh (sourced, not run).
#
# Every daemon of the box is tracked by the pid that start.sh recorded in $BOX_RUN/<name>.pid.
# A daemon counts as "ours and alive" only when that pid is a live, non-zombie process whose
# /proc/<pid>/comm is the expected program: a recycled pid never gets signalled.

BOX_RUN=${BOX_RUN:-/run/slurm-box}   # our pid files, one per daemon
BOX_LOG=${BOX_LOG:-/var/log/slurm-box} # each daemon's stdout/stderr

die() { echo "ERROR: $*" >&2; exit 1; }

# pid_file_pid NAME -> prints the recorded pid; fails when there is none
pid_file_pid() { [[ -s $BOX_RUN/$1.pid ]] && cat "$BOX_RUN/$1.pid"; }

# is_alive PID [COMM] -> true when PID is a live non-zombie process (running COMM, if given)
is_alive() {
  local pid=$1 state
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/status ]] || return 1
  state=$(awk '$1 == "State:" { print $2 }' "/proc/$pid/status" 2>/dev/null) || return 1
  [[ -n $state && $state != Z && $state != X ]] || return 1
  [[ -z ${2:-} ]] || [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

# is_ours NAME COMM -> the pid recorded for NAME is alive and runs COMM
is_ours() { local pid; pid=$(pid_file_pid "$1") || return 1; is_alive "$pid" "$2"; }

# halt_daemon NAME COMM [OWN_PIDFILE]: SIGTERM the recorded pid, wait up to 30 s, then SIGKILL.
# OWN_PIDFILE is the pid file the daemon writes itself; it is removed when it names our pid
# (a stale /run/slurmctld.pid makes the Debian package's prerm script fail on removal).
halt_daemon() {
  local name=$1 comm=$2 own=${3:-} pid i
  if ! pid=$(pid_file_pid "$name"); then
    echo "    $name: not started by the box (no pid file)"; return 0
  fi
  if ! is_alive "$pid" "$comm"; then
    echo "    $name: pid $pid is not a live $comm; removing the stale pid file"
    rm -f "$BOX_RUN/$name.pid"; return 0
  fi
  kill -TERM "$pid"
  for ((i = 0; i < 150; i++)); do is_alive "$pid" || break; sleep 0.2; done
  if is_alive "$pid"; then
    echo "    $name: pid $pid still alive 30 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$BOX_RUN/$name.pid"
  if [[ -n $own && -f $own && $(cat "$own" 2>/dev/null) == "$pid" ]]; then rm -f "$own"; fi
  echo "    stopped $name (pid $pid)"
}
