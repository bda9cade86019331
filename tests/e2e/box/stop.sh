#!/usr/bin/env bash
# tests/e2e/box/stop.sh - stop the daemons that start.sh started, and nothing else: each one
# by the pid start.sh recorded in /run/slurm-box/<name>.pid, after checking that this pid is
# still that program (never by process name). Safe to run when the box is down.
#
# Jobs still queued or running are cancelled first, while slurmctld is up, so that no
# slurmstepd or job process outlives the cluster (BOX_KEEP_JOBS=yes skips that). Accounting
# data, slurmctld state, the munge key and the configuration stay: start.sh brings the same
# cluster back.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

[[ $(id -u) -eq 0 ]] || die "stop.sh must run as root"
if [[ ! -d $BOX_RUN ]]; then
  echo "slurm-box is not running ($BOX_RUN does not exist)"
  exit 0
fi
T0=$EPOCHREALTIME

if [[ ${BOX_KEEP_JOBS:-no} != yes ]] && is_ours slurmctld slurmctld; then
  queued=$(timeout 20 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || queued=
  if [[ -n ${queued// /} ]]; then
    echo "    cancelling jobs: $queued"
    # shellcheck disable=SC2086  # one argument per job id
    timeout 20 scancel $queued || true
    for ((i = 0; i < 60; i++)); do
      [[ -z $(timeout 10 squeue -h -o %A 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
fi
# the reverse of the start order: compute daemon, controller, accounting, database, auth
halt_daemon slurmd slurmd /run/slurmd.pid
halt_daemon slurmctld slurmctld /run/slurmctld.pid
halt_daemon slurmdbd slurmdbd /run/slurmdbd.pid
halt_daemon mariadb mariadbd /run/mysqld/mysqld.pid
halt_daemon munged munged /run/munge/munged.pid
echo "==> slurm-box stopped in $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s"
