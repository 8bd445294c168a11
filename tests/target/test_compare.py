"""The comparison rules of verify-target, on hand-made run results (no emulation): each regression is
named, and a clean run passes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from export.target.runner import RemoteResult
from export.target.verify import Thresholds, agreement, compare
from manifests import QualityReport

TEXT = "some eval text"
SHA = hashlib.sha256(TEXT.encode()).hexdigest()


def run(ppl: float = 20.0, tokens: list[list[int]] | None = None, **over: Any) -> RemoteResult:
    tokens = tokens if tokens is not None else [[1, 2, 3, 4], [5, 6, 7, 8]]
    data: dict[str, Any] = {
        "ok": True,
        "onnxruntime": "1.32.0",
        "machine": "aarch64",
        "perplexity": ppl,
        "eval_tokens": 40,
        "text_ids_sha256": "t",
        "prompts": [
            {"prompt": f"p{i}", "prompt_ids_sha256": f"p{i}", "tokens": t} for i, t in enumerate(tokens)
        ],
        "golden": {"expected": [1, 2, 3, 4], "tokens": [1, 2, 3, 4]},
        "warnings": [],
    }
    data.update(over)
    return RemoteResult(data, 1.0, "")


def quality(ppl_reference: float = 19.8, eval_tokens: int = 40, sha: str = SHA) -> QualityReport:
    return QualityReport(
        eval_text_sha256=sha, eval_tokens=eval_tokens, ppl_reference=ppl_reference, ppl_quantized=20.0,
        ppl_increase_pct=1.0, greedy_agreement=0.8, greedy_prompts=2, greedy_tokens_per_prompt=4,
        max_ppl_increase_pct=2.0, min_greedy_agreement=0.6, passed=True, onnxruntime="1.32.0",
    )  # fmt: skip


def names(
    target: RemoteResult, host: RemoteResult | None = None, q: QualityReport | None = None
) -> list[str]:
    out = compare(Path("/b"), q, "cortex-a76", "10.0.13", TEXT, target, host or run(), Thresholds())
    assert out.passed == (not out.regressions)
    assert out.verification.passed == out.passed
    return [r.name for r in out.regressions]


def test_identical_runs_pass_and_compare_with_the_signed_report() -> None:
    out = compare(Path("/b"), quality(), "cortex-a76", "10.0.13", TEXT, run(), run(), Thresholds())
    assert out.passed and out.signed_report_compared and out.greedy_agreement == 1.0
    assert out.ppl_drift_pct == 0.0 and out.golden_match is True
    assert out.verification.cpu == "cortex-a76" and out.verification.perplexity == 20.0


def test_each_regression_is_named() -> None:
    assert names(run(text_ids_sha256="other")) == ["tokenizer"]
    assert names(run(ppl=float("nan"))) == ["perplexity_invalid"]
    assert names(run(ppl=20.7)) == ["perplexity_drift"]  # +3.5% > 3%
    assert names(run(ppl=19.5)) == []  # -2.5%: within the drift limit
    assert names(run(ppl=20.5), run(ppl=20.5), quality(ppl_reference=19.8)) == ["perplexity_vs_fp32"]  # +3.5%
    assert names(run(tokens=[[1, 2, 9, 9], [5, 6, 9, 9]])) == ["greedy_agreement"]  # 50%
    assert names(run(golden={"expected": [1, 2, 3, 4], "tokens": [1, 2, 3, 5]})) == ["golden"]


def test_another_text_is_compared_with_the_build_only() -> None:
    out = compare(
        Path("/b"), quality(sha="0" * 64), "cortex-a76", "q", TEXT, run(ppl=20.5), run(ppl=20.5), Thresholds()
    )
    assert out.passed and not out.signed_report_compared
    assert any("not the one the signed quality report" in w for w in out.warnings)


def test_golden_can_be_waived_and_agreement_counts_positions() -> None:
    bad_golden = run(golden={"expected": [1, 2, 3, 4], "tokens": [9, 9, 9, 9]})
    out = compare(
        Path("/b"), None, "cortex-a76", "q", TEXT, bad_golden, run(), Thresholds(check_golden=False)
    )
    assert out.passed and out.golden_match is False
    assert agreement([[1, 2, 3, 4]], [[1, 2, 0, 4]]) == pytest.approx(0.75)
    assert agreement([], []) == 1.0
