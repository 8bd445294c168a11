"""Can this onnxruntime run this bundle? The check the agent and the engine make before loading a graph.

A bundle's manifest says what it needs (``runtime.min_onnxruntime``, ``runtime.operators``) and what it
was verified with (``runtime.verified_onnxruntime``). The local onnxruntime says what it has: its version and
the CPU kernels it registers. ``check_runtime_compat`` compares the two and refuses, naming every unmet need,
rather than letting onnxruntime fail later with an obscure "could not find an implementation" (or, worse,
load a graph whose kernels it lacks for one attribute value, such as 8-bit ``MatMulNBits`` before 1.23).

Stdlib + this package only: it runs on the boards and inside the emulated target userland.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ManifestError

if TYPE_CHECKING:
    from .bundle import BundleManifest, Recipe, Runtime

DEFAULT_DOMAIN = "ai.onnx"
# Resolved by onnxruntime at load without a kernel: Constant nodes become initializers.
NO_KERNEL_NEEDED = frozenset({"ai.onnx:Constant"})
_OPS_TABLE = Path(__file__).with_name("onnxruntime_ops.json")


class RuntimeIncompatibleError(ManifestError):
    """The local onnxruntime cannot run this bundle (too old, or lacks a kernel the graph uses)."""

    reason = "runtime_incompatible"

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class FeatureNeed:
    """A need the operator list cannot express: an op whose kernel exists but not for some attribute."""

    operator: str
    min_version: str
    why: str


@dataclass
class CompatReport:
    onnxruntime: str
    ops_source: str  # "runtime" (listed by onnxruntime itself), "table:<version>" or "none"
    warnings: list[str] = field(default_factory=list)


def parse_version(version: str) -> tuple[int, ...]:
    """'1.26.0' -> (1, 26, 0); '1.22.0.dev20250101' -> (1, 22, 0); '1.26' -> (1, 26)."""
    parts: list[int] = []
    for piece in version.strip().split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"not a version: {version!r}")
    return tuple(parts)


def version_at_least(version: str, minimum: str) -> bool:
    have, need = parse_version(version), parse_version(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def normalize_op(op: str) -> str:
    """'MatMul' / ':MatMul' / 'onnx:MatMul' -> 'ai.onnx:MatMul'; 'com.microsoft:X' unchanged."""
    domain, sep, name = op.rpartition(":")
    if not sep:
        return f"{DEFAULT_DOMAIN}:{op}"
    if domain in ("", "onnx", DEFAULT_DOMAIN):
        domain = DEFAULT_DOMAIN
    return f"{domain}:{name}"


def feature_needs(recipe: Recipe | None, operators: Iterable[str]) -> list[FeatureNeed]:
    """Needs beyond 'the op exists', from what the recipe says about how the ops are used."""
    ops = {normalize_op(o) for o in operators}
    needs: list[FeatureNeed] = []
    if (
        recipe is not None
        and "com.microsoft:MatMulNBits" in ops
        and recipe.bits is not None
        and recipe.bits != 4
    ):
        # Measured on aarch64 under qemu (docs/target-verification.md): 1.22.0 registers MatMulNBits but
        # fails bits=8 at run time; 1.23.2, 1.24.4, 1.25.1 and 1.26.0 run it with the same results.
        needs.append(
            FeatureNeed(
                "com.microsoft:MatMulNBits",
                "1.23",
                f"{recipe.bits}-bit MatMulNBits kernels (onnxruntime 1.22 implements only 4-bit)",
            )
        )
    return needs


def local_onnxruntime() -> tuple[str, frozenset[str] | None]:
    """The installed onnxruntime's version and the operators it can run ('domain:OpType'): its CPU
    kernels, plus the default-domain ops whose schema it knows (it expands ONNX function ops such as
    newer-opset compositions without a kernel of their own). None when it cannot list them (minimal
    builds). Imports onnxruntime lazily."""
    import onnxruntime as ort

    try:
        from onnxruntime.capi import _pybind_state as capi

        kernels = capi.get_all_opkernel_def()
    except (ImportError, AttributeError, RuntimeError):
        return ort.__version__, None
    ops = {normalize_op(f"{k.domain}:{k.op_name}") for k in kernels if k.provider == "CPUExecutionProvider"}
    try:
        schemas = capi.get_all_operator_schema()
    except (AttributeError, RuntimeError):
        schemas = []
    ops |= {normalize_op(f":{sc.name}") for sc in schemas if sc.domain in ("", DEFAULT_DOMAIN)}
    return ort.__version__, frozenset(ops)


def table_ops(ort_version: str) -> tuple[str, frozenset[str]] | None:
    """Measured kernel lists: the newest measured version not newer than ``ort_version`` (a conservative
    stand-in: ops only get added). None when ``ort_version`` predates every measurement."""
    data = json.loads(_OPS_TABLE.read_text())
    best: str | None = None
    for v in data["versions"]:
        if version_at_least(ort_version, v) and (best is None or version_at_least(v, best)):
            best = v
    if best is None:
        return None
    return best, frozenset(normalize_op(o) for o in data["versions"][best])


def check_runtime_compat(
    manifest: BundleManifest | Runtime,
    ort_version: str,
    available_ops: Iterable[str] | None = None,
    *,
    recipe: Recipe | None = None,
) -> CompatReport:
    """Refuse (RuntimeIncompatibleError listing every problem) a bundle this onnxruntime cannot run.

    ``manifest``: a BundleManifest, or just its ``runtime`` section (then pass ``recipe`` for the
    feature checks). ``available_ops``: the local CPU kernels ('domain:OpType'), e.g. from
    ``local_onnxruntime()``; None falls back to the measured table in onnxruntime_ops.json.
    Returns warnings that do not refuse (e.g. a version the bundle was not verified with).
    """
    runtime = getattr(manifest, "runtime", manifest)
    recipe = recipe if recipe is not None else getattr(manifest, "recipe", None)
    problems: list[str] = []
    try:
        parse_version(ort_version)
    except ValueError as exc:
        raise RuntimeIncompatibleError(
            f"cannot read the local onnxruntime version: {exc}", [str(exc)]
        ) from exc

    if runtime.min_onnxruntime and not version_at_least(ort_version, runtime.min_onnxruntime):
        problems.append(f"needs onnxruntime >= {runtime.min_onnxruntime}, this runtime is {ort_version}")

    report = CompatReport(onnxruntime=ort_version, ops_source="runtime")
    if available_ops is not None:
        have: frozenset[str] | None = frozenset(normalize_op(o) for o in available_ops)
    else:
        measured = table_ops(ort_version)
        if measured is None:
            have = None
            report.ops_source = "none"
            report.warnings.append(
                f"onnxruntime {ort_version} cannot list its kernels and predates the measured table: "
                "operators not checked"
            )
        else:
            report.ops_source = f"table:{measured[0]}"
            have = measured[1]
    needed = sorted({normalize_op(o) for o in runtime.operators})
    if have is not None:
        have = have | NO_KERNEL_NEEDED
        missing = [op for op in needed if op not in have]
        if report.ops_source.startswith("table:"):
            # The table lists kernels only: a default-domain op may still run as an expanded function.
            unsure = [op for op in missing if op.startswith(DEFAULT_DOMAIN + ":")]
            if unsure:
                report.warnings.append(
                    f"not in the measured kernel table (may be function ops): {', '.join(unsure)}"
                )
            missing = [op for op in missing if op not in unsure]
        if missing:
            problems.append(
                f"onnxruntime {ort_version} has no CPU kernel for {len(missing)} operator(s) the graph uses: "
                + ", ".join(missing)
            )

    for need in feature_needs(recipe, needed):
        if not version_at_least(ort_version, need.min_version):
            problems.append(f"{need.operator}: needs onnxruntime >= {need.min_version} for {need.why}")

    if problems:
        what = getattr(manifest, "ref", "bundle")
        raise RuntimeIncompatibleError(
            f"{what} cannot run on onnxruntime {ort_version}: " + "; ".join(problems), problems
        )
    verified = list(runtime.verified_onnxruntime)
    if verified and not any(_same_release(ort_version, v) for v in verified):
        report.warnings.append(
            f"onnxruntime {ort_version} is not among the versions this bundle was verified with "
            f"({', '.join(verified)})"
        )
    return report


def _same_release(version: str, listed: str) -> bool:
    """'1.26.0' matches '1.26.0' and '1.26' (a listed major.minor covers its patch releases)."""
    have, want = parse_version(version), parse_version(listed)
    return have[: len(want)] == want


def check_local_runtime(manifest: BundleManifest) -> CompatReport:
    """check_runtime_compat against the onnxruntime installed here (for the agent and the engine)."""
    version, ops = local_onnxruntime()
    return check_runtime_compat(manifest, version, ops)
