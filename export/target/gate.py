"""`nanofleet export --verify-target CPU`: the target check as part of the export's quality gate.

Called by export/pipeline.py on the staged bundle (files in place, manifest not yet written): each CPU's
TargetVerification goes into the quality report that the manifest signs, and a passing onnxruntime
version joins ``runtime.verified_onnxruntime``. A regression or a refusal stops the export (nothing is
published): QualityGateError, exit 3, like the build-machine gate. The measurement lands in the results
cache (results.py), so a later `nanofleet verify-target` of the published bundle reuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from manifests import ArchConfig, GoldenCheck, GraphSpec, QualityReport, Recipe, Runtime, TargetVerification

from ..errors import ExportError, QualityGateError
from .errors import TargetError, TargetRefusedError
from .verify import verify_target


def verify_on_targets(
    stage: Path,
    cpus: Sequence[str],
    eval_text: Path | None,
    arch: ArchConfig,
    graph: GraphSpec,
    runtime: Runtime,
    recipe: Recipe,
    quality: QualityReport,
    golden: GoldenCheck | None,
    *,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[QualityReport, Runtime]:
    results: list[TargetVerification] = []
    for cpu in dict.fromkeys(cpus):  # each CPU once, in the order given
        try:
            tv = verify_target(
                stage, cpu, eval_text, arch=arch, graph=graph, runtime=runtime, recipe=recipe,
                quality=quality, golden=golden, threads=threads, progress=progress,
            )  # fmt: skip
        except TargetRefusedError as exc:
            raise QualityGateError(f"target verification on {cpu}: {exc.message}") from exc
        except TargetError as exc:
            raise ExportError(f"target verification on {cpu} could not run: {exc.message}") from exc
        if not tv.passed:
            raise QualityGateError(
                f"target verification failed on {cpu} (onnxruntime {tv.onnxruntime}): {tv.message}"
            )
        results.append(tv)
    verified = list(dict.fromkeys([*runtime.verified_onnxruntime, *(r.onnxruntime for r in results)]))
    return (
        quality.model_copy(update={"target_verifications": [*quality.target_verifications, *results]}),
        runtime.model_copy(update={"verified_onnxruntime": verified}),
    )
