"""Small builders of model values for tests."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

from slurm_tracker.models import JobRecord, Tres
from slurm_tracker.sacct import CAPTURE_DELIMITER, LIVE_FIELDS

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def record(
    *,
    job_id: str = "1001",
    elapsed_s: int = 3600,
    start_at: Optional[datetime] = T0,
    final: bool = True,
    cpu: int = 4,
    gpu: int = 0,
    mem_mb: int = 8192,
    node: int = 1,
    billing: int = 4,
    account: str = "physics",
    partition: str = "compute",
    user: str = "alice",
    submit_at: Optional[datetime] = None,
    cluster: str = "box",
    **extra: Any,
) -> JobRecord:
    submit = submit_at or (start_at - timedelta(minutes=5) if start_at else T0)
    end_at = start_at + timedelta(seconds=elapsed_s) if (final and start_at) else None
    return JobRecord(
        cluster=cluster,
        job_id=job_id,
        job_id_raw=job_id,
        submit_at=submit,
        start_at=start_at,
        end_at=end_at,
        elapsed_s=elapsed_s,
        state="COMPLETED" if final else "RUNNING",
        account=account,
        partition=partition,
        user=user,
        tres=Tres(cpu=cpu, mem_mb=Decimal(mem_mb), node=node, gpu=gpu, billing=billing),
        job_name=extra.pop("job_name", "job"),
        extra=extra,
    )


def live_capture(rows: list[dict[str, str]]) -> bytes:
    """sacct output in the agent's live format (-p, header, our delimiter, epoch times).

    Each row gives the fields that matter to the test; the others get plausible values.
    """
    d = CAPTURE_DELIMITER
    lines = [d.join(LIVE_FIELDS) + d]
    for given in rows:
        job = given.get("JobID", "1")
        values = {
            "Cluster": "box",
            "JobIDRaw": job,
            "User": "alice",
            "Group": "alice",
            "QOS": "normal",
            "Eligible": given.get("Submit", ""),
            "ExitCode": "0:0",
            "NNodes": "1",
            "NodeList": "node1",
            "Reservation": "",
            "JobName": "name with | bar\nand newline",
            **given,
        }
        lines.append(d.join(values.get(f, "") for f in LIVE_FIELDS) + d)
    return ("\n".join(lines) + "\n").encode()


FAKE_SACCT = '''#!{python}
"""A stand-in for sacct: prints the records of a saved capture (the agent's capture format)
in the delimiter and with the fields the command line asks for, as sacct --parsable would.
Each call is appended to <capture>.calls; with <capture>.fail-after holding N, calls after the
Nth fail as slurmdbd being down would; with <capture>.by-window present, only the runs that
ran between --starttime and --endtime are printed (else every run, for every window)."""
import os
import sys

args = sys.argv[1:]
with open({capture!r} + ".calls", "a", encoding="utf-8") as calls:
    calls.write(" ".join(args) + "\\n")
if os.path.exists({capture!r} + ".fail-after"):
    limit = int(open({capture!r} + ".fail-after").read())
    if sum(1 for _ in open({capture!r} + ".calls")) > limit:
        sys.stderr.write("sacct: error: Problem talking to the database: Connection refused\\n")
        sys.exit(1)
delimiter = next(a.split("=", 1)[1] for a in args if a.startswith("--delimiter="))
fields = next(a.split("=", 1)[1] for a in args if a.startswith("--format=")).split(",")
text = open({capture!r}, encoding="utf-8").read()
head, _, body = text.partition("\\n")
names = head.split("|#|")[:-1]
out = [delimiter.join(fields) + delimiter]
by_window = os.path.exists({capture!r} + ".by-window")
if by_window:
    import calendar, time
    def epoch(text):
        return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    start = epoch(args[args.index("--starttime") + 1])
    end = epoch(args[args.index("--endtime") + 1])
for chunk in body.split("|#|\\n"):
    if chunk.strip():
        row = dict(zip(names, chunk.split("|#|")))
        if by_window and not (
            int(row["Start"]) < end and (not row["End"].isdigit() or int(row["End"]) >= start)
        ):
            continue
        out.append(delimiter.join(row.get(f, "") for f in fields) + delimiter)
sys.stdout.write("\\n".join(out) + "\\n")
'''


def write_fake_sacct(path: Path, capture: Path) -> Path:
    """An executable fake sacct at ``path`` that serves ``capture`` (see live_capture)."""
    path.write_text(FAKE_SACCT.format(python=sys.executable, capture=str(capture)))
    path.chmod(0o755)
    return path
