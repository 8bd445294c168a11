"""`nanofleet fleet ...` as a user runs it: real processes against a running service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import BUNDLE

REPO = Path(__file__).resolve().parents[2]


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def nf(fleet, *args: str, process: bool = False) -> _Result:
    """Run `nanofleet fleet ...`: in-process through typer's runner, or as a real process."""
    argv = ["fleet", "--url", fleet.url, "--token", fleet.svc.admin_token, *args]
    if process:
        r = subprocess.run(
            [sys.executable, "-m", "nanofleet.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        return _Result(r.returncode, r.stdout, r.stderr)
    from typer.testing import CliRunner

    from nanofleet.cli import app

    r = CliRunner().invoke(app, argv)
    return _Result(r.exit_code, r.stdout, r.stderr)


def test_cli_push_apply_watch_and_json(make_fleet, bundles, tmp_path: Path) -> None:
    fleet = make_fleet()
    fleet.enroll(2, telemetry_s=1)
    r = nf(fleet, "models", "push", str(bundles[1]), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1

    doc = {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": "cli-v1"},
        "spec": {
            "bundle": {"name": BUNDLE, "version": 1},
            "strategy": {"type": "canary", "canary": {"percent": 50}},
        },
    }
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = nf(fleet, "apply", str(f), "--watch", process=True)
    assert r.returncode == 0, r.stderr
    assert "cli-v1 created" in r.stdout and "completed" in r.stdout
    r = nf(fleet, "apply", str(f), "--json")
    assert json.loads(r.stdout)["result"] == "unchanged"

    devs = json.loads(nf(fleet, "devices", "--json").stdout)
    assert [d["model"] for d in devs] == [f"{BUNDLE}@1"] * 2
    st = json.loads(nf(fleet, "status", "--json").stdout)
    assert st["devices"] == 2 and st["deployments"] == {"completed": 1} and st["mqtt_connected"]
    for table in (
        ("devices",),
        ("models",),
        ("deployments",),
        ("deployments", "show", "cli-v1"),
        ("status",),
        ("audit",),
    ):
        r = nf(fleet, *table)
        assert r.returncode == 0 and r.stdout.strip(), (table, r.stderr)

    # A bad manifest: exit 1, the field's path in the JSON error.
    doc["spec"]["strategy"] = {"type": "waves", "waves": {"sizes": [0]}}
    f.write_text(yaml.safe_dump(doc))
    r = nf(fleet, "apply", str(f), "--json")
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["ok"] is False and err["errors"][0]["path"] == "spec.strategy.waves"
    # No token: a clear 401.
    from typer.testing import CliRunner

    from nanofleet.cli import app

    r2 = CliRunner().invoke(app, ["fleet", "--url", fleet.url, "devices"], env={"NANOFLEET_FLEET_TOKEN": ""})
    assert r2.exit_code == 1 and "401" in r2.stderr
