"""The import contracts between the parts (pyproject.toml [tool.importlinter]) hold: run by `make test` so CI
keeps them, as `make lint` does. A broken contract fails here with lint-imports' own report (which import,
which line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Each boundary DEVELOPERS.md states, by contract name: deleting one from pyproject.toml fails this test.
EXPECTED = {
    "manifests (the contract) imports nothing of ours",
    "device (what a board installs) imports only manifests of ours, and never torch",
    "fleet never imports export, device, nanofleet, torch, transformers or optimum",
    "device: cli over offline over agent (offline -> agent, never the reverse)",
}


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "import-linter is not installed: pip install -e '.[dev]'"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    for name in EXPECTED:  # each one declared and checked
        assert f"{name} KEPT" in report, report
    assert f"Contracts: {len(EXPECTED)} kept, 0 broken." in report, report
