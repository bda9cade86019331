"""Adversarial job names on the real Slurm box (issue 8, "Tests must show").

Users name their own jobs, so a job name is attacker-controlled text that slurmdbd stores as it
is and sacct prints without any escaping. This module submits jobs, as the box's users, whose
names hold the old live delimiter ``|#|``, bare ``|``, newlines, tabs, a carriage return, a
forged header line and complete forged sacct records in every plausible delimiter (each forged
record bills another group, under a job id that no real record has; one claims 4294967293
CPUs), and very long names. One job is renamed by its user with ``scontrol update`` instead.

What the box accepts and keeps (Slurm 22.05 with MariaDB): ``sbatch --job-name=`` given as one
argv element (no shell) and ``scontrol update JobName=`` both carry newlines, tabs and ``\\r``
through unchanged; sbatch refuses names longer than 1024 bytes ("Pathname ... too long"); the
``job_name`` column of slurmdbd is a TINYTEXT, so sacct shows at most 255 bytes (cut on a
character boundary). A forged record therefore has to fit in 255 bytes, and does.

Then the agent's real ``sync`` runs twice, each with its own emulator and state: with the
default config (JobName is private and not needed) and with ``metadata: {fields: [job_name]}``
(the agent must then read JobName and still split records correctly). Every job of the module
must be billed exactly its own usage (``check_billing`` against ``cluster.truth``), every
accepted event must belong to a run that slurmdbd really has (other tests' jobs may share the
window) and bill no more than that run's usage, no forged job id may appear in any accepted
event, a sent job name must be exactly the stored one, and the sync must exit 0.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import cluster
from tests.e2e.agent import (
    ACCOUNTS,
    EXIT_OK,
    EXIT_UNDELIVERED,
    TOLERANCE,
    Agent,
    Jobs,
    check_billing,
    expected_charges,
    mine,
    run_of,
)
from tests.emulator import Emulator, StoredEvent

# The agent's old live query (before issue 8): what a forged record imitates.
OLD_DELIMITER = "|#|"
OLD_FIELDS = (
    "Cluster",
    "JobID",
    "JobIDRaw",
    "Account",
    "Partition",
    "User",
    "Group",
    "QOS",
    "Submit",
    "Eligible",
    "Start",
    "End",
    "ElapsedRaw",
    "State",
    "ExitCode",
    "AllocTRES",
    "NNodes",
    "NodeList",
    "Reservation",
    "JobName",
)
# A compact header and record that a parser reading saved files (any field order, by header
# name) would accept: small enough to fit in 255 bytes together.
COMPACT_FIELDS = (
    "JobIDRaw",
    "JobID",
    "Cluster",
    "Account",
    "Partition",
    "Submit",
    "Start",
    "End",
    "ElapsedRaw",
    "AllocTRES",
)
FORGED_BASE = 987654300  # forged job ids: far above any id the box hands out
HUGE_CPUS = 4294967293
FORGED_ELAPSED_S = 3
SLURMDBD_NAME_BYTES = 255  # job_name is a TINYTEXT
SBATCH_MAX_NAME = 1024  # sbatch refuses longer names
METADATA_JOB_NAME = "metadata: {fields: [job_name]}\n"


@dataclass(frozen=True)
class Hostile:
    """One adversarial job: who submits it, where, and its name."""

    role: str
    name: str
    user: str
    account: str
    partition: str = "compute"
    forged: tuple[str, ...] = ()  # forged job ids the stored name must carry in full
    renamed: bool = False  # submitted as a plain name, renamed with scontrol update


@dataclass(frozen=True)
class Submitted:
    started_at: datetime  # the agents' first_sync_start: before every job and forged record
    jobs: Mapping[str, str]  # role -> job id
    stored: Mapping[str, str]  # job id -> JobName as slurmdbd stored it
    truth: Mapping[cluster.RunId, cluster.TruthRun]
    forged_ids: tuple[str, ...]  # every forged job id used in any name


def forged_record(
    number: int, delimiter: str, at: int, *, account: str, user: str, cpus: int = 2
) -> str:
    """A complete, plausible record of the old live format for a job that does not exist:
    finished, in the agents' window, on this cluster, node and partition."""
    job_id = str(FORGED_BASE + number)
    values = {
        "Cluster": "box",
        "JobID": job_id,
        "JobIDRaw": job_id,
        "Account": account,
        "Partition": "compute",
        "User": user,
        "Group": user,
        "QOS": "normal",
        "Submit": str(at),
        "Eligible": str(at),
        "Start": str(at),
        "End": str(at + FORGED_ELAPSED_S),
        "ElapsedRaw": str(FORGED_ELAPSED_S),
        "State": "COMPLETED",
        "ExitCode": "0:0",
        "AllocTRES": f"billing={cpus},cpu={cpus},mem=100M,node=1",
        "NNodes": "1",
        "NodeList": "vm",
        "Reservation": "",
        "JobName": "y",
    }
    return delimiter.join(values[name] for name in OLD_FIELDS)


def hostile_jobs(at: int) -> list[Hostile]:
    """The names. alice (physics) forges chemistry/bob records and bob the reverse."""

    def fid(number: int) -> str:
        return str(FORGED_BASE + number)

    def as_bob(number: int, delimiter: str, **kwargs: Any) -> str:
        return forged_record(number, delimiter, at, account="chemistry", user="bob", **kwargs)

    def as_alice(number: int, delimiter: str) -> str:
        return forged_record(number, delimiter, at, account="physics", user="alice")

    d = OLD_DELIMITER
    compact_header = "|".join(COMPACT_FIELDS)
    compact_record = "|".join(
        (fid(12), fid(12), "box", "chemistry", "compute")
        + (str(at),) * 2
        + (str(at + FORGED_ELAPSED_S), str(FORGED_ELAPSED_S), "cpu=2,mem=100M,node=1")
    )
    long_forgery = f"x{d}\n{as_bob(13, d)}{d}\n"
    jobs = [
        Hostile("old-delimiter", f"a{d}b{d}{d}c{d}", "alice", "physics"),
        Hostile("bare-pipe", "a|b||c|", "bob", "chemistry"),
        Hostile("newlines", "line1\nline2\n\nline4\n", "alice", "physics"),
        Hostile("tab", "a\tb\t\tc", "bob", "chemistry", "gpu"),
        Hostile("terminators", f"{d}\n{d}\n\n|\n\t\n", "alice", "physics"),
        # the old live format: the job's own record ends at the first "|#|\n", the forged
        # one follows and is ended by the real record's trailing delimiter
        Hostile("forged-live", f"x{d}\n{as_bob(1, d)}", "alice", "physics", forged=(fid(1),)),
        Hostile(
            "forged-live-huge",
            f"x{d}\n{as_bob(2, d, cpus=HUGE_CPUS)}",
            "alice",
            "physics",
            "gpu",
            forged=(fid(2),),
        ),
        Hostile("forged-live-newline", f"\n{as_alice(3, d)}", "bob", "chemistry", forged=(fid(3),)),
        Hostile(
            "forged-live-ended", f"x{d}\n{as_bob(4, d)}{d}\n", "alice", "physics", forged=(fid(4),)
        ),
        Hostile(
            "forged-live-crlf", f"x{d}\r\n{as_bob(5, d)}", "alice", "physics", forged=(fid(5),)
        ),
        Hostile("forged-pipe", f"x|\n{as_alice(6, '|')}", "bob", "chemistry", forged=(fid(6),)),
        Hostile("forged-pipe2", f"x\n{as_bob(7, '|')}\n", "alice", "physics", forged=(fid(7),)),
        Hostile("forged-tab", f"x\t\n{as_bob(8, chr(9))}", "alice", "physics", forged=(fid(8),)),
        Hostile(
            "forged-semicolon", f"x;\n{as_alice(9, ';')}", "bob", "chemistry", forged=(fid(9),)
        ),
        Hostile(
            "forged-unit-separator",
            f"x\x1f\n{as_bob(10, chr(0x1F))}\x1e\n",
            "alice",
            "physics",
            forged=(fid(10),),
        ),
        Hostile("forged-header-live", f"x{d}\n{d.join(OLD_FIELDS)}{d}\n", "bob", "chemistry"),
        Hostile(
            "forged-header-pipe",
            f"x\n{compact_header}\n{compact_record}\n",
            "alice",
            "physics",
            forged=(fid(12),),
        ),
        Hostile(
            "renamed",
            f"r{d}\n{as_alice(11, d)}",
            "bob",
            "chemistry",
            forged=(fid(11),),
            renamed=True,
        ),
        # sbatch's longest name; slurmdbd keeps its first 255 bytes (a cut forged record)
        Hostile(
            "long",
            (long_forgery * (SBATCH_MAX_NAME // len(long_forgery) + 1))[:SBATCH_MAX_NAME],
            "alice",
            "physics",
            forged=(fid(13),),
        ),
        # multi-byte text after a forgery: cut on a character boundary at 255 bytes
        Hostile(
            "long-multibyte",
            f"x{d}\n{as_alice(14, d)}" + "\u00e9" * 400,
            "bob",
            "chemistry",
            forged=(fid(14),),
        ),
    ]
    assert all(len(h.name.encode()) <= SBATCH_MAX_NAME for h in jobs)
    assert all(
        len(h.name.encode()) <= SLURMDBD_NAME_BYTES for h in jobs if not h.role.startswith("long")
    ), "a name would be cut by slurmdbd: shorten it"
    return jobs


def submit(job: Hostile) -> str:
    """Submit as the job's user, the name passed as one argv element (no shell, no #SBATCH
    line: both would lose the newlines)."""
    args = ["--gres=gpu:1"] if job.partition == "gpu" else []
    common: dict[str, Any] = {
        "account": job.account,
        "partition": job.partition,
        "user": job.user,
        "wrap": "sleep 2",
    }
    if not job.renamed:
        return cluster.submit(*args, job_name=job.name, **common)
    # the user renames the job while it is held: same effect as renaming a queued job
    job_id = cluster.submit("--hold", *args, job_name="e2e-plain", **common)
    try:
        rename = ("scontrol", "update", f"JobId={job_id}", f"JobName={job.name}")
        cluster.run("runuser", "-u", job.user, "--", *rename)
        cluster.run("scontrol", "release", job_id)
    except cluster.BoxError:
        cluster.run("scancel", job_id, check=False)
        raise
    return job_id


def stored_name(job_id: str) -> str:
    """The job's JobName as slurmdbd stored it, byte-exact (no newline translation)."""
    delimiter = f"<{secrets.token_hex(16)}>"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SACCT_", "SLURM_"))}
    env.update({"TZ": "UTC", "LC_ALL": "C"})
    done = subprocess.run(
        [
            "sacct",
            "--allusers",
            "--allocations",
            "--noheader",
            "--parsable2",
            f"--delimiter={delimiter}",
            "--format=JobIDRaw,JobName",
            f"--jobs={job_id}",
        ],
        capture_output=True,
        env=env,
        timeout=cluster.COMMAND_TIMEOUT_S,
        check=True,
    )
    out = done.stdout.decode("utf-8")
    raw, found, rest = out.partition(delimiter)
    assert found and raw == job_id and rest.endswith("\n"), f"sacct -j {job_id}: {out!r}"
    return rest[:-1]


@pytest.fixture(scope="module")
def hostile(slurm_box: None) -> Iterator[Submitted]:
    """The module's jobs, submitted once, over and settled in accounting."""
    now = int(time.time())
    started_at = datetime.fromtimestamp(now - 5, timezone.utc)
    forged_at = now - 2  # forged runs: inside the agents' window, ended before they sync
    wanted = hostile_jobs(forged_at)
    jobs = Jobs()
    try:
        for job in wanted:
            jobs.ids[job.role] = submit(job)
        jobs.wait_done(timeout=180)
        stored = {jobs[job.role]: stored_name(jobs[job.role]) for job in wanted}
        for job in wanted:
            _check_stored(job, stored[jobs[job.role]])
        truth = cluster.truth(jobs.all())
        assert len(truth) == len(wanted), f"expected one run per job: {sorted(truth)}"
        forged_ids = tuple(str(FORGED_BASE + n) for n in range(1, 15))
        yield Submitted(started_at, dict(jobs.ids), stored, truth, forged_ids)
    finally:
        jobs.close()


def _check_stored(job: Hostile, stored: str) -> None:
    """The box must keep the payload, or the test would prove nothing."""
    if len(job.name.encode()) <= SLURMDBD_NAME_BYTES:
        assert stored == job.name, f"{job.role}: slurmdbd stored {stored!r} for {job.name!r}"
    else:
        # Slurm 22.05 with MariaDB: the first 255 bytes, cut on a character boundary
        assert job.name.startswith(stored), f"{job.role}: stored {stored!r}"
        assert len(stored.encode()) > SLURMDBD_NAME_BYTES - 4, f"{job.role}: stored {stored!r}"
    for job_id in job.forged:
        assert job_id in stored, f"{job.role}: forged job {job_id} not in stored {stored!r}"


# -- the test -------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "extra_config", ["", METADATA_JOB_NAME], ids=["default-config", "job-name-in-metadata"]
)
def test_hostile_job_names_bill_only_real_jobs(
    tmp_path: Path, hostile: Submitted, extra_config: str
) -> None:
    with Emulator() as emulator:
        agent = Agent(tmp_path, emulator.base_url, hostile.started_at, extra_config=extra_config)
        done = agent.sync(expect={EXIT_OK, EXIT_UNDELIVERED})
        events = emulator.events()

    problems: list[str] = []
    if done.returncode != EXIT_OK:
        problems.append(f"sync exited {done.returncode}, not 0")
    problems += _foreign_problems(events, hostile.forged_ids)
    try:
        check_billing(events, hostile.truth)
    except AssertionError as exc:
        problems.append(str(exc))
    problems += _job_name_problems(events, hostile, with_job_name=bool(extra_config))
    assert not problems, (
        "hostile job names changed what was billed:\n  "
        + "\n  ".join(problems)
        + f"\n--- accepted events: {len(events)}, own jobs {sorted(hostile.jobs.values())}\n"
        + _describe(events)
        + f"\n--- sync\n{done}"
    )


def _foreign_problems(events: Sequence[StoredEvent], forged_ids: Sequence[str]) -> list[str]:
    """Events of runs slurmdbd does not have, more usage than a real run had, or a forged job
    id anywhere in an event (outside the job name that carries it)."""
    problems = []
    raw_ids = {str(e.metadata.get("jobIdRaw")) for e in events}
    real = cluster.truth(sorted(i for i in raw_ids if i.isdigit()))
    billed: dict[tuple[cluster.RunId, str], Decimal] = defaultdict(Decimal)
    counted: dict[tuple[cluster.RunId, str], int] = defaultdict(int)
    for event in events:
        what = _one_line(event)
        try:
            run_id = run_of(event)
        except (KeyError, ValueError) as exc:
            problems.append(f"event without a run identity ({exc!r}): {what}")
            continue
        run = real.get(run_id)
        if run is None:
            problems.append(f"billed a run that slurmdbd does not have: {what}")
            continue
        if event.allocation != ACCOUNTS.get(run.account):
            problems.append(f"allocation is not the run's ({run.account}): {what}")
        billed[(run_id, event.sku)] += event.quantity
        counted[(run_id, event.sku)] += 1
    for (run_id, sku), quantity in sorted(billed.items()):
        # a run of another test may still be running: its usage so far is an upper bound
        most = expected_charges(real[run_id]).get(sku, Decimal(0))
        if quantity > most + TOLERANCE * counted[(run_id, sku)]:
            problems.append(f"{run_id} {sku}: billed {quantity}, its usage is only {most}")
    for event in events:
        meta = dict(event.metadata)
        meta.pop("jobName", None)  # checked against the stored name in _job_name_problems
        text = json.dumps({**event.to_json(), "metadata": meta})
        found = [job_id for job_id in forged_ids if job_id in text]
        if found:
            problems.append(f"forged job id(s) {found} in an accepted event: {text}")
    return problems


def _job_name_problems(
    events: Sequence[StoredEvent], hostile: Submitted, *, with_job_name: bool
) -> list[str]:
    """Without the metadata setting no name is sent; with it, each own event carries its
    run's stored name exactly (nothing cut, glued or taken from a neighbour)."""
    problems = []
    seen = set()
    for event in mine(events, hostile.truth):
        job_id = str(event.metadata.get("jobId"))
        if job_id in seen:  # one line per job, not per SKU
            continue
        seen.add(job_id)
        if not with_job_name:
            if "jobName" in event.metadata:
                problems.append(f"job name sent although not configured: {_one_line(event)}")
            continue
        want = hostile.stored.get(job_id)
        got = event.metadata.get("jobName")
        if got != want:
            problems.append(f"job {job_id}: jobName {got!r}, slurmdbd has {want!r}")
    return problems


def _one_line(event: StoredEvent) -> str:
    meta = event.metadata
    return (
        f"jobId={meta.get('jobId')} jobIdRaw={meta.get('jobIdRaw')} "
        f"submittedAt={meta.get('submittedAt')} allocation={event.allocation} "
        f"sku={event.sku} quantity={event.quantity} user={event.user} "
        f"key={event.event_key}"
    )


def _describe(events: Sequence[StoredEvent]) -> str:
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for event in events:
        totals[(event.allocation, event.sku)] += event.quantity
    lines = [f"  total {alloc} {sku}: {q}" for (alloc, sku), q in sorted(totals.items())]
    return "\n".join(lines + [f"  {_one_line(e)}" for e in events])
