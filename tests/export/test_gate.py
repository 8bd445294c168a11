"""The quality gate: unit tests of its arithmetic, and the real default model failing with dynamic INT8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.gate import EvalSet, GateThresholds, ModelScore, agreement, judge, robust_golden
from tests.export.conftest import run_cli


def _evalset() -> EvalSet:
    return EvalSet(text="x", text_sha256="0" * 64, token_ids=list(range(100)), prompts=[[1], [2]])


def test_agreement_is_positionwise() -> None:
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == 1.0
    assert agreement([[1, 2], [3, 4]], [[0, 0], [0, 0]]) == 0.0


@pytest.mark.parametrize(
    ("ppl", "greedy", "passed", "words"),
    [
        (10.15, [[1, 2], [3, 4]], True, []),
        (10.5, [[1, 2], [3, 4]], False, ["perplexity rose +5.00%", "limit of 2.00%"]),
        (10.1, [[9, 9], [9, 9]], False, ["greedy agreement 0.0%", "minimum of 50.0%"]),
    ],
)
def test_judge_thresholds(ppl: float, greedy, passed: bool, words: list[str]) -> None:
    ref = ModelScore(10.0, [[1, 2], [3, 4]], 1.0)
    res = judge(ref, ModelScore(ppl, greedy, 1.0), _evalset(), GateThresholds(), eval_tokens=100)
    assert res.passed is passed and res.report.passed is passed
    text = " ".join(res.messages)
    for w in words:
        assert w in text


def test_thresholds_are_configurable() -> None:
    ref = ModelScore(10.0, [[1, 2]], 1.0)
    loose = judge(ref, ModelScore(12.0, [[1, 2]], 1.0), _evalset(), GateThresholds(25.0, 0.5), eval_tokens=100)
    assert loose.passed and loose.report.max_ppl_increase_pct == 25.0


@pytest.mark.parametrize(
    ("margins", "expected"),
    [
        # every token of the first prompt is clear: it is kept whole
        ([[3.0] * 16, [5.0] * 16], (0, 16, 3.0)),
        # the first prompt hits a near-tie at token 4; the second is clear for 10: the longest clear prefix
        ([[3.0, 2.0, 4.0, 1.5, 0.2, 9.0], [2.0] * 10 + [0.1], [1.2] * 3], (1, 10, 2.0)),
        # the golden check stops BEFORE the first near-tie, even when later tokens are clear again
        ([[4.0, 4.0, 0.3, 4.0, 4.0]], (0, 2, 4.0)),
        # equal prefixes: the earlier prompt
        ([[2.0, 0.1], [2.0, 0.1]], (0, 1, 2.0)),
        # every prompt opens on a near-tie: one token, exact match as before
        ([[0.2, 5.0], [0.1]], (0, 1, 0.2)),
    ],
)
def test_robust_golden_keeps_only_tokens_clear_of_near_ties(margins, expected) -> None:  # noqa: ANN001
    assert robust_golden(margins, 1.0, 8) == expected


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_dynamic_int8_fails_the_gate_and_publishes_nothing(tmp_path: Path, session_key) -> None:
    priv, _ = session_key
    out = tmp_path / "dyn"
    proc = run_cli(
        ["export", "--recipe", "dynamic-int8", "--key", str(priv), "--out", str(out), "--json"], timeout=2300
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["reason"] == "quality_gate" and "quality gate failed" in doc["error"]
    assert "dynamic-int8" in doc["error"] and "perplexity rose" in doc["error"]
    assert not out.exists()
    report = json.loads(Path(doc["report"]).read_text())
    assert report["report"]["passed"] is False
    assert report["report"]["ppl_increase_pct"] > 20  # FACTS.md: about +120%
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn.quality_report.json"]  # no temp folders left
