"""The deployment files: systemd units, the cron file, and the API key as a systemd credential.

The unit checks run the real ``systemd-analyze`` (``verify``, and ``security --offline=yes``
with the limit CI enforces: exposure <= 2.0); the cron check runs the cron line the way cron
does (``env -i`` with the file's variables, ``sh -c``); the credential checks build the files
and directories exactly as systemd's ``LoadCredential=`` leaves them (mode, owner, POSIX ACL)
and read them as an unprivileged service user. CI runs as root with systemd-analyze and Slurm's
client installed; elsewhere the tests that need them skip with the reason (in CI they fail).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_tracker import errors
from slurm_tracker.api import load_api_key
from tests.conftest import IN_CI, REPO

SYSTEMD = REPO / "systemd"
CRON_FILE = REPO / "cron" / "slurm-tracker"
SERVICES = ("slurm-tracker.service", "slurm-tracker@.service")
INSTALLED_BINARY = "/usr/local/bin/slurm-tracker"
MAX_EXPOSURE = 2.0  # the limit CI enforces (`systemd-analyze security --threshold=20`)
SERVICE_UID = 65534  # nobody: an unprivileged service user for the credential tests
KEY = "pwt_Y3JlZGVudGlhbHMuZXhhbXBsZS5vcmc.s3cr3t-credential-key"


def _need(condition: bool, reason: str) -> None:
    """Skip with ``reason`` outside CI when ``condition`` fails; fail in CI (it must hold)."""
    if not condition:
        if IN_CI:
            pytest.fail(reason + " (the CI machine must provide it)")
        pytest.skip(reason)


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    _need(path is not None, "systemd-analyze is not installed")
    assert path is not None
    return path


def _need_root() -> None:
    _need(os.geteuid() == 0, "needs root (files owned by another user, ACLs, seteuid)")


# --- systemd units -------------------------------------------------------------------------


def _settings(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in a unit file, in order."""
    section, found = "", []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def _values(unit: Path, key: str) -> list[str]:
    return [value for section, k, value in _settings(unit) if k == key and section == "Service"]


@pytest.fixture
def runnable_units(tmp_path: Path) -> Path:
    """Copies of systemd/ whose ExecStart names this venv's slurm-tracker, which exists.

    ``systemd-analyze verify`` refuses a unit whose command is missing; the installed path
    /usr/local/bin/slurm-tracker need not exist on the machine that runs the tests.
    """
    binary = Path(sys.executable).parent / "slurm-tracker"
    assert binary.exists(), f"{binary}: install the package (pip install -e .) first"
    for unit in SYSTEMD.iterdir():
        text = unit.read_text()
        assert INSTALLED_BINARY in text or unit.suffix == ".timer", unit
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_BINARY, str(binary)))
    # an instance of the template pair, as `systemctl enable slurm-tracker@clusterA.timer` makes
    for suffix in ("service", "timer"):
        template = (tmp_path / f"slurm-tracker@.{suffix}").read_text()
        (tmp_path / f"slurm-tracker@clusterA.{suffix}").write_text(template)
    return tmp_path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_the_units_are_the_expected_set() -> None:
    assert sorted(p.name for p in SYSTEMD.iterdir()) == [
        "slurm-tracker.service",
        "slurm-tracker.timer",
        "slurm-tracker@.service",
        "slurm-tracker@.timer",
    ]


@pytest.mark.parametrize(
    "units",
    [
        ["slurm-tracker.service", "slurm-tracker.timer"],
        ["slurm-tracker@.service", "slurm-tracker@.timer"],
        ["./slurm-tracker@clusterA.service", "./slurm-tracker@clusterA.timer"],
    ],
)
def test_systemd_analyze_verify_is_clean(runnable_units: Path, units: list[str]) -> None:
    # verify exits 0 on unknown keys and unparsable values (it only warns): any output fails
    done = _run([_systemd_analyze(), "verify", *units], runnable_units)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_catches_a_broken_setting(runnable_units: Path) -> None:
    """The check above would see a typo: verify prints it (and CI fails on any output)."""
    unit = runnable_units / "slurm-tracker.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHom=yes"))
    done = _run([_systemd_analyze(), "verify", unit.name], runnable_units)
    assert "Unknown key" in done.stdout + done.stderr


def _exposure(unit: str, cwd: Path, *extra: str) -> tuple[float, int]:
    done = _run([_systemd_analyze(), "security", "--offline=yes", *extra, unit], cwd)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1)), done.returncode


@pytest.mark.parametrize(
    "unit", ["slurm-tracker.service", "slurm-tracker@.service", "./slurm-tracker@clusterA.service"]
)
def test_exposure_is_at_most_2(runnable_units: Path, unit: str) -> None:
    exposure, _ = _exposure(unit, runnable_units)
    assert exposure <= MAX_EXPOSURE
    # the CI gate: --threshold is the exposure times 10, failing when the level is above it
    assert _exposure(unit, runnable_units, "--threshold=20")[1] == 0


def test_the_ci_gate_fails_an_unhardened_unit(runnable_units: Path) -> None:
    """Without the sandbox (the unit as it was: root, no Protect*) the gate must fail."""
    unit = runnable_units / "slurm-tracker.service"
    kept = [
        line
        for line in unit.read_text().splitlines()
        if not line.startswith(("[", "#")) and "=" in line
        if line.split("=")[0]
        in ("Type", "ExecStart", "SuccessExitStatus", "StateDirectory", "UMask", "Nice")
    ]
    unit.write_text("[Service]\n" + "\n".join(kept) + "\n")
    exposure, code = _exposure(unit.name, runnable_units, "--threshold=20")
    assert exposure > 9 and code != 0


@pytest.mark.parametrize("service", SERVICES)
def test_services_run_sandboxed_as_the_dedicated_user(service: str) -> None:
    unit = SYSTEMD / service
    settings = {key: value for section, key, value in _settings(unit) if section == "Service"}
    required = {
        "Type": "oneshot",
        "User": "slurm-tracker",
        "Group": "slurm-tracker",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SuccessExitStatus": "4 75",
        "StandardError": "journal",
    }
    assert {key: settings.get(key) for key in required} == required
    assert _values(unit, "SystemCallFilter")[0] == "@system-service"
    assert "PrivateNetwork" not in settings  # it needs slurmdbd and the API
    assert "DynamicUser" not in settings  # slurmdbd needs a fixed uid for the operator
    assert "${STATE_DIRECTORY}/state.db" in settings["ExecStart"]


def test_the_plain_and_the_template_unit_differ_only_per_instance() -> None:
    plain = _settings(SYSTEMD / "slurm-tracker.service")
    template = _settings(SYSTEMD / "slurm-tracker@.service")
    per_instance = {
        "Description": ("slurm-tracker:", "slurm-tracker %i:"),
        "LoadCredential": (
            "api-key:/etc/slurm-tracker/api-key",
            "api-key:/etc/slurm-tracker/%i.api-key",
        ),
        "StateDirectory": ("slurm-tracker", "slurm-tracker/%i"),
        "ExecStart": ("/etc/slurm-tracker/config.yaml", "/etc/slurm-tracker/%i.yaml"),
        "SyslogIdentifier": ("slurm-tracker", "slurm-tracker@%i"),
    }
    expected = []
    for section, key, value in plain:
        old, new = per_instance.get(key, ("", ""))
        assert old in value, (key, value)
        expected.append((section, key, value.replace(old, new, 1) if old else value))
    assert template == expected


@pytest.mark.parametrize("timer", ["slurm-tracker.timer", "slurm-tracker@.timer"])
def test_timers_every_5_minutes_with_splay_and_catch_up(timer: str) -> None:
    settings = {key: value for section, key, value in _settings(SYSTEMD / timer)}
    assert settings["OnCalendar"] == "*:0/5"
    assert settings["RandomizedDelaySec"]
    assert settings["Persistent"] == "true"  # needs OnCalendar= to do anything
    assert settings["WantedBy"] == "timers.target"


# --- cron ----------------------------------------------------------------------------------


def _cron_file() -> tuple[dict[str, str], str, str]:
    """(variables, user, command) of the one job in the cron.d file."""
    variables, jobs = {}, []
    for raw in CRON_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2).strip("\"'")
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, line
        jobs.append((fields[5], fields[6]))
    assert len(jobs) == 1
    return variables, *jobs[0]


def test_cron_file_sets_the_environment_and_keeps_the_exit_code() -> None:
    variables, user, command = _cron_file()
    assert variables["SHELL"] == "/bin/sh"
    assert variables["PATH"].split(":")[:3] == ["/usr/local/bin", "/usr/bin", "/bin"]
    assert user == "slurm-tracker"
    assert "|" not in command  # a pipe (into logger) would hide the agent's exit code
    assert "%" not in command  # cron would turn it into a newline
    assert "MAILTO" in CRON_FILE.read_text()


@pytest.fixture
def cron_run(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A bin dir of fakes put first on cron's PATH, and the log they write."""
    fake_bin, log = tmp_path / "bin", tmp_path / "log"
    fake_bin.mkdir()
    # sleep: records the splay instead of waiting
    (fake_bin / "sleep").write_text(f'#!/bin/sh\necho "sleep $*" >> {log}\n')
    (fake_bin / "sleep").chmod(0o755)
    yield fake_bin, log


def _fake_agent(fake_bin: Path, log: Path, code: int) -> None:
    """A slurm-tracker that records its argv, PATH and where sacct is, then exits ``code``."""
    script = (
        "#!/bin/sh\n"
        f'echo "argv $*" >> {log}\n'
        f'echo "PATH $PATH" >> {log}\n'
        f'echo "sacct $(command -v sacct)" >> {log}\n'
        f"exit {code}\n"
    )
    (fake_bin / "slurm-tracker").write_text(script)
    (fake_bin / "slurm-tracker").chmod(0o755)


def _run_cron_line(fake_bin: Path) -> int:
    """The job's command as cron runs it: a bare environment with the file's variables."""
    variables, _, command = _cron_file()
    env = dict(variables, PATH=f"{fake_bin}:{variables['PATH']}", HOME="/", LOGNAME="x")
    env_args = [f"{k}={v}" for k, v in env.items()]
    done = subprocess.run(
        ["env", "-i", *env_args, variables["SHELL"], "-c", command], timeout=60, check=False
    )
    return done.returncode


@pytest.mark.parametrize("code", [0, 4, 75, 3])
def test_cron_line_keeps_the_exit_code_and_finds_sacct(
    cron_run: tuple[Path, Path], code: int
) -> None:
    fake_bin, log = cron_run
    _fake_agent(fake_bin, log, code)
    assert _run_cron_line(fake_bin) == code
    lines = log.read_text().splitlines()
    assert lines[0].startswith("sleep ")
    assert lines[1] == "argv sync -q --syslog --config /etc/slurm-tracker/config.yaml"
    variables, _, _ = _cron_file()
    assert lines[2] == f"PATH {fake_bin}:{variables['PATH']}"
    # Slurm's client (installed on the CI machine with the test cluster) is on cron's PATH
    _need(shutil.which("sacct") is not None, "Slurm's sacct is not installed")
    sacct = lines[3].removeprefix("sacct ")
    assert sacct and Path(sacct).is_absolute() and os.access(sacct, os.X_OK)


def test_cron_splay_is_random_and_below_a_minute(cron_run: tuple[Path, Path]) -> None:
    fake_bin, log = cron_run
    _fake_agent(fake_bin, log, 0)
    for _ in range(30):
        assert _run_cron_line(fake_bin) == 0
    splays = [int(line.split()[1]) for line in log.read_text().splitlines() if "sleep" in line]
    assert len(splays) == 30
    assert all(0 <= s <= 59 for s in splays)
    assert len(set(splays)) > 1  # all equal: 60**-29


def test_a_failing_splay_does_not_stop_billing(cron_run: tuple[Path, Path]) -> None:
    fake_bin, log = cron_run
    _fake_agent(fake_bin, log, 0)
    (fake_bin / "sleep").write_text("#!/bin/sh\nexit 1\n")
    assert _run_cron_line(fake_bin) == 0
    assert "argv sync" in log.read_text()


# --- the API key as a systemd credential -----------------------------------------------------


def _acl(uid: int, perms: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr format) giving ``uid`` ``perms`` (r=4, x=1).

    The owner keeps its mode bits, group and others get nothing: what systemd's
    ``fd_add_uid_acl_permission`` leaves on a credential (``ls -l``: r--r-----+).
    """
    undefined = 0xFFFFFFFF
    entries = [
        (0x01, perms, undefined),  # ACL_USER_OBJ
        (0x02, perms, uid),  # ACL_USER
        (0x04, 0, undefined),  # ACL_GROUP_OBJ
        (0x10, perms, undefined),  # ACL_MASK (shown as the group bits)
        (0x20, 0, undefined),  # ACL_OTHER
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Stands for /run: a root-owned 0755 directory an unprivileged user can traverse."""
    _need_root()
    base = Path(tempfile.mkdtemp(prefix="slurm-tracker-credentials-"))
    base.chmod(0o755)
    (base / "credentials").mkdir(mode=0o755)
    yield base / "credentials"
    shutil.rmtree(base)


def _credentials(run_dir: Path, layout: str, key: str = KEY) -> Path:
    """``$CREDENTIALS_DIRECTORY`` as systemd builds it for ``User=`` (uid SERVICE_UID).

    ``acl``: files root's with an ACL for the user (tmpfs, the usual case);
    ``chown``: file and directory given to the user (ramfs, no ACLs; the mount is read-only);
    ``root``: a service without ``User=``.
    """
    directory = run_dir / "slurm-tracker.service"
    directory.mkdir(mode=0o700)
    credential = directory / "api-key"
    credential.write_text(key + "\n")
    credential.chmod(0o400)
    directory.chmod(0o500)
    if layout == "acl":
        os.setxattr(credential, "system.posix_acl_access", _acl(SERVICE_UID, 4))
        os.setxattr(directory, "system.posix_acl_access", _acl(SERVICE_UID, 5))
        assert stat.S_IMODE(credential.stat().st_mode) == 0o440
    elif layout == "chown":
        os.chown(credential, SERVICE_UID, -1)  # systemd 252: fchown(uid, GID_INVALID)
        os.chown(directory, SERVICE_UID, -1)
    return directory


@contextlib.contextmanager
def _as_service_user() -> Iterator[None]:
    """Run the body with the effective uid and gids of an unprivileged user, then back to root."""
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(SERVICE_UID)
    os.seteuid(SERVICE_UID)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@pytest.mark.parametrize("layout", ["acl", "chown"])
def test_the_service_user_reads_the_credential_systemd_made(run_dir: Path, layout: str) -> None:
    directory = _credentials(run_dir, layout)
    environ = {"CREDENTIALS_DIRECTORY": str(directory), "PW_API_KEY": "pwt_not.this.one"}
    with _as_service_user():
        assert load_api_key(None, environ) == KEY


def test_a_service_without_user_reads_its_credential(run_dir: Path) -> None:
    directory = _credentials(run_dir, "root")
    assert load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory)}) == KEY


def test_another_service_user_cannot_read_it(run_dir: Path) -> None:
    directory = _credentials(run_dir, "acl")
    os.setxattr(directory / "api-key", "system.posix_acl_access", _acl(SERVICE_UID - 1, 4))
    os.setxattr(directory, "system.posix_acl_access", _acl(SERVICE_UID - 1, 5))
    with _as_service_user(), pytest.raises((errors.UnsafeFile, errors.ConfigError)) as info:
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory)})
    assert KEY not in str(info.value)


def test_precedence_key_file_then_credential_then_environment(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "api-key").write_text("pwt_from.the.credential\n")
    (credentials / "api-key").chmod(0o400)
    key_file = tmp_path / "api-key"
    key_file.write_text("pwt_from.the.file\n")
    key_file.chmod(0o600)
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "PW_API_KEY": "pwt_from.the.env"}
    assert load_api_key(key_file, environ) == "pwt_from.the.file"
    assert load_api_key(None, environ) == "pwt_from.the.credential"
    # a credentials directory without api-key (other credentials only) falls through
    (credentials / "api-key").unlink()
    assert load_api_key(None, environ) == "pwt_from.the.env"
    assert load_api_key(None, {"PW_API_KEY": "pwt_from.the.env"}) == "pwt_from.the.env"


def test_no_key_anywhere_names_every_source(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as info:
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    message = str(info.value)
    for source in (
        "api_key_file",
        "LoadCredential=api-key:",
        "CREDENTIALS_DIRECTORY",
        "PW_API_KEY",
    ):
        assert source in message


@pytest.mark.parametrize(
    ("mode", "group", "problem"),
    [
        (0o444, 0, "readable by other users"),
        (0o440, SERVICE_UID, "readable by other users"),  # a group that is not root's
        (0o404, 0, "readable by other users"),
        (0o420, 0, "writable by group"),
        (0o402, 0, "writable by others"),
    ],
)
def test_a_credential_others_can_read_or_write_is_refused(
    run_dir: Path, mode: int, group: int, problem: str
) -> None:
    directory = _credentials(run_dir, "root")
    os.chown(directory / "api-key", 0, group)
    (directory / "api-key").chmod(mode)
    with pytest.raises(errors.UnsafeFile) as info:
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory)})
    assert problem in str(info.value) and KEY not in str(info.value)


def test_a_credential_of_another_user_is_refused(run_dir: Path) -> None:
    directory = _credentials(run_dir, "chown")  # the service user's, read here by root
    with pytest.raises(errors.UnsafeFile) as info:
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory)})
    assert "belongs to" in str(info.value)


def test_a_credential_link_or_unsafe_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text(KEY)
    target.chmod(0o400)
    (directory / "api-key").symlink_to(target)
    with pytest.raises(errors.UnsafeFile, match="symbolic link"):
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory)})
    (directory / "api-key").unlink()
    target.rename(directory / "api-key")
    directory.chmod(0o777)
    with pytest.raises(errors.UnsafeFile, match="writable by group and others"):
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory)})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is empty"),
        ("two words", "does not hold one API key"),
        ("x" * 5000, "larger than 4096 bytes"),
        (b"\xff\xfe".decode("latin-1"), "not UTF-8"),
    ],
)
def test_a_bad_credential_is_refused_without_echoing_it(
    tmp_path: Path, content: str, problem: str
) -> None:
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    data = content.encode("latin-1") if problem == "not UTF-8" else content.encode()
    (directory / "api-key").write_bytes(data)
    (directory / "api-key").chmod(0o400)
    with pytest.raises(errors.ConfigError) as info:
        load_api_key(None, {"CREDENTIALS_DIRECTORY": str(directory), "PW_API_KEY": KEY})
    assert problem in str(info.value)
    if content:
        assert content not in str(info.value)


def test_a_relative_credentials_directory_is_refused() -> None:
    with pytest.raises(errors.ConfigError, match="not an absolute path"):
        load_api_key(None, {"CREDENTIALS_DIRECTORY": "credentials", "PW_API_KEY": KEY})


def test_the_package_ships_every_subpackage() -> None:
    # `pip install .` (the README's quick start) builds a wheel from pyproject's package list:
    # a sub-package left out of it works in the editable dev install and fails in production
    found = re.search(
        r"\[tool\.setuptools\.packages\.find\]\ninclude = \[([^]]*)\]",
        (REPO / "pyproject.toml").read_text(),
    )
    assert found, "pyproject.toml: [tool.setuptools.packages.find] include = [...] expected"
    include = re.findall(r'"([^"]+)"', found.group(1))
    present = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "slurm_tracker").rglob("__init__.py")
    }
    # setuptools' find matches each package name against the patterns (fnmatch)
    left_out = sorted(p for p in present if not any(fnmatch.fnmatch(p, i) for i in include))
    assert not left_out, f"left out of the wheel: {left_out}"
    assert "slurm_tracker.costs" in present
