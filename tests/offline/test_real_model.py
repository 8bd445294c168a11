"""The offline path with the real default model (SmolLM2-135M INT8 bundle) and the real engine: the board
loads it from the stick's copy, passes its golden health check, commits, and the rollout counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import Board, FleetProc, wait_for

pytestmark = pytest.mark.slow


def test_real_bundle_through_a_stick(tmp_path: Path, default_bundle: tuple[Path, Path]) -> None:
    bundle, pub = default_bundle
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    (tmp_path / "fleet").mkdir()
    fleet = FleetProc(tmp_path / "fleet", pub).start()
    try:
        token = fleet.enroll("real-1", data_dir=tmp_path / "board" / "data")
        with fleet.admin() as c:
            c.upload_bundle(bundle)
            c.apply(
                {
                    "apiVersion": "nanofleet/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "real"},
                    "spec": {
                        "bundle": {"name": manifest["name"], "version": manifest["version"]},
                        "selector": {"device_ids": ["real-1"]},
                    },
                }
            )
        board = Board(tmp_path / "board", "real-1", token, [pub, fleet.fleet_pub])
        doc = yaml.safe_load(board.config.read_text())
        doc["runtime"] = "engine"  # onnxruntime engine: load + golden tokens + latency budget
        doc["limits"]["threads"] = 2
        board.config.write_text(yaml.safe_dump(doc))
        res = fleet.fleet_json("export-update", "--deployment", "real", "--out", str(tmp_path / "stick"))
        assert res["bytes"] > 100_000_000
        r = board.device_json("install", str(tmp_path / "stick"))
        assert r["ok"] and r["committed"] == f"{manifest['name']}@{manifest['version']}", r
        board.device_json("export-telemetry", "--out", str(tmp_path / "stick"))
        assert fleet.fleet_json("import-telemetry", str(tmp_path / "stick"))["ok"]
        wait_for(lambda: fleet.deployment("real")["targets"][0]["state"] == "succeeded", 20, "the rollout")
    finally:
        fleet.stop()
