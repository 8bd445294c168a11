"""Which fleet server runs the rollout engine: a lease on the database.

Any number of ``fleet serve`` processes may share one PostgreSQL database; each serves the API, the
dashboard and artifacts, and ingests its share of MQTT messages, but only the holder of the rollout lease
ticks the rollout engine (and compacts telemetry), so desired states are decided once.

- ``PostgresLease``: a session-level advisory lock (``pg_try_advisory_lock``) held on one dedicated
  connection. The leader's rollout ticks run *on that connection*, so a server that lost the lock (its
  connection broke) cannot tick by mistake: its statements fail with the connection. When the holder
  dies, even by SIGKILL, the kernel closes its socket, PostgreSQL ends its session and frees the lock,
  and the next server to poll (``cluster.lease_poll_s``) takes it. The same connection holds a second
  lock named after the server's node id, which says "this node is alive": the leader drains the broker
  sessions of nodes whose lock is free (``nodes``), so messages a dead server's session holds are not
  stranded.
- ``LocalLease``: SQLite means one server; it always leads.

Lock keys are derived from the schema's name, so fleets in different schemas of one database (the test
suite) never contend.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from sqlalchemy import delete, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from .db import FleetNode, utcnow

log = logging.getLogger(__name__)


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for these names."""
    digest = hashlib.sha256("\x1f".join(("nanofleet", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Lease(Protocol):
    node_id: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_leader(self) -> bool: ...

    def leader_session(self) -> contextlib.AbstractContextManager[Session | None]: ...


class LocalLease:
    """One server per database (SQLite): always the leader."""

    def __init__(self, sessions: sessionmaker, node_id: str) -> None:
        self.sessions = sessions
        self.node_id = node_id
        self.on_acquired: Callable[[], None] | None = None

    def start(self) -> None:
        if self.on_acquired is not None:
            self.on_acquired()

    def stop(self) -> None:
        pass

    def is_leader(self) -> bool:
        return True

    @contextlib.contextmanager
    def leader_session(self) -> Iterator[Session | None]:
        with self.sessions() as s:
            yield s


class PostgresLease:
    """The rollout lease as a PostgreSQL advisory lock (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        node_id: str,
        *,
        schema: str | None,
        client_ids: list[str],
        poll_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.schema = schema or "public"
        self.client_ids = client_ids
        self.poll_s = poll_s
        self.leader_key = lock_key("leader", self.schema)
        self.on_acquired: Callable[[], None] | None = None  # e.g. republish every desired state
        self.on_lost: Callable[[], None] | None = None
        self.acquired_at: dt.datetime | None = None
        self._conn: Connection | None = None
        self._leader = False
        self._lock = threading.RLock()  # the connection is shared by the poller and the worker's ticks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._connect()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="fleet-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()  # ends the database session: both locks are freed at once
                except DBAPIError:
                    pass
            self._conn, self._leader = None, False

    def is_leader(self) -> bool:
        return self._leader

    # the leader's transactions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def leader_session(self) -> Iterator[Session | None]:
        with self._lock:
            if not self._leader or self._conn is None:
                yield None
                return
            session = Session(bind=self._conn, expire_on_commit=False, join_transaction_mode="rollback_only")
            try:
                yield session
            except DBAPIError:
                self._drop("the lease connection failed")
                raise
            finally:
                session.close()
                if self._conn is not None and self._conn.in_transaction():
                    self._conn.rollback()

    # node registry ---------------------------------------------------------------------------------
    def dead_nodes(self) -> list[FleetNode]:
        """Nodes registered in this schema whose liveness lock nobody holds (they are gone)."""
        with self.engine.connect() as conn, Session(bind=conn) as s:
            nodes = s.scalars(select(FleetNode).where(FleetNode.id != self.node_id)).all()
            s.expunge_all()
        dead = []
        with self._lock:
            if self._conn is None:
                return []
            for n in nodes:
                key = lock_key("node", self.schema, n.id)
                if self._conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
                    self._conn.commit()
                    dead.append(n)
        return dead

    def forget_node(self, node: FleetNode) -> None:
        """After its sessions are drained: drop the node's row and its liveness lock (held since
        ``dead_nodes``, so the node cannot come back half-way through)."""
        with self._lock:
            if self._conn is None:
                return
            self._conn.execute(delete(FleetNode).where(FleetNode.id == node.id))
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key("node", self.schema, node.id)})
            self._conn.commit()

    def release_node(self, node: FleetNode) -> None:
        """Give back a dead node's liveness lock without forgetting it (its drain failed; retried later)."""
        with self._lock:
            if self._conn is not None:
                self._conn.execute(
                    text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key("node", self.schema, node.id)}
                )
                self._conn.commit()

    # internals ---------------------------------------------------------------------------------------
    def _connect(self) -> None:
        """A dedicated connection, this node's liveness lock on it (waiting while a drainer holds it),
        and this node's row."""
        with self._lock:
            conn = self.engine.connect()
            key = lock_key("node", self.schema, self.node_id)
            while not conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
                conn.commit()
                log.info("node %s: its broker sessions are being drained by the leader; waiting", self.node_id)
                if self._stop.wait(self.poll_s):
                    conn.close()
                    return
            conn.commit()
            now = utcnow()
            row = {"id": self.node_id, "client_ids": self.client_ids, "started_at": now, "heartbeat_at": now}
            conn.execute(delete(FleetNode).where(FleetNode.id == self.node_id))
            conn.execute(FleetNode.__table__.insert().values(**row))
            conn.commit()
            self._conn = conn

    def _poll(self) -> None:
        while not self._stop.wait(0 if self._conn is None else self.poll_s):
            try:
                self._poll_once()
            except DBAPIError as exc:
                self._drop(f"database error: {exc.__class__.__name__}")
                self._stop.wait(self.poll_s)
            except Exception:  # noqa: BLE001 - the lease thread must survive
                log.exception("lease poll failed")

    def _poll_once(self) -> None:
        if self._conn is None:
            self._connect()
        acquired = False
        with self._lock:
            if self._conn is None:
                return
            if self._leader:
                self._conn.scalar(text("SELECT 1"))  # still connected, so still holding it
            else:
                acquired = bool(self._conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.leader_key}))
            self._conn.execute(
                FleetNode.__table__.update().where(FleetNode.id == self.node_id).values(heartbeat_at=utcnow())
            )
            self._conn.commit()
            if acquired:
                self._leader, self.acquired_at = True, utcnow()
        if acquired:
            log.info("node %s holds the rollout lease", self.node_id)
            if self.on_acquired is not None:
                self.on_acquired()

    def _drop(self, why: str) -> None:
        with self._lock:
            was = self._leader
            self._leader = False
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.invalidate()
                    self._conn.close()
            self._conn = None
        if was:
            log.warning("node %s lost the rollout lease (%s)", self.node_id, why)
            if self.on_lost is not None:
                self.on_lost()
