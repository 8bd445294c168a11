"""The board check runs first and fails with a clear message, before anything is installed.

One playbook run, three boards, each failing a different check (architecture, RAM, disk).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._harness import Run, device_host_vars, run_playbook, write_inventory

pytestmark = [pytest.mark.slow]

CASES = {
    "bad-arch": ({"nanofleet_device_allowed_architectures": ["aarch64"]}, "the CPU architecture is x86_64"),
    "bad-ram": ({"nanofleet_device_min_ram_mb": 10_000_000}, "MB needed (nanofleet_device_min_ram_mb)"),
    "bad-disk": ({"nanofleet_device_min_free_disk_mb": 10**12}, "MB needed for two model slots"),
}


@pytest.fixture(scope="module")
def failed_run() -> Iterator[tuple[Path, Run]]:
    scratch = Path(tempfile.mkdtemp(prefix="nanofleet-ansible-check-"))
    try:
        hosts = {
            name: {**device_host_vars(scratch / name, api_port=8080, bundle=None), **override}
            for name, (override, _msg) in CASES.items()
        }
        inventory = write_inventory(
            scratch / "inventory" / "hosts.yml",
            broker={},
            fleet={},
            pi5={},
            pi4=hosts,
            common={"nanofleet_mqtt_url": "mqtt://127.0.0.1:1883", "nanofleet_trusted_keys": ["/none.pub"]},
        )
        yield scratch, run_playbook(inventory, scratch / "home", timeout=600)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("board", sorted(CASES))
def test_board_check_fails_early_with_a_clear_message(failed_run: tuple[Path, Run], board: str) -> None:
    scratch, run = failed_run
    assert run.rc != 0
    assert run.recap[board]["failed"] == 1, run.output[-3000:]
    # The message names the board and what is wrong, and only this board's check fails for it.
    lines = [line for line in run.output.splitlines() if f"[{board}]" in line and "FAILED" in line]
    assert len(lines) == 1, run.output[-3000:]
    assert f"{board}:" in lines[0] and CASES[board][1] in lines[0], lines[0]
    # Failed before anything was installed on the board.
    root = scratch / board
    assert not root.exists() or not any(root.rglob("*")), sorted(root.rglob("*"))
