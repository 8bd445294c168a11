"""The verification results cache (export/target/results.py) through run_verification, with the two runs faked
(the real emulated pair is in test_verify_target.py: the CLI and the export gate share one measurement there).

What must hold: one measurement per content (a staging folder and the bundle it becomes share it); anything
that could change what the runs compute misses (a flipped byte, the text, the CPU, onnxruntime, threads, the
golden prompt, the measuring code, the arm64 root); a hit still checks the signature and runtime on the target
and judges the stored terms with the caller's thresholds; refusals are never stored; broken entries are misses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import export.target.verify as verify_mod
from export.target import results
from export.target.errors import TargetRefusedError
from export.target.runner import RemoteResult, TargetEnv
from export.target.userland import Emulator
from export.target.verify import Thresholds, run_verification
from manifests import GoldenCheck, SigningKey, read_manifest_unverified, write_signed_manifest

from .conftest import tiny_bundle

VOCAB = 16
TEXT = "one two three four five six seven eight nine ten eleven twelve"


class FakeBoard:
    """Stands in for prepare_target / run_on_target / run_on_host: records every run, computes rows that
    depend on the model's bytes and the text (so a stored result is only right for the same inputs)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: list[tuple[str, str]] = []  # (where, mode)
        self.cpu_noise = 1e-3
        self.refuse: str | None = None

    def env(self, cpu: str, ort_version: str, progress: Any = None) -> TargetEnv:
        rootfs = self.root / "rootfs"
        site = self.root / f"site-{ort_version}"
        for d in (rootfs, site):
            d.mkdir(parents=True, exist_ok=True)
        if not (rootfs / ".complete").is_file():
            (rootfs / ".complete").write_text('{"suite": "bookworm"}')
        info = site / f"onnxruntime-{ort_version}.dist-info"
        info.mkdir(exist_ok=True)
        if not (info / "RECORD").is_file():
            (info / "RECORD").write_text("onnxruntime/__init__.py,sha256=abc,10\n")
        qemu = self.root / "qemu-aarch64"
        if not qemu.is_file():
            qemu.write_bytes(b"a qemu build")
        return TargetEnv(cpu, ort_version, Emulator(str(qemu), (10, 0, 13), "fake"), rootfs, site)

    def _run(self, where: str, job: dict[str, Any], ort: str) -> RemoteResult:
        self.runs.append((where, job["mode"]))
        base = {"machine": "aarch64" if where == "target" else "x86_64", "python": "3.11.2", "onnxruntime": ort}
        if self.refuse and where == "target":
            return RemoteResult({**base, "ok": False, "reason": self.refuse, "error": "refused"}, 0.1, "")
        warnings = [f"admitted {job['dir']}"]
        if job["mode"] == "admit":
            return RemoteResult({**base, "ok": True, "warnings": warnings, "timings": {"admit_s": 0.1}}, 0.1, "")
        folder = Path(job["dir"])
        seed = int(hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()[:8], 16)
        ids = [len(w) for w in job["text"].split()][: job.get("max_text_tokens") or None]
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal((len(ids) - 1, VOCAB))
        if where == "target":
            logits = logits + self.cpu_noise * np.random.default_rng(1).standard_normal(logits.shape)
        logp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
        targets = np.asarray(ids[1:], dtype=np.int64)
        np.save(job["logprobs_out"], logp)
        np.save(job["logprobs_out"] + ".targets.npy", targets)
        nll = -float(logp[np.arange(len(targets)), targets].mean())
        data = {**base, "ok": True, "warnings": warnings, "perplexity": float(np.exp(nll)),
                "positions": len(targets), "eval_tokens": len(ids),
                "text_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
                "timings": {"perplexity_s": 300.0 if where == "target" else 3.0}}  # fmt: skip
        golden = job.get("golden_check")
        if golden is None and (folder / "manifest.yaml").is_file():
            g = read_manifest_unverified(folder).golden
            golden = g.model_dump(mode="json") if g is not None else None
        if golden is not None and job.get("golden", True):
            data["golden"] = {"expected": golden["expected_token_ids"], "tokens": [3, 4]}
        return RemoteResult(data, 300.0 if where == "target" else 3.0, "")

    def target(self, env: TargetEnv, job: dict[str, Any], timeout: float = 0) -> RemoteResult:
        return self._run("target", job, env.onnxruntime)

    def host(self, job: dict[str, Any], timeout: float = 0, python: str | None = None) -> RemoteResult:
        return self._run("host", job, "1.32.0")

    def measured(self) -> int:
        return sum(1 for where, mode in self.runs if where == "target" and mode == "verify")


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBoard:
    fake = FakeBoard(tmp_path / "board")
    monkeypatch.setattr(verify_mod, "prepare_target", fake.env)
    monkeypatch.setattr(verify_mod, "run_on_target", fake.target)
    monkeypatch.setattr(verify_mod, "run_on_host", fake.host)
    monkeypatch.setenv(results.ENV, str(tmp_path / "results"))
    return fake


@pytest.fixture
def bundle(tmp_path: Path, signing: tuple[SigningKey, Path]) -> Path:
    from onnx import helper

    key, _pub = signing
    root = tiny_bundle(tmp_path / "bundle", key, [helper.make_node("Relu", ["x"], ["y"])], ["ai.onnx:Relu"])
    (root / "model.onnx_data").write_bytes(os.urandom(4096))
    manifest = read_manifest_unverified(root)
    golden = GoldenCheck(prompt_token_ids=[1, 2], expected_token_ids=[3, 4], latency_budget_ms=100)
    write_signed_manifest(root, manifest.model_copy(update={"golden": golden}), key)
    return root


def verify(folder: Path, **kwargs: Any) -> Any:
    return run_verification(folder, kwargs.pop("cpu", "cortex-a76"), kwargs.pop("text", TEXT), **kwargs)


def test_second_verification_of_the_same_files_reuses_the_measurement(board: FakeBoard, bundle: Path) -> None:
    first = verify(bundle)
    assert first.details["cache"]["hit"] is False and board.measured() == 1
    said: list[str] = []
    second = verify(bundle, progress=said.append)
    assert second.details["cache"] == {**first.details["cache"], "hit": True,
                                       "measured_at": second.details["cache"]["measured_at"]}  # fmt: skip
    assert board.measured() == 1  # not emulated again ...
    assert board.runs[-1] == ("target", "admit")  # ... but the target admitted the bundle again
    assert sum(1 for where, _ in board.runs if where == "host") == 1
    assert any("reusing the emulated measurement" in m for m in said)
    for field in ("perplexity", "host_perplexity", "ppl_drift_pct", "eval_tokens", "golden_match"):
        assert getattr(second, field) == getattr(first, field), field
    assert second.teacher_forced == first.teacher_forced
    assert second.verification.model_dump(exclude={"message"}) == first.verification.model_dump(exclude={"message"})
    assert second.details["cache"]["measured_target_seconds"] == 300.0 and second.target_seconds == 0.1
    assert second.warnings == first.warnings  # the fresh admission's, for the same folder


def test_staging_folder_and_bundle_share_one_entry(board: FakeBoard, bundle: Path, tmp_path: Path) -> None:
    manifest = read_manifest_unverified(bundle)
    stage = tmp_path / "stage"
    stage.mkdir()
    for f in manifest.files:
        os.link(bundle / f.path, stage / f.path)
    (stage / "model.onnx_data").hardlink_to(bundle / "model.onnx_data")
    staged = verify(stage, arch=manifest.arch, graph=manifest.graph, runtime=manifest.runtime,
                    recipe=manifest.recipe, golden=manifest.golden)  # fmt: skip
    published = verify(bundle)
    assert board.measured() == 1 and published.details["cache"]["hit"]
    assert published.teacher_forced == staged.teacher_forced and published.golden_match is True


@pytest.mark.parametrize(
    "change",
    ["flip_byte", "new_file", "text", "max_tokens", "cpu", "onnxruntime", "threads", "golden_prompt", "no_golden",
     "code", "rootfs", "wheel_rebuilt", "qemu_binary"],  # fmt: skip
)
def test_anything_that_changes_the_runs_misses(
    board: FakeBoard, bundle: Path, signing: tuple[SigningKey, Path], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    verify(bundle)
    kwargs: dict[str, Any] = {}
    if change == "flip_byte":
        data = bytearray((bundle / "model.onnx_data").read_bytes())
        data[1000] ^= 0x01
        (bundle / "model.onnx_data").write_bytes(bytes(data))
    elif change == "new_file":
        (bundle / "extra.bin").write_bytes(b"read by nobody yet, but it could be")
    elif change == "text":
        kwargs["text"] = TEXT + " thirteen"
    elif change == "max_tokens":
        kwargs["max_text_tokens"] = 8
    elif change == "cpu":
        kwargs["cpu"] = "cortex-a72"
    elif change == "onnxruntime":
        kwargs["onnxruntime"] = "1.26.0"
    elif change == "threads":
        kwargs["threads"] = 2
    elif change == "golden_prompt":
        m = read_manifest_unverified(bundle)
        golden = m.golden.model_copy(update={"prompt_token_ids": [1, 5]})  # type: ignore[union-attr]
        write_signed_manifest(bundle, m.model_copy(update={"golden": golden}), signing[0])
    elif change == "no_golden":
        kwargs["thresholds"] = Thresholds(check_golden=False)
    elif change == "code":
        monkeypatch.setattr(results, "code_digest", lambda: "other code")
    elif change == "rootfs":
        (board.root / "rootfs" / ".complete").write_text('{"suite": "bookworm", "rebuilt": true}')
    elif change == "wheel_rebuilt":  # same version, other bytes: the wheel's RECORD differs
        (board.root / "site-1.32.0" / "onnxruntime-1.32.0.dist-info" / "RECORD").write_text("other,sha256=x,1\n")
    elif change == "qemu_binary":
        (board.root / "qemu-aarch64").write_bytes(b"another qemu build of the same version")
    out = verify(bundle, **kwargs)
    assert out.details["cache"]["hit"] is False and board.measured() == 2


def test_what_only_describes_the_model_shares_the_entry(
    board: FakeBoard, bundle: Path, signing: tuple[SigningKey, Path]
) -> None:
    """Re-signing (new version, other expected golden tokens) changes no byte the engine reads: a hit, and the
    golden check is judged against the NEW manifest's expected tokens."""
    verify(bundle)
    m = read_manifest_unverified(bundle)
    wrong = m.golden.model_copy(update={"expected_token_ids": [3, 9]})  # type: ignore[union-attr]
    write_signed_manifest(bundle, m.model_copy(update={"version": m.version + 1, "golden": wrong}), signing[0])
    out = verify(bundle)
    assert out.details["cache"]["hit"] and board.measured() == 1
    assert out.golden_match is False and [r.name for r in out.regressions] == ["golden"]


def test_a_hit_is_judged_with_the_callers_thresholds(board: FakeBoard, bundle: Path) -> None:
    lenient = verify(bundle)
    assert lenient.passed
    strict = verify(bundle, thresholds=Thresholds(max_kl_mean=0.0, max_ppl_drift_pct=0.0, z=0.0))  # no band
    assert strict.details["cache"]["hit"] and board.measured() == 1
    assert {"kl_divergence", "perplexity_drift"} <= {r.name for r in strict.regressions}
    assert strict.teacher_forced is not None and strict.teacher_forced.kl_mean == lenient.teacher_forced.kl_mean


def test_no_cache_measures_again_and_replaces_the_entry(board: FakeBoard, bundle: Path) -> None:
    verify(bundle)
    board.cpu_noise = 0.5  # were the target to compute differently now, --no-cache must see it
    fresh = verify(bundle, cache=False)
    assert fresh.details["cache"]["hit"] is False and board.measured() == 2
    again = verify(bundle)
    assert again.details["cache"]["hit"] and again.teacher_forced == fresh.teacher_forced


def test_a_hit_still_refuses_what_the_target_refuses_now(board: FakeBoard, bundle: Path) -> None:
    verify(bundle)
    board.refuse = "bad_signature"
    with pytest.raises(TargetRefusedError, match="refused"):
        verify(bundle)
    assert board.runs[-1] == ("target", "admit") and board.measured() == 1


def test_refusals_are_never_stored(board: FakeBoard, bundle: Path, tmp_path: Path) -> None:
    board.refuse = "runtime_incompatible"
    with pytest.raises(TargetRefusedError):
        verify(bundle)
    assert not list((tmp_path / "results").glob("*.json"))


@pytest.mark.parametrize("damage", ["truncated", "other_key", "bad_terms", "other_format"])
def test_a_broken_entry_is_a_miss_and_is_replaced(
    board: FakeBoard, bundle: Path, tmp_path: Path, damage: str
) -> None:
    first = verify(bundle)
    [entry] = (tmp_path / "results").glob("*.json")
    doc = json.loads(entry.read_text())
    if damage == "truncated":
        entry.write_text(entry.read_text()[:100])
    else:
        if damage == "other_key":
            doc["key"] = "0" * 64
        elif damage == "bad_terms":
            doc["terms"]["kl"] = doc["terms"]["kl"][:-1]
        else:
            doc["format"] = results.FORMAT + 1
        entry.write_text(json.dumps(doc))
    again = verify(bundle)
    assert again.details["cache"]["hit"] is False and board.measured() == 2
    assert again.teacher_forced == first.teacher_forced
    assert json.loads(entry.read_text())["key"] == first.details["cache"]["key"]  # replaced by a good one


def test_off_disables_the_cache(board: FakeBoard, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(results.ENV, "off")
    assert results.cache_dir() is None
    verify(bundle)
    out = verify(bundle)
    assert out.details["cache"] == {"hit": False, "key": None, "measured_at": None,
                                    "measured_target_seconds": 300.0}  # fmt: skip
    assert board.measured() == 2


def test_code_digest_follows_every_measuring_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "REPO", tmp_path)
    pkg = tmp_path / "device" / "engine"
    pkg.mkdir(parents=True)
    (pkg / "engine.py").write_text("x = 1\n")
    (pkg / "ops.json").write_text("{}")
    (pkg / "notes.txt").write_text("not code")
    prog = tmp_path / "_remote.py"
    prog.write_text("print(1)\n")
    digest = lambda: results.code_digest([tmp_path / "device"], [prog])  # noqa: E731
    d0 = digest()
    (pkg / "notes.txt").write_text("still not code")
    assert digest() == d0
    for path, text in ((pkg / "engine.py", "x = 2\n"), (pkg / "ops.json", "[]"), (prog, "print(2)\n")):
        path.write_text(text)
        assert digest() != d0
        d0 = digest()
    (pkg / "new.py").write_text("")
    assert digest() != d0


def test_old_entries_are_pruned(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.json").write_text("{}")
        os.utime(folder / f"{i}.json", ns=(i * 10**9, i * 10**9))
    results.prune(folder, keep=3)
    assert sorted(p.name for p in folder.glob("*.json")) == ["2.json", "3.json", "4.json"]


def test_the_tokenizer_file_the_engine_uses_is_in_the_key(board: FakeBoard, bundle: Path) -> None:
    """A manifest's `tokenizer` role may name another file than the default: same bytes, other tokens."""
    m = read_manifest_unverified(bundle)
    env = board.env("cortex-a76", "1.32.0")
    key = lambda name: results.measurement_key(bundle, m.arch, m.graph, TEXT, None, None, m.golden, env, name)  # noqa: E731
    assert key("tokenizer.json") == key("tokenizer.json")
    assert key("tokenizer.json").digest != key("other_tokenizer.json").digest
