"""The Jetson path of per-board variants, checked on a machine with an NVIDIA GPU and onnxruntime-gpu
(docs/fleet.md, "Per-board variants"). It cannot run on a CPU-only machine, and says so (exit 2).

    pip install onnxruntime-gpu        # a Jetson: the JetPack wheel from NVIDIA's Jetson AI Lab index
    python scripts/check_gpu_variant.py BUNDLE --key release.key [--fp16] [--json]

BUNDLE is any signed bundle (an fp32 one, `nanofleet export --precision fp32`, for --fp16). In order:

1. the board's capabilities as its agent reports them (device/agent/capabilities.py) list the provider;
2. the fleet's resolver (manifests.resolve_variant) gives this board the fp16-cuda variant of a release
   that also has a CPU variant, and refuses it a release whose only variant needs TensorRT when TensorRT is
   missing (or the reverse);
3. a copy of BUNDLE that declares ``execution_providers: [CUDAExecutionProvider]`` (with --fp16: its graph
   converted to float16, KV cache in float16, recipe precision fp16) signed with --key;
4. the engine loads it on the CUDA provider (engine.providers and the session's own list), produces the
   bundle's golden tokens (their match is reported; fp16 may differ from the int8/fp32 build's in a
   near-tie) and decodes 64 tokens, whose rate is reported.

Exit 0: every check passed; 1: a check failed (printed); 2: no CUDA provider here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CUDA = "CUDAExecutionProvider"


def make_variant(src: Path, dest: Path, key_path: Path, provider: str, fp16: bool) -> Path:
    """A signed copy of ``src`` that declares ``provider`` (and, with fp16, holds a float16 graph)."""
    from manifests import MODEL_DATA_FILE, SigningKey, describe_file, read_manifest_unverified, write_signed_manifest

    m = read_manifest_unverified(src)
    dest.mkdir(parents=True)
    for f in m.files:
        (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
        # onnx refuses to read external data with several hard links: copy what --fp16 will read
        (shutil.copyfile if fp16 else os.link)(src / f.path, dest / f.path)
    update: dict[str, object] = {"runtime": m.runtime.model_copy(update={"execution_providers": [provider]})}
    if fp16:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model_file = dest / m.graph.model_file
        model = onnx.load(str(model_file))  # external data beside it is read too
        for f in m.files:
            if f.role in ("model", "model_data"):
                (dest / f.path).unlink()  # the old graph and weights: the fp16 graph writes its own
        # The KV cache in float16 (past and present share one buffer: no cast may sit between them); every
        # other input and output (logits, LoRA slots) stays float32, as the engine feeds and reads them.
        kv = ("past_key_values.", "present.")
        keep = [n for n in [*m.graph.input_names, *m.graph.output_names] if not n.startswith(kv)]
        half = convert_float_to_float16(model, keep_io_types=keep)
        onnx.save(half, str(model_file), save_as_external_data=True, location=MODEL_DATA_FILE)
        kept = [f for f in m.files if f.role not in ("model", "model_data")]
        files = [describe_file(dest, m.graph.model_file, "model"), describe_file(dest, MODEL_DATA_FILE, "model_data"),
                 *(describe_file(dest, f.path, f.role) for f in kept)]  # fmt: skip
        update |= {
            "files": files,
            "graph": m.graph.model_copy(update={"kv_dtype": "float16"}),
            "recipe": m.recipe.model_copy(update={"precision": "fp16", "method": "none"}),
            "name": (m.name.removesuffix("-fp32").removesuffix("-int8") + "-fp16")[:128],
        }
    write_signed_manifest(dest, m.model_copy(update=update), SigningKey.load(key_path))
    return dest


def check(bundle: Path, key_path: Path, fp16: bool) -> dict[str, object]:
    import onnxruntime as ort

    from device.agent.capabilities import SystemProbe
    from device.engine import Engine, EngineOptions, SamplingParams
    from manifests import Release, TrustStore, VariantChoice, VariantRefusal, resolve_variant
    from manifests.signing import SigningKey

    result: dict[str, object] = {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
    caps = SystemProbe("jetson").probe()
    assert CUDA in (caps.execution_providers or []), f"the agent's probe does not report {CUDA}: {caps}"
    result["capabilities"] = caps.to_json()
    v = {"name": "x", "version": 1}
    release = Release.from_obj({"metadata": {"name": "check", "version": 1}, "spec": {"variants": [
        {"name": "fp16-cuda", "bundle": {**v, "name": "gpu"}, "rules": {"execution_providers": [CUDA]}},
        {"name": "int8", "bundle": {**v, "name": "cpu"}}]}})  # fmt: skip
    choice = resolve_variant(caps, release)
    assert isinstance(choice, VariantChoice) and choice.variant == "fp16-cuda", choice
    other = "TensorrtExecutionProvider" if "TensorrtExecutionProvider" not in ort.get_available_providers() else "X"
    only = Release.from_obj({"metadata": {"name": "check", "version": 2}, "spec": {"variants": [
        {"name": "trt", "bundle": v, "rules": {"execution_providers": [other]}}]}})  # fmt: skip
    assert isinstance(resolve_variant(caps, only), VariantRefusal)
    result["resolver"] = "fp16-cuda chosen; a release needing a missing provider refused"

    with tempfile.TemporaryDirectory() as tmp:
        variant = make_variant(bundle, Path(tmp) / "variant", key_path, CUDA, fp16)
        pub = Path(tmp) / "check.pub"
        pub.write_bytes(SigningKey.load(key_path).public_pem())
        t0 = time.perf_counter()
        engine = Engine.from_bundle(variant, TrustStore.from_paths([pub]), EngineOptions())
        result["load_s"] = round(time.perf_counter() - t0, 2)
        try:
            running = engine._session.get_providers()  # the session's own answer, not just what was asked
            result["engine_providers"], result["session_providers"] = engine.providers, running
            assert engine.providers[0] == CUDA and running[0] == CUDA, (engine.providers, running)
            m = engine.manifest
            assert m is not None
            if m.golden is not None:
                got = engine.greedy(m.golden.prompt_token_ids, len(m.golden.expected_token_ids))
                same = sum(a == b for a, b in zip(got, m.golden.expected_token_ids, strict=True))
                result["golden_match"] = f"{same}/{len(got)}"
            prompt = m.golden.prompt_token_ids if m.golden else [1, 2, 3]
            params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            n = sum(1 for _ in engine.generate(prompt, params))
            result["decode_tok_s"] = round(n / (time.perf_counter() - t0), 1)
        finally:
            engine.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="a signed bundle folder (fp32 for --fp16)")
    ap.add_argument("--key", type=Path, required=True, help="a signing key (PEM) to sign the variant copy with")
    ap.add_argument("--fp16", action="store_true", help="convert the graph to float16 (the Jetson variant)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args()
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        msg = f"no {CUDA} in this onnxruntime ({', '.join(ort.get_available_providers())}): install onnxruntime-gpu"
        print(json.dumps({"ok": False, "reason": "no_cuda", "error": msg}) if a.json else msg)
        return 2
    try:
        result = check(a.bundle, a.key, a.fp16)
    except (AssertionError, Exception) as exc:  # noqa: BLE001 - every failure is the check's answer
        print(json.dumps({"ok": False, "error": repr(exc)}) if a.json else f"FAILED: {exc!r}")
        return 1
    print(json.dumps({"ok": True, **result}, indent=1) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
