"""The commands as real processes: `device serve --adapter`, `bench --adapter`, and `export-adapter`'s refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from manifests import BundleManifest, SigningKey, read_manifest_unverified, write_signed_manifest
from tests.conftest import free_port, wait_port

from . import fixtures

pytestmark = pytest.mark.slow
NANOFLEET = [sys.executable, "-m", "nanofleet.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NANOFLEET, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_serve_with_adapters_answers_each_by_model_id(
    base_int8: Path, qv_int8: tuple[Path, dict], all_int8: tuple[Path, dict], adapter_keys: tuple[Path, Path]
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*NANOFLEET, "device", "serve", "--bundle", str(base_int8), "--pubkey", str(adapter_keys[1]), "--port",
         str(port), "--threads", "2", "--adapter", str(qv_int8[0]), "--adapter", str(all_int8[0])],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_port(port, timeout=120)
        url = f"http://127.0.0.1:{port}/v1"
        ids = [m["id"] for m in httpx.get(f"{url}/models", timeout=60).json()["data"]]
        base = ids[0]
        assert ids == [base, f"{base}:all", f"{base}:qv"]
        for model in ids:
            r = httpx.post(f"{url}/completions", timeout=120, json={"model": model, "prompt": "The vents open",
                                                                    "max_tokens": 6, "temperature": 0})  # fmt: skip
            assert r.status_code == 200 and r.json()["model"] == model, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert f"adapter {base}:qv (qv@1" in out.replace("\n", " ") and "Traceback" not in out


def test_serve_refuses_an_adapter_for_another_base_or_a_tampered_one(
    base_fp32: Path, qv_int8: tuple[Path, dict], adapter_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    common = ["device", "serve", "--bundle", str(base_fp32), "--pubkey", str(adapter_keys[1]), "--port",
              str(free_port())]  # fmt: skip
    r = _run(*common, "--adapter", str(qv_int8[0]), timeout=180)
    assert r.returncode == 1 and "adapter_base_mismatch" in r.stderr and "Traceback" not in r.stderr, r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(qv_int8[0], bad)
    (bad / "manifest.sig").unlink()
    r = _run(*common, "--adapter", str(bad), timeout=180)
    assert r.returncode == 1 and "adapter_rejected" in r.stderr and "manifest.sig is missing" in r.stderr, r.stderr


def test_bench_reports_memory_per_adapter_and_switch_latency(
    base_int8: Path, qv_int8: tuple[Path, dict], all_int8: tuple[Path, dict], adapter_keys: tuple[Path, Path]
) -> None:
    r = _run("bench", str(base_int8), "--pubkey", str(adapter_keys[1]), "--adapter", str(qv_int8[0]), "--adapter",
             str(all_int8[0]), "--prompt-tokens", "16", "--new-tokens", "8", "--runs", "1", "--threads", "2",
             "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {a["name"]: a for a in res["adapters"]}
    assert set(rows) == {"qv", "all"} and res["switch_ms"] is not None and res["switch_ms"] >= 0
    assert rows["qv"]["bytes"] == 4 * 30 * (576 * 16 + 16 * 960)
    assert all(a["decode_tok_s"] > 0 and a["load_ms"] > 0 for a in rows.values())


def _fails(args: list[str], code: int, reason: str) -> dict:
    r = _run("export-adapter", *args, "--json")
    assert r.returncode == code, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["reason"] == reason, doc
    assert "Traceback" not in r.stderr
    return doc


def test_export_adapter_refuses_an_adapter_that_changes_nothing(
    base_int8: Path, adapter_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    untrained = fixtures.peft_adapter("untrained")
    out = tmp_path / "out"
    doc = _fails(["--base", str(base_int8), "--adapter", str(untrained), "--key", str(adapter_keys[0]), "--out",
                  str(out)], 3, "quality_gate")  # fmt: skip
    assert "changes almost nothing" in doc["error"]
    report = json.loads((tmp_path / "out.quality_report.json").read_text())
    assert report["quality"]["effect"]["kl_mean"] == 0.0 and "effect" in report["quality"]["failures"]
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing published, no staging left


def test_export_adapter_refuses_bad_input_before_any_work(
    base_int8: Path, adapter_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    key, pub = adapter_keys
    peft = fixtures.peft_adapter("qv")
    args = ["--adapter", str(peft), "--key", str(key)]
    # a base whose graph has no LoRA slots (its manifest says so; re-signed so only that differs)
    no_slots = tmp_path / "no-slots"
    shutil.copytree(base_int8, no_slots)
    m = read_manifest_unverified(no_slots)
    write_signed_manifest(no_slots, BundleManifest.model_validate(
        {**m.model_dump(), "graph": {**m.graph.model_dump(), "lora": None}}), SigningKey.load(key))  # fmt: skip
    doc = _fails(["--base", str(no_slots), *args, "--out", str(tmp_path / "a")], 1, "base_bundle")
    assert "no LoRA slots" in doc["error"]
    doc = _fails(["--base", str(tmp_path), *args, "--out", str(tmp_path / "b")], 1, "base_bundle")
    assert "not a bundle folder" in doc["error"]
    other = tmp_path / "keys"
    from manifests import write_keypair

    write_keypair(other)
    doc = _fails(["--base", str(base_int8), *args, "--pubkey", str(other / "nanofleet.pub"), "--out",
                  str(tmp_path / "c")], 1, "base_bundle")  # fmt: skip
    assert "unknown key" in doc["error"]
    doc = _fails(["--base", str(base_int8), "--adapter", str(tmp_path), "--key", str(key), "--out",
                  str(tmp_path / "d")], 1, "adapter_source")  # fmt: skip
    assert "adapter_config.json not found" in doc["error"]
    (tmp_path / "exists").mkdir()
    _fails(["--base", str(base_int8), *args, "--out", str(tmp_path / "exists")], 1, "output_exists")
    assert pub.exists()
