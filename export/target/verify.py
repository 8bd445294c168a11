"""Verify a bundle on the boards' CPU: run the device engine under qemu-aarch64 and compare it with the build.

One run of ``_remote.py`` under emulation (the board: aarch64 onnxruntime, -cpu cortex-a76 etc.) and one on
this machine (the build's onnxruntime), on the same eval text, then a teacher-forced comparison of the two
runs' next-token distributions at every position of the text (export/teacher_forced.py) and:

=====================  =========================================================================
regression             when
=====================  =========================================================================
tokenizer              the target tokenizes the text differently from the build
perplexity_invalid     the target's perplexity (or a log-probability) is NaN/inf
kl_divergence          mean KL(build || target) over the limit (widened for short texts)
top_token_match        the target's top token equals the build's on too few positions
perplexity_drift       target perplexity differs from the build's by more than ``max_ppl_drift_pct``
                       (widened for short texts)
perplexity_vs_fp32     (eval text = the signed report's) target perplexity over fp32's by more than
                       the report's ``max_ppl_increase_pct``
golden                 the manifest's golden check (what the agent runs on activation) gives other
                       tokens on the target
=====================  =========================================================================

A bundle the target cannot run at all (runtime incompatibility, bad signature) raises TargetRefusedError.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from manifests import (
    MANIFEST_NAME,
    TOKENIZER_FILE,
    ArchConfig,
    BundleManifest,
    GoldenCheck,
    GraphSpec,
    ManifestError,
    QualityReport,
    Recipe,
    Runtime,
    TargetVerification,
    TeacherForced,
    read_manifest_unverified,
)

from .. import teacher_forced as tf
from . import results
from .errors import BadInputError, TargetRefusedError
from .runner import RemoteResult, TargetEnv, check_cpu, prepare_target, run_on_host, run_on_target
from .wheels import host_onnxruntime_version

EVAL_DIR = Path(__file__).resolve().parents[1] / "eval_text"
DEFAULT_TEXT = EVAL_DIR / "default.txt"
# Same weights, other kernels: FACTS.md measured +0.9% (MatMulNBits 8-bit, x86 1.32 vs aarch64 1.26) and
# +4.6% (dynamic INT8); a broken kernel path is off by orders of magnitude.
DEFAULT_MAX_PPL_DRIFT_PCT = 3.0
# Same weights, other kernels (x86 VNNI vs aarch64 dot product: other int8 rounding of the activations): the
# distributions differ far less than quantization moves them from fp32 (the default bundle's KL to fp32 is
# about 0.004, docs/export.md); a broken kernel path is off by whole nats.
DEFAULT_MAX_KL = 0.01
DEFAULT_MIN_TOP_MATCH = 0.90
# Rows of the two runs' log-probabilities compared at a time (each row is one vocabulary of floats).
COMPARE_ROWS = 128


@dataclass(frozen=True)
class Thresholds:
    max_ppl_drift_pct: float = DEFAULT_MAX_PPL_DRIFT_PCT
    max_kl_mean: float = DEFAULT_MAX_KL
    min_top_token_match: float = DEFAULT_MIN_TOP_MATCH
    check_golden: bool = True
    z: float = tf.DEFAULT_Z

    def limits(self) -> tf.Limits:
        return tf.Limits(
            self.max_kl_mean, self.min_top_token_match, self.max_ppl_drift_pct, ppl_two_sided=True, z=self.z
        )


@dataclass(frozen=True)
class Regression:
    name: str
    message: str


@dataclass
class Outcome:
    """Everything one verification found; ``verification`` is what goes into the signed quality report."""

    cpu: str
    onnxruntime: str
    host_onnxruntime: str
    emulator: str
    bundle: str
    eval_tokens: int | None
    perplexity: float | None
    host_perplexity: float | None
    ppl_drift_pct: float | None
    teacher_forced: TeacherForced | None
    golden_match: bool | None
    signed_report_compared: bool
    regressions: list[Regression]
    warnings: list[str]
    thresholds: Thresholds
    target_seconds: float
    host_seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def verification(self) -> TargetVerification:
        if self.passed:
            msg = f"passed on {self.cpu} (qemu {self.emulator}) vs build onnxruntime {self.host_onnxruntime}"
        else:
            msg = "; ".join(f"{r.name}: {r.message}" for r in self.regressions)
        m = self.teacher_forced
        return TargetVerification(
            cpu=self.cpu,
            onnxruntime=self.onnxruntime,
            perplexity=self.perplexity if self.perplexity is not None else float("nan"),
            greedy_agreement=m.top_token_match if m is not None else 0.0,
            passed=self.passed,
            eval_tokens=self.eval_tokens,
            message=msg,
            teacher_forced=m,
        )

    def to_dict(self) -> dict[str, Any]:
        m = self.teacher_forced
        return {
            "ok": self.passed,
            "passed": self.passed,
            "bundle": self.bundle,
            "cpu": self.cpu,
            "onnxruntime": self.onnxruntime,
            "host_onnxruntime": self.host_onnxruntime,
            "emulator": self.emulator,
            "eval_tokens": self.eval_tokens,
            "perplexity": self.perplexity,
            "host_perplexity": self.host_perplexity,
            "ppl_drift_pct": self.ppl_drift_pct,
            "kl_mean": m.kl_mean if m else None,
            "top_token_match": m.top_token_match if m else None,
            "teacher_forced": m.model_dump(mode="json") if m else None,
            "golden_match": self.golden_match,
            "signed_report_compared": self.signed_report_compared,
            "regressions": [{"name": r.name, "message": r.message} for r in self.regressions],
            "warnings": self.warnings,
            "thresholds": {
                "max_ppl_drift_pct": self.thresholds.max_ppl_drift_pct,
                "max_kl_mean": self.thresholds.max_kl_mean,
                "min_top_token_match": self.thresholds.min_top_token_match,
                "z": self.thresholds.z,
                "check_golden": self.thresholds.check_golden,
            },
            "seconds": {"target": round(self.target_seconds, 1), "host": round(self.host_seconds, 1)},
            "verification": self.verification.model_dump(mode="json"),
            **self.details,
        }


def load_text(text: str | Path | None) -> str:
    if text is None or isinstance(text, Path):
        path = text or DEFAULT_TEXT
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInputError(f"cannot read the eval text {path}: {exc}") from exc
    return text


def _refusal(where: str, data: dict[str, Any]) -> TargetRefusedError:
    return TargetRefusedError(
        f"{where} refused the bundle ({data.get('reason')}): {data.get('error')}",
        reason=str(data.get("reason") or "refused"),
        problems=list(data.get("problems") or []),
    )


def run_verification(
    bundle_dir: str | Path,
    cpu: str,
    text: str | Path | None = None,
    *,
    max_text_tokens: int | None = None,
    onnxruntime: str | None = None,
    trusted_keys: Sequence[str | Path] | None = None,
    arch: ArchConfig | None = None,
    graph: GraphSpec | None = None,
    runtime: Runtime | None = None,
    recipe: Recipe | None = None,
    quality: QualityReport | None = None,
    golden: GoldenCheck | None = None,
    thresholds: Thresholds | None = None,
    threads: int | None = None,
    timeout: float = 3600,
    cache: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Verify ``bundle_dir`` (a bundle, or an export staging folder with ``arch`` and ``graph``) on ``cpu``.

    ``text``: the eval text (str), a file (Path), or None for the export gate's default text.
    ``onnxruntime``: the version the boards run (default: this machine's, the build's version).
    ``trusted_keys``: public keys; when given, the signature and every file are checked on the target.
    ``arch``/``graph``/``runtime``/``recipe``/``quality``/``golden``: for a staging folder (no manifest yet),
    what the manifest will say; ignored when the folder has a manifest.
    ``cache``: reuse (and store) the measurement of the same files in the results cache (results.py); False
    measures again and replaces the entry.
    """
    check_cpu(cpu)
    thresholds = thresholds or Thresholds()
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder")
    manifest: BundleManifest | None = None
    if (root / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest_unverified(root)
        except ManifestError as exc:
            raise TargetRefusedError(f"cannot read {root}/{MANIFEST_NAME}: {exc}", reason=exc.reason) from exc
    elif arch is None or graph is None:
        raise BadInputError(f"{root} has no {MANIFEST_NAME}: pass arch and graph to verify a staging folder")
    eval_text = load_text(text)
    ort_version = onnxruntime or host_onnxruntime_version()

    job: dict[str, Any] = {
        "mode": "verify",
        "dir": str(root),
        "text": eval_text,
        "max_text_tokens": max_text_tokens,
        "threads": threads,
        "golden": thresholds.check_golden,
    }
    if manifest is None:
        job.update(arch=arch.model_dump(mode="json"), graph=graph.model_dump(mode="json"))  # type: ignore[union-attr]
        if runtime is not None:
            job["runtime"] = runtime.model_dump(mode="json")
        if recipe is not None:
            job["recipe"] = recipe.model_dump(mode="json")
        if golden is not None:
            job["golden_check"] = golden.model_dump(mode="json")
    if trusted_keys:
        job["trusted_keys"] = [str(Path(k).resolve()) for k in trusted_keys]

    target_env = prepare_target(cpu, ort_version, progress)
    decoded_golden = (manifest.golden if manifest else golden) if thresholds.check_golden else None
    key = None
    if results.cache_dir() is not None:
        key = results.measurement_key(
            root, manifest.arch if manifest else arch, manifest.graph if manifest else graph,  # type: ignore[arg-type]
            eval_text, max_text_tokens, threads, decoded_golden, target_env, _tokenizer_file(manifest),
        )  # fmt: skip
    entry = results.load(key) if key is not None and cache else None
    if entry is not None:
        target, host, metrics = _reuse(entry, target_env, job, decoded_golden, thresholds, timeout, progress)
    else:
        target, host, metrics, comparison = _measure(target_env, job, thresholds, timeout, progress)
        if key is not None:
            terms = comparison.terms() if comparison is not None else None
            nonfinite = comparison.nonfinite_positions if comparison is not None else 0
            results.store(key, target.data, host.data, target.seconds, host.seconds, terms, nonfinite)
    signed_quality = manifest.quality if manifest is not None else quality
    outcome = compare(
        root, signed_quality, cpu, target_env.emulator.version_text, eval_text, target, host, thresholds, metrics
    )
    outcome.details["cache"] = {
        "hit": entry is not None,
        "key": key.digest if key is not None else None,
        "measured_at": entry.measured_at if entry is not None else None,
        "measured_target_seconds": entry.target_seconds if entry is not None else round(target.seconds, 1),
    }
    return outcome


def _tokenizer_file(manifest: BundleManifest | None) -> str:
    """The file the engine tokenizes with: the manifest's ``tokenizer`` role, else the default name (as
    Engine.from_bundle / from_parts choose it)."""
    entry = manifest.file("tokenizer") if manifest is not None else None
    return entry.path if entry is not None else TOKENIZER_FILE


def _check(result: RemoteResult, where: str) -> None:
    if result.data.get("ok"):
        return
    if result.data.get("reason") == "crash":
        from .errors import RemoteRunError

        raise RemoteRunError(
            f"the {where} run crashed: {result.data.get('error')}", str(result.data.get("traceback", ""))
        )
    raise _refusal(where, result.data)


def _measure(
    target_env: TargetEnv, job: dict[str, Any], thresholds: Thresholds, timeout: float, progress: Callable[[str], None]
) -> tuple[RemoteResult, RemoteResult, TeacherForced | None, tf.Comparison | None]:
    """Both runs for real, then their comparison (None when the texts were tokenized differently)."""
    cpu, ort_version = target_env.cpu, target_env.onnxruntime
    # Both runs write every position's log-softmax row here (vocab floats each: ~100 MB for the eval text).
    rows_dir = Path(tempfile.mkdtemp(prefix="nanofleet-verify-"))
    try:
        progress(f"running the bundle on emulated {cpu} (onnxruntime {ort_version} aarch64, qemu "
                 f"{target_env.emulator.version_text}); emulation is slow: minutes for a long text")  # fmt: skip
        target = run_on_target(target_env, {**job, "logprobs_out": str(rows_dir / "target.npy")}, timeout)
        _check(target, f"emulated {cpu} (onnxruntime {ort_version})")
        progress("running the same program on this machine (the build's reference)")
        host_job = {**job, "trusted_keys": None, "logprobs_out": str(rows_dir / "host.npy")}
        host = run_on_host(host_job, timeout)
        _check(host, "this (build) machine")
        comparison = None
        if job["text"] and target.data.get("text_ids_sha256") == host.data.get("text_ids_sha256"):
            comparison = compare_rows(rows_dir / "host.npy", rows_dir / "target.npy")
    finally:
        shutil.rmtree(rows_dir, ignore_errors=True)
    metrics = comparison.result(thresholds.limits(), "build") if comparison is not None else None
    return target, host, metrics, comparison


def _reuse(
    entry: results.Entry,
    target_env: TargetEnv,
    job: dict[str, Any],
    golden: GoldenCheck | None,
    thresholds: Thresholds,
    timeout: float,
    progress: Callable[[str], None],
) -> tuple[RemoteResult, RemoteResult, TeacherForced | None]:
    """A cached measurement of the same bytes: the checks that must hold now (signature, runtime
    compatibility) run on the emulated target again; the measurement is reused and judged with this call's
    thresholds."""
    cpu, ort_version = target_env.cpu, target_env.onnxruntime
    progress(f"reusing the emulated measurement of these files on {cpu} from {entry.measured_at} "
             f"(results cache); checking signature and runtime compatibility on the target")  # fmt: skip
    admitted = run_on_target(target_env, {**job, "mode": "admit"}, timeout)
    _check(admitted, f"emulated {cpu} (onnxruntime {ort_version})")
    expected = list(golden.expected_token_ids) if golden is not None else None
    t_data: dict[str, Any] = {**entry.target, **admitted.data}
    h_data: dict[str, Any] = {**entry.host, "ok": True}
    if entry.golden_tokens is not None:
        t_data["golden"] = {"expected": expected, "tokens": entry.golden_tokens}
        h_data["golden"] = {"expected": expected, "tokens": entry.host_golden_tokens}
    target = RemoteResult(t_data, admitted.seconds, admitted.stderr_tail)
    host = RemoteResult(h_data, 0.0, "")
    metrics = None
    if entry.terms is not None:
        metrics = tf.judge(*entry.terms, thresholds.limits(), "build", entry.nonfinite_positions)
    return target, host, metrics


def compare_rows(host_file: Path, target_file: Path) -> tf.Comparison:
    """The teacher-forced comparison of the two runs' log-probability rows (memory-mapped, a slice at a time)."""
    host = np.load(host_file, mmap_mode="r")  # [positions, vocab]
    target = np.load(target_file, mmap_mode="r")
    targets = np.load(str(host_file) + ".targets.npy")  # [positions]
    if host.shape != target.shape or not np.array_equal(targets, np.load(str(target_file) + ".targets.npy")):
        raise BadInputError(f"the runs scored different positions: {host.shape} vs {target.shape}")
    cmp = tf.Comparison()
    for at in range(0, host.shape[0], COMPARE_ROWS):
        end = at + COMPARE_ROWS
        cmp.add(targets[at:end], np.asarray(host[at:end]), np.asarray(target[at:end]))
    return cmp


def compare(
    root: Path,
    quality: QualityReport | None,
    cpu: str,
    emulator: str,
    eval_text: str,
    target: RemoteResult,
    host: RemoteResult,
    thresholds: Thresholds,
    metrics: TeacherForced | None,
) -> Outcome:
    """The named regressions of one verification, from both runs' results and their teacher-forced comparison
    (``metrics``: None when the texts were tokenized differently, which is itself the regression)."""
    t, h = target.data, host.data
    regressions: list[Regression] = []
    warnings = list(t.get("warnings") or [])

    if t.get("text_ids_sha256") != h.get("text_ids_sha256"):
        regressions.append(Regression("tokenizer", "the target tokenizes the eval text differently"))
    ppl, host_ppl = t.get("perplexity"), h.get("perplexity")
    drift: float | None = None
    if ppl is not None and host_ppl is not None:
        if not (math.isfinite(ppl) and ppl > 0):
            regressions.append(Regression("perplexity_invalid", f"target perplexity is {ppl}"))
        else:
            drift = (ppl / host_ppl - 1.0) * 100.0
    if metrics is not None:
        regressions += _teacher_forced_regressions(metrics)

    compared_signed = False
    text_sha = hashlib.sha256(eval_text.encode()).hexdigest()
    if quality is not None and ppl is not None and math.isfinite(ppl):
        if text_sha == quality.eval_text_sha256 and t.get("eval_tokens") == quality.eval_tokens:
            compared_signed = True
            increase = (ppl / quality.ppl_reference - 1.0) * 100.0
            if increase > quality.max_ppl_increase_pct:
                regressions.append(
                    Regression(
                        "perplexity_vs_fp32",
                        f"target perplexity {ppl:.3f} is {increase:+.2f}% over the fp32 reference "
                        f"{quality.ppl_reference:.3f} (the signed gate allows "
                        f"{quality.max_ppl_increase_pct:g}%)",
                    )
                )
        else:
            warnings.append(
                "the eval text is not the one the signed quality report was measured on (or was cut): "
                "compared with this machine's run only"
            )
    if metrics is not None and metrics.limits.note:
        warnings.append(metrics.limits.note)

    golden_match, golden_regression = _golden(t, h, thresholds)
    if golden_regression is not None:
        regressions.append(golden_regression)
    details = {
        "target": {k: t.get(k) for k in ("machine", "python", "onnxruntime", "timings")},
        "host": {k: h.get(k) for k in ("machine", "python", "onnxruntime", "timings")},
        "golden": t.get("golden"),
        "eval_text_sha256": text_sha,
    }
    return Outcome(
        cpu=cpu,
        onnxruntime=str(t.get("onnxruntime")),
        host_onnxruntime=str(h.get("onnxruntime")),
        emulator=emulator,
        bundle=str(root),
        eval_tokens=t.get("eval_tokens"),
        perplexity=ppl,
        host_perplexity=host_ppl,
        ppl_drift_pct=drift,
        teacher_forced=metrics,
        golden_match=golden_match,
        signed_report_compared=compared_signed,
        regressions=regressions,
        warnings=warnings,
        thresholds=thresholds,
        target_seconds=target.seconds,
        host_seconds=host.seconds,
        details=details,
    )


# teacher_forced check -> this module's regression name
_REGRESSION_OF = {
    tf.FINITE: "perplexity_invalid",
    tf.KL_MEAN: "kl_divergence",
    tf.TOP_TOKEN_MATCH: "top_token_match",
    tf.PPL_RATIO: "perplexity_drift",
}


def _teacher_forced_regressions(m: TeacherForced) -> list[Regression]:
    return [Regression(_REGRESSION_OF[check], msg) for check, msg in m.failures.items()]


def _golden(t: dict[str, Any], h: dict[str, Any], thresholds: Thresholds) -> tuple[bool | None, Regression | None]:
    golden = t.get("golden")
    if golden is None:
        return None, None
    if golden["tokens"] == golden["expected"]:
        return True, None
    if not thresholds.check_golden:
        return False, None
    first = next(
        (i for i, (a, b) in enumerate(zip(golden["tokens"], golden["expected"], strict=False)) if a != b),
        min(len(golden["tokens"]), len(golden["expected"])),
    )
    host_golden = (h.get("golden") or {}).get("tokens")
    note = "" if host_golden == golden["expected"] else " (this machine does not reproduce it either)"
    return False, Regression(
        "golden",
        f"the golden check gives other tokens on the target from position {first}: the agent would refuse this "
        f"bundle on activation{note}",
    )


def verify_target(
    bundle_or_staging_dir: str | Path, cpu: str, text: str | Path | None = None, **kwargs: Any
) -> TargetVerification:
    """The export gate's entry point: run_verification(...) reduced to the signed report's record.

    Raises TargetRefusedError when the target cannot run the bundle at all; a quality regression is
    returned as ``passed=False`` with the reasons in ``message`` (the caller decides to fail the export).
    """
    return run_verification(bundle_or_staging_dir, cpu, text, **kwargs).verification
