"""`nanofleet fleet release create`: a release built from --variant options (bundle folders or name@version),
validated before any fleet is contacted, errors in one line (JSON with --json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.release_cli import VariantSpecError, parse_variant
from manifests import Release, SigningKey

from .conftest import make_bundle

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nanofleet.cli", "fleet", "release", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip


def test_parse_variant(tmp_path: Path, bundle_key: tuple[SigningKey, Path]) -> None:
    folder = make_bundle(tmp_path / "b", bundle_key[0], 4, name="tiny-int8")
    doc, found = parse_variant(f"int8={folder},min_ram=4GiB,cpu_features=asimddp+i8mm,hardware_class=pi5|cm5")
    assert found == folder
    assert doc == {
        "name": "int8",
        "bundle": {"name": "tiny-int8", "version": 4},
        "rules": {"min_ram": "4GiB", "cpu_features": ["asimddp", "i8mm"], "hardware_class": ["pi5", "cm5"]},
    }
    doc, found = parse_variant("fp16=tiny-fp16@2,execution_providers=CUDAExecutionProvider|TensorrtExecutionProvider")
    assert found is None and doc["bundle"] == {"name": "tiny-fp16", "version": 2}
    for bad, expect in [
        ("int8", "NAME=BUNDLE"),
        ("int8=nowhere", "neither a bundle folder nor name@version"),
        ("int8=x@1,gpu=yes", "unknown rule 'gpu'"),
        ("int8=x@1,min_ram", "not RULE=VALUE"),
    ]:
        with pytest.raises(VariantSpecError, match=expect):
            parse_variant(bad)


def test_dry_run_prints_the_release_and_bad_input_fails_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "release.yaml"
    r = cli("create", "--name", "tiny", "--version", "3", "--variant", "int8=tiny-int8@1,min_ram=4GiB",
            "--variant", "int4=tiny-int4@1", "--dry-run", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rel = Release.from_obj(yaml.safe_load(r.stdout))
    assert rel.ref == "tiny@3" and [v.name for v in rel.spec.variants] == ["int8", "int4"]
    assert rel.spec.variants[0].rules.min_ram_bytes == 4 * 2**30
    assert Release.from_yaml(out.read_text()) == rel
    assert cli("create", str(out), "--dry-run", "--json").returncode == 0
    example = cli("create", str(REPO / "manifests" / "examples" / "release.yaml"), "--dry-run", "--json")
    assert example.returncode == 0 and json.loads(example.stdout)["release"]["metadata"]["name"] == "smollm2"
    for args, expect in [
        (["create", "--name", "tiny", "--version", "1"], "at least one --variant"),
        (["create", "--name", "tiny", "--version", "1", "--variant", "a=x@1", "--variant", "a=y@1"], "unique"),
        (["create", str(tmp_path / "missing.yaml")], "cannot read"),
    ]:
        r = cli(*args, "--dry-run")
        lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
        assert r.returncode == 1 and len(lines) == 1 and expect in lines[0], (args, lines)
    r = cli("create", "--name", "tiny", "--version", "1", "--variant", "a", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["reason"] == "invalid_release"
