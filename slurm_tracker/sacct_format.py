"""sacct's output format: the field lists of our queries, the delimiters, the field names.

Facts shared by the subprocess runner (:mod:`slurm_tracker.sacct`, which builds the queries)
and the readers (:mod:`slurm_tracker.parse` and its modules, which read their output): kept
here so that a reader never imports the module that starts subprocesses. No I/O.
"""

from __future__ import annotations

import re
import secrets

#: The delimiter of the documented capture command (saved files read with --sacct-file). The live
#: query never uses it: see new_delimiter.
CAPTURE_DELIMITER = "|#|"
LIVE_FIELDS = (
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
)  # free text (JobName) last
FREE_TEXT_FIELD = "JobName"

#: Fields of the report's query. Unlike the billing query it reads step records (no
#: ``--allocations``): TotalCPU, MaxRSS, AveRSS, NTasks and the TRES usage of each step give
#: the utilisation. No free text but JobName, asked for only when grouping by it, and last.
REPORT_FIELDS = (
    "Cluster",
    "JobID",
    "JobIDRaw",
    "Account",
    "Partition",
    "User",
    "Submit",
    "Start",
    "End",
    "ElapsedRaw",
    "State",
    "AllocTRES",
    "ReqTRES",
    "ReqMem",
    "NNodes",
    "NodeList",
    "NTasks",
    "TotalCPU",
    "MaxRSS",
    "AveRSS",
    "TRESUsageInAve",
    "TRESUsageInMax",
    "JobName",
)  # free text (JobName) last

#: sacct --helpformat names (Slurm 15.08 to 25.11), to map headers case-insensitively.
KNOWN_FIELDS: tuple[str, ...] = (
    "Account", "AdminComment", "AllocCPUS", "AllocGRES", "AllocNodes", "AllocTRES", "AssocID",
    "AveCPU", "AveCPUFreq", "AveDiskRead", "AveDiskWrite", "AvePages", "AveRSS", "AveVMSize",
    "BlockID", "Cluster", "Comment", "Constraints", "ConsumedEnergy", "ConsumedEnergyRaw",
    "Container", "CPUTime", "CPUTimeRAW", "DBIndex", "DerivedExitCode", "Elapsed", "ElapsedRaw",
    "Eligible", "End", "ExitCode", "Extra", "FailedNode", "Flags", "GID", "Group", "JobID",
    "JobIDRaw", "JobName", "Layout", "Licenses", "MaxDiskRead", "MaxDiskReadNode",
    "MaxDiskReadTask", "MaxDiskWrite", "MaxDiskWriteNode", "MaxDiskWriteTask", "MaxPages",
    "MaxPagesNode", "MaxPagesTask", "MaxRSS", "MaxRSSNode", "MaxRSSTask", "MaxVMSize",
    "MaxVMSizeNode", "MaxVMSizeTask", "McsLabel", "MinCPU", "MinCPUNode", "MinCPUTask", "NCPUS",
    "NNodes", "NodeList", "NTasks", "Partition", "Planned", "PlannedCPU", "PlannedCPURAW",
    "Priority", "QOS", "QOSRAW", "Reason", "ReqCPUFreq", "ReqCPUFreqGov", "ReqCPUFreqMax",
    "ReqCPUFreqMin", "ReqCPUS", "ReqGRES", "ReqMem", "ReqNodes", "ReqTRES", "Reservation",
    "ReservationId", "Reserved", "ResvCPU", "ResvCPURAW", "Start", "State", "StdErr", "StdIn",
    "StdOut", "Submit", "SubmitLine", "Suspended", "SystemComment", "SystemCPU", "Timelimit",
    "TimelimitRaw", "TotalCPU", "TRESUsageInAve", "TRESUsageInMax", "TRESUsageInMaxNode",
    "TRESUsageInMaxTask", "TRESUsageInMin", "TRESUsageInMinNode", "TRESUsageInMinTask",
    "TRESUsageInTot", "TRESUsageOutAve", "TRESUsageOutMax", "TRESUsageOutMaxNode",
    "TRESUsageOutMaxTask", "TRESUsageOutMin", "TRESUsageOutMinNode", "TRESUsageOutMinTask",
    "TRESUsageOutTot", "UID", "User", "UserCPU", "WCKey", "WCKeyID", "WorkDir",
)  # fmt: skip
_CANONICAL = {name.lower(): name for name in KNOWN_FIELDS}

#: Fields users can fill with any text (``|``, newlines...). When one is the last column, a
#: record with too many delimiters is rejoined into it.
FREE_TEXT_FIELDS = frozenset(
    {"JobName", "SubmitLine", "WorkDir", "Comment", "AdminComment", "SystemComment", "Extra",
     "StdOut", "StdErr", "StdIn", "Constraints", "Container", "WCKey"}
)  # fmt: skip

#: What new_delimiter draws (sacct.build_command refuses any other live delimiter).
DELIMITER_RE = re.compile(r"\|~[0-9a-f]{32}~\|")


def new_delimiter() -> str:
    """A delimiter nobody can predict: ``|~`` + 128 random bits in hex + ``~|``."""
    return f"|~{secrets.token_hex(16)}~|"


def live_fields(with_job_name: bool) -> tuple[str, ...]:
    """The fields of the live query; JobName (user text) only when it is needed, and last."""
    return LIVE_FIELDS if with_job_name else LIVE_FIELDS[:-1]


def report_fields(with_job_name: bool) -> tuple[str, ...]:
    """The fields of the report's query; JobName only when it is needed, and last."""
    return REPORT_FIELDS if with_job_name else REPORT_FIELDS[:-1]


def canonical_field(name: str) -> str:
    """sacct's spelling of a field name (``jobidraw`` -> ``JobIDRaw``; ``jobname%30`` too)."""
    bare = name.strip().split("%", 1)[0].strip()
    return _CANONICAL.get(bare.lower(), bare)
