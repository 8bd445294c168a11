"""The stick pulled mid-copy, both ways, simulated by SIGKILL of the copying process mid-write (test
hooks stop it half-way) or by a half-copied file: no half-installed bundle, no half-imported file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests import SigningKey
from manifests.offline.format import TEMP_PREFIX

from .conftest import Board, FleetProc, kill, popen_cli, wait_for
from .helpers import bootstrapped, clone, export

pytestmark = pytest.mark.slow  # several real processes


@pytest.fixture(scope="module")
def base(
    tmp_path_factory: pytest.TempPathFactory,
    fleet: FleetProc,
    bundles: dict[int, Path],
    release_key: tuple[SigningKey, Path],
) -> Iterator[Board]:
    yield bootstrapped(fleet, tmp_path_factory.mktemp("base-board"), "field-k", bundles[1], release_key[1])


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, fleet: FleetProc, base: Board) -> Path:
    fleet.deploy("kill-v2", 2, ["field-k"])
    return export(fleet, "kill-v2", tmp_path_factory.mktemp("sticks") / "good")


def test_fleet_export_killed_mid_copy_leaves_no_package(
    tmp_path: Path, fleet: FleetProc, base: Board
) -> None:
    fleet.deploy("kill-export-v2", 2, ["field-k"])
    stick = tmp_path / "stick"
    proc = popen_cli(
        "fleet", "--config", str(fleet.config), "export-update", "--deployment", "kill-export-v2",
        "--out", str(stick), env={"NANOFLEET_OFFLINE_PAUSE_IN": "export-update"},
    )  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "paused-in-export-update").exists(), 60, "the export to pause mid-copy")
    finally:
        kill(proc)
    left = [p.name for p in stick.iterdir()]
    assert len(left) == 1 and left[0].startswith(TEMP_PREFIX)  # only the temp folder: no package
    board = clone(base, tmp_path / "b")
    res = board.device_json("install", str(stick), expect_rc=1)
    assert res["reason"] == "no_package"
    # The next export cleans the remains up and writes a whole package.
    pkg = export(fleet, "kill-export-v2", stick, cli=True)
    assert [p.name for p in stick.iterdir()] == [pkg.name]
    assert board.device_json("install", str(stick))["outcome"] == "committed"


def test_install_killed_mid_copy_then_stick_removed_rolls_back(
    tmp_path: Path, base: Board, package: Path
) -> None:
    board = clone(base, tmp_path / "b")
    before = board.state()
    active = before["active_slot"]
    old_files = board.slot_files(active)
    stick = tmp_path / "stick"
    shutil.copytree(package, stick / package.name)
    proc = popen_cli(
        "device", "install", str(stick), "--config", str(board.config),
        env={"NANOFLEET_AGENT_PAUSE_IN": "downloading"},
    )  # fmt: skip
    try:
        wait_for(lambda: (board.data / "paused-in-downloading").exists(), 60, "the copy to pause half-way")
    finally:
        kill(proc)
    mid = board.state()
    assert mid["state"] == "downloading" and mid["active_slot"] == active
    shutil.rmtree(stick)  # the stick is pulled out
    # The agent starts (boot): the resume map continues the copy, the source is gone, it rolls back.
    board.run()
    try:
        wait_for(lambda: board.state().get("state") == "failed", 30, "the rollback")
    finally:
        board.stop()
    after = board.state()
    assert after["active_slot"] == active and board.slot_files(active) == old_files
    inactive = "a" if active == "b" else "b"
    assert after["slots"][inactive] is None and board.slot_files(inactive) == []  # nothing half-installed
    assert after["highest_committed"] == {"tiny": 1}


def test_install_killed_mid_copy_resumes_when_the_stick_is_back(
    tmp_path: Path, base: Board, package: Path
) -> None:
    board = clone(base, tmp_path / "b")
    stick = tmp_path / "stick"
    shutil.copytree(package, stick / package.name)
    proc = popen_cli(
        "device", "install", str(stick), "--config", str(board.config),
        env={"NANOFLEET_AGENT_PAUSE_IN": "downloading"},
    )  # fmt: skip
    try:
        wait_for(lambda: (board.data / "paused-in-downloading").exists(), 60, "the copy to pause half-way")
    finally:
        kill(proc)
    res = board.device_json("install", str(stick))
    assert res["ok"] and res["committed"] == "tiny@2", res


def _entries(fleet: FleetProc, device_id: str) -> int:
    with fleet.admin() as c:
        return len(c.telemetry(device_id, limit=10000))


def test_telemetry_export_killed_mid_write_then_truncated_copy(
    tmp_path: Path, fleet: FleetProc, bundles: dict[int, Path], release_key: tuple[SigningKey, Path]
) -> None:
    board = bootstrapped(fleet, tmp_path / "b", "field-t", bundles[1], release_key[1])
    queued = board.outbox_len()
    assert queued > 0
    stick = tmp_path / "stick"
    proc = popen_cli(
        "device", "export-telemetry", "--out", str(stick), "--config", str(board.config),
        env={"NANOFLEET_OFFLINE_PAUSE_IN": "export-telemetry"},
    )  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "paused-in-export-telemetry").exists(), 60, "the export to pause")
    finally:
        kill(proc)
    left = [p.name for p in stick.iterdir()]
    assert len(left) == 1 and left[0].startswith(TEMP_PREFIX)
    assert board.outbox_len() == queued  # nothing left the queue
    r = fleet.fleet("import-telemetry", str(stick))
    assert r.returncode == 1 and "no telemetry exports" in r.stdout + r.stderr

    res = board.device_json("export-telemetry", "--out", str(stick))
    assert board.outbox_len() == 0 and res["telemetry"] + res["events"] == queued
    full = Path(res["path"])
    # A copy cut short (the stick pulled during a plain `cp`): refused whole, nothing ingested.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / full.name).write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    # A copy with one byte changed in the body: the board's signature refuses it.
    forged = tmp_path / "forged"
    forged.mkdir()
    outer = json.loads(full.read_text())
    body = outer["body"].replace('"outbox_dropped":0', '"outbox_dropped":7')
    assert body != outer["body"]
    (forged / full.name).write_text(json.dumps({**outer, "body": body}))
    for bad, words in ((cut, "truncated or corrupt"), (forged, "signature does not verify")):
        res = fleet.fleet_json("import-telemetry", str(bad), expect_rc=1)
        assert not res["ok"] and words in res["files"][0]["error"], res
        assert _entries(fleet, "field-t") == 0
    res = fleet.fleet_json("import-telemetry", str(stick))
    assert res["ok"] and res["files"][0]["telemetry"] + res["files"][0]["events"] == queued
    n = _entries(fleet, "field-t")
    assert n == res["files"][0]["telemetry"]
    assert fleet.fleet_json("import-telemetry", str(stick / full.name))["files"][0]["duplicate"]
    assert _entries(fleet, "field-t") == n


def test_import_killed_mid_import_ingests_nothing(
    tmp_path: Path, fleet: FleetProc, bundles: dict[int, Path], release_key: tuple[SigningKey, Path]
) -> None:
    """SIGKILL of the fleet service while it ingests an export: after a restart, none of it is there;
    the import then runs whole."""
    board = bootstrapped(fleet, tmp_path / "b", "field-i", bundles[1], release_key[1])
    stick = tmp_path / "stick"
    res = board.device_json("export-telemetry", "--out", str(stick))
    assert res["telemetry"] >= 1
    fleet.stop()
    fleet.start(env={"NANOFLEET_OFFLINE_PAUSE_IN": "import-telemetry"})
    try:
        proc = popen_cli("fleet", "--config", str(fleet.config), "import-telemetry", str(stick))
        wait_for(lambda: (fleet.data / "paused-in-import-telemetry").exists(), 60, "the import to pause")
        fleet.kill()
        kill(proc)
    finally:
        fleet.start()
    assert _entries(fleet, "field-i") == 0
    out = fleet.fleet_json("import-telemetry", str(stick))
    assert out["ok"] and not out["files"][0]["duplicate"]
    assert _entries(fleet, "field-i") == res["telemetry"]
