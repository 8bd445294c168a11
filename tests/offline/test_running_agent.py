"""`nanofleet device install` while the agent runs: the package is handed to the running agent (one
writer of the update record), which installs it and keeps serving; refusals come back at once."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml

from manifests import SigningKey

from .conftest import FleetProc, wait_for
from .helpers import bootstrapped, export

pytestmark = pytest.mark.slow  # several real processes


def _serving(port: int) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def test_install_hands_off_to_the_running_agent(
    tmp_path: Path, fleet: FleetProc, bundles: dict[int, Path], release_key: tuple[SigningKey, Path]
) -> None:
    board = bootstrapped(fleet, tmp_path / "b", "field-h", bundles[1], release_key[1])
    port = yaml.safe_load(board.config.read_text())["api"]["port"]
    fleet.deploy("handoff-v2", 2, ["field-h"])
    pkg = export(fleet, "handoff-v2", tmp_path / "stick")
    board.run()
    try:
        assert wait_for(lambda: _serving(port), 30, "the agent to serve")["version"] == 1  # type: ignore[index]
        res = board.device_json("install", str(tmp_path / "stick"))
        assert res["ok"] and res["via"] == "agent" and res["outcome"] == "committed", res
        assert _serving(port)["version"] == 2  # type: ignore[index]  # the running agent swapped it in
        # A tampered copy is refused by the command itself, before the agent sees it.
        bad = tmp_path / "bad" / pkg.name
        shutil.copytree(pkg, bad)
        (bad / "deployment.yaml").write_text("tampered\n")
        r = board.device_json("install", str(bad), expect_rc=1)
        assert r["reason"] == "tampered" and "deployment.yaml" in r["error"]
        # The same package again: done before.
        again = board.device_json("install", str(tmp_path / "stick"))
        assert again["ok"] and again["outcome"] == "duplicate"
        assert board.proc is not None and board.proc.poll() is None  # the agent is still running
    finally:
        board.stop()
