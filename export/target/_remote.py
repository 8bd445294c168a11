"""The verification program. The SAME file runs twice per check: under qemu-aarch64 with the board's Python,
onnxruntime and CPU model, and natively on the build machine; the two results are compared by verify.py.

It imports only the device engine (device/engine), the contract (manifests/) and the stdlib, exactly what
a board has. Run as ``python3.11 -P _remote.py JOB.json`` (``-P``: this folder is not put on sys.path);
it prints one line ``NANOFLEET_RESULT {json}`` on stdout, and exits 0 even on a refusal (the JSON says).

Modes:
  probe   versions, the machine, onnxruntime's CPU kernels; runs nothing else (a userland self-test)
  admit   the signature (with trusted_keys) and runtime compatibility only: what a cached measurement
          (results.py) still needs checked on the target
  verify  admit, then load the bundle with the engine, the eval text teacher-forced (perplexity; with
          logprobs_out, every position's log-softmax row to a .npy) and the golden check
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MARKER = "NANOFLEET_RESULT "

# Python puts this script's folder first on sys.path; nothing here may be importable by a bare name.
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def _ids_sha(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def probe(job: dict[str, Any]) -> dict[str, Any]:
    from manifests.runtime_compat import local_onnxruntime

    version, ops = local_onnxruntime()
    result: dict[str, Any] = {
        "ok": True,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": version,
        "ops": sorted(ops) if ops is not None else None,
    }
    model = job.get("model")
    if model:  # a plain onnxruntime call: the userland self-test before the engine is involved
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        feeds = {
            i.name: np.asarray(v, dtype=np.float32)
            for i, v in zip(sess.get_inputs(), job["inputs"], strict=False)
        }
        result["outputs"] = [o.tolist() for o in sess.run(None, feeds)]
    return result


def admit(job: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The checks before any byte of the model is parsed: the signature and every file's sha256 (with
    trusted_keys), then whether this onnxruntime can run the bundle at all (version, operators). Returns
    (result so far, manifest or None); the result has ``ok`` False on a refusal."""
    from manifests import ManifestError, Recipe, Runtime, TrustStore, read_manifest_unverified, verify_bundle
    from manifests.runtime_compat import RuntimeIncompatibleError, check_runtime_compat, local_onnxruntime

    ort_version, ops = local_onnxruntime()
    base: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                            "onnxruntime": ort_version}  # fmt: skip
    root = Path(job["dir"])
    manifest = None
    try:
        if job.get("trusted_keys"):
            trust = TrustStore.from_paths(list(job["trusted_keys"]))
            manifest = verify_bundle(root, trust)
        elif (root / "manifest.yaml").is_file():
            manifest = read_manifest_unverified(root)
    except ManifestError as exc:
        return {**base, "ok": False, "reason": getattr(exc, "reason", "invalid"), "error": str(exc)}, None

    runtime = manifest.runtime if manifest else (Runtime(**job["runtime"]) if job.get("runtime") else None)
    recipe = manifest.recipe if manifest else (Recipe(**job["recipe"]) if job.get("recipe") else None)
    warnings: list[str] = []
    if runtime is not None:
        try:
            report = check_runtime_compat(manifest or runtime, ort_version, ops, recipe=recipe)
            warnings += report.warnings
        except RuntimeIncompatibleError as exc:
            refusal = {**base, "ok": False, "reason": exc.reason, "error": str(exc), "problems": exc.problems}
            return refusal, None
    return {**base, "ok": True, "warnings": warnings}, manifest


def verify(job: dict[str, Any]) -> dict[str, Any]:
    from device.engine import Engine, EngineError, EngineOptions
    from manifests import ArchConfig, GraphSpec

    t0 = time.monotonic()
    result, manifest = admit(job)
    if not result["ok"] or job.get("mode") == "admit":
        result["timings"] = {"admit_s": time.monotonic() - t0}
        return result
    root = Path(job["dir"])
    timings: dict[str, float] = {}
    options = EngineOptions(threads=job.get("threads"))
    try:
        if manifest is not None:
            engine = Engine.from_bundle(root, None, options)  # verified above when keys were given
        else:
            engine = Engine.from_parts(root, ArchConfig(**job["arch"]), GraphSpec(**job["graph"]), options)
    except EngineError as exc:
        return {**result, "ok": False, "reason": "load", "error": str(exc)}
    timings["load_s"] = time.monotonic() - t0

    with engine:
        if job.get("text"):
            ids = engine.encode(job["text"], add_special_tokens=False)  # as the export gate does
            if job.get("max_text_tokens"):
                ids = ids[: int(job["max_text_tokens"])]
            t = time.monotonic()
            result.update(_teacher_forced(engine, ids, job.get("logprobs_out")))
            timings["perplexity_s"] = time.monotonic() - t
            result["eval_tokens"] = len(ids)
            result["text_ids_sha256"] = _ids_sha(ids)
        t = time.monotonic()
        golden = manifest.golden if manifest is not None else job.get("golden_check")
        if golden is not None and job.get("golden", True):
            g = golden if isinstance(golden, dict) else golden.model_dump()
            k = len(g["expected_token_ids"])
            result["golden"] = {
                "expected": list(g["expected_token_ids"]),
                "tokens": engine.greedy(list(g["prompt_token_ids"]), k),
            }
        timings["greedy_s"] = time.monotonic() - t
    result["timings"] = timings
    return result


def _teacher_forced(engine: Any, ids: list[int], out: str | None) -> dict[str, Any]:
    """Perplexity of ``ids``; with ``out``, also every position's log-softmax row, written as ``out`` (float32
    [positions, vocab]) and ``out``.targets.npy (int64 [positions]) for verify.py's teacher-forced comparison."""
    import numpy as np

    chunks = []
    nll, count = 0.0, 0
    for targets, logp in engine.log_probs(ids):
        nll -= float(logp[np.arange(targets.shape[0]), targets].astype(np.float64).sum())
        count += int(targets.shape[0])
        if out:
            chunks.append((targets, logp))
    if out:
        rows = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(count, chunks[0][1].shape[1]))
        at = 0
        for _targets, logp in chunks:
            rows[at : at + logp.shape[0]] = logp
            at += logp.shape[0]
        rows.flush()
        del rows
        np.save(out + ".targets.npy", np.concatenate([t for t, _ in chunks]).astype(np.int64))
    return {"perplexity": math.exp(nll / count) if math.isfinite(nll) else float("nan"), "positions": count}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python3 _remote.py JOB.json\n")
        return 2
    job = json.loads(Path(argv[1]).read_text())
    try:
        result = probe(job) if job.get("mode") == "probe" else verify(job)
    except Exception as exc:  # the caller needs the reason as data, whatever went wrong
        result = {"ok": False, "reason": "crash", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
