"""Progress for long work: rich bars/spinners on stderr for people, nothing for --json or tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Reporter:
    """Named steps with wall times. ``step`` yields a ``tick`` callback that advances the step's bar."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None

    def __enter__(self) -> Reporter:
        if self.enabled:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    @contextmanager
    def step(self, key: str, description: str, total: int | None = 1) -> Iterator[Callable[[], None]]:
        t0 = time.perf_counter()
        task = self._progress.add_task(description, total=total) if self._progress else None

        def tick() -> None:
            if self._progress is not None and task is not None:
                self._progress.advance(task)

        try:
            yield tick
        finally:
            self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - t0, 2)
            if self._progress is not None and task is not None:
                self._progress.update(task, completed=total or 1, total=total or 1)
