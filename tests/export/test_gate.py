"""The quality gate: its defaults, the golden-check choice, and the real default model failing with dynamic INT8
(the metrics' arithmetic: test_teacher_forced.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.gate import PRECISION_DEFAULTS, GateThresholds, robust_golden
from tests.export.conftest import run_cli


def test_precision_defaults_are_teacher_forced_limits() -> None:
    int8, int4 = PRECISION_DEFAULTS["int8"], PRECISION_DEFAULTS["int4"]
    assert int8 == GateThresholds()
    assert int4.max_kl_mean > int8.max_kl_mean and int4.min_top_token_match < int8.min_top_token_match
    assert int4.max_ppl_increase_pct > int8.max_ppl_increase_pct
    limits = int8.limits()
    assert (limits.max_kl_mean, limits.min_top_token_match, limits.max_ppl_change_pct) == (
        int8.max_kl_mean, int8.min_top_token_match, int8.max_ppl_increase_pct,
    )  # fmt: skip
    assert not limits.ppl_two_sided  # vs fp32 only an increase counts


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
    tf = report["report"]["teacher_forced"]
    assert tf["kl_mean"] > 0.1 and set(tf["failures"]) >= {"kl_mean", "ppl_ratio"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn.quality_report.json"]  # no temp folders left
