#!/usr/bin/env bash
# tests/e2e/capture.sh - run a varied workload on the box and save what sacct says about it:
# the project's own real test data (tests/data/README.md describes the files).
#
#   tests/e2e/capture.sh            # writes tests/data/sacct-box-22.05.{txt,json,jobs.tsv}
#                                   # and examples/sacct-sample.txt (a copy of the .txt)
#   CAPTURE_DIR=/tmp/c tests/e2e/capture.sh   # writes all four files into /tmp/c instead
#
# Needs root; starts the box first (tests/e2e/box/start.sh, a no-op when it is up). Takes about
# two minutes: the timeout job alone runs for its one-minute limit. Jobs still running at
# capture time are cancelled afterwards. Job ids differ on every run; the .jobs.tsv file says
# which id played which part.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${CAPTURE_DIR:-$REPO/tests/data}
SAMPLE=${CAPTURE_DIR:+$CAPTURE_DIR/sacct-sample.txt}
SAMPLE=${SAMPLE:-$REPO/examples/sacct-sample.txt}
BASE=$OUT/sacct-box-22.05
# The agent's own live query (slurm_tracker runs exactly these options).
FIELDS=Cluster,JobID,JobIDRaw,Account,Partition,User,Group,QOS,Submit,Eligible,Start,End,ElapsedRaw,State,ExitCode,AllocTRES,NNodes,NodeList,Reservation,JobName

# squeue's states of a job that is not over yet
ACTIVE=PD,R,S,CG,CF,RQ,RF,RH,RS,SE,SI,SO,ST,RD
die() { echo "ERROR: $*" >&2; exit 1; }
say() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
[[ $(id -u) -eq 0 ]] || die "capture.sh must run as root (it starts the box, suspends and requeues jobs)"

"$HERE/box/start.sh" >/tmp/slurm-box-capture-start.log 2>&1 ||
  { tail -n 30 /tmp/slurm-box-capture-start.log >&2; die "the box did not start (log above)"; }
if [[ -n $(squeue -h -o %A) ]]; then
  die "the box has queued or running jobs; the capture wants a quiet box: scancel them first"
fi
install -d "$OUT" "$(dirname "$SAMPLE")"

JOBS_TSV=$(mktemp)
MINE=()
# on failure, the workload's jobs that are still queued are cancelled
on_exit() {
  local rc=$?
  rm -f "$JOBS_TSV"
  if ((rc != 0 && ${#MINE[@]})); then scancel "${MINE[@]}" 2>/dev/null || true; fi
}
trap on_exit EXIT
printf 'job_id\tscenario\texpected\n' >"$JOBS_TSV"
note() { MINE+=("$1"); printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$JOBS_TSV"; }

# job NAME ACCOUNT PARTITION USER -- SBATCH_ARGS... : submit, print the job id
job() {
  local name=$1 account=$2 partition=$3 user=$4
  [[ ${5:-} == -- ]] || die "job '$name': usage: job NAME ACCOUNT PARTITION USER -- ARGS..."
  shift 5
  local argv=(sbatch --parsable --job-name="$name" --account="$account" --partition="$partition"
    --chdir=/tmp/slurm-box-jobs --output=/dev/null "$@")
  if [[ $user != root ]]; then argv=(runuser -u "$user" -- "${argv[@]}"); fi
  local id
  id=$("${argv[@]}") || die "sbatch failed for job '$name'"
  echo "${id%%;*}"
}
state_of() { squeue -h --states=all -j "$1" -o %T 2>/dev/null | sed -n 1p; }
await_state() { # await_state JOB STATE TIMEOUT_S
  local t0=$SECONDS
  until [[ $(state_of "$1") == "$2" ]]; do
    ((SECONDS - t0 < $3)) || die "job $1 is '$(state_of "$1")', not $2, after $3 s"
    sleep 0.5
  done
}
# settled JOB...: every run of every job has an End and a Partition in accounting, and none is
# still queued (slurmdbd can hold a job's end for a few seconds before its start details)
settled() {
  local ids=$1 rows
  [[ -z $(squeue -h -j "$ids" -t "$ACTIVE" -o %A 2>/dev/null) ]] || return 1
  rows=$(SLURM_TIME_FORMAT=%s sacct -n -X -P --duplicates -j "$ids" -o End,Partition) || return 1
  [[ -n $rows ]] && ! grep -E '^(Unknown|None)?\||\|$' <<<"$rows" >/dev/null
}
await_settled() { # await_settled TIMEOUT_S JOB...
  local limit=$1 t0=$SECONDS ids
  shift
  ids=$(IFS=,; echo "$*")
  until settled "$ids"; do
    ((SECONDS - t0 < limit)) || die "jobs $ids not settled in accounting after $limit s"
    sleep 1
  done
}

START=$(date -u +%s)
say "window starts at $START ($(date -u -d "@$START" +%FT%TZ)); submitting the workload"

# --- jobs that finish on their own
a=$(job done-physics physics compute root -- --wrap 'sleep 5')
note "$a" "completed, physics, compute, root" "COMPLETED 0:0, cpu=1"
b=$(job done-chemistry chemistry compute bob -- --mem=300M --wrap 'sleep 4')
note "$b" "completed, chemistry, compute, user bob, --mem=300M" "COMPLETED, mem=300M"
c=$(job done-unmapped unmapped-lab compute alice -- --wrap 'sleep 3')
note "$c" "completed, unmapped-lab (no allocation mapped), user alice" "COMPLETED"
d=$(job gpu-two physics gpu root -- --gres=gpu:2 --mem=500M --wrap 'sleep 6')
note "$d" "completed, physics, gpu partition, --gres=gpu:2" "COMPLETED, gres/gpu=2 and gres/gpu:a100=2"
e=$(job gpu-typed chemistry gpu bob -- --gres=gpu:a100:1 -c 2 --wrap 'sleep 5')
note "$e" "completed, chemistry, gpu partition, typed --gres=gpu:a100:1, -c 2" "COMPLETED, cpu=2, gpu=1"
f=$(job multi-cpu physics compute root -- -c 4 --mem=1G --wrap 'sleep 7')
note "$f" "completed, 4 CPUs, --mem=1G" "COMPLETED, cpu=4, mem=1G"
g=$(job fails chemistry compute root -- --wrap 'sleep 2; exit 1')
note "$g" "script exits 1" "FAILED 1:0"
h=$(job killed physics compute root -- --wrap 'sleep 2; kill -KILL $$')
note "$h" "script killed by SIGKILL" "FAILED 0:9"
i=$(job times-out chemistry compute root -- --time=1 --wrap 'sleep 600')
note "$i" "--time=1, sleeps longer" "TIMEOUT, ElapsedRaw >= 60 (limits are checked every ~30 s)"
arr=$(job array physics compute root -- --array=0-3 --wrap 'sleep 3; test "$SLURM_ARRAY_TASK_ID" != 2')
note "$arr" "array 0-3 (JobID ${arr}_N, JobIDRaw differs), task 2 exits 1" "3 COMPLETED, ${arr}_2 FAILED 1:0"
n=$(job $'odd|name\nsecond line' unmapped-lab compute root -- --wrap 'sleep 2')
note "$n" "job name with '|' and a newline" "COMPLETED; the record spans two lines"

# --- jobs that are acted upon
cr=$(job cancel-running physics compute root -- --wrap 'sleep 600')
note "$cr" "cancelled while running (scancel)" "CANCELLED by 0, Start and End known"
pd=$(job cancel-pending chemistry compute root -- --begin=now+1hour --wrap 'sleep 5')
note "$pd" "cancelled while pending (--begin=now+1hour)" "NOT in the window capture (Eligible is in the future; sacct -j shows it: CANCELLED by 0, ElapsedRaw 0, no AllocTRES)"
rq=$(job requeued physics compute root -- --wrap 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then sleep 4; else sleep 600; fi')
note "$rq" "requeued while running (scontrol requeue), second run completes" "2 records, same JobIDRaw: REQUEUED, then COMPLETED with a later Submit"
sr=$(job suspended-resumed chemistry compute root -- --wrap 'sleep 12')
note "$sr" "suspended for some seconds while running, then resumed; completes" "COMPLETED, ElapsedRaw = End - Start - seconds suspended"

# --- act on them
scancel "$pd"
await_state "$cr" RUNNING 90
await_state "$rq" RUNNING 90
await_state "$sr" RUNNING 90
sleep 3
scontrol suspend "$sr"
scancel "$cr"
scontrol requeue "$rq"
# Slurm holds a requeued job back for two minutes (its begin time, set while the first run is
# COMPLETING, overrides an earlier change); once it is PENDING, let it start again now.
# A restart within the second of the requeue fails ("Job credential revoked"): wait 2 s.
await_state "$rq" PENDING 30
sleep 2
scontrol update JobId="$rq" StartTime=now
sleep 6
scontrol resume "$sr"
say "waiting for the short jobs"
await_settled 180 "$a" "$b" "$c" "$d" "$e" "$f" "$g" "$h" "$arr" "$n" "$cr" "$pd" "$rq" "$sr"

# --- jobs still going when sacct runs: submitted once the short jobs are gone (so that they
#     get CPUs at once), cancelled after the capture
r1=$(job long-physics physics compute root -- -c 2 --wrap 'sleep 3600')
note "$r1" "running at capture time, 2 CPUs" "RUNNING, End Unknown, ElapsedRaw so far"
r2=$(job long-gpu chemistry gpu bob -- --gres=gpu:1 --wrap 'sleep 3600')
note "$r2" "running at capture time, gpu=1, user bob" "RUNNING, End Unknown"
r3=$(job long-unmapped unmapped-lab compute alice -- --wrap 'sleep 3600')
note "$r3" "running at capture time, unmapped-lab, user alice" "RUNNING, End Unknown"
su=$(job long-suspended physics compute root -- --wrap 'sleep 3600')
note "$su" "suspended at capture time" "SUSPENDED, End Unknown"
await_state "$r2" RUNNING 60
# needs the GPU that the long gpu job holds. (A job pending for only a few seconds may be
# missing from a window query: submit it well before the capture.)
pg=$(job waits-for-gpus physics gpu root -- --gres=gpu:4 --wrap 'sleep 5')
note "$pg" "pending at capture time (needs 4 GPUs, 1 is taken)" "PENDING (Resources), no Start, no AllocTRES"
await_state "$su" RUNNING 60
sleep 2
scontrol suspend "$su"
await_state "$r1" RUNNING 60
await_state "$r3" RUNNING 60

say "waiting for the timeout job (it ends a minute or so after it started)"
await_settled 150 "$i"
await_state "$pg" PENDING 10
sleep 5

# --- the capture
END=$(date -u +%s)
S=$(date -u -d "@$START" +%Y-%m-%dT%H:%M:%S)
E=$(date -u -d "@$END" +%Y-%m-%dT%H:%M:%S)
say "capturing window [$S, $E) UTC"
TZ=UTC SLURM_TIME_FORMAT=%s sacct --allusers --allocations --duplicates --parsable --delimiter='|#|' \
  --format="$FIELDS" --starttime "$S" --endtime "$E" >"$BASE.txt"
TZ=UTC sacct --allusers --allocations --duplicates --json --starttime "$S" --endtime "$E" >"$BASE.json"
CAPTURED_AT=$(date -u +%s)

# The box may be shared (other people's tests): a capture with jobs that are not ours would be
# described wrongly by the .jobs.tsv file, so it is refused.
ours=" $(cut -f1 "$JOBS_TSV" | sed 1d | tr '\n' ' ') "
foreign=
for id in $(awk -F '[|]#[|]' 'NR > 1 && NF >= 20 { sub(/_.*/, "", $2); print $2 }' "$BASE.txt" | sort -u); do
  [[ $ours == *" $id "* ]] || foreign+=" $id"
done
if [[ -n $foreign ]]; then
  die "jobs that are not the workload's ran during the capture:$foreign; run it again on a quiet box"
fi
cp "$BASE.txt" "$SAMPLE"

# --- clean up: the long jobs end now (their final records are not part of the capture)
scancel "$r1" "$r2" "$r3" "$su" "$pg"
await_settled 60 "$r1" "$r2" "$r3" "$su" "$pg"
{
  printf '# window: --starttime %s --endtime %s (UTC; epoch %s to %s); captured at epoch %s\n' \
    "$S" "$E" "$START" "$END" "$CAPTURED_AT"
  printf '# %s\n' "$(sacct --version)"
  cat "$JOBS_TSV"
} >"$BASE.jobs.tsv"
say "wrote $BASE.txt ($(grep -c '|#|$' "$BASE.txt") records incl. header), $BASE.json, $BASE.jobs.tsv, $SAMPLE"
say "window [$START, $END) epoch; ran from $(date -u -d "@$START" +%FT%TZ) to $(date -u -d "@$CAPTURED_AT" +%FT%TZ)"
