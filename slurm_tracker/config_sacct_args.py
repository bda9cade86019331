"""The sacct option tables: which options ``sacct.extra_args`` allows, and why others are refused.

An ALLOW-list: sacct.extra_args may only narrow which jobs are read (by account, partition, QOS,
user, group, WCKey, node or constraint). Anything else could read other clusters' jobs, change
the output the agent parses, or move the window, and is refused with the reason.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Optional

from slurm_tracker.redaction import quoted, shown_value

#: Allowed long options (full names only), each taking a value.
_SACCT_ALLOWED_LONG = frozenset(
    {"accounts", "partition", "qos", "user", "uid", "gid", "group", "wckeys", "nodelist",
     "constraints"}
)  # fmt: skip
#: Allowed short options, each taking a value (-A physics, -Aphysics).
_SACCT_ALLOWED_SHORT = frozenset("ArqugWN")
SACCT_ALLOWED_HELP = (
    "sacct.extra_args may only narrow which jobs are read: --accounts (-A), --partition (-r), "
    "--qos (-q), --user (-u), --uid, --gid or --group (-g), --wckeys (-W), --nodelist (-N) "
    "and --constraints, each with a value (--partition=compute, or in the next item)"
)

# sacct's options (getopt_long, Slurm 20.11 to 25.11), to recognise the refused ones and their
# values: long options by whether they take a value.
_SACCT_LONG_WITH_VALUE = frozenset(
    {
        "accounts", "associations", "cluster", "clusters", "constraints", "delimiter",
        "endtime", "fields", "file", "flags", "format", "gid", "group", "jobs", "name",
        "ncpus", "nnodes", "nodelist", "partition", "qos", "reason", "starttime", "state",
        "timelimit-max", "timelimit-min", "uid", "units", "user", "wckeys",
    }
)  # fmt: skip
_SACCT_LONG_OTHER = frozenset(
    {
        "allclusters", "allocations", "allusers", "batch-script", "brief",
        "completion", "duplicates", "env-vars", "federation", "help", "help-fields",
        "helpformat", "json", "local", "long", "noconvert", "noheader", "parsable",
        "parsable2", "truncate", "usage", "verbose", "version", "whole-hetjob", "yaml",
    }
)  # fmt: skip
_SACCT_LONG = _SACCT_LONG_WITH_VALUE | _SACCT_LONG_OTHER
_SACCT_SHORT_WITH_VALUE = frozenset("ACEfFgiIjkKMNoqrRsSuWx")

_USE_CLUSTERS = (
    "it changes which clusters' jobs are read, and another cluster's jobs would be billed by "
    "this agent: use sacct.clusters to bill several clusters (the agent passes --clusters itself)"
)
# Refused options with a specific reason: (long names, short letters, why).
_SACCT_REFUSED: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("clusters", "cluster", "allclusters", "federation", "local"), "ML", _USE_CLUSTERS),
    (("format", "fields"), "o",
     "the agent chooses the fields it reads; other fields would break parsing"),
    (("parsable", "parsable2", "delimiter", "json", "yaml", "noheader", "long", "brief",
      "units", "noconvert"),
     "pPnlb", "the agent chooses the output format it parses"),
    (("starttime", "endtime"), "SE",
     "the agent sets the time window itself (from the last sync, the overlap and the lag)"),
    (("allocations", "duplicates", "allusers"), "XDa", "the agent already passes it"),
    (("state",), "s",
     "with --state, sacct selects jobs by the state they were in during the window instead "
     "of the jobs that ran in it, so usage would be missed"),
    (("jobs",), "j",
     "it would limit every sync to these jobs while the window moves on, so every other "
     "job's usage would never be billed; use `sync --sacct-file` for one-off checks"),
    (("truncate",), "T",
     "it cuts start and end times at the window's edges, which changes elapsed times and "
     "would bill runs wrongly"),
    (("completion",), "c", "it reads the job completion log instead of the accounting database"),
    (("file",), "f",
     "it reads a file instead of the accounting database; use `sync --sacct-file` to bill "
     "a saved capture"),
    (("help", "helpformat", "help-fields", "usage", "version", "batch-script", "env-vars"),
     "heUVB", "it prints something other than job records"),
)  # fmt: skip


def _sacct_refusal_long(name: str) -> str:
    for names, _, why in _SACCT_REFUSED:
        if name in names:
            return why
    return f"it is not on the allow-list; {SACCT_ALLOWED_HELP}"


def _sacct_refusal_short(letter: str) -> str:
    for _, letters, why in _SACCT_REFUSED:
        if letter in letters:
            return why
    if letter == "C":
        return "write its full name, --constraints"
    return f"it is not on the allow-list; {SACCT_ALLOWED_HELP}"


def _sacct_value_problem(option: str, value: Optional[str]) -> Optional[str]:
    """Why ``value`` cannot be the value of the allowed ``option``; None when it can."""
    usage = (
        f"{option}=VALUE or {option} VALUE as two items"
        if option.startswith("--")
        else f"{option}VALUE or {option} VALUE as two items"
    )
    if value is None:
        return f"{option} needs a value: write {usage}"
    if not value.strip():
        return f"{option} needs a value, got an empty one: write {usage}"
    if value.startswith("-"):
        return f"{option} needs a value, but {quoted(value)} looks like an option: write {usage}"
    if value.startswith("="):
        return f"the value {quoted(value)} of {option} starts with '=': write {usage}"
    if value != value.strip() or any(unicodedata.category(c) == "Cc" for c in value):
        return f"the value {quoted(value)} of {option} has blanks around it or control characters"
    return None


def _allowed_option(
    option: str, inline: Optional[str], following: Optional[str]
) -> tuple[Optional[str], bool]:
    """(the problem with the value of an allowed ``option``, whether the next item is its value):
    the value is ``inline`` (``--partition=compute``, ``-rcompute``) when given, else the next
    item."""
    if inline is not None:
        return _sacct_value_problem(option, inline), False
    problem = _sacct_value_problem(option, following)
    return problem, problem is None


def sacct_arg_problems(args: Sequence[str]) -> list[tuple[int, str]]:
    """(index, message) for each extra sacct argument that is not allowed.

    Only the options of SACCT_ALLOWED_HELP are allowed, by their full names, each with its value
    (``--partition=compute``, ``--partition compute``, ``-r compute`` or ``-rcompute``).
    Every other item is refused with the reason and what to do instead.
    """
    problems: list[tuple[int, str]] = []
    index = 0
    while index < len(args):
        arg = args[index]
        following = args[index + 1] if index + 1 < len(args) else None
        problem: Optional[str] = None
        skip_next = False
        if arg in ("", "-", "--"):
            problem = f"{quoted(arg)} is not a sacct option: remove it"
        elif arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            shown = f"--{shown_value(name)}"
            if name in _SACCT_ALLOWED_LONG:
                inline = value if has_value else None
                problem, skip_next = _allowed_option(f"--{name}", inline, following)
            elif name in _SACCT_LONG:
                problem = f"{shown} is refused: {_sacct_refusal_long(name)}"
                skip_next = not has_value and name in _SACCT_LONG_WITH_VALUE
            else:
                known = sorted(option for option in _SACCT_LONG if name and option.startswith(name))
                if len(known) == 1 and known[0] in _SACCT_ALLOWED_LONG:
                    problem = (
                        f"{shown} is an abbreviation: write the full name --{known[0]} "
                        "(abbreviations are refused: they may name another option in another "
                        "Slurm version)"
                    )
                    skip_next = not has_value
                elif len(known) == 1:
                    problem = (
                        f"{shown} is an abbreviation of --{known[0]}, which is refused: "
                        f"{_sacct_refusal_long(known[0])}"
                    )
                    skip_next = not has_value and known[0] in _SACCT_LONG_WITH_VALUE
                elif known:
                    problem = (
                        f"{shown} is an abbreviation (of --{', --'.join(known)}): abbreviations "
                        f"are refused; {SACCT_ALLOWED_HELP}"
                    )
                else:
                    problem = (
                        f"{shown} is not an option sacct.extra_args allows; {SACCT_ALLOWED_HELP}"
                    )
        elif arg.startswith("-"):
            letter, rest = arg[1], arg[2:]
            if letter in _SACCT_ALLOWED_SHORT:
                problem, skip_next = _allowed_option(f"-{letter}", rest or None, following)
            else:
                problem = (
                    f"-{shown_value(letter)} (in {shown_value(arg)}) is refused: "
                    f"{_sacct_refusal_short(letter)}"
                )
                skip_next = not rest and letter in _SACCT_SHORT_WITH_VALUE
        else:
            problem = (
                f"{quoted(arg)} is not an option: give each option as its own item, "
                "with its value after '=' (--partition=compute) or in the next item"
            )
        if problem is not None:
            problems.append((index, problem))
        index += 2 if skip_next else 1
    return problems
