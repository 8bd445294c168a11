"""Token choice from one row of logits: repetition penalty -> temperature -> top-k -> top-p -> draw."""

from __future__ import annotations

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
        x = logits.astype(np.float64) / p.temperature  # [vocab]
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
