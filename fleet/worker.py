"""The fleet's single writer: one thread that applies MQTT messages, runs commands and ticks the rollout
engine, and publishes desired states only after the commit (the database is the truth the broker is made
to match).

Its inbox is a ``WorkQueue`` with three lanes, taken in this order for every batch:

1. commands (REST API, dashboard, offline media) and control items (a reconnect's republish);
2. state messages from devices (reported, status, events): what the rollout engine waits on;
3. telemetry, the bulk.

A telemetry flood therefore never delays a command or a device's result. The message lanes are bounded:
a producer (the MQTT bridge's network thread) waits for room, which stops it reading from the broker,
which then holds the backlog (the bridge also caps unacknowledged messages per connection). A message is
acknowledged to the broker only once the transaction that applied it is committed (``Inbound.ack``), so a
crash at any point loses nothing the broker was told is safe: it redelivers, and ingest is idempotent.

Rollout ticks run in a transaction of their own, only while this server holds the rollout lease
(``fleet/lease.py``), so a long tick never holds device rows that ingest needs, and two servers never
tick at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .bridge import RECONNECTED, Inbound
from .commands.base import CommandResult
from .errors import ServiceUnavailableError

log = logging.getLogger(__name__)

BATCH_LIMIT = 1000
LANE_LIMIT = 20_000  # messages per lane before producers wait

Ingest = Callable[[Session, Sequence[Inbound]], object]  # apply MQTT messages (idempotent)
Tick = Callable[[Session], set[str]]  # periodic work; returns devices whose desired state changed
Publish = Callable[[Session, set[str] | None], None]  # publish these devices' desired states (None: all)
Committed = Callable[[list[object]], None]  # told what ingest reported, once its batch is committed
# A session for leader-only work (rollout ticks), or None while another server holds the lease.
LeaderSession = Callable[[], contextlib.AbstractContextManager[Session | None]]


@dataclass
class CommandCall:
    """A command waiting for the worker; ``run`` gets the worker's session, the caller waits on ``future``."""

    name: str
    run: Callable[[Session], CommandResult[Any]]
    future: concurrent.futures.Future[CommandResult[Any]] = field(default_factory=concurrent.futures.Future)


Item = Inbound | CommandCall


class Lane(enum.IntEnum):
    COMMANDS = 0
    STATE = 1
    TELEMETRY = 2


def lane_of(item: Item) -> Lane:
    if isinstance(item, CommandCall) or item.topic == RECONNECTED:
        return Lane.COMMANDS
    return Lane.TELEMETRY if item.topic.endswith("/telemetry") else Lane.STATE


def describe(item: Item) -> str:
    return f"MQTT message on {item.topic}" if isinstance(item, Inbound) else f"command {item.name}"


class WorkQueue:
    """The worker's inbox: commands, then device state, then telemetry; FIFO within each lane."""

    def __init__(self, lane_limit: int = LANE_LIMIT) -> None:
        self.lane_limit = lane_limit
        self._lanes: tuple[deque[Item], deque[Item], deque[Item]] = (deque(), deque(), deque())
        self._cond = threading.Condition()
        self._closed = False

    def put_command(self, call: CommandCall) -> None:
        with self._cond:
            if self._closed:
                raise ServiceUnavailableError("the fleet service is shutting down; retry on another server")
            self._lanes[Lane.COMMANDS].append(call)
            self._cond.notify_all()

    def put_message(self, msg: Inbound) -> bool:
        """Queue one message; waits while its lane is full (back-pressure). False once closed."""
        lane = self._lanes[lane_of(msg)]
        with self._cond:
            while len(lane) >= self.lane_limit and lane_of(msg) is not Lane.COMMANDS and not self._closed:
                self._cond.wait(0.5)
            if self._closed:
                return False
            lane.append(msg)
            self._cond.notify_all()
            return True

    def put_back(self, batch: list[Item]) -> None:
        """Return a batch that could not be applied to the front of its lanes, in its order."""
        with self._cond:
            for item in reversed(batch):
                self._lanes[lane_of(item)].appendleft(item)
            self._cond.notify_all()

    def get_batch(self, timeout: float, limit: int = BATCH_LIMIT) -> list[Item]:
        """Up to ``limit`` items, higher lanes first; waits up to ``timeout`` for the first."""
        with self._cond:
            if not any(self._lanes):
                self._cond.wait(timeout)
            batch: list[Item] = []
            for lane in self._lanes:
                while lane and len(batch) < limit:
                    batch.append(lane.popleft())
            if batch:
                self._cond.notify_all()  # room for waiting producers
            return batch

    def close(self) -> list[Item]:
        """Refuse anything new; returns what was still waiting (its messages stay unacknowledged)."""
        with self._cond:
            self._closed = True
            left = [item for lane in self._lanes for item in lane]
            for lane in self._lanes:
                lane.clear()
            self._cond.notify_all()
            return left

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    def qsize(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    def depths(self) -> dict[str, int]:
        return {lane.name.lower(): len(self._lanes[lane]) for lane in Lane}


def _transient(exc: BaseException) -> bool:
    """The database is unreachable, restarting, or chose this transaction as a deadlock victim: the
    batch itself is fine and must be applied later, not dropped."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _claim(call: CommandCall) -> bool:
    """Mark a command as running; False when its caller gave up on it first (cancelled)."""
    return call.future.running() or call.future.set_running_or_notify_cancel()


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
        leader_session: LeaderSession | None = None,
        committed: Committed | None = None,
        batch_limit: int = BATCH_LIMIT,
    ) -> None:
        self.inbox = inbox
        self.batch_limit = batch_limit
        self.sessions = sessions
        self.ingest, self.tick, self.publish = ingest, tick, publish
        self.tick_s = tick_s
        self.committed = committed

        @contextlib.contextmanager
        def local_leader() -> Iterator[Session | None]:
            with sessions() as s:
                yield s

        self.leader_session: LeaderSession = leader_session or local_leader
        self.last_tick_s = 0.0  # how long the last tick took (the status page shows it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = 0.0

    def start(self) -> None:
        self._stop.clear()
        self.inbox.reopen()
        self._thread = threading.Thread(target=self._work, name="fleet-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, then stop. Messages still queued stay unacknowledged (the broker
        redelivers them); commands still queued fail with 503."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for item in self.inbox.close():
            if isinstance(item, CommandCall) and not item.future.done():
                item.future.set_exception(ServiceUnavailableError("the fleet service stopped before running it"))

    def _work(self) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            wait = max(0.0, min(self.tick_s, last_tick + self.tick_s - time.monotonic()))
            batch = self.inbox.get_batch(wait, self.batch_limit)
            if batch:
                self._apply(batch)
            # The rollout engine runs every tick_s however busy MQTT is, in its own transaction.
            if time.monotonic() - last_tick >= self.tick_s and not self._stop.is_set():
                self._tick_once()
                last_tick = time.monotonic()

    def _apply(self, batch: list[Item]) -> None:
        try:
            self._process(batch)
            self._backoff = 0.0
        except Exception as exc:  # noqa: BLE001 - the worker must survive anything
            if _transient(exc):
                self._backoff = min(5.0, max(0.2, self._backoff * 2))
                log.warning("fleet worker batch not applied (%s); retrying in %.1fs", exc.__class__.__name__,
                            self._backoff)
                self.inbox.put_back(batch)
                self._stop.wait(self._backoff)
                return
            log.exception("fleet worker batch failed; retrying its items one by one")
            self._retry_one_by_one(batch)

    def _tick_once(self) -> None:
        start = time.monotonic()
        try:
            with self.leader_session() as session:
                if session is None:
                    return
                changed = self.tick(session)
                session.commit()
                if changed:
                    self.publish(session, changed)
        except Exception:  # noqa: BLE001 - retried next tick (the engine keeps no state of its own)
            log.exception("rollout tick failed")
        finally:
            self.last_tick_s = time.monotonic() - start

    def _retry_one_by_one(self, batch: list[Item]) -> None:
        # One poison message must not take the rest of its batch down with it.
        for item in batch:
            try:
                self._process([item])
            except Exception as exc:  # noqa: BLE001
                if _transient(exc):
                    self.inbox.put_back([item])
                    continue
                log.error("dropped %s after an error: %s", describe(item), exc)
                if isinstance(item, CommandCall) and not item.future.done():
                    item.future.set_exception(exc)
                elif isinstance(item, Inbound) and item.ack is not None:
                    item.ack()  # refused for good: redelivering it would fail the same way

    def _process(self, batch: list[Item]) -> None:
        changed: set[str] = set()
        republish = False
        done: list[tuple[CommandCall, CommandResult[Any] | None, BaseException | None]] = []
        reports: list[object] = []
        messages: list[Inbound] = []
        with self.sessions() as session:
            pending: list[Inbound] = []
            for item in batch:
                if isinstance(item, Inbound) and item.topic != RECONNECTED:
                    pending.append(item)  # consecutive messages go to ingest together
                    messages.append(item)
                    continue
                if pending:
                    reports.append(self.ingest(session, pending))
                    pending = []
                if isinstance(item, CommandCall):
                    # A caller that gave up (timed out) cancelled it: it must not run behind their back.
                    if not _claim(item):
                        continue
                    result, exc = self._run_command(session, item)
                    if result is not None:
                        changed |= result.changed_devices
                    done.append((item, result, exc))
                else:
                    republish = True
            if pending:
                reports.append(self.ingest(session, pending))
            session.commit()
            # Committed: now, and only now, the broker may forget these messages.
            for m in messages:
                if m.ack is not None:
                    m.ack()
            if reports and self.committed is not None:
                self.committed(reports)
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
