"""Token choice from one row of logits: repetition penalty -> temperature -> top-k -> top-p -> draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .options import SamplingParams


class Sampler:
    """Per-request sampler; owns the random generator so a seed reproduces a whole generation."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        # logits: [vocab] float32 (a view the caller may not reuse afterwards); seen: [n] int64 token ids
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None and seen.size:
            logits = logits.copy()
            ids = np.unique(seen)
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        # A grammar mask leaves -inf on the tokens it forbids: draw among the rest only (the same
        # distribution, without exp/argsort over the whole vocabulary each step).
        keep = np.flatnonzero(logits != -np.inf) if logits.min() == -np.inf else None  # [k] token ids
        if keep is not None:
            return int(keep[self._draw(logits[keep])])
        return self._draw(logits)

    def _draw(self, logits: np.ndarray) -> int:
        # logits: [n] with no -inf; returns an index into it
        p = self.params
        x = logits.astype(np.float64) / p.temperature  # [n]
        if p.top_k and p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x)
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")  # [vocab]
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            keep = order[:cut]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


class Constraint(Protocol):
    """A per-request filter on the next token (``constraints.GrammarConstraint`` is the one we ship).

    The engine calls ``mask`` on each step's logits before sampling (forbidden tokens come back as -inf;
    the sampler's temperature, top-k and top-p then work on what is left) and ``advance`` with the token
    chosen; ``advance`` returns False once nothing but EOS may follow, which ends the generation."""

    def mask(self, logits: np.ndarray) -> np.ndarray: ...

    def advance(self, token_id: int) -> bool: ...


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a chosen token and of the ``top`` most likely tokens at that step:
    log-softmax of the raw logits, before the grammar mask, repetition penalty and temperature (what
    OpenAI and vLLM report by default)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    # logits: [vocab] float32, the model's own
    x = logits.astype(np.float64)
    mx = float(x.max())
    lse = mx + math.log(float(np.exp(x - mx).sum()))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, x.shape[0])
        ids = np.argpartition(-x, k - 1)[:k]  # [k] unordered
        ids = ids[np.argsort(-x[ids], kind="stable")]
        best = tuple((int(i), float(x[i] - lse)) for i in ids)
    return TokenLogprob(token_id, float(x[token_id] - lse), best)
