"""The ``sacct:`` section of the configuration: the program, the window, the extra arguments
(checked against config_sacct_args.py) and the clusters billed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.parser import isoparse
from yaml.nodes import Node, SequenceNode

from slurm_tracker.config_durations import parse_duration
from slurm_tracker.config_model import CONFIG_KEYS, SacctConfig
from slurm_tracker.config_nodes import (
    INT_TAG,
    STR_TAG,
    TIMESTAMP_TAG,
    Entry,
    NodeReader,
    Where,
    is_null,
    kind_of,
)
from slurm_tracker.config_sacct_args import sacct_arg_problems
from slurm_tracker.redaction import ABSOLUTE_TIME, quoted, redacted_words
from slurm_tracker.times import utc_text

#: An absolute first_sync_start later than now plus this is a typo.
FUTURE_TOLERANCE = timedelta(minutes=5)


class SacctReader(NodeReader):
    """The sacct section, and cluster names (also read at the top level)."""

    def cluster_name(self, node: Node, path: Where) -> Optional[str]:
        """A Slurm cluster name: no blanks, ':' (event keys) or ',' (sacct --clusters lists)."""
        value = self.name(node, path, "the cluster name")
        if value is None:
            return None
        if any(char in ":," or char.isspace() for char in value):
            self.add(
                path,
                node,
                f"the cluster name {quoted(value)} must not contain blanks, ':' or ',' "
                "(it is part of event keys and of sacct's --clusters list)",
            )
            return None
        if value.lower() in ("all", "-1"):
            self.add(
                path,
                node,
                f"{quoted(value)} is not a cluster name: to sacct, --clusters={value} means "
                "every cluster; list each cluster this agent bills by its name",
            )
            return None
        if value.startswith("-"):
            self.add(path, node, f"the cluster name {quoted(value)} must not start with '-'")
            return None
        return value

    def clusters(self, entry: Optional[Entry], path: Where) -> tuple[str, ...]:
        """sacct.clusters: the clusters billed, which the agent passes as --clusters=a,b."""
        names, ok = self.name_list(
            entry, path, "a list of cluster names, e.g. [hpc1, hpc2]", self.cluster_name
        )
        return names if ok else ()

    def sacct(self, entry: Optional[Entry]) -> SacctConfig:
        path: Where = ("sacct",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["sacct"]) or {}
        defaults = SacctConfig()
        program = defaults.path
        if "path" in fields:
            value = self.name(fields["path"].value, (*path, "path"), "the sacct program")
            program = value if value is not None else program

        def seconds(key: str, minimum: int, default: int) -> int:
            value = self.duration(fields.get(key), (*path, key), minimum)
            return value if value is not None else default

        start_at, lookback_s = self.first_sync(fields.get("first_sync_start"), defaults)
        return SacctConfig(
            path=program,
            timeout_s=seconds("timeout", 1, defaults.timeout_s),
            lag_s=seconds("lag", 0, defaults.lag_s),
            overlap_s=seconds("overlap", 0, defaults.overlap_s),
            first_sync_start=start_at,
            first_sync_lookback_s=lookback_s,
            extra_args=self.extra_args(fields.get("extra_args"), (*path, "extra_args")),
            backfill_chunk_s=seconds("backfill_chunk", 1, defaults.backfill_chunk_s),
            backfill_pause_s=seconds("backfill_pause", 0, defaults.backfill_pause_s),
            file_timezone=self.timezone(fields.get("file_timezone"), defaults.file_timezone),
            clusters=self.clusters(fields.get("clusters"), (*path, "clusters")),
        )

    def first_sync(
        self, entry: Optional[Entry], defaults: SacctConfig
    ) -> tuple[Optional[datetime], int]:
        """An absolute start (a date or RFC 3339 time, naive = UTC) or a look-back duration."""
        fallback = (defaults.first_sync_start, defaults.first_sync_lookback_s)
        if entry is None or is_null(entry.value):
            return fallback
        path: Where = ("sacct", "first_sync_start")
        node = entry.value
        help_text = (
            "give a date or time (2026-01-01, 2026-01-01T00:00:00Z) or how far back "
            "the first sync looks (1d, 2w)"
        )
        tags = (STR_TAG, INT_TAG, TIMESTAMP_TAG)
        if not self.is_scalar(node, path, tags, "a time or a duration", help_text):
            return fallback
        value = str(node.value).strip()
        if ABSOLUTE_TIME.fullmatch(value):
            try:
                parsed = isoparse(value.upper())
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=timezone.utc)
                start_at = parsed.astimezone(timezone.utc)
            except (ValueError, OverflowError) as exc:
                self.add(
                    path,
                    node,
                    f"not a valid time {quoted(value)}: {redacted_words(str(exc))}",
                )
                return fallback
            if start_at > self.now_at + FUTURE_TOLERANCE:
                self.add(
                    path,
                    node,
                    f"{utc_text(start_at)} is in the future (it is now {utc_text(self.now_at)})"
                    ": a typo? the agent would bill nothing until then; give a time in the past "
                    "or a look-back such as 1d",
                )
                return fallback
            return start_at, defaults.first_sync_lookback_s
        try:
            lookback = parse_duration(value)
        except ValueError:
            self.add(path, node, f"neither a time nor a duration: {quoted(value)}; {help_text}")
            return fallback
        if lookback < 1:
            self.add(path, node, f"a look-back must be more than 0; {help_text}")
            return fallback
        return None, lookback

    def extra_args(self, entry: Optional[Entry], path: Where) -> tuple[str, ...]:
        if entry is None or is_null(entry.value):
            return ()
        node = entry.value
        if not isinstance(node, SequenceNode):
            self.add(
                path,
                node,
                "expected a list of sacct options, e.g. [--partition=compute]; "
                f"got {kind_of(node)}",
            )
            return ()
        args: list[str] = []
        items: list[tuple[int, Node]] = []  # (index in the file's list, node) of each arg
        for index, item in enumerate(node.value):
            value = self.text(item, (*path, index), "one sacct option as text")
            if value is not None:
                args.append(value)
                items.append((index, item))
        problems = sacct_arg_problems(args)
        for position, message in problems:
            index, item = items[position]
            self.add((*path, index), item, message)
        return () if problems or len(args) < len(node.value) else tuple(args)

    def timezone(self, entry: Optional[Entry], default: str) -> str:
        if entry is None:
            return default
        path: Where = ("sacct", "file_timezone")
        value = self.name(entry.value, path, "a time zone name")
        if value is None:
            return default
        if value.upper() == "UTC":
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            self.add(
                path,
                entry.value,
                f"unknown time zone {quoted(value)}: use an IANA name such as UTC, "
                "Europe/Berlin or America/Chicago (is the tzdata package installed?)",
            )
            return default
        return value
