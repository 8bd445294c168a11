"""The board check runs first and fails with a clear message, before anything is installed."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._harness import device_host_vars, run_playbook, write_inventory


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nanofleet-ansible-check-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"nanofleet_device_allowed_architectures": ["aarch64"]}, "the CPU architecture is x86_64"),
        ({"nanofleet_device_min_ram_mb": 10_000_000}, "MB needed (nanofleet_device_min_ram_mb)"),
        ({"nanofleet_device_min_free_disk_mb": 10**12}, "nanofleet_device_min_free_disk_mb"),
    ],
    ids=["arch", "ram", "disk"],
)
def test_board_check_fails_early_with_a_clear_message(
    scratch: Path, override: dict[str, object], message: str
) -> None:
    root = scratch / "board"
    host = {**device_host_vars(root, api_port=8080, bundle=None), **override}
    inventory = write_inventory(
        scratch / "inventory" / "hosts.yml",
        broker={},
        fleet={},
        pi5={},
        pi4={"pi4-check": host},
        common={"nanofleet_mqtt_url": "mqtt://127.0.0.1:1883", "nanofleet_trusted_keys": ["/none.pub"]},
    )
    run = run_playbook(inventory, scratch / "home", timeout=300)
    assert run.rc != 0
    assert run.recap["pi4-check"]["failed"] == 1
    assert message in run.output, run.output[-3000:]
    assert "pi4-check:" in run.output
    # Failed before anything was installed on the board.
    assert not root.exists() or not any(root.rglob("*")), sorted(root.rglob("*"))
    assert sys.platform.startswith("linux")
