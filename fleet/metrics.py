"""Prometheus metrics of the fleet service, served at ``GET /metrics`` (text exposition format).

Every label has a small fixed set of values (a topic kind, a drop reason, a route template, a status
code): no device id, user name or URL ever becomes a label, so an attacker cannot grow the series.
The worker queue depth is read live from each running service (a collector), so the worker and its
queue need no metrics code of their own.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MESSAGES_IN = Counter(
    "nanofleet_mqtt_messages", "MQTT messages from devices, by topic kind (invalid: not a device topic)", ["kind"]
)
DROPPED = Counter("nanofleet_mqtt_dropped", "MQTT messages dropped at ingest, by reason", ["reason"])
REFUSED_LOGINS = Counter("nanofleet_mqtt_refused_logins", "Embedded broker: refused MQTT logins, by reason", ["reason"])
ACL_DENIED = Counter("nanofleet_mqtt_acl_denied", "Embedded broker: topic ACL refusals, by action", ["action"])
INGEST_LAG = Histogram(
    "nanofleet_ingest_lag_seconds",
    "From the bridge receiving an MQTT message to ingest handling it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
COMMIT_LAG = Histogram(
    "nanofleet_ingest_commit_lag_seconds",
    "From a device sending a telemetry sample (its ts) to the fleet committing it",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300),
)
ROLLOUT_TICKS = Counter("nanofleet_rollout_ticks", "Rollout engine ticks run")
API_LATENCY = Histogram(
    "nanofleet_api_request_duration_seconds",
    "HTTP requests, by method, route template and status code",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def message_in(kind: str) -> None:
    MESSAGES_IN.labels(kind=kind).inc()


def message_dropped(reason: str) -> None:
    DROPPED.labels(reason=reason).inc()


def login_refused(reason: str) -> None:
    REFUSED_LOGINS.labels(reason=reason).inc()


def acl_denied(action: str) -> None:
    ACL_DENIED.labels(action=action).inc()


def observe_ingest_lag(seconds: float) -> None:
    INGEST_LAG.observe(seconds)


def observe_commit_lag(seconds: float) -> None:
    COMMIT_LAG.observe(seconds)


def rollout_tick() -> None:
    ROLLOUT_TICKS.inc()


class _Queue(Protocol):
    def qsize(self) -> int: ...


class _QueueDepth(Collector):
    """Items waiting for the worker, summed over the services running in this process."""

    def __init__(self) -> None:
        self._queues: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, q: _Queue) -> None:
        with self._lock:
            self._queues.add(q)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            depth = sum(q.qsize() for q in list(self._queues))
        yield GaugeMetricFamily("nanofleet_worker_queue_depth", "Items waiting for the fleet worker", value=depth)


_QUEUE_DEPTH = _QueueDepth()
REGISTRY.register(_QUEUE_DEPTH)


def watch_queue(q: _Queue) -> None:
    """Report this worker queue's depth (held weakly: a stopped service drops out)."""
    _QUEUE_DEPTH.add(q)


def exposition() -> tuple[bytes, str]:
    """The metrics page: (body, content type)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class LatencyMiddleware:
    """Times every HTTP request; the route label is the matched route's template (``/api/v1/devices/{id}``),
    ``unmatched`` otherwise, so paths an attacker makes up never become series."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            API_LATENCY.labels(method if method in _METHODS else "other", template, str(status["code"])).observe(
                time.perf_counter() - start
            )


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def install(app: Any) -> None:
    """Mount ``GET /metrics`` and the request timer on a FastAPI app (before its first request)."""
    @app.get(
        "/metrics",
        tags=["service"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    )
    def prometheus_metrics() -> Response:
        """Prometheus metrics: MQTT messages in by kind, drops by reason, refused logins, ingest lag, worker
        queue depth, rollout ticks, API latency. No authentication (no identifiers in it); restrict it
        at the reverse proxy if the API is public."""
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    app.add_middleware(LatencyMiddleware)
