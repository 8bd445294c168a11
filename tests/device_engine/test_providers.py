"""Execution-provider selection: the provider a bundle declares when the board has it, the declared CPU
fallback, and a named refusal otherwise (pure cases with fake provider lists, then the real default bundle
on this CPU-only onnxruntime). The CUDA/TensorRT path itself is checked on an NVIDIA machine:
scripts/check_gpu_variant.py (docs/fleet.md, "Per-board variants")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device.engine import Engine, ExecutionProviderUnavailableError, choose_providers
from device.engine.providers import check_session
from manifests import SigningKey, TrustStore, read_manifest_unverified, write_signed_manifest

REPO = Path(__file__).resolve().parents[2]
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
JETSON = [TRT, CUDA, CPU]  # onnxruntime-gpu on a Jetson (JetPack wheel)


def test_choose_providers_with_fake_provider_lists() -> None:
    assert choose_providers([], [CPU]) == [CPU]  # an older bundle, or one that declares nothing: CPU
    assert choose_providers([CUDA], JETSON) == [CUDA, CPU]  # CPU last: onnxruntime puts the rest there
    assert choose_providers([TRT, CUDA], JETSON) == [TRT, CPU]
    assert choose_providers([TRT, CUDA], [CUDA, CPU]) == [CUDA, CPU]  # second choice
    assert choose_providers([CUDA, CPU], [CPU]) == [CPU]  # the declared fallback
    with pytest.raises(ExecutionProviderUnavailableError) as ei:
        choose_providers([CUDA, TRT], [CPU], bundle="smollm2-fp16@1")
    e = ei.value
    assert e.reason == "execution_provider_unavailable" and "\n" not in e.message
    assert e.message == (
        "smollm2-fp16@1 needs CUDAExecutionProvider or TensorrtExecutionProvider; this onnxruntime has "
        "CPUExecutionProvider (install onnxruntime-gpu for CUDA/TensorRT)"
    )


def test_an_accelerator_onnxruntime_could_not_start_is_refused_unless_cpu_was_declared() -> None:
    check_session([CUDA], [CUDA, CPU], [CUDA, CPU])  # it started
    check_session([CUDA, CPU], [CUDA, CPU], [CPU])  # dropped, but the bundle allows CPU: a logged fallback
    check_session([], [CPU], [CPU])
    with pytest.raises(ExecutionProviderUnavailableError) as ei:
        check_session([CUDA], [CUDA, CPU], [CPU], bundle="smollm2-fp16@1")
    assert "lists but could not start (running on CPUExecutionProvider)" in ei.value.message


def _declaring(src: Path, dest: Path, key: SigningKey, providers: list[str]) -> Path:
    dest.mkdir(parents=True)
    m = read_manifest_unverified(src)
    for f in m.files:
        os.link(src / f.path, dest / f.path)
    runtime = m.runtime.model_copy(update={"execution_providers": providers})
    write_signed_manifest(dest, m.model_copy(update={"runtime": runtime}), key)
    return dest


@pytest.mark.slow
def test_real_bundle_refuses_a_missing_provider_and_falls_back_when_declared(
    tmp_path: Path, default_bundle: tuple[Path, Path]
) -> None:
    bundle, pub = default_bundle
    key = SigningKey.load(pub.parent / "nanofleet.key")
    trust = TrustStore.from_paths([pub])
    gpu_only = _declaring(bundle, tmp_path / "gpu-only", key, [CUDA])
    with pytest.raises(ExecutionProviderUnavailableError) as ei:
        Engine.from_bundle(gpu_only, trust)
    msg = ei.value.message  # this wheel lists e.g. AzureExecutionProvider, CPUExecutionProvider
    assert msg.startswith(f"{read_manifest_unverified(bundle).ref} needs CUDAExecutionProvider; this onnxruntime has ")
    assert "CPUExecutionProvider" in msg and "install onnxruntime-gpu" in msg
    either = _declaring(bundle, tmp_path / "either", key, [CUDA, CPU])
    engine = Engine.from_bundle(either, trust)
    try:
        assert engine.providers == [CPU] and engine.weights in ("packed", "mapped")
        m = read_manifest_unverified(either)
        assert m.golden is not None
        assert engine.greedy(m.golden.prompt_token_ids, len(m.golden.expected_token_ids)) == m.golden.expected_token_ids
    finally:
        engine.close()


@pytest.mark.slow
def test_the_fp16_variant_format_runs_here_on_cpu(tmp_path: Path, default_bundle: tuple[Path, Path]) -> None:
    """scripts/check_gpu_variant.py --fp16 makes the Jetson variant (fp16 graph and KV cache); declared for CPU
    it runs here, so only the CUDA provider itself is left to the NVIDIA machine. Golden tokens all match."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_gpu_variant", REPO / "scripts" / "check_gpu_variant.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bundle, pub = default_bundle
    variant = script.make_variant(bundle, tmp_path / "fp16", pub.parent / "nanofleet.key", CPU, True)
    engine = Engine.from_bundle(variant, TrustStore.from_paths([pub]))
    try:
        m = engine.manifest
        assert m is not None and m.recipe.precision == "fp16" and m.graph.kv_dtype == "float16"
        assert m.runtime.execution_providers == [CPU] and engine.providers == [CPU]
        assert m.golden is not None
        assert engine.greedy(m.golden.prompt_token_ids, len(m.golden.expected_token_ids)) == m.golden.expected_token_ids
    finally:
        engine.close()
