"""What every command is: a function ``(ctx, ...inputs) -> CommandResult[T]`` that the service's single
worker runs in its transaction (``FleetService.execute``). A command changes state only through
``ctx.session`` and returns plain, typed data: the session is gone when its caller reads the result.
Side effects outside the database (publishing desired states, deleting blob files) happen after the
commit, from what the result names."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from ..env import FleetEnv

T = TypeVar("T")


@dataclass(frozen=True)
class CommandContext:
    session: Session
    now: dt.datetime
    env: FleetEnv


@dataclass(frozen=True)
class CommandResult(Generic[T]):
    value: T
    # Devices whose desired state the command changed: the worker publishes them after the commit.
    changed_devices: frozenset[str] = frozenset()
    # Work outside the database that must happen only once the transaction is committed.
    after_commit: tuple[Callable[[], None], ...] = field(default=())
