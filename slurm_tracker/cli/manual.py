"""The manual, generated from the click definitions: `slurm-tracker help` prints every
command's help in one text; `slurm-tracker help --man` prints it as a man page (roff), e.g.
``slurm-tracker help --man | gzip > /usr/local/share/man/man1/slurm-tracker.1.gz``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence
from datetime import date

import click

ENVIRONMENT = (
    ("SLURM_TRACKER_CONFIG", "The config file when --config is not given."),
    (
        "PW_API_KEY",
        "The API key, when neither api.api_key_file nor a systemd credential gives one.",
    ),
    ("CREDENTIALS_DIRECTORY", "Set by systemd: the key is read from its file api-key."),
    ("SLURM_TRACKER_LOG_FORMAT", "text (default) or json: the format of log lines on stderr."),
    ("SLURM_TRACKER_SYSLOG", "1: also log to the local syslog, as --syslog does."),
    ("JOURNAL_STREAM", "Set by systemd: log lines then carry the journal's priority prefix."),
)
FILES = (
    ("/etc/slurm-tracker/config.yaml", "The default config file."),
    ("/var/lib/slurm-tracker/state.db", "The state file of the shipped systemd unit."),
)


def commands(
    group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command, click.Context]]:
    """Every command under ``group``, depth first in name order, with its context."""
    for name in sorted(group.list_commands(ctx)):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        yield (*path, name), command, sub
        if isinstance(command, click.Group):
            yield from commands(command, sub, (*path, name))


def text(main: click.Group, ctx: click.Context, chosen: Sequence[str] = ()) -> str:
    """Every command's --help (or the chosen commands'), one after the other."""
    parts = [main.get_help(ctx)] if not chosen else []
    for path, command, sub in commands(main, ctx):
        if chosen and " ".join(path) != " ".join(chosen) and path[0] not in chosen:
            continue
        rule = "=" * 78
        parts.append(f"{rule}\n{sub.command_path}\n{rule}\n{command.get_help(sub)}")
    return "\n\n".join(parts)


def _roff(value: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no line starting a request."""
    escaped = value.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", escaped, flags=re.MULTILINE)


def _paragraphs(help_text: str) -> list[str]:
    """The help text's paragraphs; click's ``\\b`` (verbatim) blocks kept as .nf blocks."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(help_text)):
        if block.startswith("\b"):
            lines = block.split("\n")[1:]
            out.append(".nf\n" + "\n".join(_roff(ln) for ln in lines) + "\n.fi")
        else:
            out.append(_roff(" ".join(block.split())))
    return out


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", f"\\fB{_roff(names)}\\fR", _roff(" ".join(help_text.split()))]
    return lines


def man(main: click.Group, ctx: click.Context, version: str, today: date, exit_status: str) -> str:
    """The man page, section 1."""
    summary = (main.help or "").strip().split("\n")[0].rstrip(".")
    out = [
        f'.TH SLURM\\-TRACKER 1 "{today:%Y-%m-%d}" "slurm-tracker {_roff(version)}" '
        '"User Commands"',
        ".SH NAME",
        f"slurm\\-tracker \\- {_roff(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        ".B slurm\\-tracker",
        "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
    ]
    for paragraph in _paragraphs(main.help or ""):
        out += [paragraph, ".PP"]
    out.append(".SH COMMANDS")
    for _path, command, sub in commands(main, ctx):
        usage = " ".join(command.collect_usage_pieces(sub))
        out.append(f'.SS "{_roff(sub.command_path)} {_roff(usage)}"')
        for paragraph in _paragraphs(command.help or ""):
            out += [paragraph, ".PP"]
        out += _options(command, sub)
    out.append(".SH EXIT STATUS")
    out += [_roff(" ".join(exit_status.split()))]
    out.append(".SH ENVIRONMENT")
    for name, meaning in ENVIRONMENT:
        out += [".TP", f"\\fB{_roff(name)}\\fR", _roff(meaning)]
    out.append(".SH FILES")
    for name, meaning in FILES:
        out += [".TP", f"\\fI{_roff(name)}\\fR", _roff(meaning)]
    out += [".SH SEE ALSO", "sacct(1), systemd.timer(5), crontab(5)"]
    return "\n".join(out) + "\n"
