"""Verify a bundle on the boards' CPU: run the device engine under qemu-aarch64 and compare it with the build.

One run of ``_remote.py`` under emulation (the board: aarch64 onnxruntime, -cpu cortex-a76 etc.) and one on
this machine (the build's onnxruntime), on the same eval text and golden prompts, then:

=====================  =========================================================================
regression             when
=====================  =========================================================================
tokenizer              the target tokenizes the text or a prompt differently from the build
perplexity_invalid     the target's perplexity is NaN/inf
perplexity_drift       target perplexity differs from the build's by more than ``max_ppl_drift_pct``
perplexity_vs_fp32     (eval text = the signed report's) target perplexity over fp32's by more than
                       the report's ``max_ppl_increase_pct``
greedy_agreement       position-wise greedy agreement with the build below ``min_agreement``
golden                 the manifest's golden check (what the agent runs on activation) gives other
                       tokens on the target
=====================  =========================================================================

A bundle the target cannot run at all (runtime incompatibility, bad signature) raises TargetRefusedError.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests import (
    ArchConfig,
    BundleManifest,
    GoldenCheck,
    GraphSpec,
    ManifestError,
    QualityReport,
    Recipe,
    Runtime,
    TargetVerification,
    read_manifest_unverified,
)

from .errors import BadInputError, TargetRefusedError
from .runner import RemoteResult, check_cpu, prepare_target, run_on_host, run_on_target
from .wheels import host_onnxruntime_version

EVAL_DIR = Path(__file__).resolve().parents[1] / "eval_text"
DEFAULT_TEXT = EVAL_DIR / "default.txt"
DEFAULT_PROMPTS = EVAL_DIR / "greedy_prompts.json"
# Same weights, other kernels: FACTS.md measured +0.9% (MatMulNBits 8-bit, x86 1.32 vs aarch64 1.26) and
# +4.6% (dynamic INT8); a broken kernel path is off by orders of magnitude.
DEFAULT_MAX_PPL_DRIFT_PCT = 3.0
# Greedy decoding flips for good at the first near-tie, so even equal weights on other kernels lose whole
# tails: measured 0.76 for the default INT8 bundle, Cortex-A76 vs x86 (one prompt differs from its first
# token). A broken kernel path agrees on almost none. Same floor as the export gate's.
DEFAULT_MIN_AGREEMENT = 0.6
DEFAULT_NEW_TOKENS = 16


@dataclass(frozen=True)
class Thresholds:
    max_ppl_drift_pct: float = DEFAULT_MAX_PPL_DRIFT_PCT
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    check_golden: bool = True


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
    greedy_agreement: float
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
        return TargetVerification(
            cpu=self.cpu,
            onnxruntime=self.onnxruntime,
            perplexity=self.perplexity if self.perplexity is not None else float("nan"),
            greedy_agreement=self.greedy_agreement,
            passed=self.passed,
            eval_tokens=self.eval_tokens,
            message=msg,
        )

    def to_dict(self) -> dict[str, Any]:
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
            "greedy_agreement": self.greedy_agreement,
            "golden_match": self.golden_match,
            "signed_report_compared": self.signed_report_compared,
            "regressions": [{"name": r.name, "message": r.message} for r in self.regressions],
            "warnings": self.warnings,
            "thresholds": {
                "max_ppl_drift_pct": self.thresholds.max_ppl_drift_pct,
                "min_agreement": self.thresholds.min_agreement,
                "check_golden": self.thresholds.check_golden,
            },
            "seconds": {"target": round(self.target_seconds, 1), "host": round(self.host_seconds, 1)},
            "verification": self.verification.model_dump(mode="json"),
            **self.details,
        }


def agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> float:
    """Fraction of greedy tokens equal to the reference's at the same position, over all prompts."""
    total = sum(len(r) for r in reference)
    same = sum(
        int(a == b) for r, c in zip(reference, candidate, strict=False) for a, b in zip(r, c, strict=False)
    )
    return same / total if total else 1.0


def load_prompts(path: Path | None, limit: int | None) -> list[str]:
    path = path or DEFAULT_PROMPTS
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read the prompts file {path}: {exc}") from exc
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
        raise BadInputError(f"{path} must be a JSON list of non-empty strings")
    return prompts[:limit] if limit is not None else prompts


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
    prompts: Sequence[str] | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
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
    progress: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Verify ``bundle_dir`` (a bundle, or an export staging folder with ``arch`` and ``graph``) on ``cpu``.

    ``text``: the eval text (str), a file (Path), or None for the export gate's default text.
    ``onnxruntime``: the version the boards run (default: this machine's, the build's version).
    ``trusted_keys``: public keys; when given, the signature and every file are checked on the target.
    ``arch``/``graph``/``runtime``/``recipe``/``quality``/``golden``: for a staging folder (no manifest yet),
    what the manifest will say; ignored when the folder has a manifest.
    """
    check_cpu(cpu)
    thresholds = thresholds or Thresholds()
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder")
    manifest: BundleManifest | None = None
    if (root / "manifest.yaml").is_file():
        try:
            manifest = read_manifest_unverified(root)
        except ManifestError as exc:
            raise TargetRefusedError(f"cannot read {root}/manifest.yaml: {exc}", reason=exc.reason) from exc
    elif arch is None or graph is None:
        raise BadInputError(f"{root} has no manifest.yaml: pass arch and graph to verify a staging folder")
    if new_tokens < 1:
        raise BadInputError("new_tokens must be at least 1")
    eval_text = load_text(text)
    prompt_list = list(prompts) if prompts is not None else load_prompts(None, None)
    ort_version = onnxruntime or host_onnxruntime_version()

    job: dict[str, Any] = {
        "mode": "verify",
        "dir": str(root),
        "text": eval_text,
        "max_text_tokens": max_text_tokens,
        "prompts": prompt_list,
        "new_tokens": new_tokens,
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
    progress(f"running the bundle on emulated {cpu} (onnxruntime {ort_version} aarch64, qemu "
             f"{target_env.emulator.version_text}); emulation is slow: minutes for a long text")  # fmt: skip
    target = run_on_target(target_env, job, timeout)
    if not target.data.get("ok"):
        if target.data.get("reason") == "crash":
            from .errors import RemoteRunError

            raise RemoteRunError(
                f"the emulated run crashed: {target.data.get('error')}", str(target.data.get("traceback", ""))
            )
        raise _refusal(f"the emulated {cpu} (onnxruntime {ort_version})", target.data)
    progress("running the same program on this machine (the build's reference)")
    host = run_on_host({**job, "trusted_keys": None}, timeout)
    if not host.data.get("ok"):
        raise _refusal("this (build) machine", host.data)
    signed_quality = manifest.quality if manifest is not None else quality
    return compare(
        root, signed_quality, cpu, target_env.emulator.version_text, eval_text, target, host, thresholds
    )


def compare(
    root: Path,
    quality: QualityReport | None,
    cpu: str,
    emulator: str,
    eval_text: str,
    target: RemoteResult,
    host: RemoteResult,
    thresholds: Thresholds,
) -> Outcome:
    t, h = target.data, host.data
    regressions: list[Regression] = []
    warnings = list(t.get("warnings") or [])

    if t.get("text_ids_sha256") != h.get("text_ids_sha256"):
        regressions.append(Regression("tokenizer", "the target tokenizes the eval text differently"))
    for tp, hp in zip(t.get("prompts", []), h.get("prompts", []), strict=False):
        if tp["prompt_ids_sha256"] != hp["prompt_ids_sha256"]:
            regressions.append(
                Regression("tokenizer", f"the target tokenizes the prompt {tp['prompt']!r} differently")
            )

    ppl, host_ppl = t.get("perplexity"), h.get("perplexity")
    drift: float | None = None
    if ppl is not None and host_ppl is not None:
        if not (math.isfinite(ppl) and ppl > 0):
            regressions.append(Regression("perplexity_invalid", f"target perplexity is {ppl}"))
        else:
            drift = (ppl / host_ppl - 1.0) * 100.0
            if abs(drift) > thresholds.max_ppl_drift_pct:
                regressions.append(
                    Regression(
                        "perplexity_drift",
                        f"target perplexity {ppl:.3f} vs build {host_ppl:.3f} ({drift:+.2f}%, limit "
                        f"±{thresholds.max_ppl_drift_pct:g}%)",
                    )
                )

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

    host_tokens = [p["tokens"] for p in h.get("prompts", [])]
    target_tokens = [p["tokens"] for p in t.get("prompts", [])]
    agree = agreement(host_tokens, target_tokens)
    if agree < thresholds.min_agreement:
        regressions.append(
            Regression(
                "greedy_agreement",
                f"greedy tokens agree with the build on {agree:.1%} of positions (minimum "
                f"{thresholds.min_agreement:.0%})",
            )
        )

    golden_match: bool | None = None
    golden = t.get("golden")
    if golden is not None:
        golden_match = golden["tokens"] == golden["expected"]
        if not golden_match and thresholds.check_golden:
            first = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(golden["tokens"], golden["expected"], strict=False))
                    if a != b
                ),
                min(len(golden["tokens"]), len(golden["expected"])),
            )
            host_golden = (h.get("golden") or {}).get("tokens")
            note = "" if host_golden == golden["expected"] else " (this machine does not reproduce it either)"
            regressions.append(
                Regression(
                    "golden",
                    f"the golden check gives other tokens on the target from position {first}: the agent "
                    f"would refuse this bundle on activation{note}",
                )
            )

    details = {
        "target": {k: t.get(k) for k in ("machine", "python", "onnxruntime", "timings")},
        "host": {k: h.get(k) for k in ("machine", "python", "onnxruntime", "timings")},
        "prompts": [
            {
                "prompt": tp["prompt"],
                "first_difference": next(
                    (i for i, (a, b) in enumerate(zip(tp["tokens"], hp["tokens"], strict=False)) if a != b),
                    None,
                ),
                "target": tp["tokens"],
                "host": hp["tokens"],
            }
            for tp, hp in zip(t.get("prompts", []), h.get("prompts", []), strict=False)
        ],
        "golden": golden,
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
        greedy_agreement=agree,
        golden_match=golden_match,
        signed_report_compared=compared_signed,
        regressions=regressions,
        warnings=warnings,
        thresholds=thresholds,
        target_seconds=target.seconds,
        host_seconds=host.seconds,
        details=details,
    )


def verify_target(
    bundle_or_staging_dir: str | Path, cpu: str, text: str | Path | None = None, **kwargs: Any
) -> TargetVerification:
    """The export gate's entry point: run_verification(...) reduced to the signed report's record.

    Raises TargetRefusedError when the target cannot run the bundle at all; a quality regression is
    returned as ``passed=False`` with the reasons in ``message`` (the caller decides to fail the export).
    """
    return run_verification(bundle_or_staging_dir, cpu, text, **kwargs).verification
