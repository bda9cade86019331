"""The configuration loader: values, defaults, and every problem reported at once with its place."""

from __future__ import annotations

import base64
import os
import random
import socket
import string
import textwrap
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Optional, Union

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.cli import main
from slurm_tracker.config import (
    CONFIG_ENV,
    CONFIG_KEYS,
    DEFAULT_CONFIG_PATH,
    DEFAULT_STATE_FILE,
    MAX_ALIAS_NODES,
    MAX_DURATION_S,
    MAX_YAML_DEPTH,
    AccountMapping,
    ApiConfig,
    Config,
    Limits,
    SacctConfig,
    config_from_text,
    format_duration,
    is_loopback,
    load_config,
    looks_secret,
    parse_duration,
    resolve_config_path,
    sacct_arg_problems,
    shown_value,
)
from slurm_tracker.errors import ConfigError, UnsafeFile
from slurm_tracker.models import SkuCharge
from tests.conftest import cli_runner, shown

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
BASE_DIR = Path("/srv/tracker")

# The smallest valid file: 7 lines, so a section appended to it starts at line 8.
MINIMAL = """\
cluster: hpc1
accounts:
  map:
    physics: physics-2026
partitions:
  map:
    compute: SLURM_CPU_HOUR
"""


# The real clock of these tests: every time they give is before it.
NOW_AT = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def load(text: str) -> Config:
    return config_from_text(textwrap.dedent(text), "test.yaml", base_dir=BASE_DIR, now_at=NOW_AT)


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.source == "test.yaml"
    return info.value.problems


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- the example


def test_example_loads_with_the_quick_start_values() -> None:
    config = load_config(EXAMPLE)
    assert config.cluster == "box"
    assert config.source == str(EXAMPLE)
    assert config.state_file == Path("/var/lib/slurm-tracker/state.db")
    assert config.reporting_interval_s == 900
    assert config.api == ApiConfig(organization="my-org")
    assert config.accounts == AccountMapping(
        exact={"physics": "physics-2026", "chemistry": "chemistry-2026"},
        default=None,
        ignore=("root",),
    )
    assert "unmapped-lab" not in config.accounts.exact  # the dry run shows it as skipped
    assert config.partitions.exact == {
        "compute": (SkuCharge("SLURM_CPU_HOUR", "cpu"),),
        "gpu": (SkuCharge("SLURM_GPU_HOUR", "gpu"), SkuCharge("SLURM_CPU_HOUR", "cpu")),
    }
    assert config.partitions.default == ()
    assert config.metadata_fields == ("qos",)
    assert config.sacct == SacctConfig(first_sync_start=None, first_sync_lookback_s=86400)
    assert config.catalog_file is None
    assert config.limits == Limits()  # the example shows the defaults


def test_example_inline_catalog_is_stored_as_written() -> None:
    config = load_config(EXAMPLE)
    expected = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))["catalog"]
    assert config.catalog == expected
    assert config.catalog is not None
    units = config.catalog["units"]
    assert isinstance(units, list)
    assert [unit["name"] for unit in units] == ["core-hours", "usd"]
    gpu_rules = units[1]["skus"][0]["rules"]
    assert [rule["rate"] for rule in gpu_rules] == [2.5, 2.0]


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for section, keys in CONFIG_KEYS.items():
        for key in keys:
            assert f"{key}:" in text, f"{section}.{key} is not in config.example.yaml"


# ---------------------------------------------------------------------------- defaults


def test_minimal_file_takes_the_dataclass_defaults() -> None:
    config = load(MINIMAL)
    assert config.cluster == "hpc1"
    assert config.state_file == DEFAULT_STATE_FILE
    assert config.api == ApiConfig()
    assert config.sacct == SacctConfig()
    assert config.metadata_fields == ()
    assert config.reporting_interval_s == 900
    assert config.catalog is None
    assert config.catalog_file is None
    assert config.source == "test.yaml"
    assert config.limits == Limits()


def test_every_option_is_read() -> None:
    config = load(
        MINIMAL
        + """\
state_file: /data/state.db
reporting_interval: 1h
api:
  organization: acme
  url: https://api.example.org/
  api_key_file: /etc/key
  connect_timeout: 3s
  read_timeout: 1m
  max_attempts: 7
  max_retry_time: 10m
  concurrency: 32
  requests_per_second: 2.5
sacct:
  path: /opt/slurm/bin/sacct
  timeout: 90
  lag: 0
  overlap: 2h
  first_sync_start: 2026-03-01T12:00:00+02:00
  extra_args: [--partition, compute, -Aphysics, --user=alice]
  backfill_chunk: 12h
  backfill_pause: 0s
  file_timezone: Europe/Berlin
  clusters: [hpc1, hpc2]
metadata:
  fields: [qos, job_name]
catalog_file: catalog.yaml
limits:
  max_cpus: 100000
  max_gpus: 512
  max_nodes: 1200
  max_memory: 2048G
  clock_skew: 1m
  hold_above: 2500.5
"""
    )
    assert config.state_file == Path("/data/state.db")
    assert config.reporting_interval_s == 3600
    assert config.api == ApiConfig(
        organization="acme",
        url="https://api.example.org",
        api_key_file=Path("/etc/key"),
        connect_timeout_s=3.0,
        read_timeout_s=60.0,
        max_attempts=7,
        max_retry_time_s=600,
        concurrency=32,
        requests_per_second=2.5,
    )
    assert config.sacct == SacctConfig(
        path="/opt/slurm/bin/sacct",
        timeout_s=90,
        lag_s=0,
        overlap_s=7200,
        first_sync_start=datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc),
        first_sync_lookback_s=86400,
        extra_args=("--partition", "compute", "-Aphysics", "--user=alice"),
        backfill_chunk_s=43200,
        backfill_pause_s=0,
        file_timezone="Europe/Berlin",
        clusters=("hpc1", "hpc2"),
    )
    assert config.metadata_fields == ("qos", "job_name")
    assert config.catalog_file == BASE_DIR / "catalog.yaml"
    assert config.limits == Limits(
        max_cpus=100000,
        max_gpus=512,
        max_nodes=1200,
        max_mem_mb=2048 * 1024,
        clock_skew_s=60,
        hold_above=Decimal("2500.5"),
    )


def test_patterns_keep_file_order_and_exact_names_are_separate() -> None:
    config = load(
        """\
        cluster: hpc1
        accounts:
          map:
            "chem*": chemistry-2026
            physics: physics-2026
            "c?em-old": old-chem
            12345: numbered
          default: general
          ignore: [root, "test-*"]
        partitions:
          map:
            "gpu-[ab]": {sku: SLURM_GPU_HOUR, metric: gpu}
            compute: SLURM_CPU_HOUR
          default: [{sku: SLURM_NODE_HOUR, metric: node}, SLURM_MEM_HOUR]
          ignore: [debug]
        """
    )
    assert config.accounts == AccountMapping(
        exact={"physics": "physics-2026", "12345": "numbered"},
        patterns=(("chem*", "chemistry-2026"), ("c?em-old", "old-chem")),
        default="general",
        ignore=("root", "test-*"),
    )
    assert config.partitions.exact == {"compute": (SkuCharge("SLURM_CPU_HOUR", "cpu"),)}
    assert config.partitions.patterns == (("gpu-[ab]", (SkuCharge("SLURM_GPU_HOUR", "gpu"),)),)
    assert config.partitions.default == (
        SkuCharge("SLURM_NODE_HOUR", "node"),
        SkuCharge("SLURM_MEM_HOUR", "cpu"),
    )
    assert config.partitions.ignore == ("debug",)


@pytest.mark.parametrize(
    ("value", "start_at", "lookback_s"),
    [
        ("2026-01-01", datetime(2026, 1, 1, tzinfo=timezone.utc), 86400),
        ("2026-01-01T00:00:00Z", datetime(2026, 1, 1, tzinfo=timezone.utc), 86400),
        ('"2026-01-01 06:30:00"', datetime(2026, 1, 1, 6, 30, tzinfo=timezone.utc), 86400),
        ("2026-01-01T06:30:00-05:00", datetime(2026, 1, 1, 11, 30, tzinfo=timezone.utc), 86400),
        ("2026-01-01T06:30", datetime(2026, 1, 1, 6, 30, tzinfo=timezone.utc), 86400),
        ("3d", None, 3 * 86400),
        ("1w", None, 604800),
        ("7200", None, 7200),
        ("null", None, 86400),
    ],
)
def test_first_sync_start_is_a_time_or_a_look_back(
    value: str, start_at: datetime, lookback_s: int
) -> None:
    config = load(MINIMAL + f"sacct:\n  first_sync_start: {value}\n")
    assert config.sacct.first_sync_start == start_at
    assert config.sacct.first_sync_lookback_s == lookback_s
    if start_at is not None:
        assert config.sacct.first_sync_start is not None
        assert config.sacct.first_sync_start.tzinfo is timezone.utc


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://activate.example.org", "https://activate.example.org"),
        ("https://activate.example.org:8443/", "https://activate.example.org:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.5.6.7", "http://127.5.6.7"),
        ("http://[::1]:9000", "http://[::1]:9000"),
        ("http://localhost:5000", "http://localhost:5000"),
        ("HTTP://LOCALHOST", "HTTP://LOCALHOST"),
    ],
)
def test_api_url_https_or_loopback_is_accepted(url: str, stored: str) -> None:
    assert load(MINIMAL + f"api:\n  url: {url}\n").api.url == stored


def test_empty_sections_take_defaults() -> None:
    config = load(MINIMAL + "api:\nsacct:\nmetadata:\ncatalog:\ncatalog_file:\n")
    assert config.api == ApiConfig()
    assert config.sacct == SacctConfig()
    assert config.catalog is None


def test_anchors_and_aliases_are_read() -> None:
    config = load(
        """\
        cluster: hpc1
        accounts:
          map:
            physics: &shared shared-2026
            chemistry: *shared
        partitions:
          map:
            compute: &cpu [{sku: SLURM_CPU_HOUR, metric: cpu}]
            short: *cpu
        """
    )
    assert config.accounts.exact == {"physics": "shared-2026", "chemistry": "shared-2026"}
    assert config.partitions.exact["short"] == config.partitions.exact["compute"]


# ---------------------------------------------------------------------------- problems


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        # unknown keys, with a suggestion
        (
            "api:\n  concurency: 4\n",
            'api.concurency (line 9): unknown key; did you mean "concurrency"?',
        ),
        ("sacct:\n  Timeout: 5m\n", 'sacct.Timeout (line 9): unknown key; did you mean "timeout"?'),
        (
            "metadata:\n  field: [qos]\n",
            'metadata.field (line 9): unknown key; did you mean "fields"?',
        ),
        ("zzz: 1\n", "zzz (line 8): unknown key; expected one of: cluster, state_file"),
        # wrong types
        ("state_file: [a, b]\n", "state_file (line 8): expected a file path; got a list"),
        ("api: 5\n", "api (line 8): expected a mapping with keys organization, url"),
        (
            "api:\n  organization: {a: 1}\n",
            "api.organization (line 9): expected the organization's name; got a mapping",
        ),
        (
            "api:\n  max_attempts: 2.5\n",
            "api.max_attempts (line 9): expected a whole number; got a number (2.5)",
        ),
        (
            "api:\n  max_attempts: '5'\n",
            'api.max_attempts (line 9): expected a whole number; got text ("5")',
        ),
        (
            "api:\n  concurrency: true\n",
            "api.concurrency (line 9): expected a whole number; got a boolean",
        ),
        (
            "api:\n  requests_per_second: fast\n",
            "api.requests_per_second (line 9): expected a number",
        ),
        (
            "sacct:\n  path: [sacct]\n",
            "sacct.path (line 9): expected the sacct program; got a list",
        ),
        (
            "sacct:\n  extra_args: --clusters=a\n",
            "sacct.extra_args (line 9): expected a list of sacct options",
        ),
        (
            "sacct:\n  extra_args: [[-a]]\n",
            "sacct.extra_args[0] (line 9): expected one sacct option as text; got a list",
        ),
        ("metadata:\n  fields: qos\n", "metadata.fields (line 9): expected a list of job fields"),
        ("catalog: [1]\n", "catalog (line 8): expected a mapping (the catalog"),
        ("catalog_file: [x]\n", "catalog_file (line 8): expected a file path; got a list"),
        # durations and numbers
        ("reporting_interval: 5x\n", "reporting_interval (line 8): not a duration: '5x'"),
        ("reporting_interval: 1.5h\n", "reporting_interval (line 8): not a duration: '1.5h'"),
        ("sacct:\n  lag: -1m\n", "sacct.lag (line 9): negative duration '-1m'"),
        ("sacct:\n  overlap: -30\n", "sacct.overlap (line 9): negative duration '-30'"),
        ("sacct:\n  lag: 1:30\n", "sacct.lag (line 9): not a duration: '1:30'"),
        ("sacct:\n  timeout: 0\n", "sacct.timeout (line 9): must be more than 0; got 0"),
        ("sacct:\n  backfill_chunk: 0s\n", "sacct.backfill_chunk (line 9): must be more than 0"),
        (
            "sacct:\n  backfill_pause: 1.5\n",
            "sacct.backfill_pause (line 9): expected a duration; got a number (1.5)",
        ),
        ("api:\n  read_timeout: 0\n", "api.read_timeout (line 9): must be more than 0"),
        ("api:\n  max_retry_time: 10y\n", "api.max_retry_time (line 9): not a duration: '10y'"),
        ("api:\n  max_attempts: 0\n", "api.max_attempts (line 9): must be at least 1; got 0"),
        ("api:\n  max_attempts: -3\n", "api.max_attempts (line 9): must be at least 1; got -3"),
        ("api:\n  concurrency: 0\n", "api.concurrency (line 9): must be from 1 to 32; got 0"),
        ("api:\n  concurrency: 33\n", "api.concurrency (line 9): must be from 1 to 32; got 33"),
        (
            "api:\n  requests_per_second: -0.5\n",
            "api.requests_per_second (line 9): must be a finite number, 0 or more",
        ),
        (
            "api:\n  requests_per_second: .inf\n",
            "api.requests_per_second (line 9): must be a finite number",
        ),
        (
            "sacct:\n  first_sync_start: yesterday\n",
            'sacct.first_sync_start (line 9): neither a time nor a duration: "yesterday"',
        ),
        (
            "sacct:\n  first_sync_start: 2026-02-30\n",
            'sacct.first_sync_start (line 9): not a valid time "2026-02-30"',
        ),
        (
            "sacct:\n  first_sync_start: 0s\n",
            "sacct.first_sync_start (line 9): a look-back must be more than 0",
        ),
        # names, URLs, zones
        (
            "api:\n  organization: my org\n",
            "api.organization (line 9): the organization's name cannot contain blanks or '/'",
        ),
        (
            "api:\n  url: http://example.org\n",
            "api.url (line 9): must use https:// for example.org",
        ),
        ("api:\n  url: http://10.0.0.1\n", "api.url (line 9): must use https:// for 10.0.0.1"),
        ("api:\n  url: ftp://example.org\n", "api.url (line 9): must start with https://"),
        ("api:\n  url: example.org\n", "api.url (line 9): must start with https://"),
        ("api:\n  url: https://example.org/?org=1\n", "api.url (line 9): must not have a query"),
        ("api:\n  url: https://example.org:99999\n", "api.url (line 9): not a valid URL"),
        (
            "api:\n  url: https://bob:hunter2@example.org\n",
            "api.url (line 9): must not contain a user name or password",
        ),
        ("sacct:\n  path: ''\n", "sacct.path (line 9): the sacct program is empty"),
        (
            "sacct:\n  file_timezone: Mars/Olympus\n",
            'sacct.file_timezone (line 9): unknown time zone "Mars/Olympus"',
        ),
        (
            "sacct:\n  file_timezone: ../etc\n",
            'sacct.file_timezone (line 9): unknown time zone "../etc"',
        ),
        (
            "metadata:\n  fields: [jobname]\n",
            'metadata.fields[0] (line 9): unknown job field "jobname"; did you mean "job_name"?',
        ),
        ("metadata:\n  fields: [qos, qos]\n", "metadata.fields[1] (line 9): qos is listed twice"),
        (
            "catalog_file: cat.yaml\ncatalog: {units: []}\n",
            "catalog (line 9): both catalog_file and an inline catalog are set",
        ),
        ("catalog:\n  units: !!binary notbase64!\n", "catalog (line 9): cannot be read: "),
        ("cluster2: x\n", 'cluster2 (line 8): unknown key; did you mean "cluster"?'),
    ],
)
def test_each_problem_is_reported_with_its_location(section: str, expected: str) -> None:
    assert only_problem(MINIMAL + section).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("accounts:\n  map: {physics: p}\npartitions:\n  map: {c: S}\n", "cluster: missing"),
        (
            "cluster:\n" + MINIMAL[len("cluster: hpc1\n") :],
            "cluster (line 1): expected the cluster name; got nothing",
        ),
        (
            "cluster: [a]\n" + MINIMAL[len("cluster: hpc1\n") :],
            "cluster (line 1): expected the cluster name; got a list",
        ),
        (
            "cluster: ''\n" + MINIMAL[len("cluster: hpc1\n") :],
            "cluster (line 1): the cluster name is empty",
        ),
        (
            "cluster: a:b\n" + MINIMAL[len("cluster: hpc1\n") :],
            'cluster (line 1): the cluster name "a:b" must not contain',
        ),
        (
            "cluster: x\naccounts: {}\npartitions:\n  map: {c: S}\n",
            "accounts (line 2): no account is mapped and there is no accounts.default: "
            "nothing would ever be billed",
        ),
        (
            "cluster: x\naccounts:\n  map: {a: b}\n",
            "partitions: no partition is mapped and there is no partitions.default: "
            "nothing would ever be billed",
        ),
        (
            "cluster: x\naccounts:\n  map: [a]\npartitions:\n  default: S\n",
            "accounts.map (line 3): expected a mapping of Slurm account -> allocation name; "
            "got a list",
        ),
        (
            "cluster: x\naccounts:\n  default: ''\npartitions:\n  default: S\n",
            "accounts.default (line 3): an allocation name is empty",
        ),
        (
            "cluster: x\naccounts:\n  default: [a]\npartitions:\n  default: S\n",
            "accounts.default (line 3): expected an allocation name; got a list",
        ),
        (
            "cluster: x\naccounts:\n  default: a\n  ignore: root\npartitions:\n  default: S\n",
            "accounts.ignore (line 4): expected a list of account names or patterns",
        ),
        (
            "cluster: x\naccounts:\n  default: a\n  ignore: ['']\npartitions:\n  default: S\n",
            "accounts.ignore[0] (line 4): an account name or pattern is empty",
        ),
        (
            "cluster: x\naccounts:\n  default: a\npartitions:\n"
            "  default: ['S', {sku: T, metric: ram}]\n",
            'partitions.default[1].metric (line 5): unknown metric "ram"; '
            "expected one of: cpu, gpu, node, mem, billing",
        ),
        (
            "cluster: x\naccounts:\n  default: a\npartitions:\n  default: {metric: gpu}\n",
            "partitions.default (line 5): missing sku",
        ),
        (
            "cluster: x\naccounts:\n  default: a\npartitions:\n  default: {sku: S, metrc: gpu}\n",
            'partitions.default.metrc (line 5): unknown key; did you mean "metric"?',
        ),
        (
            "cluster: x\naccounts:\n  default: a\npartitions:\n  default: true\n",
            "partitions.default (line 5): expected a SKU code; got a boolean",
        ),
        (
            "cluster: x\naccounts:\n  default: a\npartitions:\n  map:\n    gpu: ~\n",
            "partitions.map.gpu (line 6): expected a SKU code, a mapping {sku: CODE, metric: cpu} "
            "or a list",
        ),
        (
            "cluster: x\naccounts:\n  map:\n    ~: a\npartitions:\n  default: S\n",
            "accounts.map (line 4): expected a Slurm account name; got nothing",
        ),
        (
            "cluster: x\naccounts:\n  map:\n    ? [a, b]\n    : c\npartitions:\n  default: S\n",
            "accounts.map (line 4): expected a Slurm account name; got a list",
        ),
        (
            "cluster: x\naccounts:\n  map:\n    physics: ' p'\npartitions:\n  default: S\n",
            'accounts.map.physics (line 4): an allocation name " p" starts or ends with blanks',
        ),
        (
            "cluster: x\naccounts:\n  map:\n    physics: "
            + "a" * 256
            + "\npartitions:\n  default: S\n",
            "accounts.map.physics (line 4): an allocation name has at most 255 characters",
        ),
        (
            "- cluster: x\n",
            "the top level (line 1): not a slurm-tracker configuration (its top level is not a "
            "mapping): expected a mapping with keys cluster, state_file",
        ),
        ("", "the top level: the file is empty"),
        ("# only a comment\n", "the top level: the file is empty"),
        ("---\n", "the top level: the file is empty"),
        ("~\n", "the top level: the file is empty"),
        ("<<: {cluster: x}\n", '"<<" (line 1): merge keys (<<) are not supported here'),
    ],
)
def test_problems_outside_the_minimal_file(text: str, expected: str) -> None:
    found = problems(text)
    assert any(problem.startswith(expected) for problem in found), found


def test_mapping_problems_name_the_key_and_line() -> None:
    found = problems(
        """\
        cluster: hpc1
        accounts:
          map:
            physics: physics-2026
            "chem*": ""
            root: root-alloc
          ignore: [root, "phys*", lab, lab]
        partitions:
          map:
            compute: " "
            gpu:
              - {sku: "SLURM GPU", metric: gpu}
              - {sku: SLURM_CPU_HOUR, metric: gpuu}
            big: [SLURM_NODE_HOUR, {sku: SLURM_NODE_HOUR, metric: node}]
            empty: []
          ignore: [compute]
        """
    )
    assert found == (
        'accounts.map."chem*" (line 5): an allocation name is empty',
        'accounts.ignore[0] (line 7): "root" is both ignored here and mapped at line 6: '
        "remove it from one of the two",
        'accounts.ignore[1] (line 7): the pattern "phys*" ignores accounts that are mapped: '
        '"physics" (line 4); ignoring wins, so narrow the pattern or remove the mapping',
        'accounts.ignore[3] (line 7): "lab" is listed twice (also at line 7): remove one',
        "partitions.map.compute (line 10): the SKU code is empty",
        'partitions.map.gpu[0].sku (line 12): the SKU code "SLURM GPU" contains blanks: '
        "SKU codes are single words like SLURM_CPU_HOUR",
        'partitions.map.gpu[1].metric (line 13): unknown metric "gpuu"; did you mean "gpu"?',
        "partitions.map.big[1] (line 14): SKU SLURM_NODE_HOUR is charged twice for the same runs "
        "(also at line 14): their events would share one event key",
        "partitions.map.empty (line 15): the list of SKUs is empty: give at least one",
        'partitions.ignore[0] (line 16): "compute" is both ignored here and mapped at line 10: '
        "remove it from one of the two",
    )


def test_a_file_with_many_problems_reports_them_all_at_once() -> None:
    text = """\
    clustr: hpc1
    state_file: [x]
    reporting_interval: soon
    api:
      url: http://example.org
      concurrency: 99
      api_key: pwt_c2VjcmV0.do-not-print-me
    sacct:
      lag: -5
      extra_args: [--json]
      file_timezone: Nowhere/City
    accounts:
      map:
        physics: a
        physics: b
    partitions:
      map:
        gpu: {sku: G, metric: tpu}
    metadata:
      fields: [secret_field]
    """
    with pytest.raises(ConfigError) as info:
        load(text)
    found = info.value.problems
    expected_starts = [
        "cluster: missing",
        'clustr (line 1): unknown key; did you mean "cluster"?',
        "state_file (line 2): expected a file path; got a list",
        "reporting_interval (line 3): not a duration",
        "api.url (line 5): must use https://",
        "api.concurrency (line 6): must be from 1 to 32",
        "api.api_key (line 7): never put the API key in the configuration file",
        "sacct.lag (line 9): negative duration",
        "sacct.extra_args[0] (line 10): --json is refused: the agent chooses the output format",
        'sacct.file_timezone (line 11): unknown time zone "Nowhere/City"',
        "accounts.map.physics (line 15): duplicate key: also at line 14",
        'partitions.map.gpu.metric (line 18): unknown metric "tpu"',
        'metadata.fields[0] (line 20): unknown job field "secret_field"',
    ]
    assert len(found) == len(expected_starts), found
    for problem, start in zip(found, expected_starts):
        assert problem.startswith(start), (problem, start)
    message = str(info.value)
    assert message.startswith(f"invalid configuration test.yaml ({len(expected_starts)} problems)")
    assert "do-not-print-me" not in message


# ------------------------------------------------------------------------ duplicate keys


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "cluster: other\n", "cluster (line 8): duplicate key: also at line 1"),
        (
            MINIMAL + "api:\n  organization: a\n  url: https://x.org\n  organization: b\n",
            "api.organization (line 11): duplicate key: also at line 9",
        ),
        (
            "cluster: x\naccounts:\n  map:\n    physics: a\n    chem: b\n    physics: c\n"
            "partitions:\n  default: S\n",
            "accounts.map.physics (line 6): duplicate key: also at line 4",
        ),
        (
            "cluster: x\naccounts:\n  map: {'chem*': a, chem*: b}\npartitions:\n  default: S\n",
            'accounts.map."chem*" (line 3): duplicate key: also at line 3',
        ),
        (
            MINIMAL + "catalog:\n  units:\n    - name: u\n      ratedInUsd: true\n      name: v\n",
            "catalog.units[0].name (line 12): duplicate key: also at line 10",
        ),
        (
            "cluster: x\naccounts:\n  default: a\npartitions:\n  default:\n"
            "    - {sku: S, metric: cpu, sku: T}\n",
            "partitions.default[0].sku (line 6): duplicate key: also at line 6",
        ),
    ],
)
def test_duplicate_keys_are_caught_with_both_lines(text: str, expected: str) -> None:
    found = problems(text)
    assert any(problem.startswith(expected) for problem in found), found
    assert any("YAML would silently keep only the last one" in problem for problem in found)


def test_a_key_given_three_times_is_reported_twice() -> None:
    repeated = "reporting_interval: 1m\nreporting_interval: 2m\nreporting_interval: 3m\n"
    found = problems(MINIMAL + repeated)
    assert found == (
        "reporting_interval (line 9): duplicate key: also at line 8; YAML would silently keep "
        "only the last one: remove or merge one of them",
        "reporting_interval (line 10): duplicate key: also at line 8; YAML would silently keep "
        "only the last one: remove or merge one of them",
    )


# --------------------------------------------------------------------------- did you mean


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "reporting_intervall: 5m\n", "reporting_interval"),
        (MINIMAL + "statefile: /x\n", "state_file"),
        (MINIMAL + "api:\n  organisation: x\n", "organization"),
        (MINIMAL + "api:\n  apikey_file: /k\n", "api_key_file"),
        (MINIMAL + "api:\n  read-timeout: 5s\n", "read_timeout"),
        (MINIMAL + "sacct:\n  extra_arg: []\n", "extra_args"),
        (MINIMAL + "sacct:\n  first_sync: 1d\n", "first_sync_start"),
        (MINIMAL + "metadata:\n  Fields: []\n", "fields"),
        ("cluster: x\naccounts:\n  maps: {a: b}\npartitions:\n  default: S\n", "map"),
        ("cluster: x\naccounts:\n  default: a\npartitions:\n  defualt: S\n", "default"),
        ("cluster: x\naccounts:\n  default: a\npartitions:\n  default: {skus: S}\n", "sku"),
    ],
)
def test_unknown_keys_suggest_the_closest_known_key(text: str, expected: str) -> None:
    found = problems(text)
    assert any(f'unknown key; did you mean "{expected}"?' in problem for problem in found), found


# ------------------------------------------------------------------------ the API key


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL + "api:\n  api_key: pwt_aG9zdA.s3cr3t-value\n",
        MINIMAL + "api_key: pwt_aG9zdA.s3cr3t-value\n",
        MINIMAL + "api:\n  API_KEY: [pwt_aG9zdA.s3cr3t-value]\n",
        MINIMAL + "api:\n  token: pwt_aG9zdA.s3cr3t-value\n",
    ],
)
def test_an_api_key_in_the_file_is_refused_without_echoing_it(text: str) -> None:
    problem = only_problem(text)
    assert "never put the API key in the configuration file" in problem
    assert "api.api_key_file" in problem
    assert "$PW_API_KEY" in problem
    assert "s3cr3t" not in problem


# ---------------------------------------------------------------------- sacct extra args


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--accounts=physics,chemistry"],
        ["--accounts", "physics"],
        ["-A", "physics"],
        ["-Aphysics"],
        ["--partition", "compute"],
        ["--partition=compute,gpu"],
        ["-r", "compute"],
        ["-rcompute"],
        ["--qos=normal"],
        ["-q", "normal"],
        ["--user=alice,bob"],
        ["-uroot"],  # -u takes the rest as its value: the o in root is not -o
        ["-u", "root"],
        ["--uid=1000"],
        ["--gid=100"],
        ["--group", "physics"],
        ["-g", "100"],
        ["--wckeys=projA"],
        ["-W", "projA"],
        ["--nodelist=node[01-04]"],
        ["-N", "node01"],
        ["--constraints=skylake"],
        ["--partition", "compute", "-Aphysics", "--qos=normal", "-u", "alice"],
    ],
)
def test_extra_args_on_the_allow_list_are_accepted(args: list[str]) -> None:
    assert sacct_arg_problems(args) == []


@pytest.mark.parametrize(
    ("args", "index", "expected"),
    [
        # other clusters' jobs: the message points to sacct.clusters
        (["--clusters=hpc1"], 0, "--clusters is refused"),
        (["--clusters", "hpc1"], 0, "--clusters is refused"),
        (["--cluster=hpc1"], 0, "--cluster is refused"),
        (["-M", "hpc1"], 0, "-M (in -M) is refused"),
        (["-Mhpc1"], 0, "-M (in -Mhpc1) is refused"),
        (["--allclusters"], 0, "--allclusters is refused"),
        (["-L"], 0, "-L (in -L) is refused"),
        (["--federation"], 0, "--federation is refused"),
        (["--local"], 0, "--local is refused"),
        # options the agent sets itself or that break what it reads
        (["--format=JobID"], 0, "--format is refused: the agent chooses the fields"),
        (["--fields", "JobID"], 0, "--fields is refused"),
        (["-o", "JobID"], 0, "-o (in -o) is refused"),
        (["-oJobID"], 0, "-o (in -oJobID) is refused"),
        (["--parsable2"], 0, "--parsable2 is refused: the agent chooses the output format"),
        (["-P"], 0, "-P (in -P) is refused"),
        (["-ap"], 0, "-a (in -ap) is refused: the agent already passes it"),
        (["-a"], 0, "-a (in -a) is refused: the agent already passes it"),
        (["--allusers"], 0, "--allusers is refused: the agent already passes it"),
        (["--delimiter=,"], 0, "--delimiter is refused"),
        (["--json"], 0, "--json is refused"),
        (["--json=v0.0.40"], 0, "--json is refused"),
        (["--yaml"], 0, "--yaml is refused"),
        (["--noheader"], 0, "--noheader is refused"),
        (["--units=G"], 0, "--units is refused: the agent chooses the output format"),
        (["--noconvert"], 0, "--noconvert is refused"),
        (["-n"], 0, "-n (in -n) is refused"),
        (["--starttime=2020-01-01"], 0, "--starttime is refused: the agent sets the time window"),
        (["-S", "2020-01-01"], 0, "-S (in -S) is refused"),
        (["-E", "now"], 0, "-E (in -E) is refused"),
        (["--endtime=now"], 0, "--endtime is refused"),
        (["-X"], 0, "-X (in -X) is refused: the agent already passes it"),
        (["--allocations"], 0, "--allocations is refused"),
        (["--state=CD"], 0, "with --state, sacct selects jobs by the state"),
        (["-s", "CD"], 0, "with --state, sacct selects jobs by the state"),
        (["--jobs=12"], 0, "it would limit every sync to these jobs"),
        (["-j", "12"], 0, "it would limit every sync to these jobs"),
        (["--truncate"], 0, "--truncate is refused: it cuts start and end times"),
        (["--file=/tmp/x"], 0, "use `sync --sacct-file`"),
        (["--completion"], 0, "job completion log"),
        (["-a", "--brief"], 0, "-a (in -a) is refused"),
        # not on the allow-list at all
        (["--whole-hetjob=yes"], 0, "--whole-hetjob is refused: it is not on the allow-list"),
        (["--name=x"], 0, "--name is refused: it is not on the allow-list"),
        (["--some-future-option"], 0, "--some-future-option is not an option"),
        (["-C", "skylake"], 0, "-C (in -C) is refused: write its full name, --constraints"),
        (["-Z"], 0, "-Z (in -Z) is refused: it is not on the allow-list"),
        # abbreviations
        (["--part", "compute"], 0, "--part is an abbreviation: write the full name --partition"),
        (["--acc=physics"], 0, "--acc is an abbreviation: write the full name --accounts"),
        (
            ["--start", "2020-01-01"],
            0,
            "--start is an abbreviation of --starttime, which is refused: the agent sets",
        ),
        (["--us=alice"], 0, "--us is an abbreviation (of --usage, --user)"),
        # values
        (["--partition"], 0, "--partition needs a value: write --partition=VALUE"),
        (["-r"], 0, "-r needs a value: write -rVALUE or -r VALUE"),
        (["--partition="], 0, "--partition needs a value, got an empty one"),
        (["--partition", "-X"], 0, '--partition needs a value, but "-X" looks like an option'),
        (["--partition", "--clusters=x"], 0, "looks like an option"),
        (["--user", " alice"], 0, 'the value " alice" of --user has blanks around it'),
        (["--partition=a\nb"], 0, "control characters"),
        (["-A=physics"], 0, "the value \"=physics\" of -A starts with '='"),
        # items that are not options
        (["--clusters", "hpc1", "hpc2"], 2, '"hpc2" is not an option'),
        (["--partition", "a", "b"], 2, '"b" is not an option'),
        (["compute"], 0, '"compute" is not an option: give each option as its own item'),
        (["--"], 0, '"--" is not a sacct option'),
        ([""], 0, '"" is not a sacct option'),
        (["-"], 0, '"-" is not a sacct option'),
    ],
)
def test_extra_args_off_the_allow_list_are_refused_with_a_reason(
    args: list[str], index: int, expected: str
) -> None:
    found = sacct_arg_problems(args)
    assert found, args
    assert index in [position for position, _ in found], found
    message = dict(found)[index]
    assert expected in message, message


@pytest.mark.parametrize(
    "args",
    [
        ["--clusters", "hpc1"],
        ["-M", "hpc1"],
        ["--format", "JobID"],
        ["--start", "2020-01-01"],
        ["-S", "2020-01-01"],
        ["--part", "compute"],
    ],
)
def test_the_value_of_a_refused_option_is_not_reported_again(args: list[str]) -> None:
    assert [index for index, _ in sacct_arg_problems(args)] == [0]


@pytest.mark.parametrize(
    "args",
    [
        ["--clusters=hpc1"],
        ["-M", "hpc1"],
        ["-Mall"],
        ["--allclusters"],
        ["-L"],
        ["--federation"],
        ["--local"],
    ],
)
def test_cluster_options_point_to_sacct_clusters(args: list[str]) -> None:
    ((index, message),) = sacct_arg_problems(args)
    assert index == 0
    assert "use sacct.clusters to bill several clusters" in message


def test_every_refusal_says_what_to_do_instead() -> None:
    # the generic refusal names the whole allow-list
    ((_, message),) = sacct_arg_problems(["--array"])
    for option in ("--accounts", "--partition", "--qos", "--user", "--uid", "--gid", "--group"):
        assert option in message
    for option in ("--wckeys", "--nodelist", "--constraints", "-A", "-r", "-q", "-u", "-g"):
        assert option in message


def test_extra_args_problems_name_the_item_and_line() -> None:
    found = problems(MINIMAL + "sacct:\n  extra_args:\n    - --partition=a\n    - -j\n    - '12'\n")
    assert found == (
        "sacct.extra_args[1] (line 11): -j (in -j) is refused: it would limit every sync to "
        "these jobs while the window moves on, so every other job's usage would never be "
        "billed; use `sync --sacct-file` for one-off checks",
    )


def test_extra_args_problems_keep_the_index_of_the_file_after_a_bad_item() -> None:
    found = problems(MINIMAL + "sacct:\n  extra_args: [[-r], --clusters=a]\n")
    assert found[0].startswith("sacct.extra_args[0] (line 9): expected one sacct option as text")
    assert found[1].startswith("sacct.extra_args[1] (line 9): --clusters is refused")


def test_a_refused_extra_arg_fails_the_file() -> None:
    found = only_problem(MINIMAL + "sacct:\n  extra_args: [--allclusters]\n")
    assert found.startswith("sacct.extra_args[0] (line 9): --allclusters is refused")
    assert "use sacct.clusters to bill several clusters" in found


# ------------------------------------------------------------------------- sacct.clusters


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[hpc1]", ("hpc1",)),
        ("[hpc1, hpc2, gpu-cluster_3]", ("hpc1", "hpc2", "gpu-cluster_3")),
        ("[]", ()),
        ("", ()),
        ("[2024]", ("2024",)),
    ],
)
def test_sacct_clusters_are_read(value: str, expected: tuple[str, ...]) -> None:
    assert load(MINIMAL + f"sacct:\n  clusters: {value}\n").sacct.clusters == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hpc1", "sacct.clusters (line 9): expected a list of cluster names, e.g. [hpc1, hpc2]"),
        ("{a: b}", "sacct.clusters (line 9): expected a list of cluster names"),
        ("[a b]", 'sacct.clusters[0] (line 9): the cluster name "a b" must not contain blanks'),
        ("['a,b']", 'sacct.clusters[0] (line 9): the cluster name "a,b" must not contain'),
        ("['a:b']", 'sacct.clusters[0] (line 9): the cluster name "a:b" must not contain'),
        ("[all]", 'sacct.clusters[0] (line 9): "all" is not a cluster name: to sacct'),
        ("[ALL]", 'sacct.clusters[0] (line 9): "ALL" is not a cluster name'),
        ("['-1']", 'sacct.clusters[0] (line 9): "-1" is not a cluster name'),
        ("[-x]", 'sacct.clusters[0] (line 9): the cluster name "-x" must not start with'),
        ("['']", "sacct.clusters[0] (line 9): the cluster name is empty"),
        ("[[a]]", "sacct.clusters[0] (line 9): expected the cluster name; got a list"),
        ("[a, b, a]", 'sacct.clusters[2] (line 9): "a" is listed twice (also at line 9)'),
    ],
)
def test_sacct_clusters_problems(value: str, expected: str) -> None:
    assert only_problem(MINIMAL + f"sacct:\n  clusters: {value}\n").startswith(expected)


# ------------------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1w2d3h4m5s", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("90m", 5400),
        ("0", 0),
        ("0s", 0),
        ("90", 90),
        (" 2m ", 120),
        ("007s", 7),
        (90, 90),
        (0, 0),
        (MAX_DURATION_S, MAX_DURATION_S),
    ],
)
def test_parse_duration(text: Union[str, int], seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "5x",
        "m",
        "1.5h",
        "1e3",
        "-5",
        "-5m",
        -1,
        "30m1h",
        "1h1h",
        "1h 30m",
        "1H",
        "5 m",
        "²",
        "٣s",
        "0x10",
        "1:30",
        True,
        MAX_DURATION_S + 1,
        "99999999999w",
    ],
)
def test_parse_duration_refuses_garbage(text: Union[str, int]) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (5400, "1h30m"), (86400, "1d"), (694861, "1w1d1h1m1s")],
)
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=MAX_DURATION_S))
def test_durations_round_trip(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert parse_duration(str(seconds)) == seconds
    assert format_duration(parse_duration(text)) == text


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("wdhms"), st.integers(min_value=0, max_value=500)),
        min_size=1,
        max_size=5,
        unique_by=lambda part: part[0],
    )
)
def test_any_composed_duration_parses_to_its_sum(parts: list[tuple[str, int]]) -> None:
    sizes = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
    ordered = sorted(parts, key=lambda part: "wdhms".index(part[0]))
    text = "".join(f"{count}{unit}" for unit, count in ordered)
    assert parse_duration(text) == sum(count * sizes[unit] for unit, count in parts)


# -------------------------------------------------------------- where the file is, paths


@pytest.mark.parametrize(
    ("cli", "environ", "expected"),
    [
        ("/cli.yaml", {CONFIG_ENV: "/env.yaml"}, Path("/cli.yaml")),
        ("rel/cli.yaml", {}, Path("rel/cli.yaml")),
        (None, {CONFIG_ENV: "/env.yaml"}, Path("/env.yaml")),
        ("", {CONFIG_ENV: "/env.yaml"}, Path("/env.yaml")),
        (None, {CONFIG_ENV: ""}, DEFAULT_CONFIG_PATH),
        (None, {}, DEFAULT_CONFIG_PATH),
        (None, {"OTHER": "/x.yaml"}, Path("/etc/slurm-tracker/config.yaml")),
    ],
)
def test_config_path_resolution_order(
    cli: Optional[str], environ: dict[str, str], expected: Path
) -> None:
    assert resolve_config_path(cli, environ) == expected


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "config.yaml"
    path.write_text(
        MINIMAL
        + "state_file: state/tracker.db\ncatalog_file: ./catalog.yaml\n"
        + "api:\n  api_key_file: ../secrets/key\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.state_file == folder / "state" / "tracker.db"
    assert config.catalog_file == folder / "catalog.yaml"
    assert config.api.api_key_file == folder / ".." / "secrets" / "key"


def test_relative_config_path_still_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.yaml").write_text(MINIMAL + "state_file: s.db\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("config.yaml"))
    assert config.state_file == tmp_path / "s.db"
    assert config.state_file.is_absolute()


def test_absolute_and_home_paths_are_kept() -> None:
    config = load(MINIMAL + "state_file: /abs/state.db\ncatalog_file: ~/catalog.yaml\n")
    assert config.state_file == Path("/abs/state.db")
    assert config.catalog_file == Path("~/catalog.yaml").expanduser()


def test_config_from_text_resolves_against_base_dir() -> None:
    config = config_from_text(MINIMAL + "state_file: s.db\n", "x", base_dir=Path("/base"))
    assert config.state_file == Path("/base/s.db")


# -------------------------------------------------------------- reading the file itself


def test_a_missing_file_says_where_the_config_is_looked_for(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    (problem,) = info.value.problems
    assert f"{path} does not exist" in problem
    for place in ("--config", "$SLURM_TRACKER_CONFIG", "/etc/slurm-tracker/config.yaml"):
        assert place in problem
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_a_file_that_cannot_be_opened_says_so(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))  # a socket cannot be opened for reading (ENXIO), even by root
        with pytest.raises(ConfigError) as info:
            load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"cannot read {path}: No such device or address")
    assert "--config" in problem and "$SLURM_TRACKER_CONFIG" in problem
    assert isinstance(info.value.__cause__, OSError)


def test_a_file_without_read_permission_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    real_open = os.open

    def refuse(name: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(name) == str(path):  # root reads files whatever their mode: simulate it
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ConfigError, match=r"cannot read .*Permission denied"):
        load_config(path)


def test_a_file_in_a_missing_directory_says_it_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert f"{path} does not exist" in problem


# ---------------------------------------------------------- the file must be trusted


def test_a_directory_is_not_a_configuration(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFile, match=r"configuration .* is not a regular file"):
        load_config(tmp_path)


def test_a_symlinked_config_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text(MINIMAL, encoding="utf-8")
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    assert load_config(real).cluster == "hpc1"  # the file itself is fine
    with pytest.raises(UnsafeFile, match=r"is a symbolic link"):
        load_config(link)


def test_a_dangling_symlink_is_refused_not_missing(tmp_path: Path) -> None:
    link = tmp_path / "config.yaml"
    link.symlink_to(tmp_path / "not-there.yaml")
    with pytest.raises(UnsafeFile, match=r"is a symbolic link"):
        load_config(link)


@pytest.mark.parametrize("mode", [0o646, 0o664, 0o666])
def test_a_config_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    os.chmod(path, mode)
    with pytest.raises(UnsafeFile, match=r"is writable by .* run `chmod go-w"):
        load_config(path)
    os.chmod(path, 0o644)
    assert load_config(path).cluster == "hpc1"


def test_a_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "CI runs as root: chown needs it"
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeFile, match=r"belongs to .*65534.*only files of .* or root"):
        load_config(path)


def test_a_config_in_a_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "config.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    os.chmod(folder, 0o777)
    with pytest.raises(UnsafeFile, match=r"directory .*etc is writable by"):
        load_config(path)
    os.chmod(folder, 0o1777)  # sticky is not enough for the file's own directory
    with pytest.raises(UnsafeFile, match=r"directory .*etc is writable by"):
        load_config(path)
    os.chmod(folder, 0o755)
    assert load_config(path).cluster == "hpc1"


def test_a_config_larger_than_1_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL + "#" * (1 << 20) + "\n", encoding="utf-8")
    with pytest.raises(UnsafeFile, match=r"is larger than 1048576 bytes"):
        load_config(path)


def test_a_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"cluster: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(bad byte at offset 12\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cluster: x\naccounts: [a\n", "line 3, column 1: YAML syntax error"),
        ("cluster: x\n  bad: indent\n", "line 2, column 6: YAML syntax error"),
        ("cluster: 'x\n", "line 2, column 1: YAML syntax error"),
        ("cluster: x\n\tapi: {}\n", "line 2, column 1: YAML syntax error"),
        ("cluster: x\n---\ncluster: y\n", "line 2, column 1: YAML syntax error"),
        ("cluster: *nope\n", "line 1, column 10: YAML syntax error"),
    ],
)
def test_yaml_syntax_errors_give_line_and_column(text: str, expected: str) -> None:
    problem = only_problem(text)
    assert problem.startswith(expected), problem


def test_unsafe_tags_are_never_constructed() -> None:
    found = problems(MINIMAL + "catalog: !!python/object/apply:os.system [echo hacked]\n")
    assert found[0].startswith("catalog (line 8): expected a mapping")
    found = problems(MINIMAL + "catalog:\n  units: !!python/object/apply:os.system [echo x]\n")
    assert found[0].startswith("catalog (line 9): cannot be read: could not determine a construc")


# ---------------------------------------------------------------------------- limits


def test_limits_default_when_absent_or_empty() -> None:
    assert load(MINIMAL).limits == Limits()
    assert load(MINIMAL + "limits:\n").limits == Limits()
    assert load(MINIMAL + "limits: {}\n").limits == Limits()


@pytest.mark.parametrize(
    ("text", "mem_mb"),
    [
        ("65536", 65536),
        ("1", 1),
        ("1M", 1),
        ("512M", 512),
        ("2048G", 2048 * 1024),
        ("1.5T", 3 * 512 * 1024),
        ("512T", 512 * 1024**2),
        ("64P", 64 * 1024**3),
        ("4t", 4 * 1024**2),
        ("'65536'", 65536),
    ],
)
def test_limits_max_memory_units(text: str, mem_mb: int) -> None:
    assert load(MINIMAL + f"limits:\n  max_memory: {text}\n").limits.max_mem_mb == mem_mb


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0), ("0s", 0), ("30s", 30), ("5m", 300), ("1d", 86400)]
)
def test_limits_clock_skew_from_0_to_a_day(text: str, seconds: int) -> None:
    assert load(MINIMAL + f"limits:\n  clock_skew: {text}\n").limits.clock_skew_s == seconds


@pytest.mark.parametrize(
    ("text", "hold"),
    [
        ("0", Decimal(0)),
        ("1000", Decimal(1000)),
        ("2500.25", Decimal("2500.25")),
        ("0.1", Decimal("0.1")),  # exactly, not the float 0.1000000000000000055...
        ("1_000_000", Decimal(1000000)),
        ("'1e6'", Decimal("1e6")),
        ("1e6", Decimal("1e6")),  # YAML 1.1 reads it as text: still a number here
    ],
)
def test_limits_hold_above_is_an_exact_decimal(text: str, hold: Decimal) -> None:
    value = load(MINIMAL + f"limits:\n  hold_above: {text}\n").limits.hold_above
    assert isinstance(value, Decimal)
    assert value == hold


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("limits: 5\n", "limits (line 8): expected a mapping with keys max_cpus, max_gpus"),
        (
            "limits:\n  max_cpu: 5\n",
            'limits.max_cpu (line 9): unknown key; did you mean "max_cpus"?',
        ),
        ("limits:\n  max_cpus: 0\n", "limits.max_cpus (line 9): must be at least 1; got 0"),
        ("limits:\n  max_gpus: -1\n", "limits.max_gpus (line 9): must be at least 1; got -1"),
        (
            "limits:\n  max_nodes: 1.5\n",
            "limits.max_nodes (line 9): expected a whole number; got a number (1.5)",
        ),
        (
            "limits:\n  max_cpus: '100'\n",
            'limits.max_cpus (line 9): expected a whole number; got text ("100")',
        ),
        (
            "limits:\n  max_cpus:\n",
            "limits.max_cpus (line 9): expected a whole number; got nothing",
        ),
        (
            "limits:\n  max_cpus: " + "9" * 5000 + "\n",
            "limits.max_cpus (line 9): must be at least 1; got a number of 5000 digits",
        ),
        (
            "limits:\n  max_cpus: !!int abc\n",
            "limits.max_cpus (line 9): expected a whole number",
        ),
        (
            "limits:\n  max_memory: 64X\n",
            'limits.max_memory (line 9): not an amount of memory: "64X"',
        ),
        ("limits:\n  max_memory: 64 G\n", "limits.max_memory (line 9): not an amount of memory"),
        ("limits:\n  max_memory: -5G\n", "limits.max_memory (line 9): not an amount of memory"),
        ("limits:\n  max_memory: 0\n", 'limits.max_memory (line 9): must be at least 1M; got "0"'),
        ("limits:\n  max_memory: 0.5M\n", "limits.max_memory (line 9): must be at least 1M"),
        ("limits:\n  max_memory: 1.5\n", "limits.max_memory (line 9): a fraction of a MiB"),
        ("limits:\n  max_memory: [1G]\n", "limits.max_memory (line 9): expected an amount"),
        ("limits:\n  max_memory: 64KB\n", "limits.max_memory (line 9): not an amount of memory"),
        (
            "limits:\n  max_memory: " + "9" * 5000 + "G\n",
            "limits.max_memory (line 9): not an amount of memory",
        ),
        ("limits:\n  clock_skew: 2d\n", "limits.clock_skew (line 9): must be at most 1d; got 2d"),
        ("limits:\n  clock_skew: -1m\n", "limits.clock_skew (line 9): negative duration"),
        ("limits:\n  clock_skew: soon\n", "limits.clock_skew (line 9): not a duration"),
        ("limits:\n  hold_above: -1\n", "limits.hold_above (line 9): must be 0 or more; got -1"),
        ("limits:\n  hold_above: .inf\n", "limits.hold_above (line 9): expected a number"),
        ("limits:\n  hold_above: .nan\n", "limits.hold_above (line 9): expected a number"),
        (
            "limits:\n  hold_above: lots\n",
            "limits.hold_above (line 9): expected a number; got text",
        ),
        ("limits:\n  hold_above: true\n", "limits.hold_above (line 9): expected a number"),
        ("limits:\n  hold_above: 0x10\n", "limits.hold_above (line 9): expected a number"),
        (
            "limits:\n  hold_above: " + "9" * 5000 + "\n",
            "limits.hold_above (line 9): expected a number",
        ),
    ],
)
def test_limits_problems(section: str, expected: str) -> None:
    assert only_problem(MINIMAL + section).startswith(expected)


def test_all_limit_problems_are_reported_at_once() -> None:
    found = problems(
        MINIMAL
        + "limits:\n  max_cpus: 0\n  max_gpus: x\n  max_nodes: 0\n  max_memory: lots\n"
        + "  clock_skew: 1w\n  hold_above: -3\n"
    )
    assert [problem.split(" (line")[0] for problem in found] == [
        "limits.max_cpus",
        "limits.max_gpus",
        "limits.max_nodes",
        "limits.max_memory",
        "limits.clock_skew",
        "limits.hold_above",
    ]


# ---------------------------------------------------------------- first_sync_start and now


@pytest.mark.parametrize(
    "value",
    [
        "2062-01-01",  # the typo of the issue: 2026 -> 2062
        "2026-11-30T12:05:01Z",  # just beyond the 5 minutes of tolerance
        "2026-11-30T13:00:00+00:30",
        "9999-12-31T23:59:59Z",
    ],
)
def test_first_sync_start_in_the_future_is_refused(value: str) -> None:
    problem = only_problem(MINIMAL + f"sacct:\n  first_sync_start: {value}\n")
    assert problem.startswith("sacct.first_sync_start (line 9): "), problem
    assert "is in the future (it is now 2026-11-30T12:00:00Z): a typo? the agent would bill " in (
        problem
    )
    assert "nothing until then" in problem


@pytest.mark.parametrize(
    "value", ["2026-11-30T12:05:00Z", "2026-11-30T12:00:00Z", "2026-11-30", "2000-01-01"]
)
def test_first_sync_start_up_to_5_minutes_ahead_is_accepted(value: str) -> None:
    config = load(MINIMAL + f"sacct:\n  first_sync_start: {value}\n")
    assert config.sacct.first_sync_start is not None
    assert config.sacct.first_sync_start <= NOW_AT + timedelta(minutes=5)


def test_first_sync_start_out_of_range_after_conversion_is_a_problem() -> None:
    # 9999-12-31T23:00-05:00 is in year 10000 in UTC: an OverflowError, reported
    problem = only_problem(MINIMAL + "sacct:\n  first_sync_start: 9999-12-31T23:00:00-05:00\n")
    assert problem.startswith('sacct.first_sync_start (line 9): not a valid time "9999-12-31T23')


def test_load_config_checks_against_the_real_clock_by_default(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(MINIMAL + f"sacct:\n  first_sync_start: {tomorrow}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is in the future"):
        load_config(path)
    # a clock given explicitly is used instead
    later = datetime.now(timezone.utc) + timedelta(days=3)
    assert load_config(path, now_at=later).sacct.first_sync_start is not None


def test_a_naive_now_is_taken_as_utc() -> None:
    config = config_from_text(
        MINIMAL + "sacct:\n  first_sync_start: 2026-01-02\n",
        "x",
        now_at=datetime(2026, 1, 2, 0, 4),
    )
    assert config.sacct.first_sync_start == datetime(2026, 1, 2, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------- secrets


def realistic_key(seed: int) -> str:
    """An API key as the platform issues them: pwt_ + base64url(host) + "." + 40 random chars."""
    rng = random.Random(seed)
    host = base64.urlsafe_b64encode(b"activate.example.org").decode().rstrip("=")
    secret = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(40))
    return f"pwt_{host}.{secret}"


KEY = realistic_key(8)
BARE_SECRET = KEY.rsplit(".", 1)[1]  # the 40 random characters alone, pasted without prefix


def leaks(secret: str, text: str) -> list[str]:
    """The 8-character pieces of ``secret`` after its 4 first characters that ``text`` shows."""
    return [secret[i : i + 8] for i in range(1, len(secret) - 7) if secret[i : i + 8] in text]


PARTITIONS = "partitions:\n  default: S\n"
SECTIONS = "accounts:\n  default: a\n" + PARTITIONS
BASE = "cluster: hpc1\n" + SECTIONS

# Every place a value can go, with "{v}" where it goes; and whether a bare 40-character token
# there is invalid (so that an error, which must not echo it, is raised).
FIELDS: dict[str, tuple[str, bool]] = {
    "cluster": ("cluster: {v}\n" + SECTIONS, False),
    "state_file": (BASE + "state_file: {v}\n", False),
    "reporting_interval": (BASE + "reporting_interval: {v}\n", True),
    "catalog_file": (BASE + "catalog_file: {v}\n", False),
    "api.organization": (BASE + "api:\n  organization: {v}\n", False),
    "api.url": (BASE + "api:\n  url: {v}\n", True),
    "api.url.host": (BASE + "api:\n  url: http://{v}:8080/\n", True),
    "api.url.port": (BASE + "api:\n  url: 'https://example.org:{v}'\n", True),
    "api.api_key_file": (BASE + "api:\n  api_key_file: {v}\n", False),
    "api.connect_timeout": (BASE + "api:\n  connect_timeout: {v}\n", True),
    "api.read_timeout": (BASE + "api:\n  read_timeout: {v}\n", True),
    "api.max_attempts": (BASE + "api:\n  max_attempts: {v}\n", True),
    "api.max_retry_time": (BASE + "api:\n  max_retry_time: {v}\n", True),
    "api.concurrency": (BASE + "api:\n  concurrency: {v}\n", True),
    "api.requests_per_second": (BASE + "api:\n  requests_per_second: {v}\n", True),
    "api.api_key": (BASE + "api:\n  api_key: {v}\n", True),
    "api.password": (BASE + "api:\n  password: {v}\n", True),
    "token": (BASE + "token: [{v}]\n", True),
    "sacct.path": (BASE + "sacct:\n  path: {v}\n", False),
    "sacct.timeout": (BASE + "sacct:\n  timeout: {v}\n", True),
    "sacct.lag": (BASE + "sacct:\n  lag: {v}\n", True),
    "sacct.overlap": (BASE + "sacct:\n  overlap: {v}\n", True),
    "sacct.first_sync_start": (BASE + "sacct:\n  first_sync_start: {v}\n", True),
    "sacct.extra_args.item": (BASE + "sacct:\n  extra_args: [{v}]\n", True),
    "sacct.extra_args.long": (BASE + "sacct:\n  extra_args: ['--{v}']\n", True),
    "sacct.extra_args.short": (BASE + "sacct:\n  extra_args: ['-{v}']\n", True),
    "sacct.extra_args.value": (BASE + "sacct:\n  extra_args: ['--partition={v}']\n", False),
    "sacct.extra_args.next": (BASE + "sacct:\n  extra_args: [--partition, {v}]\n", False),
    "sacct.extra_args.refused": (BASE + "sacct:\n  extra_args: ['--clusters={v}']\n", True),
    "sacct.backfill_chunk": (BASE + "sacct:\n  backfill_chunk: {v}\n", True),
    "sacct.backfill_pause": (BASE + "sacct:\n  backfill_pause: {v}\n", True),
    "sacct.file_timezone": (BASE + "sacct:\n  file_timezone: {v}\n", True),
    "sacct.clusters": (BASE + "sacct:\n  clusters: [{v}]\n", False),
    "sacct.clusters.twice": (BASE + "sacct:\n  clusters: [{v}, {v}]\n", True),
    "accounts.map.key": (
        "cluster: x\naccounts:\n  map:\n    {v}: a\npartitions:\n  default: S\n",
        False,
    ),
    "accounts.map.value": (
        "cluster: x\naccounts:\n  map:\n    a: {v}\npartitions:\n  default: S\n",
        False,
    ),
    "accounts.default": (
        "cluster: x\naccounts:\n  default: {v}\npartitions:\n  default: S\n",
        False,
    ),
    "accounts.ignore": (
        "cluster: x\naccounts:\n  map: {{v}: a}\n  ignore: [{v}]\n" + PARTITIONS,
        True,
    ),
    "partitions.map.sku": (
        "cluster: x\naccounts:\n  default: a\npartitions:\n  map:\n    c: {v}\n",
        False,
    ),
    "partitions.default.metric": (
        "cluster: x\naccounts:\n  default: a\npartitions:\n  default: {sku: S, metric: {v}}\n",
        True,
    ),
    "partitions.twice": (
        "cluster: x\naccounts:\n  default: a\npartitions:\n  default: [{v}, {v}]\n",
        True,
    ),
    "metadata.fields": (BASE + "metadata:\n  fields: [{v}]\n", True),
    "catalog": (BASE + "catalog:\n  units: [{name: {v}}]\n", False),
    "catalog.tag": (BASE + "catalog:\n  units: !!int {v}\n", True),
    "limits.max_cpus": (BASE + "limits:\n  max_cpus: {v}\n", True),
    "limits.max_gpus": (BASE + "limits:\n  max_gpus: {v}\n", True),
    "limits.max_nodes": (BASE + "limits:\n  max_nodes: {v}\n", True),
    "limits.max_memory": (BASE + "limits:\n  max_memory: {v}\n", True),
    "limits.clock_skew": (BASE + "limits:\n  clock_skew: {v}\n", True),
    "limits.hold_above": (BASE + "limits:\n  hold_above: {v}\n", True),
    "unknown key's value": (BASE + "zzz: {v}\n", True),
    "unknown key": (BASE + "{v}: 1\n", True),
    "unknown section key": (BASE + "api:\n  {v}: 1\n", True),
    "duplicate key": ("cluster: x\naccounts:\n  map: {{v}: a, {v}: b}\n" + PARTITIONS, True),
    "the whole file": ("{v}\n", True),
    "a list": ("- {v}\n", True),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_an_api_key_in_any_field_is_refused_and_never_echoed(field: str) -> None:
    template, _ = FIELDS[field]
    with pytest.raises(ConfigError) as info:
        load(template.replace("{v}", KEY))
    message = str(info.value)
    assert not leaks(KEY, message), message
    if field not in ("the whole file", "a list"):
        assert "never put the API key in the configuration file" in message, message


@pytest.mark.parametrize("field", list(FIELDS))
def test_a_token_in_any_field_is_never_echoed(field: str) -> None:
    template, invalid = FIELDS[field]
    text = template.replace("{v}", BARE_SECRET)
    if not invalid:
        load(text)  # a valid value: nothing is printed
        return
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert not leaks(BARE_SECRET, message), message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("api:\n  connect_timeout: {v}\n", "api.connect_timeout (line 9): not a duration: "),
        ("api:\n  max_attempts: {v}\n", "api.max_attempts (line 9): expected a whole number"),
        ("sacct:\n  file_timezone: {v}\n", "sacct.file_timezone (line 9): unknown time zone "),
        ("metadata:\n  fields: [{v}]\n", "metadata.fields[0] (line 9): unknown job field "),
        ("{v}: 1\n", ""),
    ],
)
def test_a_redacted_value_shows_4_characters_at_most(section: str, expected: str) -> None:
    problem = only_problem(MINIMAL + section.replace("{v}", BARE_SECRET))
    assert problem.startswith(expected), problem
    assert f"{BARE_SECRET[:4]}… (redacted)" in problem
    assert BARE_SECRET[:5] not in problem


@pytest.mark.parametrize("name", ["pwt_lab", "PWT_x.y", "SLURM_PWT_HOUR.v2"])
def test_names_that_only_start_like_a_key_are_not_refused_as_keys(name: str) -> None:
    config = load(MINIMAL.replace("physics: physics-2026", f"{name}: physics-2026"))
    assert name in config.accounts.exact


def test_the_api_key_file_given_as_config_is_not_echoed(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_config(key_file)
    (problem,) = info.value.problems
    assert problem.startswith(
        "the top level (line 1): not a slurm-tracker configuration (its top level is not a mapping)"
    )
    assert "got text (pwt_… (redacted)); it looks like an API key" in problem
    assert not leaks(KEY, str(info.value))


def test_check_with_the_api_key_file_as_config_says_what_it_is(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    result = cli_runner().invoke(main, ["check", "--config", str(key_file)])
    output = shown(result)
    assert result.exit_code == 3, output
    assert "not a slurm-tracker configuration (its top level is not a mapping)" in output
    assert "pwt_… (redacted)" in output
    assert not leaks(KEY, output), output


@pytest.mark.parametrize(
    "text",
    [
        "hello world, this is not a configuration\n",
        "s3cr3t\n",
        "12345\n",
        "- one\n- two\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
        "-----END OPENSSH PRIVATE KEY-----\n",
    ],
)
def test_a_file_that_is_not_a_mapping_is_never_echoed(text: str) -> None:
    problem = only_problem(text)
    assert "not a slurm-tracker configuration (its top level is not a mapping)" in problem
    first_line = text.splitlines()[0]
    if not first_line.startswith("- "):
        assert f"{first_line[:4]}… (redacted)" in problem
        assert first_line[:5] not in problem


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (KEY, True),
        ("pwt_x", True),
        ("my key is pwt_abc", True),
        (BARE_SECRET, True),
        ("ghp_" + "a1" * 18, True),
        ("a" * 19 + "1", True),
        ("a" * 18 + "1", False),  # 19 characters
        ("physics-2026", False),
        ("SLURM_PWT_HOUR", False),  # pwt_ inside a word is no API key prefix
        ("2026-01-01T00:00:00Z", False),
        ("2026-01-01T00:00:00.123456+02:00", False),
        ("https://activate.example.org", False),  # letters only
        ("x" * 500, False),
        ("1" * 500, False),
        ("a b c d 1 2 3 4 5 6 7 8 9 0 a b c d e f", False),
    ],
)
def test_looks_secret(text: str, secret: bool) -> None:
    assert looks_secret(text) is secret


def test_shown_value() -> None:
    assert shown_value("physics") == "physics"
    assert shown_value(KEY) == "pwt_… (redacted)"
    assert shown_value(BARE_SECRET) == f"{BARE_SECRET[:4]}… (redacted)"
    assert shown_value("anything", redact=True) == "anyt… (redacted)"
    assert shown_value("a\nbcdef", redact=True) == "a\\nbc… (redacted)"
    assert shown_value("x" * 500) == "x" * 59 + "…"


def test_durations_from_the_command_line_are_not_echoed_when_secret() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(KEY)
    assert not leaks(KEY, str(info.value))
    with pytest.raises(ValueError, match=r"not a duration: '5x'"):
        parse_duration("5x")


# ----------------------------------------------------------- hostile and broken YAML


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000 + "]" * 10_000,
        "{a: " * 10_000 + "1" + "}" * 10_000,
        "".join(f"{' ' * depth}a:\n" for depth in range(10_000)),
        MINIMAL + "catalog:\n  units: " + "[" * 10_000 + "]" * 10_000 + "\n",
        MINIMAL + "catalog: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
        "- " * 5_000 + "x\n",
    ],
    ids=["lists", "mappings", "block-mappings", "in-catalog-lists", "in-catalog-maps", "dashes"],
)
def test_deeply_nested_yaml_is_a_config_error(text: str) -> None:
    problem = only_problem(text)
    assert "nested too deeply: more than 50 levels of lists and mappings" in problem
    assert problem.startswith("line ")


def test_nesting_up_to_the_limit_is_read() -> None:
    depth = MAX_YAML_DEPTH - 3  # the catalog section and its units list are two levels
    text = MINIMAL + "catalog:\n  units: " + "[" * depth + "]" * depth + "\n"
    config = load(text)
    assert config.catalog is not None


ALIAS_BOMB = MINIMAL + textwrap.dedent(
    """\
    catalog:
      a: &a [x, x, x, x, x, x, x, x, x, x]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
      i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
      units: [{name: *i}]
    """
)


def test_an_alias_bomb_is_refused_quickly() -> None:
    problem = only_problem(ALIAS_BOMB)
    assert problem.startswith("line 12, column ")  # the alias that goes over the limit
    assert f"aliases (*name) repeat more than {MAX_ALIAS_NODES} values" in problem


def test_aliases_below_the_limit_are_read() -> None:
    text = MINIMAL + "catalog:\n  a: &a [" + ", ".join(["x"] * 99) + "]\n"
    text += "  b: [" + ", ".join(["*a"] * 99) + "]\n"  # 99 x 100 nodes repeated
    config = load(text)
    assert config.catalog is not None
    assert len(config.catalog["b"]) == 99  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL + "catalog: &a\n  x: *a\n",
        MINIMAL + "catalog:\n  units: &a [*a]\n",
        MINIMAL + "catalog:\n  units: &a [{name: x, skus: *a}]\n",
        "cluster: x\naccounts: &a\n  map: {b: *a}\npartitions:\n  default: S\n",
    ],
)
def test_a_structure_that_contains_itself_is_refused(text: str) -> None:
    problem = only_problem(text)
    assert "the alias *a is used inside the value it names" in problem


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("  version: " + "9" * 5000 + "\n", "as int: invalid or far too large"),
        ("  version: !!int abc\n", "cannot read 'abc' as int"),
        ("  version: !!int\n", "cannot read '' as int"),
        ("  version: !!float\n", "cannot read '' as float"),
        ("  version: !!float abc\n", "cannot read 'abc' as float"),
        ("  pulled_at: 2026-13-45\n", "cannot read '2026-13-45' as timestamp"),
        ("  pulled_at: !!timestamp abc\n", "cannot read 'abc' as timestamp"),
        ("  units: !!binary notbase64!\n", "failed to decode base64 data"),
        ("  units: !!python/object/apply:os.system [echo x]\n", "could not determine a construc"),
        ("  <<: 5\n", "expected a mapping or list of mappings for merging"),
        ("  ? [a]\n  : 1\n", "found unhashable key"),
    ],
)
def test_values_that_cannot_be_built_are_config_errors(section: str, expected: str) -> None:
    problem = only_problem(MINIMAL + "catalog:\n" + section)
    assert problem.startswith("catalog (line 9): cannot be read: "), problem
    assert expected in problem


@pytest.mark.parametrize(
    "section",
    [
        "api:\n  max_attempts: " + "9" * 5000 + "\n",
        "api:\n  requests_per_second: " + "9" * 5000 + "\n",
        "api:\n  concurrency: !!int abc\n",
        "api:\n  requests_per_second: !!float abc\n",
        "reporting_interval: " + "9" * 5000 + "\n",
        "reporting_interval: " + "9" * 5000 + "w\n",
        "sacct:\n  first_sync_start: " + "9" * 5000 + "\n",
    ],
)
def test_huge_or_mistagged_numbers_are_config_errors(section: str) -> None:
    problem = only_problem(MINIMAL + section)
    assert len(problem) < 400, problem  # the value is not echoed in full


def test_a_very_long_line_is_read_and_not_echoed_in_full() -> None:
    long_name = "a" * (1 << 20)
    config = load(MINIMAL + f"sacct:\n  path: {long_name}\n")
    assert config.sacct.path == long_name
    problem = only_problem(MINIMAL + f"sacct:\n  file_timezone: {long_name}\n")
    assert problem.startswith('sacct.file_timezone (line 9): unknown time zone "aaaa')
    assert len(problem) < 300


def test_a_very_long_key_is_a_syntax_error() -> None:
    problem = only_problem(MINIMAL + "k" * 2000 + ": 1\n")
    assert problem.startswith("line 8, column 2001: YAML syntax error")


@pytest.mark.parametrize(
    "text", ["cluster: x\x00\n", "cluster: \x1b[31mred\n", "cluster: x\ufffe\n"]
)
def test_unprintable_characters_are_config_errors(text: str) -> None:
    problem = only_problem(text)
    assert problem.startswith("not valid YAML: unacceptable character")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('cluster: "a\\tb"\n', 'cluster (line 1): the cluster name "a\\tb" contains a control'),
        ('cluster: x\nsacct:\n  path: "sac\\0ct"\n', "sacct.path (line 3): the sacct program"),
    ],
)
def test_control_characters_in_names_are_refused(text: str, expected: str) -> None:
    found = problems(text + SECTIONS)
    assert any(problem.startswith(expected) for problem in found), found


def test_syntax_errors_do_not_echo_the_document() -> None:
    problem = only_problem(f"cluster: x\napi: *{BARE_SECRET}\n")
    assert problem.startswith("line 2, column 6: YAML syntax error")
    assert not leaks(BARE_SECRET, problem), problem


YAML_PIECES = [*"[]{}:,-&*!|>'\"#?% \t", "\n", "\n  ", "a", "b1", "&a ", "*a", "!!int ", "<<: "]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=60).map("".join))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    try:
        config = config_from_text(MINIMAL + text, "fuzz", now_at=NOW_AT)
    except ConfigError as exc:
        assert exc.problems
    else:
        assert config.cluster


# --------------------------------------------------------------------------- loopback


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]:8080",
        "http://127.0.0.2",
        "http://127.255.255.254:9000/",
        "http://localhost.",
        "http://localhost.:8080",
        "http://LocalHost",
    ],
)
def test_plain_http_to_loopback_is_accepted(url: str) -> None:
    assert load(MINIMAL + f"api:\n  url: '{url}'\n").api.url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://foo.localhost",
        "http://localhost.example.org",
        "http://127.0.0.1.nip.io",
        "http://[::2]",
        "http://0.0.0.0",
        "http://128.0.0.1",
    ],
)
def test_plain_http_elsewhere_is_refused(url: str) -> None:
    problem = only_problem(MINIMAL + f"api:\n  url: '{url}'\n")
    assert problem.startswith("api.url (line 9): must use https:// for "), problem


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost.", True),
        ("[::1]", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("foo.localhost", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
