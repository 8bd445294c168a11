"""Boards bootstrapped once and cloned per test, packages exported by the real fleet."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from device.offline.format import PACKAGE_DOC

from .conftest import Board, FleetProc, wait_for


def bootstrapped(
    fleet: FleetProc, root: Path, device_id: str, v1: Path, release_pub: Path, **kw: object
) -> Board:
    """A board enrolled in the fleet that committed ``v1`` (its bootstrap bundle), agent stopped."""
    token = fleet.enroll(device_id)
    board = Board(root, device_id, token, [release_pub, fleet.fleet_pub], bootstrap=v1, **kw)  # type: ignore[arg-type]
    board.run()
    try:
        wait_for(
            lambda: board.state().get("state") == "committed" and board.state().get("active_slot"),
            30,
            "the bootstrap bundle to commit",
        )
    finally:
        board.stop()
    return board


def clone(board: Board, root: Path, *, trusted: list[Path] | None = None) -> Board:
    """The same board (same id and credential) with a copy of its data dir."""
    doc = yaml.safe_load(board.config.read_text())
    copy = Board.__new__(Board)
    copy.root, copy.device_id, copy.data, copy.config, copy.proc = (
        root,
        board.device_id,
        root / "data",
        root / "agent.yaml",
        None,
    )
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(board.data, copy.data)
    doc["data_dir"] = str(copy.data)
    if trusted is not None:
        doc["trusted_keys"] = [str(p) for p in trusted]
    copy.config.write_text(yaml.safe_dump(doc))
    return copy


def export(fleet: FleetProc, deployment: str, out: Path, *args: str) -> Path:
    res = fleet.fleet_json("export-update", "--deployment", deployment, "--out", str(out), *args)
    pkg = Path(res["path"])
    assert (pkg / PACKAGE_DOC).is_file()
    return pkg


def snapshot(board: Board) -> dict[str, object]:
    """What must not change when a package is refused: the update record and both slots' files."""
    return {
        "state": (board.data / "state.json").read_bytes(),
        "a": board.slot_files("a"),
        "b": board.slot_files("b"),
    }
