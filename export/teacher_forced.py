"""Teacher-forced quality metrics: a candidate model's next-token distributions against a reference's.

Both models read the same text and, at every position, predict the next token from the text's OWN prefix
(teacher forcing). Per position ``i`` with reference log-probabilities ``r`` and candidate ``c``:

    kl_i    = Σ_v exp(r_v) (r_v - c_v)      KL(reference || candidate), nats (llama.cpp's "KLD")
    same_i  = argmax r == argmax c          "same top token"
    d_i     = r[t_i] - c[t_i]               the per-token log perplexity ratio (t_i: the text's next token)

and the text's figures are their means: ``kl_mean``, ``top_token_match``, ``ppl_ratio = exp(mean d)``.
Free-running greedy agreement, which these replace, diverges for good at the first near-tie; here a
near-tie costs one position.

The band. Each mean is an estimate from ``n`` positions, so a short text could refuse a good model by bad
luck. The verdict refuses only when the estimate is beyond the limit by more than ``z`` standard errors
(a one-sided test at the limit; ``z`` = 2.33 refuses a model exactly at the limit 1% of the time):

    kl_mean            ≤ max_kl + z · sd(kl_i) / √n
    top_token_match    ≥ min_top − z · √(min_top (1 − min_top) / n)        (binomial at the floor)
    mean d             ≤ log(1 + max_ppl%) + z · sd(d_i) / √n             (|mean d| when two-sided)

Measured on the default model's 522-position eval text (int8): the KL limit widens by 0.0003 nats (its
per-token spread is small), the same-top-token floor by 3.1 points, the perplexity limit from +2% to +2.9%;
on 40 tokens those become about 0.001, 11 points and +5%. Under 500 positions the limits record says the
text was short (``TeacherForcedLimits.note``). Positions of one text are not independent; measured with
batch means over blocks of 16 tokens, the true standard errors are about 1.0-1.2x the independent ones
used here, so the band is if anything slightly narrow (strict).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from manifests import TeacherForced, TeacherForcedLimits

# One-sided 1%: a model exactly at a limit is refused once in a hundred texts.
DEFAULT_Z = 2.33
# Under this many positions the limits record says the text was short (the gate's eval text has 522).
SHARP_TOKENS = 500


@dataclass(frozen=True)
class Limits:
    """Nominal limits of one comparison (before the band)."""

    max_kl_mean: float
    min_top_token_match: float
    max_ppl_change_pct: float
    ppl_two_sided: bool = False  # target vs build: a perplexity drop is as suspicious as a rise
    z: float = DEFAULT_Z


# Check names (TeacherForced.failures keys), stable for scripts and the dashboard.
KL_MEAN, TOP_TOKEN_MATCH, PPL_RATIO, FINITE = "kl_mean", "top_token_match", "ppl_ratio", "finite"
# A non-finite candidate log-probability (a broken kernel's NaN) counts as this: far beyond any limit, yet
# the means stay numbers.
FLOOR_LOGP = -1e4


class Comparison:
    """Accumulates per-position terms chunk by chunk (no model's full logits need to stay in memory)."""

    def __init__(self) -> None:
        self._kl: list[np.ndarray] = []
        self._same: list[np.ndarray] = []
        self._nll_ref: list[np.ndarray] = []
        self._nll_cand: list[np.ndarray] = []
        self.nonfinite_positions = 0

    def add(self, targets: np.ndarray, ref_logp: np.ndarray, cand_logp: np.ndarray) -> None:
        """``targets`` [c] int, ``ref_logp``/``cand_logp`` [c, vocab] log-softmax rows for those positions."""
        if ref_logp.shape != cand_logp.shape or ref_logp.shape[0] != targets.shape[0]:
            raise ValueError(f"shape mismatch: {ref_logp.shape} vs {cand_logp.shape} for {targets.shape[0]} targets")
        r = ref_logp.astype(np.float64)  # [c, vocab]
        c = cand_logp.astype(np.float64)
        bad = ~np.isfinite(c)
        if bad.any():
            self.nonfinite_positions += int(bad.any(axis=-1).sum())
            c[bad] = FLOOR_LOGP
        kl = np.sum(np.exp(r) * (r - c), axis=-1)  # [c]
        self._kl.append(np.maximum(kl, 0.0))  # rounding can give -1e-9 for identical rows
        self._same.append(np.argmax(r, axis=-1) == np.argmax(c, axis=-1))
        rows = np.arange(targets.shape[0])
        self._nll_ref.append(-r[rows, targets])
        self._nll_cand.append(-c[rows, targets])

    @property
    def tokens(self) -> int:
        return int(sum(a.shape[0] for a in self._kl))

    def terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The per-position terms so far ([n] each: kl, same, nll_ref, nll_cand), what ``judge`` takes: a few
        numbers per position, so a comparison can be stored and judged again under other limits."""
        if not self.tokens:
            raise ValueError("no positions were compared")
        return (np.concatenate(self._kl), np.concatenate(self._same), np.concatenate(self._nll_ref),
                np.concatenate(self._nll_cand))  # fmt: skip

    def result(self, limits: Limits, reference: str) -> TeacherForced:
        kl, same, nll_r, nll_c = self.terms()
        return judge(kl, same, nll_r, nll_c, limits, reference, self.nonfinite_positions)


def compare_chunks(
    reference: Iterable[tuple[np.ndarray, np.ndarray]], candidate: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Comparison:
    """Two ``Engine.log_probs`` streams over the same ids (same chunking) -> their comparison."""
    cmp = Comparison()
    for (t_ref, r), (t_cand, c) in zip(reference, candidate, strict=True):
        if not np.array_equal(t_ref, t_cand):
            raise ValueError("the two streams score different tokens")
        cmp.add(t_ref, r, c)
    return cmp


def _se(values: np.ndarray) -> float:
    n = values.shape[0]
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def band(limits: Limits, n: int, kl_se: float, log_ratio_se: float) -> TeacherForcedLimits:
    """The limits applied to ``n`` positions (module doc), with a note when the text is short enough to matter."""
    z = limits.z
    kl_limit = limits.max_kl_mean + z * kl_se
    p0 = limits.min_top_token_match
    top_limit = max(0.0, p0 - z * math.sqrt(p0 * (1.0 - p0) / n))
    log_limit = math.log1p(limits.max_ppl_change_pct / 100.0) + z * log_ratio_se
    ppl_limit_pct = math.expm1(log_limit) * 100.0
    note = None
    if n < SHARP_TOKENS:
        widened = [f"KL {limits.max_kl_mean:g} → {kl_limit:.4g}"]
        if p0 > 0:
            widened.append(f"same top token {p0:.1%} → {top_limit:.1%}")
        widened.append(
            f"perplexity {'±' if limits.ppl_two_sided else '+'}{limits.max_ppl_change_pct:g}% → {ppl_limit_pct:.2f}%"
        )
        note = (
            f"short text ({n} tokens, under {SHARP_TOKENS}): each limit widened by {z:g} standard errors of its "
            f"estimate ({', '.join(widened)}); a longer text gives a sharper verdict"
        )
    return TeacherForcedLimits(
        max_kl_mean=limits.max_kl_mean,
        min_top_token_match=p0,
        max_ppl_change_pct=limits.max_ppl_change_pct,
        ppl_two_sided=limits.ppl_two_sided,
        z=z,
        kl_mean_limit=round(kl_limit, 6),
        top_token_match_limit=round(top_limit, 6),
        ppl_change_limit_pct=round(ppl_limit_pct, 4),
        note=note,
    )


def judge(
    kl: np.ndarray,
    same: np.ndarray,
    nll_ref: np.ndarray,
    nll_cand: np.ndarray,
    limits: Limits,
    reference: str,
    nonfinite_positions: int = 0,
) -> TeacherForced:
    """Per-position terms ([n] each) -> the metrics, the limits at this ``n`` and the verdict."""
    n = int(kl.shape[0])
    d = nll_cand - nll_ref  # [n] per-token log perplexity ratio
    kl_mean, kl_se = float(kl.mean()), _se(kl)
    log_ratio, log_se = float(d.mean()), _se(d)
    top = float(same.mean())
    applied = band(limits, n, kl_se, log_se)
    ratio = math.exp(log_ratio)
    change_pct = (ratio - 1.0) * 100.0
    failures: dict[str, str] = {}
    if nonfinite_positions:
        failures[FINITE] = f"the candidate's log-probabilities are not finite at {nonfinite_positions} of {n} positions"
    if kl_mean > applied.kl_mean_limit:
        failures[KL_MEAN] = (
            f"mean KL divergence to the {reference} {kl_mean:.4f} is over the limit of {applied.kl_mean_limit:.4f}"
            f" ({n} tokens)"
        )
    if top < applied.top_token_match_limit:
        failures[TOP_TOKEN_MATCH] = (
            f"same top token as the {reference} on {top:.1%} of {n} positions, under the floor of "
            f"{applied.top_token_match_limit:.1%}"
        )
    log_limit = math.log1p(applied.ppl_change_limit_pct / 100.0)
    off = abs(log_ratio) if limits.ppl_two_sided else log_ratio
    if off > log_limit:
        verb = "changed" if limits.ppl_two_sided else "rose"
        bound = "±" if limits.ppl_two_sided else ""
        failures[PPL_RATIO] = (
            f"perplexity {verb} {change_pct:+.2f}% against the {reference} ({math.exp(nll_ref.mean()):.3f} → "
            f"{math.exp(nll_cand.mean()):.3f}), over the limit of {bound}{applied.ppl_change_limit_pct:.2f}%"
        )
    return TeacherForced(
        reference=reference,
        tokens=n,
        kl_mean=round(kl_mean, 6),
        kl_mean_se=round(kl_se, 6),
        kl_p99=round(float(np.quantile(kl, 0.99)), 6),
        kl_max=round(float(kl.max()), 6),
        top_token_match=round(top, 6),
        ppl_reference=round(math.exp(float(nll_ref.mean())), 4),
        ppl_candidate=round(math.exp(float(nll_cand.mean())), 4),
        ppl_ratio=round(ratio, 6),
        log_ppl_ratio_se=round(log_se, 6),
        limits=applied,
        passed=not failures,
        failures=failures,
    )
