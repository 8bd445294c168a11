"""Serving statistics shared by /metrics and the agent's telemetry (``holder.stats.snapshot()``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    ttft_s: float | None  # time from admission to the first token (None: no token was produced)
    prompt_tokens: int
    completion_tokens: int
    decode_s: float  # time from the first token to the last
    ok: bool


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class ServingStats:
    """Thread-safe counters plus a rolling window of the last ``window`` requests for rates/percentiles."""

    def __init__(self, window: int = 256) -> None:
        self._lock = threading.Lock()
        self._window: deque[RequestRecord] = deque(maxlen=window)
        self.started_at = time.time()
        self.requests = 0
        self.errors = 0
        self.rejected = 0  # queue full
        self.tokens_in = 0
        self.tokens_out = 0
        self.queue_depth = 0  # waiting for a generation slot
        self.in_flight = 0  # generating now

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 0 if rec.ok else 1
            self.tokens_in += rec.prompt_tokens
            self.tokens_out += rec.completion_tokens
            self._window.append(rec)

    def record_error(self) -> None:
        """A request that failed before generating (bad params, unknown model...)."""
        with self._lock:
            self.requests += 1
            self.errors += 1

    def record_rejected(self) -> None:
        with self._lock:
            self.requests += 1
            self.rejected += 1

    def adjust(self, queue: int = 0, in_flight: int = 0) -> None:
        with self._lock:
            self.queue_depth += queue
            self.in_flight += in_flight

    def reset(self) -> None:
        """Forget the rolling window (e.g. after a model swap, to judge the new model alone)."""
        with self._lock:
            self._window.clear()

    def __call__(self) -> dict[str, Any]:
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Counters plus rates over the rolling window: requests, errors, rejected, tokens_in, tokens_out,
        queue_depth, in_flight, uptime_s, ttft_p50_ms, ttft_p95_ms, decode_tok_s, window_requests."""
        with self._lock:
            recs = list(self._window)
            out: dict[str, Any] = {
                "requests": self.requests,
                "errors": self.errors,
                "rejected": self.rejected,
                "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out,
                "queue_depth": self.queue_depth,
                "in_flight": self.in_flight,
                "uptime_s": round(time.time() - self.started_at, 3),
            }
        ttfts = sorted(r.ttft_s for r in recs if r.ttft_s is not None)
        dec_tokens = sum(max(r.completion_tokens - 1, 0) for r in recs if r.ttft_s is not None)
        dec_time = sum(r.decode_s for r in recs if r.ttft_s is not None)
        p50, p95 = _percentile(ttfts, 0.5), _percentile(ttfts, 0.95)
        out["ttft_p50_ms"] = None if p50 is None else round(p50 * 1000, 2)
        out["ttft_p95_ms"] = None if p95 is None else round(p95 * 1000, 2)
        out["decode_tok_s"] = round(dec_tokens / dec_time, 2) if dec_time > 0 else None
        out["window_requests"] = len(recs)
        return out
