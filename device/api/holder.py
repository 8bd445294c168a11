"""ModelHolder: the engine currently served, swapped without dropping requests.

Each request leases the engine at the moment it starts generating; ``swap`` points new leases at the new
engine at once, waits until every lease on the old one is returned (in-flight requests and streams finish
on the old engine), then closes the old engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from device.engine import Engine

from .stats import ServingStats


class NoModelError(RuntimeError):
    """No engine is loaded (before the first activation)."""


class DrainTimeoutError(TimeoutError):
    """The old engine still had requests in flight when the drain timeout passed."""


class ModelHolder:
    def __init__(self, engine: Engine | None = None, stats: ServingStats | None = None) -> None:
        self._cond = threading.Condition()
        self._engine = engine
        self._leases: dict[int, int] = {}  # id(engine) -> requests in flight on it
        self.stats = stats or ServingStats()
        self.swaps = 0

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def ready(self) -> bool:
        e = self._engine
        return e is not None and not e.closed

    def in_flight(self, engine: Engine | None = None) -> int:
        with self._cond:
            if engine is None:
                return sum(self._leases.values())
            return self._leases.get(id(engine), 0)

    @contextmanager
    def lease(self) -> Iterator[Engine]:
        """Hold the current engine for the length of one request."""
        with self._cond:
            engine = self._engine
            if engine is None or engine.closed:
                raise NoModelError("no model is loaded")
            self._leases[id(engine)] = self._leases.get(id(engine), 0) + 1
        try:
            yield engine
        finally:
            with self._cond:
                n = self._leases[id(engine)] - 1
                if n:
                    self._leases[id(engine)] = n
                else:
                    del self._leases[id(engine)]
                self._cond.notify_all()

    def swap(
        self, new_engine: Engine | None, drain_timeout: float | None = None, close_old: bool = True
    ) -> None:
        """Serve ``new_engine`` from now on; drain and close the old one.

        Returns after the old engine is closed. On ``DrainTimeoutError`` the new engine is already serving
        and the old one is left open (its stragglers keep running); call ``swap`` again or close it later."""
        with self._cond:
            old = self._engine
            self._engine = new_engine
            self.swaps += 1
            if old is None or old is new_engine:
                return old
            deadline = None if drain_timeout is None else time.monotonic() + drain_timeout
            while self._leases.get(id(old), 0):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DrainTimeoutError(
                        f"{self._leases.get(id(old), 0)} request(s) still running on the old model"
                    )
                self._cond.wait(left)
        if close_old:
            old.close()
        return old

    def close(self, drain_timeout: float | None = None) -> None:
        """Stop serving: drain and close the current engine."""
        self.swap(None, drain_timeout=drain_timeout)
