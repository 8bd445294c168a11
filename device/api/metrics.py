"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .holder import ModelHolder

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, holder: ModelHolder) -> None:
        self.holder = holder
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "nanofleet_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("nanofleet_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("nanofleet_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "nanofleet_ttft_seconds",
            "Time to first token (from generation start)",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "nanofleet_decode_seconds_per_token",
            "Mean decode time per output token of each request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "nanofleet_decode_seconds",
            "Decode time of each request (first to last token)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.errors = Counter("nanofleet_errors", "Failed requests by kind", ["kind"], registry=r)
        queue = Gauge("nanofleet_queue_depth", "Requests waiting for a generation slot", registry=r)
        queue.set_function(lambda: holder.stats.queue_depth)
        in_flight = Gauge("nanofleet_in_flight", "Generations running now", registry=r)
        in_flight.set_function(lambda: holder.stats.in_flight)
        self.model_info = Gauge(
            "nanofleet_model_info", "The model served (value 1)", ["name", "version"], registry=r
        )

    def render(self) -> bytes:
        self.model_info.clear()
        engine = self.holder.engine
        if engine is not None:
            self.model_info.labels(name=engine.name, version=str(engine.version or "")).set(1)
        return generate_latest(self.registry)


ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics"}
)


class StatusMiddleware:
    """Counts every HTTP response by endpoint and status (pure ASGI: streaming stays intact)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
