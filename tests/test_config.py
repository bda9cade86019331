"""The configuration loader: values, defaults, and every problem reported at once with its place."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.config import (
    CONFIG_ENV,
    CONFIG_KEYS,
    DEFAULT_CONFIG_PATH,
    DEFAULT_STATE_FILE,
    MAX_DURATION_S,
    AccountMapping,
    ApiConfig,
    Config,
    SacctConfig,
    config_from_text,
    format_duration,
    load_config,
    parse_duration,
    resolve_config_path,
    sacct_arg_problems,
)
from slurm_tracker.errors import ConfigError
from slurm_tracker.models import SkuCharge

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


def load(text: str) -> Config:
    return config_from_text(textwrap.dedent(text), "test.yaml", base_dir=BASE_DIR)


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
  extra_args: [--clusters=hpc1, --partition, compute, -a]
  backfill_chunk: 12h
  backfill_pause: 0s
  file_timezone: Europe/Berlin
metadata:
  fields: [qos, job_name]
catalog_file: catalog.yaml
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
        extra_args=("--clusters=hpc1", "--partition", "compute", "-a"),
        backfill_chunk_s=43200,
        backfill_pause_s=0,
        file_timezone="Europe/Berlin",
    )
    assert config.metadata_fields == ("qos", "job_name")
    assert config.catalog_file == BASE_DIR / "catalog.yaml"


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
        ("- cluster: x\n", "the top level (line 1): expected a mapping with keys cluster"),
        ("", "the top level: the file is empty"),
        ("# only a comment\n", "the top level: the file is empty"),
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
        "sacct.extra_args[0] (line 10): --json conflicts with the agent's own sacct options",
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
        ["--clusters=hpc1"],
        ["-M", "hpc1"],
        ["-Mhpc1"],
        ["--partition", "compute"],
        ["--part", "compute"],
        ["-r", "compute", "-a"],
        ["-uroot"],  # -u takes the rest as its value: the o in root is not -o
        ["--units=G", "--noconvert", "--local", "-L"],
        ["--accounts=physics,chemistry", "--whole-hetjob=yes"],
        ["--some-future-option"],
    ],
)
def test_extra_args_that_do_not_clash_are_accepted(args: list[str]) -> None:
    assert sacct_arg_problems(args) == []


@pytest.mark.parametrize(
    ("args", "index", "expected"),
    [
        (["--format=JobID"], 0, "--format conflicts"),
        (["--fields", "JobID"], 0, "--fields conflicts"),
        (["-o", "JobID"], 0, "-o (in -o) conflicts"),
        (["-oJobID"], 0, "-o (in -oJobID) conflicts"),
        (["--parsable2"], 0, "--parsable2 conflicts"),
        (["-P"], 0, "-P (in -P) conflicts"),
        (["-ap"], 0, "-p (in -ap) conflicts"),
        (["--delimiter=,"], 0, "--delimiter conflicts"),
        (["--json"], 0, "--json conflicts"),
        (["--json=v0.0.40"], 0, "--json conflicts"),
        (["--yaml"], 0, "--yaml conflicts"),
        (["--noheader"], 0, "--noheader conflicts"),
        (["-n"], 0, "-n (in -n) conflicts"),
        (["--starttime=2020-01-01"], 0, "--starttime conflicts"),
        (["--start", "2020-01-01"], 0, "--start (short for --starttime) conflicts"),
        (["-S", "2020-01-01"], 0, "-S (in -S) conflicts"),
        (["-E", "now"], 0, "-E (in -E) conflicts"),
        (["--endtime=now"], 0, "--endtime conflicts"),
        (["-X"], 0, "-X (in -X) conflicts"),
        (["--allocations"], 0, "--allocations conflicts"),
        (["-aX"], 0, "-X (in -aX) conflicts"),
        (["--state=CD"], 0, "with --state, sacct selects jobs by the state"),
        (["-s", "CD"], 0, "with --state, sacct selects jobs by the state"),
        (["--jobs=12"], 0, "it would limit every sync to these jobs"),
        (["-j", "12"], 0, "it would limit every sync to these jobs"),
        (["--truncate"], 0, "--truncate conflicts"),
        (["-a", "--brief"], 1, "--brief conflicts"),
        (["-M", "hpc1", "--long"], 2, "--long conflicts"),
        (["--clusters", "hpc1", "hpc2"], 2, '"hpc2" is not an option'),
        (["--"], 0, '"--" is not a sacct option'),
        ([""], 0, '"" is not a sacct option'),
    ],
)
def test_extra_args_that_clash_are_refused_with_a_reason(
    args: list[str], index: int, expected: str
) -> None:
    found = sacct_arg_problems(args)
    assert len(found) == 1, found
    assert found[0][0] == index
    assert expected in found[0][1]


def test_extra_args_problems_name_the_item_and_line() -> None:
    found = problems(MINIMAL + "sacct:\n  extra_args:\n    - --clusters=a\n    - -j\n    - '12'\n")
    assert found == (
        "sacct.extra_args[1] (line 11): -j (in -j) conflicts with the agent's own sacct options: "
        "it would limit every sync to these jobs while the window moves on, so every other "
        "job's usage would never be billed; use `sync --sacct-file` for one-off checks",
    )


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


def test_an_unreadable_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory: cannot be read as a file, even by root
    (problem,) = info.value.problems
    assert problem.startswith(f"cannot read {tmp_path}: ")
    assert "--config" in problem and "$SLURM_TRACKER_CONFIG" in problem


def test_a_file_without_read_permission_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL, encoding="utf-8")

    def refuse(self: Path) -> bytes:  # root reads files whatever their mode: simulate it
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError, match=r"cannot read .*Permission denied"):
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
