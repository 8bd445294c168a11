"""`nanofleet demo` end to end: real export (shared test bundle cache), real fleet, real agent processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, default_bundle: tuple[Path, Path]) -> None:
    bundle, pub = default_bundle
    work = tmp_path / "demo"
    # Seed the demo's cache with the shared test bundle (and the key that signed it): no second export.
    shutil.copytree(pub.parent, work / "keys")
    shutil.copytree(bundle, work / "bundles" / "v1")
    proc = subprocess.run(
        [sys.executable, "-m", "nanofleet.cli", "demo", "--devices", "2", "--json", "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True
    assert [d["id"] for d in summary["devices"]] == ["demo-0", "demo-1"]
    for d in summary["devices"]:
        assert d["model_version"] == 2
        assert "paris" in d["answer"].lower(), d
    deps = summary["deployments"]
    assert deps["demo-v1"]["status"] == "completed" and deps["demo-v2"]["status"] == "completed"
    assert deps["demo-v3-broken"]["status"] == "rolled_back"
    assert deps["demo-v3-broken"]["abort_reason"].startswith("failure rate")
    assert not (work / "run").exists()  # everything it started is gone, and so is its run data
