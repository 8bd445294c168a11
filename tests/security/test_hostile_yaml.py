"""`nanofleet fleet apply` and the dashboard's manifest editor on hostile YAML (issue 15): an alias bomb and
100k-deep nesting give one line (or one JSON object with --json), exit 1, in bounded memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import safe_yaml
from fleet.dashboard.actions import ManifestInputError, parse_manifest_text

LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9)
)
HOSTILE = {
    "billion-laughs": LAUGHS,
    "deep-flow": "[" * 100_000 + "]" * 100_000,
    "deep-block": "- " * 100_000 + "x\n",
    "deep-mapping": "{a: " * 100_000 + "1" + "}" * 100_000,
    "surrogate": 'apiVersion: nanofleet/v1\nkind: Deployment\nmetadata: {name: x, description: "\\ud800"}\n',
    "huge": "a: " + "x" * (2 * 1024 * 1024) + "\n",
}
MEMORY_LIMIT = 1536 * 1024 * 1024  # address space: the alias bomb alone needs gigabytes once expanded


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def apply(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nanofleet.cli",
            "fleet",
            "apply",
            str(path),
            "--url",
            "http://127.0.0.1:9",
            "--token",
            "t",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit,
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_apply_refuses_hostile_yaml_on_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(HOSTILE[name])
    r = apply(path, "--json")
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr[-2000:]
    body = json.loads(r.stdout)
    assert body["ok"] is False and body["reason"] == "input" and str(path) in body["error"]
    plain = apply(path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr + plain.stdout
    lines = [line for line in (plain.stdout + plain.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot read"), lines[:5]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_dashboard_editor_refuses_hostile_yaml(name: str) -> None:
    with pytest.raises(ManifestInputError) as info:
        parse_manifest_text(HOSTILE[name])
    assert info.value.errors and "\n" not in info.value.errors[0]["msg"].strip()


def test_ordinary_manifests_still_load() -> None:
    root = Path(__file__).resolve().parents[2] / "manifests" / "examples"
    for example in ("deployment-canary.yaml", "deployment-waves.yaml"):
        doc = safe_yaml.load_file(root / example)
        assert doc["kind"] == "Deployment"
        assert parse_manifest_text((root / example).read_text()).metadata.name == doc["metadata"]["name"]
