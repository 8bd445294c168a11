"""Teacher-forced metrics (export/teacher_forced.py): the arithmetic, the band for short texts, and why they
replace free-running greedy agreement (a near-tie costs one position, not the rest of the sequence)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export import teacher_forced as tf
from export.gate import EvalSet, GateThresholds, ModelScore, judge

VOCAB = 64


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def text_model(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(targets [n], reference log-probs [n, VOCAB]): a peaked distribution per position, the text's next token
    drawn from it (a model that predicts its text reasonably)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, (n, VOCAB))
    logits[np.arange(n), rng.integers(0, VOCAB, n)] += 4.0
    logp = log_softmax(logits)
    probs = np.exp(logp.astype(np.float64))
    targets = np.array([rng.choice(VOCAB, p=row / row.sum()) for row in probs])
    return targets, logp


def perturbed(logp: np.ndarray, scale: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return log_softmax(logp.astype(np.float64) + rng.normal(0, scale, logp.shape))


def compare(targets: np.ndarray, ref: np.ndarray, cand: np.ndarray, limits: tf.Limits) -> tf.TeacherForced:
    cmp = tf.Comparison()
    for at in range(0, targets.shape[0], 50):  # chunked, as the engine streams it
        cmp.add(targets[at : at + 50], ref[at : at + 50], cand[at : at + 50])
    return cmp.result(limits, "fp32")


LIMITS = tf.Limits(max_kl_mean=0.02, min_top_token_match=0.9, max_ppl_change_pct=2.0)


def test_identical_models_score_zero_kl_full_match_ratio_one() -> None:
    targets, ref = text_model(300)
    m = compare(targets, ref, ref.copy(), LIMITS)
    assert m.passed and m.failures == {}
    assert m.kl_mean == pytest.approx(0.0, abs=1e-7) and m.top_token_match == 1.0 and m.ppl_ratio == 1.0
    assert m.tokens == 300 and m.reference == "fp32"


def test_metrics_match_their_definitions() -> None:
    targets, ref = text_model(200)
    cand = perturbed(ref, 0.3)
    m = compare(targets, ref, cand, tf.Limits(10.0, 0.0, 1000.0))
    p = np.exp(ref.astype(np.float64))
    kl = (p * (ref.astype(np.float64) - cand)).sum(-1)
    assert m.kl_mean == pytest.approx(kl.mean(), rel=1e-4)
    assert m.kl_p99 == pytest.approx(np.quantile(kl, 0.99), rel=1e-4)
    assert m.top_token_match == pytest.approx(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    rows = np.arange(200)
    ppl_r = math.exp(-ref[rows, targets].astype(np.float64).mean())
    ppl_c = math.exp(-cand[rows, targets].mean())
    assert m.ppl_reference == pytest.approx(ppl_r, rel=1e-4) and m.ppl_ratio == pytest.approx(ppl_c / ppl_r, rel=1e-4)


def test_a_near_tie_costs_one_position_not_the_rest_of_the_text() -> None:
    """A candidate that flips a near-tie at 1 position in 20 and is otherwise equal: free-running greedy would
    diverge at the first flip (agreement ~ the share of positions before it); teacher-forced it is 95%."""
    targets, ref = text_model(400)
    cand = ref.astype(np.float64).copy()
    for i in range(0, 400, 20):  # make the runner-up win by a hair at these positions
        order = np.argsort(cand[i])
        cand[i, order[-2]] = cand[i, order[-1]] + 1e-3
    cand = log_softmax(cand)
    m = compare(targets, ref, cand, LIMITS)
    assert m.top_token_match == pytest.approx(0.95)
    assert m.passed, m.failures


@pytest.mark.parametrize(
    ("scale", "failed"),
    [(0.05, set()), (3.0, {tf.KL_MEAN, tf.TOP_TOKEN_MATCH, tf.PPL_RATIO})],
)
def test_a_damaged_model_fails_every_check_a_good_one_none(scale: float, failed: set[str]) -> None:
    targets, ref = text_model(600)
    m = compare(targets, ref, perturbed(ref, scale), LIMITS)
    assert set(m.failures) == failed and m.passed is (not failed)
    for msg in m.failures.values():
        assert "600" in msg or "positions" in msg or "perplexity" in msg


def test_short_texts_get_a_wider_band_and_say_so() -> None:
    long_t, long_r = text_model(2000)
    long_c = perturbed(long_r, 0.25)
    long = compare(long_t, long_r, long_c, LIMITS)
    short = compare(long_t[:40], long_r[:40], long_c[:40], LIMITS)
    assert short.limits.kl_mean_limit > long.limits.kl_mean_limit >= LIMITS.max_kl_mean
    assert short.limits.top_token_match_limit < long.limits.top_token_match_limit <= LIMITS.min_top_token_match
    assert short.limits.ppl_change_limit_pct > long.limits.ppl_change_limit_pct >= LIMITS.max_ppl_change_pct
    assert short.limits.note and "40 tokens" in short.limits.note and "under 500" in short.limits.note
    # the binomial floor at the limit: p0 - z sqrt(p0 (1 - p0) / n)
    assert short.limits.top_token_match_limit == pytest.approx(0.9 - 2.33 * math.sqrt(0.09 / 40), abs=1e-6)
    assert long.limits.note is None


def test_the_drift_check_is_two_sided() -> None:
    targets, ref = text_model(800)
    better = log_softmax(ref.astype(np.float64) + 3.0 * np.eye(VOCAB)[targets])  # much lower perplexity
    one_sided = compare(targets, ref, better, tf.Limits(100.0, 0.0, 3.0))
    two_sided = compare(targets, ref, better, tf.Limits(100.0, 0.0, 3.0, ppl_two_sided=True))
    assert tf.PPL_RATIO not in one_sided.failures and one_sided.ppl_ratio < 0.9
    assert tf.PPL_RATIO in two_sided.failures and "±" in two_sided.failures[tf.PPL_RATIO]


def test_non_finite_log_probabilities_fail_and_stay_numbers() -> None:
    targets, ref = text_model(100)
    cand = ref.copy()
    cand[3, :] = np.nan
    m = compare(targets, ref, cand, LIMITS)
    assert tf.FINITE in m.failures and "1 of 100" in m.failures[tf.FINITE]
    assert math.isfinite(m.kl_mean) and math.isfinite(m.ppl_ratio)
    m.model_dump_json()  # the signed report stays valid JSON


def test_the_gate_judges_by_the_teacher_forced_metrics() -> None:
    targets, ref = text_model(300)
    chunks = [(targets[a : a + 128], ref[a : a + 128]) for a in range(0, 300, 128)]
    ppl_ref = math.exp(-ref[np.arange(300), targets].astype(np.float64).mean())
    reference = ModelScore(ppl_ref, 1.0, targets=targets, log_probs=ref)
    evalset = EvalSet(text="x", text_sha256="0" * 64, token_ids=list(range(301)), prompts=[[1]])
    for scale, passed in ((0.02, True), (2.0, False)):
        cand = perturbed(ref, scale)
        starts = range(0, 300, 128)
        cmp = tf.compare_chunks(chunks, [(t, cand[a : a + 128]) for (t, _), a in zip(chunks, starts, strict=True)])
        score = ModelScore(math.exp(-cand[np.arange(300), targets].astype(np.float64).mean()), 1.0, comparison=cmp)
        res = judge(reference, score, evalset, GateThresholds(), eval_tokens=301)
        assert res.passed is passed and res.report.passed is passed
        q = res.report
        assert q.teacher_forced is not None and q.teacher_forced.tokens == 300
        assert q.greedy_agreement == pytest.approx(q.teacher_forced.top_token_match, abs=1e-4)
        assert q.min_greedy_agreement == GateThresholds().min_top_token_match and q.greedy_prompts == 0
        assert (not res.messages) is passed
