"""`nanofleet device install` refuses what it must, with a clear reason, and changes nothing; a good
package installs through the agent's state machine with no agent running and no network."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests import SigningKey
from manifests.offline.format import PACKAGE_DOC

from .conftest import Board, FleetProc
from .helpers import bootstrapped, clone, export, snapshot


@pytest.fixture(scope="module")
def base(
    tmp_path_factory: pytest.TempPathFactory,
    fleet: FleetProc,
    bundles: dict[int, Path],
    release_key: tuple[SigningKey, Path],
) -> Iterator[Board]:
    yield bootstrapped(fleet, tmp_path_factory.mktemp("base-board"), "field-r", bundles[1], release_key[1])


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory, fleet: FleetProc, base: Board) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sticks")
    fleet.enroll("field-other")
    # Deploy and export one after the other: the newest deployment to reach a device takes it over.
    out = {}
    for key, name, device, args in (
        ("good", "refuse-v2", "field-r", ()),
        ("other", "other-v2", "field-other", ()),
        ("expiring", "expiring-v2", "field-r", ("--valid-days", "0.00002")),
    ):
        fleet.deploy(name, 2, [device])
        out[key] = export(fleet, name, root / key, *args)
    return out


def refused(board: Board, pkg: Path, reason: str, words: str, *, cli: bool = False) -> None:
    """Refused with this reason, and nothing changed. ``cli``: through `nanofleet device install`
    (exit code, JSON error); otherwise the same code in-process (the suite stays fast)."""
    before = snapshot(board)
    if cli:
        res = board.device_json("install", str(pkg), expect_rc=1)
        assert res["ok"] is False and res["reason"] == reason, res
        assert "nothing was changed" in res["error"]
        message = res["error"]
    else:
        from device.agent.config import load_config
        from device.offline.install import install
        from manifests.offline.errors import PackageError

        with pytest.raises(PackageError) as info:
            install(load_config(board.config), pkg)
        assert info.value.reason == reason, info.value.message
        message = info.value.message
    assert words in message, message
    assert snapshot(board) == before


def test_package_for_other_devices_is_refused(tmp_path: Path, base: Board, packages: dict[str, Path]) -> None:
    refused(clone(base, tmp_path / "b"), packages["other"], "not_for_this_device", "field-other", cli=True)


def test_expired_package_is_refused(tmp_path: Path, base: Board, packages: dict[str, Path]) -> None:
    time.sleep(2.0)  # valid for 1.7 s
    refused(clone(base, tmp_path / "b"), packages["expiring"], "expired", "expired at")


def test_tampered_bundle_file_is_refused(tmp_path: Path, base: Board, packages: dict[str, Path]) -> None:
    pkg = tmp_path / "stick" / packages["good"].name
    shutil.copytree(packages["good"], pkg)
    weights = next(pkg.glob("bundles/*/weights.bin"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    refused(clone(base, tmp_path / "b"), pkg, "tampered", "weights.bin")


def test_extra_file_in_package_is_refused(tmp_path: Path, base: Board, packages: dict[str, Path]) -> None:
    pkg = tmp_path / "stick" / packages["good"].name
    shutil.copytree(packages["good"], pkg)
    next(pkg.glob("bundles/*")).joinpath("evil.py").write_text("print('hi')")
    refused(clone(base, tmp_path / "b"), pkg, "tampered", "evil.py")


def test_edited_target_list_breaks_the_signature(
    tmp_path: Path, base: Board, packages: dict[str, Path]
) -> None:
    pkg = tmp_path / "stick" / packages["other"].name
    shutil.copytree(packages["other"], pkg)
    doc = json.loads((pkg / PACKAGE_DOC).read_text())
    doc["payload"]["targets"]["field-r"] = doc["payload"]["targets"]["field-other"]
    (pkg / PACKAGE_DOC).write_text(json.dumps(doc))
    refused(clone(base, tmp_path / "b"), pkg, "bad_signature", "does not match")


def test_package_signed_by_an_untrusted_fleet_is_refused(
    tmp_path: Path, base: Board, packages: dict[str, Path], release_key: tuple[SigningKey, Path]
) -> None:
    board = clone(base, tmp_path / "b", trusted=[release_key[1]])  # the fleet's key is not trusted
    refused(board, packages["good"], "unknown_key", "unknown key")


def test_truncated_package_document_is_refused(
    tmp_path: Path, base: Board, packages: dict[str, Path]
) -> None:
    pkg = tmp_path / "stick" / packages["good"].name
    shutil.copytree(packages["good"], pkg)
    raw = (pkg / PACKAGE_DOC).read_bytes()
    (pkg / PACKAGE_DOC).write_bytes(raw[: len(raw) // 2])
    refused(clone(base, tmp_path / "b"), pkg, "schema", "truncated or corrupt")


def test_install_without_agent_then_duplicate_then_downgrade_refused(
    tmp_path: Path, fleet: FleetProc, base: Board, packages: dict[str, Path]
) -> None:
    board = clone(base, tmp_path / "b")
    # A stick with several packages: the one for this board is chosen, the other board's is skipped.
    stick = tmp_path / "stick"
    for name in ("good", "other"):
        shutil.copytree(packages[name], stick / packages[name].name)
    res = board.device_json("install", str(stick))
    assert res["ok"] and res["outcome"] == "committed" and res["via"] == "direct", res
    assert res["committed"] == "tiny@2" and res["bundle"] == "tiny@2"
    st = board.state()
    assert st["state"] == "committed" and st["highest_committed"] == {"tiny": 2}
    inactive = "a" if st["active_slot"] == "b" else "b"
    assert board.slot_files(inactive) == board.slot_files(
        st["active_slot"]
    )  # the old bundle stays for rollback

    before = snapshot(board)
    again = board.device_json("install", str(stick))
    assert again["ok"] and again["outcome"] == "duplicate"
    assert snapshot(board) == before

    fleet.deploy("downgrade-v1", 1, ["field-r"])
    old = export(fleet, "downgrade-v1", tmp_path / "stick2")
    refused(board, old, "anti_rollback", "below the highest version")
