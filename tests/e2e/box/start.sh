#!/usr/bin/env bash
# tests/e2e/box/start.sh - bring up "the box": a real single-node Slurm cluster with job
# accounting (munged, MariaDB, slurmdbd, slurmctld, slurmd) from Debian bookworm packages
# (slurm-wlm 22.05), without systemd. Used by the end-to-end tests (tests/e2e) and by
# tests/e2e/capture.sh. Needs root.
#
# Idempotent: on a fresh machine it installs and configures everything; while the box is up
# it only checks; after stop.sh it starts the same daemons again (accounting data, job ids and
# the munge key persist). A daemon is restarted only when its configuration file changed.
# Each daemon runs in its foreground mode, detached with setsid, and its pid is recorded in
# /run/slurm-box/<name>.pid; stop.sh signals exactly those pids, never a process name.
#
# Environment (all optional):
#   BOX_CLUSTER  cluster name                                   (default: box)
#   BOX_CPUS     CPUs advertised for the node (more than the    (default: 8)
#                machine has, so that several jobs run at once)
#   BOX_MEM_MB   memory advertised for the node, MiB            (default: 4096, capped at real)
#   BOX_GPUS     fake a100 GPUs on the node (no devices needed) (default: 4)
#   BOX_DB_PASS  password of the MariaDB user 'slurm'           (default: slurmbox)
#   BOX_USERS    create users alice and bob (yes/no)            (default: yes)
#
# Result: cluster $BOX_CLUSTER, one node named $(hostname -s), partitions compute (default) and
# gpu, accounts physics, chemistry, unmapped-lab; users root (all three accounts), alice
# (physics, unmapped-lab), bob (chemistry). Jobs are requeueable and can be suspended; AllocTRES
# carries cpu, mem, node, billing and gres/gpu (+ gres/gpu:a100). Try, as root:
#   sbatch -A physics -p gpu --gres=gpu:2 --wrap 'sleep 5'; sacct -X -o JobID,AllocTRES%60
set -euo pipefail
export LC_ALL=C
# Pipelines under pipefail end in readers that drain their input (sed -n 1p, grep >/dev/null),
# never in head or grep -q, whose early exit could kill the writer with SIGPIPE.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

BOX_CLUSTER=${BOX_CLUSTER:-box}
BOX_CPUS=${BOX_CPUS:-8}
BOX_MEM_MB=${BOX_MEM_MB:-4096}
BOX_GPUS=${BOX_GPUS:-4}
BOX_DB_PASS=${BOX_DB_PASS:-slurmbox}
BOX_USERS=${BOX_USERS:-yes}
SLURM_ETC=/etc/slurm
NODE=$(hostname -s)
ACCOUNTS=(physics chemistry unmapped-lab)
JOBS_DIR=/tmp/slurm-box-jobs   # world-writable working directory for test jobs

[[ $BOX_CPUS =~ ^[1-9][0-9]*$ ]] || die "BOX_CPUS must be a positive integer, got '$BOX_CPUS'"
[[ $BOX_MEM_MB =~ ^[1-9][0-9]*$ ]] || die "BOX_MEM_MB must be a positive integer, got '$BOX_MEM_MB'"
[[ $BOX_GPUS =~ ^[0-9]+$ ]] || die "BOX_GPUS must be a non-negative integer, got '$BOX_GPUS'"

# ------------------------------------------------------------------ timing
START_T=$EPOCHREALTIME
STEP=
STEP_T=
SUMMARY=
elapsed_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
step() { # step NAME DESCRIPTION: closes the previous step (prints its time), opens the next
  if [[ -n $STEP ]]; then
    local took; took=$(elapsed_since "$STEP_T")
    printf '    (%s took %ss)\n' "$STEP" "$took"
    SUMMARY+="$STEP=${took}s "
  fi
  STEP=$1; STEP_T=$EPOCHREALTIME
  if [[ -n $STEP ]]; then echo "==> $STEP: $2"; fi
}

# ------------------------------------------------------------------ daemon handling
logs_of() { # the log files worth showing when daemon NAME fails
  case $1 in
    munged) echo "$BOX_LOG/munged.out /var/log/munge/munged.log" ;;
    mariadb) echo "$BOX_LOG/mariadb.out" ;;
    slurmdbd | slurmctld | slurmd) echo "$BOX_LOG/$1.out /var/log/slurm/$1.log" ;;
  esac
}
daemon_failed() { # daemon_failed NAME WHY: print WHY and the tail of NAME's logs, exit 1
  local f
  echo "ERROR: $1: $2" >&2
  for f in $(logs_of "$1"); do
    if [[ -s $f ]]; then echo "---- last lines of $f" >&2; tail -n 25 "$f" >&2; fi
  done
  if [[ $1 == slurmd ]]; then echo "---- sinfo -R" >&2; timeout 10 sinfo -R >&2 || true; fi
  exit 1
}
launch() { # launch NAME COMM CMD...: start CMD (which stays in the foreground) unless running
  local name=$1 comm=$2
  shift 2
  if is_ours "$name" "$comm"; then
    echo "    $name already running (pid $(pid_file_pid "$name"))"; return 0
  fi
  rm -f "$BOX_RUN/$name.pid"
  # A script has no job control, so the background child is not a process-group leader and
  # setsid(1) execs in place: $! is the daemon itself. fds 8 (our stdout) and 9 (our lock)
  # are not inherited.
  setsid "$@" </dev/null >>"$BOX_LOG/$name.out" 2>&1 8>&- 9>&- &
  echo $! >"$BOX_RUN/$name.pid"
  echo "    started $name (pid $!)"
}
await() { # await NAME COMM TIMEOUT_S WHAT CMD...: poll CMD until it succeeds
  local name=$1 comm=$2 limit=$3 what=$4 t0=$SECONDS
  shift 4
  until "$@" >/dev/null 2>&1; do
    is_alive "$(pid_file_pid "$name")" || daemon_failed "$name" "exited while waiting for: $what"
    ((SECONDS - t0 < limit)) || daemon_failed "$name" "no '$what' after ${limit}s"
    sleep 0.25
  done
  is_ours "$name" "$comm" || daemon_failed "$name" "pid $(pid_file_pid "$name") is not $comm"
}
FILE_CHANGED=0
put_file() { # put_file PATH MODE OWNER:GROUP < CONTENT; FILE_CHANGED=1 when the content changed
  local path=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
    FILE_CHANGED=0
  else
    install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$path"
    FILE_CHANGED=1
  fi
  rm -f "$tmp"
  chmod "$mode" "$path"
  chown "$owner" "$path"
}

[[ $(id -u) -eq 0 ]] || die "start.sh must run as root (it installs packages and starts daemons)"
exec 8>&1 # for messages from checks that run with their output discarded (see await)
install -d -m 0755 "$BOX_RUN"
exec 9>"$BOX_RUN/start.lock"
flock -w 600 9 || die "another start.sh still holds $BOX_RUN/start.lock after 600 s"

# ------------------------------------------------------------------ 1. packages
step packages "Debian packages"
PACKAGES=(munge mariadb-server mariadb-client slurm-wlm slurmctld slurmd slurm-client slurmdbd
  slurm-wlm-basic-plugins slurm-wlm-mysql-plugin)
to_install=()
for p in "${PACKAGES[@]}"; do
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || to_install+=("$p")
done
if ((${#to_install[@]})); then
  echo "    installing: ${to_install[*]}"
  # Keep the packages' maintainer scripts from starting munge or MariaDB themselves: the box
  # starts every daemon so that stop.sh can stop exactly what was started.
  OWN_POLICY=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    OWN_POLICY=1
    trap 'if [[ $OWN_POLICY == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  fi
  apt_log=/tmp/slurm-box-apt.log
  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
      -o Dpkg::Options::=--force-confold "${to_install[@]}" >>"$apt_log" 2>&1
  }
  : >"$apt_log"
  # The current package lists are tried first (fast); they are refreshed only on failure.
  if ! apt_install; then
    echo "    install failed with the current package lists; running apt-get update"
    apt-get update -q >>"$apt_log" 2>&1 || true
    if ! apt_install; then
      tail -n 30 "$apt_log" >&2
      die "apt-get install failed; full log in $apt_log"
    fi
  fi
  if ((OWN_POLICY)); then rm -f /usr/sbin/policy-rc.d; OWN_POLICY=0; fi
else
  echo "    all installed"
fi
for u in slurm munge mysql; do
  id "$u" >/dev/null 2>&1 || die "system user '$u' is missing after the package install"
done

# ------------------------------------------------------------------ 2. directories, users
step setup "directories, munge key, users"
install -d -m 0755 "$BOX_LOG" "$SLURM_ETC"
install -d -m 0755 -o slurm -g slurm /var/log/slurm /var/lib/slurm /var/lib/slurm/slurmctld
install -d -m 0755 -o root -g root /var/spool/slurmd
install -d -m 0700 -o munge -g munge /etc/munge /var/lib/munge
install -d -m 0755 -o munge -g munge /run/munge /var/log/munge
install -d -m 0755 -o mysql -g mysql /run/mysqld
install -d -m 1777 "$JOBS_DIR"
if [[ ! -s /etc/munge/munge.key ]]; then
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  echo "    created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
# slurmd and srun resolve the node's own name
if ! getent hosts "$NODE" >/dev/null; then
  echo "127.0.0.1 $NODE" >>/etc/hosts
  echo "    added '127.0.0.1 $NODE' to /etc/hosts"
fi
if [[ $BOX_USERS == yes ]]; then
  for u in alice bob; do
    if ! id "$u" >/dev/null 2>&1; then
      useradd --create-home --shell /bin/bash "$u"
      echo "    created user $u"
    fi
  done
fi

# ------------------------------------------------------------------ 3. munged
step munge "munged"
munge_works() { munge -n -S /run/munge/munge.socket.2 | unmunge -S /run/munge/munge.socket.2; }
launch munged munged setpriv --reuid=munge --regid=munge --init-groups -- \
  /usr/sbin/munged --foreground --socket=/run/munge/munge.socket.2
await munged munged 30 "munge -n | unmunge" munge_works

# ------------------------------------------------------------------ 4. MariaDB
step mariadb "MariaDB and the accounting database"
if [[ ! -d /var/lib/mysql/mysql ]]; then
  echo "    initialising /var/lib/mysql"
  install -d -m 0755 -o mysql -g mysql /var/lib/mysql
  if ! mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
    >"$BOX_LOG/mariadb-install-db.out" 2>&1; then
    tail -n 30 "$BOX_LOG/mariadb-install-db.out" >&2
    die "mariadb-install-db failed (log: $BOX_LOG/mariadb-install-db.out)"
  fi
fi
launch mariadb mariadbd /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
  --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
  --bind-address=127.0.0.1 --port=3306 --innodb-lock-wait-timeout=900 \
  --innodb-buffer-pool-size=256M --max-allowed-packet=16M
await mariadb mariadbd 60 "mariadb-admin ping" mariadb-admin --socket=/run/mysqld/mysqld.sock ping
mariadb --socket=/run/mysqld/mysqld.sock <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${BOX_DB_PASS}';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${BOX_DB_PASS}';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ------------------------------------------------------------------ 5. configuration
step config "slurm.conf, gres.conf, slurmdbd.conf"
# The node's real memory as slurmd sees it; the box advertises at most that much.
hw=$(slurmd -C 2>/dev/null | sed -n 1p)
[[ $hw == NodeName=* ]] || die "'slurmd -C' printed no node line (got: $hw)"
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ $real_mem =~ ^[0-9]+$ ]] || die "no RealMemory in 'slurmd -C' output: $hw"
mem=$((BOX_MEM_MB < real_mem ? BOX_MEM_MB : real_mem))
node_gres=
if ((BOX_GPUS > 0)); then node_gres="Gres=gpu:a100:$BOX_GPUS"; fi
NODE_LINE="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$BOX_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$BOX_CPUS ThreadsPerCore=1 RealMemory=$mem $node_gres State=UNKNOWN"

put_file "$SLURM_ETC/slurm.conf" 0644 root:root <<EOF
# Written by tests/e2e/box/start.sh (slurm-tracker's test cluster). Edits here are overwritten.
ClusterName=$BOX_CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# there is no mail transfer agent here
MailProg=/bin/true
SwitchType=switch/none
# no cgroups in a container: track processes through /proc, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
PrologFlags=Contain
SchedulerType=sched/backfill
# look at pending jobs every few seconds (defaults: 60 s and 30 s), e.g. when a begin time passes
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
# cores and memory are consumable: AllocTRES carries cpu= and mem=
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
# trust the node line below even where it differs from the hardware (BOX_CPUS)
SlurmdParameters=config_overrides
ReturnToService=2
# jobs can be requeued (scontrol requeue) by default
JobRequeue=1
# fake GPUs: counted and scheduled, no device files
GresTypes=gpu
# accounting
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu,gres/gpu:a100
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5
JobCompType=jobcomp/none
# finished jobs leave slurmctld quickly (sacct keeps them); time limits without grace
MinJobAge=10
OverTimeLimit=0
KillWait=5
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=120
SlurmdTimeout=300
# files
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# the node and its partitions
$NODE_LINE
PartitionName=compute Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
slurm_conf_changed=$FILE_CHANGED

# Fake GPUs. slurmd 22.05 ignores a gpu record without File= (the node then registers 0 GPUs
# and is drained), and it wants each File to be a character or block device. Symbolic links
# to /dev/null are both: with TaskPlugin=task/none nothing opens or constrains them, yet Slurm
# schedules, binds (CUDA_VISIBLE_DEVICES) and accounts the GPUs like real ones.
FAKE_GPU_DIR=/var/lib/slurm-box/fake-gpu
gres_line="# no GPUs (BOX_GPUS=0)"
if ((BOX_GPUS > 0)); then
  install -d -m 0755 "$FAKE_GPU_DIR"
  for ((g = 0; g < BOX_GPUS; g++)); do ln -sfn /dev/null "$FAKE_GPU_DIR/gpu$g"; done
  gres_line="NodeName=$NODE Name=gpu Type=a100 File=$FAKE_GPU_DIR/gpu[0-$((BOX_GPUS - 1))]"
fi
put_file "$SLURM_ETC/gres.conf" 0644 root:root <<EOF
# Written by tests/e2e/box/start.sh. Edits here are overwritten.
AutoDetect=off
$gres_line
EOF
if ((FILE_CHANGED)); then slurm_conf_changed=1; fi

put_file "$SLURM_ETC/slurmdbd.conf" 0600 slurm:slurm <<EOF
# Written by tests/e2e/box/start.sh. Edits here are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$BOX_DB_PASS
StorageLoc=slurm_acct_db
EOF
slurmdbd_conf_changed=$FILE_CHANGED
echo "    $NODE_LINE"
# a running daemon whose configuration changed is restarted (stopped here, started below)
if ((slurmdbd_conf_changed)) && is_ours slurmdbd slurmdbd; then
  halt_daemon slurmdbd slurmdbd /run/slurmdbd.pid
fi
if ((slurm_conf_changed)); then
  if is_ours slurmd slurmd; then halt_daemon slurmd slurmd /run/slurmd.pid; fi
  if is_ours slurmctld slurmctld; then halt_daemon slurmctld slurmctld /run/slurmctld.pid; fi
fi

# ------------------------------------------------------------------ 6. slurmdbd, associations
step slurmdbd "slurmdbd, cluster, accounts, users"
launch slurmdbd slurmdbd /usr/sbin/slurmdbd -D
await slurmdbd slurmdbd 90 "sacctmgr reaches slurmdbd" timeout 15 sacctmgr -n -P list cluster format=cluster
db_list() { timeout 30 sacctmgr -n -P "$@"; }
if ! db_list list cluster format=cluster | grep -x -- "$BOX_CLUSTER" >/dev/null; then
  sacctmgr -i add cluster "$BOX_CLUSTER" >/dev/null
  echo "    added cluster $BOX_CLUSTER"
fi
known_accounts=$(db_list list account format=account)
for a in "${ACCOUNTS[@]}"; do
  if ! grep -x -- "$a" <<<"$known_accounts" >/dev/null; then
    sacctmgr -i add account "$a" cluster="$BOX_CLUSTER" Description="$a" Organization="$a" >/dev/null
    echo "    added account $a"
  fi
done
# user -> accounts; a user new to the database gets the first one as DefaultAccount
declare -A MEMBERSHIP=([root]="physics chemistry unmapped-lab")
if [[ $BOX_USERS == yes ]]; then
  MEMBERSHIP[alice]="physics unmapped-lab"
  MEMBERSHIP[bob]="chemistry"
fi
known_assocs=$(db_list list association cluster="$BOX_CLUSTER" format=user,account)
known_users=$(db_list list user format=user)
for u in "${!MEMBERSHIP[@]}"; do
  read -r -a accts <<<"${MEMBERSHIP[$u]}"
  default=()
  grep -x -- "$u" <<<"$known_users" >/dev/null || default=(DefaultAccount="${accts[0]}")
  for a in "${accts[@]}"; do
    if ! grep -x -- "$u|$a" <<<"$known_assocs" >/dev/null; then
      sacctmgr -i add user "$u" account="$a" cluster="$BOX_CLUSTER" "${default[@]}" >/dev/null
      echo "    added association user=$u account=$a"
      default=()
    fi
  done
done

# ------------------------------------------------------------------ 7. slurmctld, slurmd
step slurm "slurmctld, slurmd, node ready"
launch slurmctld slurmctld /usr/sbin/slurmctld -D
await slurmctld slurmctld 60 "scontrol ping says UP" bash -c 'scontrol ping | grep "is UP" >/dev/null'
launch slurmd slurmd /usr/sbin/slurmd -D
node_ready() { # idle, or busy with jobs left from before; not down, drained or unresponsive
  local state
  state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | sed -n 1p)
  # A drain left by an earlier, misconfigured start survives restarts; resume the node (if the
  # configuration is still wrong, slurmctld drains it again and this wait times out).
  if [[ $state == drained ]]; then
    echo "    node $NODE was drained ($(sinfo -h -N -n "$NODE" -o %E | sed -n 1p)); resuming it" >&8
    scontrol update NodeName="$NODE" State=RESUME >&8 2>&1 || true
    return 1
  fi
  [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}
await slurmd slurmd 90 "sinfo shows node $NODE ready" node_ready
# slurmctld has registered with slurmdbd once the cluster row has a control host
await slurmctld slurmctld 60 "slurmctld registered with slurmdbd" \
  bash -c "sacctmgr -n -P list cluster $BOX_CLUSTER format=controlhost | grep . >/dev/null"

step "" ""
echo "==> slurm-box is up in $(elapsed_since "$START_T")s: cluster $BOX_CLUSTER, node $NODE ($SUMMARY)"
sinfo -o '%P %a %D %T %C %G'
