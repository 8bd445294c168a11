"""Every document in manifests/examples/ as a user runs it: it works, or it fails in one line having
created nothing (the example fleet config names keys under /etc/nanofleet that this machine lacks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanofleet.resign import resign_bundle

from .conftest import REPO, RunningFleet, nanofleet

EXAMPLES = REPO / "manifests" / "examples"
# release.yaml: tests/manifests/test_variants.py and tests/fleet/test_release_cli.py
COVERED = {"agent.yaml", "fleet.yaml", "deployment-canary.yaml", "deployment-waves.yaml", "release.yaml"}


def test_every_example_is_covered_here() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == COVERED


def _state(path: Path) -> list[str] | None:
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize(
    ("argv", "side_effect", "expect"),
    [
        (["device", "run", "--config", str(EXAMPLES / "agent.yaml")], Path("/var/lib/nanofleet"), "release-2026.pub"),
        (
            ["fleet", "serve", "--config", str(EXAMPLES / "fleet.yaml")],
            Path("/var/lib/nanofleet-fleet"),
            "release-2026.pub",
        ),
    ],
    ids=["agent.yaml", "fleet.yaml"],
)
def test_service_examples_fail_in_one_line_without_side_effects(
    argv: list[str], side_effect: Path, expect: str
) -> None:
    if Path("/etc/nanofleet/keys/release-2026.pub").exists():
        pytest.fail("this machine has the example's keys: the example would start a real service")
    before = _state(side_effect)
    r = nanofleet(*argv, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert len(r.lines) == 1 and expect in r.lines[0] and "Traceback" not in r.stderr, r.lines
    assert "INFO" not in r.stderr  # no library chatter before the error either
    assert _state(side_effect) == before


def test_deployment_examples_apply_to_a_fleet(running_fleet: RunningFleet, tmp_path: Path, default_bundle) -> None:
    bundle, _pub = default_bundle
    v1 = tmp_path / "v1"
    shutil.copytree(bundle, v1)
    # The example fleet trusts one key: re-sign the default bundle (v1 and v2) with it.
    v1b = resign_bundle(v1, tmp_path / "b1", running_fleet.bundle_key, version=1)
    resign_bundle(v1, tmp_path / "b2", running_fleet.bundle_key, version=2)
    conn = ["--url", running_fleet.url, "--token", running_fleet.server.svc.admin_token]

    # Before the bundle is pushed, apply says what the registry holds.
    r = nanofleet("fleet", "apply", str(EXAMPLES / "deployment-canary.yaml"), *conn)
    assert r.returncode == 1 and "no bundles yet" in r.lines[0] and len(r.lines) == 1, r.lines
    for b in ("b1", "b2"):
        assert nanofleet("fleet", "models", "push", str(tmp_path / b), *conn).returncode == 0
    with running_fleet.admin() as admin, admin.__class__(running_fleet.url) as anon:
        lab = admin.enrollment_token(uses=1, tags={"site": "lab"})["token"]
        field = admin.enrollment_token(uses=3, groups=["field"])["token"]
        anon.enroll(lab, device_id="lab-1")
        for i in range(3):
            anon.enroll(field, device_id=f"field-{i}")

    canary = nanofleet("fleet", "apply", str(EXAMPLES / "deployment-canary.yaml"), *conn, "--json")
    assert canary.returncode == 0, canary.stderr
    doc = json.loads(canary.stdout)
    assert doc["result"] == "created" and doc["deployment"]["bundle"] == f"{v1b.name}@1"
    assert doc["deployment"]["counts"]["total"] == 1
    waves = nanofleet("fleet", "apply", str(EXAMPLES / "deployment-waves.yaml"), *conn, "--json")
    assert waves.returncode == 0, waves.stderr
    assert json.loads(waves.stdout)["deployment"]["counts"]["total"] == 3

    # A bundle name that is not there: the answer lists the ones that are.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text((EXAMPLES / "deployment-canary.yaml").read_text().replace("instruct-int8", "instruct"))
    r = nanofleet("fleet", "apply", str(wrong), *conn)
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert f"it holds {v1b.name}@1, {v1b.name}@2" in r.lines[0], r.lines
