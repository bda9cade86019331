"""Catalog administration (slurm_tracker/catalog_admin.py): `catalog pull`, through the CLI."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from slurm_tracker import rating
from slurm_tracker.cli import main
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, DEFAULT_CATALOG, Emulator

UTC = timezone.utc


def test_catalog_pull_writes_a_catalog_the_dry_run_can_use(tmp_path: Path) -> None:
    # the embedded catalog keys SKUs by code: one code in two units is refused (tested in
    # test_rating), so the emulator's second GPU_HOUR is left out here
    catalog = copy.deepcopy(dict(DEFAULT_CATALOG))
    del catalog["skus"]["gpu-hours"]["GPU_HOUR"]
    with Emulator(catalog) as emulator:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"cluster: box\napi: {{organization: test-org, url: '{emulator.base_url}'}}\n"
            "accounts: {map: {physics: physics}}\npartitions: {map: {compute: CPU_HOUR}}\n"
            "catalog_file: catalog.yaml\n"
        )
        result = cli_runner().invoke(
            main, ["catalog", "pull", "--config", str(config)], env={"PW_API_KEY": DEFAULT_API_KEY}
        )
    assert result.exit_code == 0, shown(result)
    pulled = rating.load_catalog_file(tmp_path / "catalog.yaml")
    assert {"CPU_HOUR", "GPU_HOUR", "MEM_GB_HOUR", "OLD_SKU"} <= set(pulled.skus)
    assert pulled.skus["OLD_SKU"].archived
    cpu = rating.rate(
        pulled,
        "CPU_HOUR",
        Decimal(2),
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 2, 1, 1, tzinfo=UTC),
    )
    assert (cpu.amount, cpu.usd) == (Decimal("3.000000"), Decimal("0.150000"))
    show = cli_runner().invoke(
        main, ["catalog", "show", "--config", str(config), "--at", "2025-06-01T00:00:00Z"]
    )
    assert show.exit_code == 0 and "CPU_HOUR" in shown(show)
