"""verify-target end to end: the device engine on an emulated Cortex-A76 (qemu-aarch64, Debian arm64 userland,
aarch64 onnxruntime wheels) against the same program on this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from export.target.errors import EmulatorTooOldError, ToolMissingError, UnsupportedCpuError
from export.target.runner import TargetEnv, check_cpu, run_on_target
from export.target.tools import require_tool
from export.target.userland import ensure_emulator
from export.target.wheels import host_onnxruntime_version
from manifests import (
    BundleManifest,
    SigningKey,
    read_manifest_unverified,
    write_keypair,
    write_signed_manifest,
)

from .conftest import OLD_ORT, run_cli, tiny_bundle

# Emulation is slow (minutes per test on a shared 2-core machine): `make test-fast` leaves these out, and the
# time limit covers building the emulated board and the default bundle on a fresh machine.
EMULATION_TIMEOUT_S = 2400


@pytest.mark.slow
@pytest.mark.timeout(EMULATION_TIMEOUT_S)
def test_plain_onnxruntime_runs_on_the_emulated_board(target_env: TargetEnv, tmp_path: Path) -> None:
    """The userland itself: aarch64 Python + the aarch64 onnxruntime wheel compute a tiny graph right."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "tiny.onnx")
    x = [[1.0, -2.0, 3.0, -4.0]]
    result = run_on_target(target_env, {"mode": "probe", "model": str(tmp_path / "tiny.onnx"), "inputs": [x]})
    data = result.data
    assert data["ok"], data
    assert data["machine"] == "aarch64"
    assert data["python"].startswith("3.11")
    assert data["onnxruntime"] == host_onnxruntime_version()
    assert "com.microsoft:MatMulNBits" in data["ops"]
    np.testing.assert_allclose(data["outputs"][0], np.maximum(np.asarray(x) @ w, 0), rtol=1e-6)


def test_clear_errors_for_bad_cpu_missing_tools_and_old_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsupportedCpuError, match="cortex-a76"):
        check_cpu("max")  # qemu's default: takes SVE/SME paths no board has
    with pytest.raises(ToolMissingError, match="apt-get install nanofleet-no-such-package"):
        require_tool("nanofleet-no-such-tool", "nanofleet-no-such-package", "for this test")
    old = shutil.which("qemu-aarch64-static")
    assert old, "qemu-user-static is not installed: run scripts/ensure_services.sh"
    monkeypatch.setenv("NANOFLEET_QEMU_AARCH64", old)  # Debian bookworm's qemu 7.2
    with pytest.raises(EmulatorTooOldError, match="qemu 8 or newer"):
        ensure_emulator("1.32.0")
    assert ensure_emulator("1.26.0").version[0] == 7


def test_bad_cpu_exits_2_with_the_choices(tmp_path: Path) -> None:
    code, data, _ = run_cli(str(tmp_path), "--cpu", "max", timeout=120)
    assert code == 2 and data["reason"] == "unsupported_cpu" and "cortex-a72" in data["error"]


@pytest.mark.slow
@pytest.mark.timeout(EMULATION_TIMEOUT_S)
def test_bundle_using_an_operator_the_target_lacks_is_refused(
    signing: tuple[SigningKey, Path], tmp_path: Path
) -> None:
    """Built with the newest onnxruntime's fused op; the boards run 1.26, which has no kernel for it."""
    from onnx import helper

    key, pub = signing
    node = helper.make_node("GatedDeltaNet", ["x", "x", "x", "x", "x"], ["y"], domain="com.microsoft")
    bundle = tiny_bundle(tmp_path / "b", key, [node], ["com.microsoft:GatedDeltaNet"])
    code, data, _ = run_cli(str(bundle), "--cpu", "cortex-a76", "--onnxruntime", OLD_ORT, "--trust", str(pub))
    assert code == 3, data
    assert data["reason"] == "runtime_incompatible"
    assert "com.microsoft:GatedDeltaNet" in data["error"] and OLD_ORT in data["error"]
    assert "emulated cortex-a76" in data["error"]
    assert any("no CPU kernel" in p for p in data["problems"])


@pytest.mark.slow
@pytest.mark.timeout(EMULATION_TIMEOUT_S)
def test_default_bundle_verifies_on_cortex_a76(a76_cli_run: tuple[int, dict[str, Any], str]) -> None:
    # The gate's own eval text (500+ tokens), as a user would run it: teacher-forced over every position, the
    # target's next-token distributions are compared with the build's, and the signed fp32 reference applies.
    code, data, err = a76_cli_run
    assert code == 0, (data, err[-2000:])
    assert data["cache"]["hit"] is False and data["cache"]["key"]  # this session's first: emulated for real
    assert data["passed"] and data["regressions"] == []
    assert data["target"]["machine"] == "aarch64" and data["host"]["machine"] == "x86_64"
    assert data["onnxruntime"] == host_onnxruntime_version()
    assert data["eval_tokens"] > 500
    assert 1.0 < data["perplexity"] < 1000.0
    assert abs(data["ppl_drift_pct"]) < 3.0
    m = data["teacher_forced"]
    assert m["reference"] == "build" and m["tokens"] == data["eval_tokens"] - 1 and m["passed"]
    assert m["kl_mean"] <= m["limits"]["kl_mean_limit"] and m["top_token_match"] >= 0.9
    assert m["limits"]["note"] is None  # 500+ tokens: a sharp verdict, no widened band
    assert data["golden_match"] is True  # the agent's activation check would pass on a Pi 5
    assert data["signed_report_compared"]  # the gate's text: compared with the signed quality report too
    v = data["verification"]
    assert v["cpu"] == "cortex-a76" and v["passed"] and v["perplexity"] == data["perplexity"]
    assert v["teacher_forced"] == m and v["greedy_agreement"] == m["top_token_match"]


@pytest.mark.slow
@pytest.mark.timeout(EMULATION_TIMEOUT_S)
def test_a_regression_is_named_and_exits_1(
    default_bundle: tuple[Path, Path], a76_cli_run: tuple[int, dict[str, Any], str], tmp_path: Path
) -> None:
    """A bundle whose signed golden tokens the board would not reproduce: exit 1, regression 'golden'.

    Its model files are the default bundle's (hard links) and only the manifest is re-signed, so the CLI's
    measurement of the gate's text (a76_cli_run) is reused from the results cache: what this shows is that a
    hit is judged against the manifest given now, not the one that was measured, and that the target still
    checks the new signature (the `admit` run); the emulated golden decode itself is a76_cli_run's."""
    src, _pub = default_bundle
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = read_manifest_unverified(src)
    for f in manifest.files:
        os.link(src / f.path, bundle / f.path)  # read-only use: hard links, no 140 MB copy
    golden = manifest.golden
    assert golden is not None
    wrong = [(t + 1) % manifest.arch.vocab_size for t in golden.expected_token_ids]
    data = manifest.model_dump(mode="json")
    data["golden"]["expected_token_ids"] = wrong
    key = SigningKey.generate()
    _priv, pub = write_keypair(tmp_path / "keys", key)
    write_signed_manifest(bundle, BundleManifest.model_validate(yaml.safe_load(yaml.safe_dump(data))), key)
    code, out, _ = run_cli(str(bundle), "--cpu", "cortex-a76", "--trust", str(pub))
    assert code == 1, out
    assert out["cache"]["hit"] is True and out["cache"]["key"] == a76_cli_run[1]["cache"]["key"]
    assert [r["name"] for r in out["regressions"]] == ["golden"]
    assert "position 0" in out["regressions"][0]["message"]
    assert out["verification"]["passed"] is False and "golden" in out["verification"]["message"]
    # the same measurement, judged again: everything but the golden check passes as in the CLI's run
    assert out["teacher_forced"] == a76_cli_run[1]["teacher_forced"] and out["teacher_forced"]["passed"]


@pytest.mark.slow
@pytest.mark.timeout(EMULATION_TIMEOUT_S)
def test_export_gate_signs_the_target_result_into_the_quality_report(
    default_bundle: tuple[Path, Path], a76_cli_run: tuple[int, dict[str, Any], str], tmp_path: Path
) -> None:
    """`nanofleet export --verify-target` path: the staged bundle (files, no manifest yet) is verified from
    what the manifest will say, and the result lands in the quality report and verified_onnxruntime.

    The staged files are the CLI test's bundle's (hard links), so the gate reuses that emulated measurement
    from the results cache (content-addressed: paths are not in the key) and must sign the same figures; the
    runtime check still runs on the emulated target."""
    from export.target.gate import verify_on_targets

    src, _pub = default_bundle
    manifest = read_manifest_unverified(src)
    stage = tmp_path / "stage"
    stage.mkdir()
    for f in manifest.files:
        os.link(src / f.path, stage / f.path)
    assert manifest.quality is not None and manifest.quality.target_verifications == []
    runtime = manifest.runtime.model_copy(update={"verified_onnxruntime": []})
    said: list[str] = []
    quality, runtime = verify_on_targets(
        stage, ["cortex-a76"], None, manifest.arch, manifest.graph, runtime, manifest.recipe,
        manifest.quality, manifest.golden, progress=said.append,
    )  # fmt: skip  (None: the gate's own eval text, as `export --verify-target` uses by default)
    [tv] = quality.target_verifications
    assert tv.cpu == "cortex-a76" and tv.passed and tv.onnxruntime == host_onnxruntime_version()
    assert tv.eval_tokens and tv.eval_tokens > 500 and 1.0 < tv.perplexity < 1000.0
    assert tv.teacher_forced is not None and tv.teacher_forced.passed
    assert runtime.verified_onnxruntime == [host_onnxruntime_version()]
    assert quality.ppl_quantized == manifest.quality.ppl_quantized  # the build's own results are kept
    # one emulated measurement for both entry points: the gate reused the CLI's, and signs what the CLI said
    _code, cli, _err = a76_cli_run
    assert any("reusing the emulated measurement" in m for m in said), said
    assert not any("emulation is slow" in m for m in said), said
    assert tv.perplexity == cli["perplexity"] and tv.eval_tokens == cli["eval_tokens"]
    assert tv.teacher_forced.model_dump(mode="json") == cli["teacher_forced"]
