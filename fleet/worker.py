"""The fleet's single writer: one thread that applies MQTT messages, runs commands and ticks the rollout
engine, each batch in one transaction, and publishes desired states only after the commit (the database
is the truth the broker is made to match).

Its inbox is a ``WorkQueue``, one explicit object between the producers (the MQTT bridge, the REST API,
the dashboard) and the worker, so priorities (commands and reported state ahead of telemetry) can be
added there without touching either side. What a message does is ``fleet/ingest.py``'s business,
behind the ``Ingest`` callable; what a tick does is the service's (``Tick``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from .bridge import RECONNECTED, Inbound
from .commands.base import CommandResult

log = logging.getLogger(__name__)

BATCH_LIMIT = 500

Ingest = Callable[[Session, Sequence[Inbound]], None]  # apply MQTT messages (idempotent)
Tick = Callable[[Session], set[str]]  # periodic work; returns devices whose desired state changed
Publish = Callable[[Session, set[str] | None], None]  # publish these devices' desired states (None: all)


@dataclass
class CommandCall:
    """A command waiting for the worker; ``run`` gets the worker's session, the caller waits on ``future``."""

    name: str
    run: Callable[[Session], CommandResult[Any]]
    future: concurrent.futures.Future[CommandResult[Any]] = field(default_factory=concurrent.futures.Future)


Item = Inbound | CommandCall


def describe(item: Item) -> str:
    return f"MQTT message on {item.topic}" if isinstance(item, Inbound) else f"command {item.name}"


class WorkQueue:
    """The worker's inbox: one FIFO of MQTT messages and commands, in arrival order."""

    def __init__(self) -> None:
        self._q: queue.Queue[Item] = queue.Queue()

    def put_message(self, msg: Inbound) -> None:
        self._q.put(msg)

    def put_command(self, call: CommandCall) -> None:
        self._q.put(call)

    def get_batch(self, timeout: float, limit: int = BATCH_LIMIT) -> list[Item]:
        """Up to ``limit`` items; waits up to ``timeout`` for the first (empty list: none came)."""
        try:
            batch = [self._q.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < limit:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def qsize(self) -> int:
        return self._q.qsize()


class Worker:
    def __init__(
        self,
        inbox: WorkQueue,
        sessions: sessionmaker,
        *,
        ingest: Ingest,
        tick: Tick,
        publish: Publish,
        tick_s: float,
    ) -> None:
        self.inbox = inbox
        self.sessions = sessions
        self.ingest, self.tick, self.publish = ingest, tick, publish
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="fleet-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            batch = self.inbox.get_batch(self.tick_s)
            # The rollout engine runs at most every tick_s however busy MQTT is (commands that need a
            # tick, like apply, run it themselves).
            tick = time.monotonic() - last_tick >= self.tick_s
            if not batch and not tick:
                continue
            try:
                self._process(batch, tick=tick)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("fleet worker batch failed; retrying its items one by one")
                self._retry_one_by_one(batch)
            if tick:
                last_tick = time.monotonic()

    def _retry_one_by_one(self, batch: list[Item]) -> None:
        # One poison message must not take the rest of its batch down with it.
        for item in batch:
            try:
                self._process([item], tick=False)
            except Exception as exc:  # noqa: BLE001
                log.error("dropped %s after an error: %s", describe(item), exc)
                if isinstance(item, CommandCall) and not item.future.done():
                    item.future.set_exception(exc)
        time.sleep(0.2)

    def _process(self, batch: list[Item], *, tick: bool) -> None:
        changed: set[str] = set()
        republish = False
        done: list[tuple[CommandCall, CommandResult[Any] | None, BaseException | None]] = []
        with self.sessions() as session:
            messages: list[Inbound] = []
            for item in batch:
                if isinstance(item, Inbound) and item.topic != RECONNECTED:
                    messages.append(item)  # consecutive messages go to ingest together, in order
                    continue
                if messages:
                    self.ingest(session, messages)
                    messages = []
                if isinstance(item, CommandCall):
                    result, exc = self._run_command(session, item)
                    if result is not None:
                        changed |= result.changed_devices
                    done.append((item, result, exc))
                else:
                    republish = True
            if messages:
                self.ingest(session, messages)
            if tick:
                changed |= self.tick(session)
            session.commit()
            if republish:
                self.publish(session, None)
            elif changed:
                self.publish(session, changed)
        for call, result, exc in done:
            if exc is not None:
                call.future.set_exception(exc)
                continue
            assert result is not None
            for effect in result.after_commit:
                try:
                    effect()
                except Exception:  # noqa: BLE001 - committed already; the effect is best effort
                    log.exception("after-commit work of command %s failed", call.name)
            call.future.set_result(result)

    @staticmethod
    def _run_command(
        session: Session, call: CommandCall
    ) -> tuple[CommandResult[Any] | None, BaseException | None]:
        # Each command in its own savepoint: one failing command rolls back only itself.
        try:
            with session.begin_nested():
                return call.run(session), None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            return None, exc
